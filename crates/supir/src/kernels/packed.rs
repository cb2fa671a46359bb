//! The linear layers' GEMM with the weight packed once at load: `y[m×n] = x[m×k] · Wᵀ + b`,
//! `W [n×k]` as `torch.nn.Linear` stores it.
//!
//! A BLAS packs both operands on every call; for the UNet's 16x16 level (`m` = 512 tokens of
//! the CFG batch, `W` 1280x1280 to 1280x10240) re-packing the weight costs about a tenth of the
//! product. Here `W` is laid out once in micro-panels of [`NR`] columns of `Wᵀ` (`[k][NR]`,
//! zero-padded past `n`), and a call reads the activations where they lie.
//!
//! Loops as in BLIS (Goto's algorithm): the output is cut into `mc x nc` blocks run as rayon
//! tasks; each walks `k` in steps of [`KC`] and runs the `MR x NR` micro-kernel (24 AVX-512
//! accumulators) over `MR x KC` slices of `x`, read in place (a slice stays in L1 across the
//! `nc / NR` panels; copied out first only where its rows would alias in L1), and the weight block (`KC x nc`, streamed through L2). Each
//! output element is summed over `k` in order by one task, so results do not depend on the
//! thread count.
//!
//! Needs AVX-512F ([`available`]); elsewhere the layers keep the BLAS path.
//! `SUPIR_PACKED=off` turns it off.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::SyncPtr;

/// Columns of `Wᵀ` per micro-panel: two 16-lane vectors.
pub const NR: usize = 32;
/// Rows of `x` per micro-kernel call (24 accumulators + 2 weight vectors + 1 broadcast).
pub const MR: usize = 12;
/// Depth of one pass over the weight block (an `MR x KC` slice of `x` is 24 KiB, in L1; 256 and
/// 768 measured the same within noise, `examples/packed_bench.rs`).
const KC: usize = 512;
/// Largest block of output rows per task.
const MC_MAX: usize = 144;
/// Largest block of output columns per task (its weight block, `KC x NC_MAX`, is 1 MiB).
const NC_MAX: usize = 512;

/// Whether this CPU runs the packed kernel (AVX-512F) and `SUPIR_PACKED` does not turn it off.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("SUPIR_PACKED")
            .map(|v| v.eq_ignore_ascii_case("off") || v == "0")
            .unwrap_or(false);
        !off && cpu_has_avx512f()
    })
}

fn cpu_has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The panels' element type: f32, or half precision kept at its own size and widened to f32
/// one `KC x nc` weight block at a time (once per block of up to [`MC_MAX`] output rows, so the
/// widening costs under 1% of the multiply-adds; the products are the f32 products of the
/// half-precision values).
#[derive(Debug)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

/// A weight element type [`PackedWeight`] keeps.
pub trait PanelElem: Copy + Default + Send + Sync {
    fn to_f32(self) -> f32;
    #[doc(hidden)]
    fn wrap(v: Vec<Self>) -> PanelsOf;
}

/// The panels of one element type (for [`PanelElem::wrap`]).
#[doc(hidden)]
pub struct PanelsOf(Panels);

impl PanelElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn wrap(v: Vec<Self>) -> PanelsOf {
        PanelsOf(Panels::F32(v))
    }
}

impl PanelElem for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn wrap(v: Vec<Self>) -> PanelsOf {
        PanelsOf(Panels::Bf16(v))
    }
}

impl PanelElem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn wrap(v: Vec<Self>) -> PanelsOf {
        PanelsOf(Panels::F16(v))
    }
}

/// `Wᵀ` (and the bias) in the micro-kernel's layout: panel `q` holds columns `q·NR ..` of
/// `Wᵀ` as `k` rows of `NR` values (f32, bf16 or f16).
#[derive(Debug)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    data: Panels,
    /// The bias padded to whole panels, or `None`.
    bias: Option<Vec<f32>>,
}

impl PackedWeight {
    /// Packs `w [n×k]` (row-major, f32, bf16 or f16, kept in that type) and an optional bias
    /// `[n]`.
    pub fn new<T: PanelElem>(w: &[T], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(w.len(), n * k, "packed: weight size");
        let panels = n.div_ceil(NR);
        let mut data = vec![T::default(); panels * k * NR];
        use rayon::prelude::*;
        data.par_chunks_mut((k * NR).max(1))
            .enumerate()
            .for_each(|(q, panel)| {
                let cols = (n - q * NR).min(NR);
                // Blocks of 64 depths keep the 32 source rows' lines in L1 while transposing.
                for p0 in (0..k).step_by(64) {
                    let p1 = (p0 + 64).min(k);
                    for j in 0..cols {
                        let row = &w[(q * NR + j) * k..][..k];
                        for p in p0..p1 {
                            panel[p * NR + j] = row[p];
                        }
                    }
                }
            });
        let bias = bias.map(|b| {
            assert_eq!(b.len(), n, "packed: bias size");
            let mut v = b.to_vec();
            v.resize(panels * NR, 0.0);
            v
        });
        Self {
            n,
            k,
            data: T::wrap(data).0,
            bias,
        }
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let data = match &self.data {
            Panels::F32(v) => 4 * v.len(),
            Panels::Bf16(v) => 2 * v.len(),
            Panels::F16(v) => 2 * v.len(),
        };
        data + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }

    /// `W [n×k]` back in its row-major layout.
    pub fn unpack_weight(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0.0f32; n * k];
        let at = |i: usize| match &self.data {
            Panels::F32(v) => v[i],
            Panels::Bf16(v) => v[i].to_f32(),
            Panels::F16(v) => v[i].to_f32(),
        };
        for (j, row) in w.chunks_mut(k.max(1)).enumerate().take(n) {
            let panel = (j / NR) * k * NR;
            for (p, v) in row.iter_mut().enumerate() {
                *v = at(panel + p * NR + j % NR);
            }
        }
        w
    }

    /// The bias as given, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref().map(|b| &b[..self.n])
    }

    /// `x [m×k] · Wᵀ + b` as a new `[m×n]` buffer. Panics unless [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let len = m * self.n;
        let mut out = Vec::<f32>::with_capacity(len);
        // SAFETY: `out` has room for m·n floats, which `run` writes completely.
        unsafe {
            self.run(x, m, out.as_mut_ptr());
            out.set_len(len);
        }
        out
    }

    /// [`matmul`](Self::matmul) into `out` (`m·n` floats, overwritten).
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(out.len(), m * self.n, "packed: output size");
        // SAFETY: `out` is a unique borrow of m·n floats.
        unsafe { self.run(x, m, out.as_mut_ptr()) }
    }

    /// Writes all `m·n` outputs at `out`.
    ///
    /// # Safety
    /// `out` must be valid for writing `m·n` floats and not overlap `x`.
    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "packed: input size");
        assert!(available(), "packed: AVX-512F kernel not available");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            let bias = self.bias();
            for i in 0..m {
                for j in 0..n {
                    *out.add(i * n + j) = bias.map_or(0.0, |b| b[j]);
                }
            }
            return;
        }
        // Blocks: `mc` rows (whole micro-panels, blocks of near-equal size), `nc` columns.
        let c = SyncPtr(out);
        super::for_each_gemm_block(
            (m, n, k),
            (MR, NR),
            (MC_MAX, NC_MAX),
            |i0, rows, j0, cols| {
                // SAFETY: blocks are disjoint `rows x cols` parts of the `m x n` output, which
                // `block` writes completely (first pass over `k` stores, later passes accumulate).
                unsafe { self.block(x, i0, rows, j0, cols, c.get().add(i0 * n + j0)) }
            },
        );
    }

    /// One output block: rows `i0 ..+rows` of `x`, columns `j0 ..+cols` (a multiple of `NR`
    /// from a panel boundary), written at `c` with row stride `n`.
    ///
    /// # Safety
    /// `c` must point at element `(i0, j0)` of an `m x n` output that this call may write.
    unsafe fn block(&self, x: &[f32], i0: usize, rows: usize, j0: usize, cols: usize, c: *mut f32) {
        thread_local! {
            static ABUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
            static WBUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        let (n, k) = (self.n, self.k);
        // Rows of `x` a multiple of 4 KiB apart fall in one L1 set (8 ways for 12 rows): such a
        // slice is copied out first, as is the last, short one. The copy's row stride is padded
        // off any power of two.
        let alias = (k * 4) % 4096 == 0;
        let panels = cols.div_ceil(NR);
        ABUF.with(|buf| {
            WBUF.with(|wbuf| {
                let mut abuf = buf.borrow_mut();
                let mut wbuf = wbuf.borrow_mut();
                let lda_buf = KC + 16;
                if abuf.len() < MR * lda_buf {
                    abuf.resize(MR * lda_buf, 0.0);
                }
                for p0 in (0..k).step_by(KC) {
                    let kc = (k - p0).min(KC);
                    let first = p0 == 0;
                    let wblock: Option<*const f32> = match &self.data {
                        Panels::F32(_) => None,
                        Panels::Bf16(d) => {
                            widen_bf16(d, &mut wbuf, panels, j0 / NR, k, p0, kc);
                            Some(wbuf.as_ptr())
                        }
                        Panels::F16(d) => {
                            use half::slice::HalfFloatSliceExt;
                            wbuf.resize(panels * KC * NR, 0.0);
                            for jp in 0..panels {
                                let from = (j0 / NR + jp) * k * NR + p0 * NR;
                                d[from..][..kc * NR]
                                    .convert_to_f32_slice(&mut wbuf[jp * kc * NR..][..kc * NR]);
                            }
                            Some(wbuf.as_ptr())
                        }
                    };
                    for ip in 0..rows.div_ceil(MR) {
                        let mr = (rows - ip * MR).min(MR);
                        let (a, lda) = if mr == MR && !alias {
                            (x.as_ptr().add((i0 + ip * MR) * k + p0), k)
                        } else {
                            for r in 0..MR {
                                let dst = &mut abuf[r * lda_buf..][..kc];
                                if r < mr {
                                    dst.copy_from_slice(&x[(i0 + ip * MR + r) * k + p0..][..kc]);
                                } else {
                                    dst.fill(0.0);
                                }
                            }
                            (abuf.as_ptr(), lda_buf)
                        };
                        for jp in 0..cols.div_ceil(NR) {
                            let j = j0 + jp * NR;
                            let b = match (&self.data, wblock) {
                                (_, Some(wb)) => wb.add(jp * kc * NR),
                                (Panels::F32(d), None) => {
                                    d.as_ptr().add((j / NR) * k * NR + p0 * NR)
                                }
                                _ => unreachable!("half panels are widened above"),
                            };
                            let bias = match (&self.bias, first) {
                                (Some(bv), true) => bv.as_ptr().add(j),
                                _ => std::ptr::null(),
                            };
                            let nr = (n - j).min(NR);
                            let cij = c.add(ip * MR * n + jp * NR);
                            kernel_12x32(kc, a, lda, b, cij, n, mr, nr, first, bias);
                        }
                    }
                }
            })
        });
    }
}

super::avx2_dispatch! {
    /// Rows `p0 ..+kc` of panels `q0 ..+panels` of bf16 `d` (panels of `k x NR`) into `out` as
    /// f32 (`kc x NR` per panel, back to back): bf16 is the high half of an f32.
    fn widen_bf16(
        d: &[half::bf16],
        out: &mut Vec<f32>,
        panels: usize,
        q0: usize,
        k: usize,
        p0: usize,
        kc: usize,
    ) {
        out.resize(panels * KC * NR, 0.0);
        for jp in 0..panels {
            let from = (q0 + jp) * k * NR + p0 * NR;
            let src = &d[from..][..kc * NR];
            for (o, s) in out[jp * kc * NR..][..kc * NR].iter_mut().zip(src) {
                *o = f32::from_bits((s.to_bits() as u32) << 16);
            }
        }
    }
}

/// `C[mr×nr] (=|+=) A·B (+ bias)` for one `MR x NR` tile: `a` is `MR` rows of `kc` floats at
/// row stride `lda`, `b` `kc` rows of `NR`; `first` stores (adding `bias` when not null)
/// instead of accumulating.
///
/// # Safety
/// AVX-512F present; `a` covers `MR x kc` at stride `lda`, `b` `kc x NR`; `c` covers `mr` rows
/// of `nr` floats at stride `ldc`; `bias`, when not null, covers `NR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_12x32(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    first: bool,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    let mut acc = [[z; 2]; MR];
    let mut b = b;
    let (a0, a4, a8) = (a, a.add(4 * lda), a.add(8 * lda));
    let rows = [
        a0,
        a0.add(lda),
        a0.add(2 * lda),
        a0.add(3 * lda),
        a4,
        a4.add(lda),
        a4.add(2 * lda),
        a4.add(3 * lda),
        a8,
        a8.add(lda),
        a8.add(2 * lda),
        a8.add(3 * lda),
    ];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        macro_rules! row {
            ($($i:literal)*) => {$(
                let ai = _mm512_set1_ps(*rows[$i].add(p));
                acc[$i][0] = _mm512_fmadd_ps(ai, b0, acc[$i][0]);
                acc[$i][1] = _mm512_fmadd_ps(ai, b1, acc[$i][1]);
            )*};
        }
        row!(0 1 2 3 4 5 6 7 8 9 10 11);
        b = b.add(NR);
    }
    let (bias0, bias1) = if bias.is_null() {
        (z, z)
    } else {
        (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)))
    };
    if nr == NR {
        for (i, acc) in acc.iter().enumerate().take(mr) {
            let ci = c.add(i * ldc);
            let (v0, v1) = if first {
                (_mm512_add_ps(acc[0], bias0), _mm512_add_ps(acc[1], bias1))
            } else {
                (
                    _mm512_add_ps(acc[0], _mm512_loadu_ps(ci)),
                    _mm512_add_ps(acc[1], _mm512_loadu_ps(ci.add(16))),
                )
            };
            _mm512_storeu_ps(ci, v0);
            _mm512_storeu_ps(ci.add(16), v1);
        }
    } else {
        let bits = (1u32 << nr) - 1;
        let (m0, m1) = ((bits & 0xffff) as __mmask16, (bits >> 16) as __mmask16);
        for (i, acc) in acc.iter().enumerate().take(mr) {
            let ci = c.add(i * ldc);
            let (v0, v1) = if first {
                (_mm512_add_ps(acc[0], bias0), _mm512_add_ps(acc[1], bias1))
            } else {
                (
                    _mm512_add_ps(acc[0], _mm512_maskz_loadu_ps(m0, ci)),
                    _mm512_add_ps(acc[1], _mm512_maskz_loadu_ps(m1, ci.add(16))),
                )
            };
            _mm512_mask_storeu_ps(ci, m0, v0);
            _mm512_mask_storeu_ps(ci.add(16), m1, v1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_12x32(
    _: usize,
    _: *const f32,
    _: usize,
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: usize,
    _: usize,
    _: bool,
    _: *const f32,
) {
    unreachable!("packed: available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise;

    fn plain(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for p in 0..k {
                    s += x[i * k + p] as f64 * w[j * k + p] as f64;
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn packed_matmul_matches_the_plain_product() {
        if !available() {
            eprintln!("packed kernel not available on this CPU; skipped");
            return;
        }
        // Edges in every dimension: m not a multiple of MR or of the row blocks, n not a
        // multiple of NR (masked columns), k across several KC passes with a tail; k = 1024 and
        // 2048 take the copied-slice path (rows 4 KiB apart).
        for (m, n, k, bias) in [
            (1, 1, 1, false),
            (13, 33, 7, true),
            (150, 70, 600, true),
            (300, 544, 300, false),
            (37, 1030, 256, true),
            (30, 64, 1024, false),
            (161, 96, 2048, true),
        ] {
            let x = test_noise(m * k, 1 + m as u64);
            let w = test_noise(n * k, 2 + n as u64);
            let b = test_noise(n, 3);
            let b = bias.then_some(&b[..]);
            let packed = PackedWeight::new(&w, n, k, b);
            assert_eq!(packed.unpack_weight(), w);
            assert_eq!(packed.bias(), b);
            let y = packed.matmul(&x, m);
            let r = plain(&x, &w, b, m, n, k);
            let tol = 1e-5 * (k as f32).sqrt() * 4.0;
            for (i, (u, v)) in y.iter().zip(&r).enumerate() {
                assert!((u - v).abs() <= tol, "{m}x{n}x{k} [{i}]: {u} vs {v}");
            }
        }
    }

    #[test]
    fn half_precision_panels_give_the_f32_product_of_their_values() {
        if !available() {
            return;
        }
        // Two depth passes and a short one, masked columns, several row blocks.
        for (m, n, k) in [(13, 33, 7), (150, 70, 1100), (300, 544, 300)] {
            let x = test_noise(m * k, 4);
            let w = test_noise(n * k, 5);
            let b = test_noise(n, 6);
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            for (packed, widened) in [
                (
                    PackedWeight::new(&wb, n, k, Some(&b)),
                    wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                ),
                (
                    PackedWeight::new(&wh, n, k, Some(&b)),
                    wh.iter().map(|v| v.to_f32()).collect(),
                ),
            ] {
                assert_eq!(
                    packed.bytes(),
                    2 * n.div_ceil(NR) * NR * k + 4 * n.div_ceil(NR) * NR
                );
                assert_eq!(packed.unpack_weight(), widened);
                // The same f32 kernel on the widened values: equal to packing them as f32.
                let want = PackedWeight::new(&widened, n, k, Some(&b)).matmul(&x, m);
                assert_eq!(packed.matmul(&x, m), want, "{m}x{n}x{k}");
            }
        }
    }

    #[test]
    fn packed_matmul_with_empty_depth_is_the_bias() {
        if !available() {
            return;
        }
        let packed = PackedWeight::new::<f32>(&[], 3, 0, Some(&[1.0, 2.0, 3.0]));
        assert_eq!(packed.matmul(&[], 2), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }
}
