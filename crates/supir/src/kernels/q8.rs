//! Linear layers on 8-bit integer dot products: `y[m×n] = x[m×k] · Wᵀ + b` with `W [n×k]` in
//! GGUF's Q8_0 blocks (32 weights `qw` and one f16 scale `dw` each: `w = dw·qw`) and `x`
//! quantised per call to blocks of 32 (`qx`, an f32 scale `dx`), multiplied as ggml's
//! `vec_dot_q8_0_q8_0` does: `y = b + Σ_blocks dx·dw·Σ_{i<32} qx[i]·qw[i]`.
//!
//! The integer sums are exact, so every path below (AVX512-VNNI, AVX2, plain) gives the same
//! block sums; only the f32 accumulation over blocks may round differently.
//!
//! - AVX512-VNNI: `vpdpbusd` multiplies unsigned by signed bytes, so the weights are stored
//!   offset by 128 (`qw + 128`, in 0..=255) and each block's sum starts from `-128·Σ qx`
//!   (computed with the activations). Micro-kernel [`MR`] rows x [`NR`] columns.
//! - AVX2: `vpmaddwd` on 16-bit values (the same `qw + 128` bytes zero-extended, `qx`
//!   quantised straight to 16 bits, the same starting sum); [`MR2`] rows x 8 columns. It
//!   replaced `vpmaddubsw` with ggml's sign trick (`|qx|` times `qw` carrying the sign of `qx`),
//!   which needs a `vpsignb` per product vector and was wrong for `qw = -128`.
//! - elsewhere the plain loops.
//!
//! `W` is repacked once (the integers and scales as GGUF holds them, in the micro-kernel's
//! order); [`Q8Weight::gguf_blocks`] gives the GGUF bytes back. Loops and threading as in
//! [`super::packed`]: `mc x nc` output blocks as rayon tasks, depth in passes of [`KCB`] blocks;
//! each output element is summed over `k` in order by one task, so results do not depend on
//! the thread count. `SUPIR_Q8=avx2|plain` forces a slower path (comparisons).

use std::sync::OnceLock;

use half::f16;

use super::SyncPtr;

/// Values per quantisation block (GGUF `QK8_0`).
pub const QK: usize = 32;
/// Bytes of one GGUF Q8_0 block: the f16 scale, then 32 signed bytes.
pub const BLOCK_BYTES: usize = 2 + QK;
/// Columns of `Wᵀ` per packed panel (two 16-lane vectors).
const NR: usize = 32;
/// Rows per AVX512-VNNI micro-kernel call (8 i32 + 8 f32 accumulators; 6 rows measured
/// slower: the compiler spills the f32 ones).
const MR: usize = 4;
/// Rows per AVX2 micro-kernel call (over a quarter panel: 8 columns; 12 accumulators).
const MR2: usize = 6;
/// Most blocks per depth pass (512 values: the `MR x 512` activation slice and a 16 KiB weight
/// panel).
const KCB: usize = 16;
/// Largest block of output rows per task (a multiple of [`MR`] and [`MR2`]).
const MC_MAX: usize = 144;
/// Largest block of output columns per task.
const NC_MAX: usize = 512;

/// The kernel a CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Path {
    /// `vpdpbusd` on 512-bit vectors (AVX512-VNNI + AVX512BW).
    Avx512Vnni,
    /// `vpmaddubsw` / `vpmaddwd` on 256-bit vectors.
    Avx2,
    /// Plain loops.
    Plain,
}

impl Q8Path {
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "avx512-vnni",
            Self::Avx2 => "avx2",
            Self::Plain => "plain",
        }
    }

    /// Rows per micro-kernel call (the activations are padded to a multiple).
    fn rows(self) -> usize {
        match self {
            Self::Avx512Vnni => MR,
            Self::Avx2 => MR2,
            Self::Plain => 1,
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Self::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Self::Avx2 => has!("avx2") && has!("fma"),
                Self::Plain => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Plain
        }
    }
}

/// The fastest path this CPU has, unless `SUPIR_Q8` names a slower one.
pub fn best_path() -> Q8Path {
    static PATH: OnceLock<Q8Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        let want = std::env::var("SUPIR_Q8").unwrap_or_default();
        let order: &[Q8Path] = match want.to_ascii_lowercase().as_str() {
            "plain" => &[Q8Path::Plain],
            "avx2" => &[Q8Path::Avx2, Q8Path::Plain],
            _ => &[Q8Path::Avx512Vnni, Q8Path::Avx2, Q8Path::Plain],
        };
        *order
            .iter()
            .find(|p| p.supported())
            .unwrap_or(&Q8Path::Plain)
    })
}

/// GGUF Q8_0 blocks of one row (`k` a multiple of [`QK`]), as ggml's `quantize_row_q8_0_ref`
/// makes them: `d = max|x| / 127` (stored as f16), `q = round(x / d)` from the f32 `d`.
pub fn quantize_row_gguf(x: &[f32], out: &mut Vec<u8>) {
    assert!(
        x.len().is_multiple_of(QK),
        "q8: row length not a multiple of 32"
    );
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|&v| (v * id).round() as i8 as u8));
    }
}

/// `W` in GGUF Q8_0, repacked for the kernels.
#[derive(Debug)]
pub struct Q8Weight {
    n: usize,
    k: usize,
    /// Blocks per row (`k / 32`).
    kb: usize,
    /// `qw + 128` of panel `q`, block `b`, group `g` of 4 depths: `NR` columns x 4 bytes, at
    /// `((q·kb + b)·8 + g)·128` (128, i.e. `qw = 0`, past `n`).
    qs: Vec<u8>,
    /// `dw` of panel `q`, block `b`, column `j` at `(q·kb + b)·NR + j` (0 past `n`).
    scales: Vec<f16>,
    /// The bias padded to whole panels.
    bias: Option<Vec<f32>>,
}

impl Q8Weight {
    /// Quantises `w [n×k]` (row-major; `k` a multiple of 32) to Q8_0 and packs it.
    pub fn quantize(
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Self> {
        if !k.is_multiple_of(QK) || w.len() != n * k {
            candle_core::bail!("q8_0: a {n}x{k} weight needs its input width a multiple of {QK}");
        }
        use rayon::prelude::*;
        let row_bytes = k / QK * BLOCK_BYTES;
        let mut gguf = vec![0u8; n * row_bytes];
        gguf.par_chunks_mut(row_bytes.max(1))
            .zip(w.par_chunks(k.max(1)))
            .for_each(|(out, row)| {
                let mut v = Vec::with_capacity(row_bytes);
                quantize_row_gguf(row, &mut v);
                out.copy_from_slice(&v);
            });
        Self::from_gguf(&gguf, n, k, bias)
    }

    /// Packs GGUF Q8_0 bytes of `W [n×k]` (`n` rows of `k / 32` blocks of [`BLOCK_BYTES`]).
    pub fn from_gguf(
        blocks: &[u8],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Self> {
        let kb = k / QK;
        if !k.is_multiple_of(QK) || blocks.len() != n * kb * BLOCK_BYTES {
            candle_core::bail!(
                "q8_0: {} bytes are not a {n}x{k} weight in 34-byte blocks",
                blocks.len()
            );
        }
        if let Some(b) = bias {
            if b.len() != n {
                candle_core::bail!("q8_0: bias of {} values for {n} outputs", b.len());
            }
        }
        let panels = n.div_ceil(NR);
        let mut qs = vec![0x80u8; panels * kb * QK * NR];
        let mut scales = vec![f16::ZERO; panels * kb * NR];
        use rayon::prelude::*;
        qs.par_chunks_mut((kb * QK * NR).max(1))
            .zip(scales.par_chunks_mut((kb * NR).max(1)))
            .enumerate()
            .for_each(|(q, (qs, scales))| {
                for j in 0..NR.min(n - q * NR) {
                    let col = q * NR + j;
                    for b in 0..kb {
                        let blk = &blocks[(col * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                        scales[b * NR + j] = f16::from_le_bytes([blk[0], blk[1]]);
                        for (i, &v) in blk[2..].iter().enumerate() {
                            qs[(b * 8 + i / 4) * NR * 4 + j * 4 + i % 4] = v ^ 0x80;
                        }
                    }
                }
            });
        let bias = bias.map(|b| {
            let mut v = b.to_vec();
            v.resize(panels * NR, 0.0);
            v
        });
        Ok(Self {
            n,
            k,
            kb,
            qs,
            scales,
            bias,
        })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (integers, scales, bias).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * self.scales.len() + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }

    /// The bias as given, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref().map(|b| &b[..self.n])
    }

    fn q(&self, col: usize, p: usize) -> i8 {
        let (q, j, b, i) = (col / NR, col % NR, p / QK, p % QK);
        (self.qs[((q * self.kb + b) * 8 + i / 4) * NR * 4 + j * 4 + i % 4] ^ 0x80) as i8
    }

    fn scale(&self, col: usize, b: usize) -> f32 {
        self.scales[((col / NR) * self.kb + b) * NR + col % NR].to_f32()
    }

    /// The GGUF Q8_0 bytes of `W` (row-major blocks), as [`from_gguf`](Self::from_gguf) takes.
    pub fn gguf_blocks(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.n * self.kb * BLOCK_BYTES);
        for col in 0..self.n {
            for b in 0..self.kb {
                out.extend_from_slice(&f16::from_f32(self.scale(col, b)).to_le_bytes());
                out.extend((0..QK).map(|i| self.q(col, b * QK + i) as u8));
            }
        }
        out
    }

    /// `W` dequantised, `[n×k]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.n * self.k];
        for (col, row) in w.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            for (p, v) in row.iter_mut().enumerate() {
                *v = self.scale(col, p / QK) * self.q(col, p) as f32;
            }
        }
        w
    }

    /// `x [m×k] · Wᵀ + b` on the fastest path of this CPU.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(best_path(), x, m)
    }

    /// [`matmul`](Self::matmul) on `path`. Panics when the CPU lacks it or `x` is not `m×k`.
    pub fn matmul_with(&self, path: Q8Path, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "q8: input size");
        assert!(
            path.supported(),
            "q8: the {} kernel is not available",
            path.name()
        );
        let mut out = vec![0.0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let mr = path.rows();
        let acts = Activations::quantize(x, m, k, mr, path == Q8Path::Avx2);
        if path == Q8Path::Plain {
            self.plain(&acts, m, &mut out);
            return out;
        }
        let c = SyncPtr(out.as_mut_ptr());
        super::for_each_gemm_block(
            (m, n, k),
            (mr, NR),
            (MC_MAX, NC_MAX),
            |i0, rows, j0, cols| {
                // SAFETY: blocks are disjoint `rows x cols` parts of the `m x n` output; the path
                // is supported (asserted above).
                unsafe { self.block(path, &acts, i0, rows, j0, cols, c.get().add(i0 * n + j0)) }
            },
        );
        out
    }

    /// The plain loops over the same integers.
    fn plain(&self, a: &Activations, m: usize, out: &mut [f32]) {
        let n = self.n;
        for i in 0..m {
            for col in 0..n {
                let mut acc = self.bias.as_ref().map_or(0.0, |b| b[col]);
                for b in 0..self.kb {
                    let mut s = 0i32;
                    for t in 0..QK {
                        let qx = a.q[i * a.lda + b * QK + t];
                        s += qx as i32 * self.q(col, b * QK + t) as i32;
                    }
                    acc += s as f32 * (a.d[i * self.kb + b] * self.scale(col, b));
                }
                out[i * n + col] = acc;
            }
        }
    }

    /// One output block: rows `i0 ..+rows`, columns `j0 ..+cols` (from a panel boundary),
    /// written at `c` with row stride `n`.
    ///
    /// # Safety
    /// `path` is supported; `c` points at element `(i0, j0)` of the `m x n` output.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        path: Q8Path,
        a: &Activations,
        i0: usize,
        rows: usize,
        j0: usize,
        cols: usize,
        c: *mut f32,
    ) {
        let (n, kb) = (self.n, self.kb);
        let mr = path.rows();
        // Passes of near-equal depth (640 = 10 + 10 blocks, not 16 + 4).
        let step = kb.div_ceil(kb.div_ceil(KCB).max(1)).max(1);
        for b0 in (0..kb).step_by(step) {
            let nblk = (kb - b0).min(step);
            let first = b0 == 0;
            for ip in 0..rows.div_ceil(mr) {
                let r0 = i0 + ip * mr;
                let valid = (rows - ip * mr).min(mr);
                // Only the buffer of this path is allocated (`wrapping_add`: no offset into the
                // empty one).
                let qa = a.q.as_ptr().wrapping_add(r0 * a.lda + b0 * QK);
                let qa16 = a.q16.as_ptr().wrapping_add(r0 * a.lda + b0 * QK);
                let da = a.d.as_ptr().add(r0 * kb + b0);
                let sa = a.comp.as_ptr().add(r0 * kb + b0);
                for jp in 0..cols.div_ceil(NR) {
                    let j = j0 + jp * NR;
                    let q = j / NR;
                    let w = self.qs.as_ptr().add((q * kb + b0) * QK * NR);
                    let ws = self.scales.as_ptr().add((q * kb + b0) * NR);
                    let bias = match (&self.bias, first) {
                        (Some(bv), true) => bv.as_ptr().add(j),
                        _ => std::ptr::null(),
                    };
                    let nr = (n - j).min(NR);
                    let cij = c.add(ip * mr * n + jp * NR);
                    let tile = Tile {
                        nblk,
                        qa,
                        qa16,
                        lda: a.lda,
                        da,
                        sa,
                        ldd: kb,
                        w,
                        ws,
                        c: cij,
                        ldc: n,
                        mr: valid,
                        nr,
                        first,
                        bias,
                    };
                    match path {
                        Q8Path::Avx512Vnni => kernel_vnni(&tile),
                        _ => {
                            for col0 in (0..nr).step_by(8) {
                                kernel_avx2(&tile, col0);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Activations quantised per row in blocks of 32 (`qx`, scale `dx`, and `-128·Σ qx`, the
/// VNNI and AVX2 kernels' starting sum), rows padded with zeros to a multiple of the kernel's
/// height. `qx` is held as bytes (VNNI, plain) or as 16-bit values (AVX2), not both.
struct Activations {
    q: Vec<i8>,
    q16: Vec<i16>,
    d: Vec<f32>,
    comp: Vec<i32>,
    /// Values per row (`k`).
    lda: usize,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize, row_multiple: usize, wide: bool) -> Self {
        let kb = k / QK;
        let rows = m.next_multiple_of(row_multiple);
        let mut d = vec![0.0f32; rows * kb];
        let mut comp = vec![0i32; rows * kb];
        let (mut q, mut q16) = (Vec::new(), Vec::new());
        let parallel = m * k >= 1 << 16;
        if wide {
            q16 = vec![0i16; rows * k];
            quantize_rows(x, m, k, &mut q16, &mut d, &mut comp, parallel);
        } else {
            q = vec![0i8; rows * k];
            quantize_rows(x, m, k, &mut q, &mut d, &mut comp, parallel);
        }
        Self {
            q,
            q16,
            d,
            comp,
            lda: k,
        }
    }
}

/// A quantised activation as the kernels read it.
trait Qx: Copy + Send + Default {
    /// `r as i8`, widened to `Self`.
    fn from_i32(r: i32) -> Self;
}

impl Qx for i8 {
    fn from_i32(r: i32) -> Self {
        r as i8
    }
}

impl Qx for i16 {
    fn from_i32(r: i32) -> Self {
        r as i8 as i16
    }
}

/// One row's input and outputs as the row loop zips them.
type Row<'a, T> = (&'a [f32], (&'a mut [T], (&'a mut [f32], &'a mut [i32])));

/// The first `m` rows of `x` (`k` values each) into `q`, `d`, `comp` (rows of `k`, `k / 32`).
fn quantize_rows<T: Qx>(
    x: &[f32],
    m: usize,
    k: usize,
    q: &mut [T],
    d: &mut [f32],
    comp: &mut [i32],
    parallel: bool,
) {
    let (kq, kd) = (k.max(1), (k / QK).max(1));
    let row = |(xr, (qr, (dr, cr))): Row<T>| quantize_row(xr, qr, dr, cr);
    if parallel {
        use rayon::prelude::*;
        let outs = q.par_chunks_exact_mut(kq).zip(
            d.par_chunks_exact_mut(kd)
                .zip(comp.par_chunks_exact_mut(kd)),
        );
        x.par_chunks_exact(kq).take(m).zip(outs).for_each(row);
    } else {
        let outs = q
            .chunks_exact_mut(kq)
            .zip(d.chunks_exact_mut(kd).zip(comp.chunks_exact_mut(kd)));
        x.chunks_exact(kq).take(m).zip(outs).for_each(row);
    }
}

/// One activation row to blocks of 32: `dx = max|x| / 127`, `qx = x / dx` rounded to nearest
/// (ties to even), `-128·Σ qx`; vectorised where the CPU has AVX2 (same values: a block whose
/// scaled values are not all finite and within ±127.5 takes the scalar form).
fn quantize_row<T: Qx>(x: &[f32], q: &mut [T], d: &mut [f32], comp: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_row_avx2(x, q, d, comp) };
    }
    let blocks = x.chunks_exact(QK).zip(q.chunks_exact_mut(QK));
    for (((blk, qb), db), cb) in blocks.zip(d.iter_mut()).zip(comp.iter_mut()) {
        (*db, *cb) = quantize_block(blk, qb);
    }
}

/// One block (scalar): its `qx` into `q`, returns `(dx, -128·Σ qx)`.
#[inline(always)]
fn quantize_block<T: Qx>(blk: &[f32], q: &mut [T]) -> (f32, i32) {
    let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let s = amax / 127.0;
    let id = if s != 0.0 { 1.0 / s } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(blk) {
        let r = (v * id).round_ties_even() as i32;
        *o = T::from_i32(r);
        sum = sum.wrapping_add(r);
    }
    (s, sum.wrapping_mul(-128))
}

/// [`quantize_row`] on 8-lane vectors: `vmaxps` ignores NaN in its first operand as
/// `f32::max` does, `vcvtps2dq` rounds to nearest even as `round_ties_even`, and the saturating
/// packs equal the casts for values within ±127.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2<T: Qx>(x: &[f32], q: &mut [T], d: &mut [f32], comp: &mut [i32]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let limit = _mm256_set1_ps(127.5);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let blocks = x.chunks_exact(QK).zip(q.chunks_exact_mut(QK));
    for (((blk, qb), db), cb) in blocks.zip(d.iter_mut()).zip(comp.iter_mut()) {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(blk.as_ptr().add(8 * i)));
        let mut m = _mm256_setzero_ps();
        for v in v {
            m = _mm256_max_ps(_mm256_and_ps(v, abs_mask), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let s = amax / 127.0;
        let id = if s != 0.0 { 1.0 / s } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let p: [__m256; 4] = std::array::from_fn(|i| _mm256_mul_ps(v[i], idv));
        // Out of range or NaN (`NLT_UQ`: at least 127.5, or NaN): the scalar casts decide.
        let mut bad = _mm256_setzero_ps();
        for p in p {
            bad = _mm256_or_ps(
                bad,
                _mm256_cmp_ps(_mm256_and_ps(p, abs_mask), limit, _CMP_NLT_UQ),
            );
        }
        if _mm256_movemask_ps(bad) != 0 {
            (*db, *cb) = quantize_block(blk, qb);
            continue;
        }
        let r: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(p[i]));
        let t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        let t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        let t2 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t2, _mm_shuffle_epi32(t2, 0b10_11_00_01)));
        let (a, b) = (
            _mm256_packs_epi32(r[0], r[1]),
            _mm256_packs_epi32(r[2], r[3]),
        );
        let out = qb.as_mut_ptr();
        if std::mem::size_of::<T>() == 1 {
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
            _mm256_storeu_si256(out as *mut __m256i, bytes);
        } else {
            let out = out as *mut __m256i;
            _mm256_storeu_si256(out, _mm256_permute4x64_epi64(a, 0xd8));
            _mm256_storeu_si256(out.add(1), _mm256_permute4x64_epi64(b, 0xd8));
        }
        *db = s;
        *cb = sum.wrapping_mul(-128);
    }
}

/// One micro-kernel call: `nblk` blocks of rows `qa` or `qa16` (stride `lda` values; scales `da` and
/// starting sums `sa`, stride `ldd`) against one packed panel (`w`, `ws` at the same first
/// block), into `c`.
struct Tile {
    nblk: usize,
    /// The activations as bytes (VNNI) or 16-bit values (AVX2); the other is not allocated.
    qa: *const i8,
    qa16: *const i16,
    lda: usize,
    da: *const f32,
    sa: *const i32,
    ldd: usize,
    w: *const u8,
    ws: *const f16,
    c: *mut f32,
    ldc: usize,
    /// Rows of `c` to write (the activation rows past them are zero padding).
    mr: usize,
    nr: usize,
    first: bool,
    bias: *const f32,
}

/// `MR x NR` tile on `vpdpbusd` (weights `qw + 128` unsigned, activations signed).
///
/// # Safety
/// AVX512F/BW/VNNI and F16C present; the tile's pointers cover `MR` activation rows, `nblk`
/// blocks of the panel, and `mr x nr` outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn kernel_vnni(t: &Tile) {
    use std::arch::x86_64::*;
    let zf = _mm512_setzero_ps();
    let mut acc = [[zf; 2]; MR];
    let rows: [*const i8; MR] = std::array::from_fn(|r| t.qa.add(r * t.lda));
    for b in 0..t.nblk {
        let mut s: [[__m512i; 2]; MR] = std::array::from_fn(|r| {
            let c = _mm512_set1_epi32(*t.sa.add(r * t.ldd + b));
            [c, c]
        });
        let wb = t.w.add(b * QK * NR);
        for g in 0..8 {
            let w0 = _mm512_loadu_si512(wb.add(g * 128) as *const _);
            let w1 = _mm512_loadu_si512(wb.add(g * 128 + 64) as *const _);
            for r in 0..MR {
                let p = rows[r].add(b * QK + g * 4) as *const i32;
                let xr = _mm512_set1_epi32(p.read_unaligned());
                s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, xr);
                s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, xr);
            }
        }
        let ws = t.ws.add(b * NR) as *const __m256i;
        let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(ws));
        let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(ws.add(1)));
        for r in 0..MR {
            let dx = _mm512_set1_ps(*t.da.add(r * t.ldd + b));
            let (f0, f1) = (_mm512_cvtepi32_ps(s[r][0]), _mm512_cvtepi32_ps(s[r][1]));
            acc[r][0] = _mm512_fmadd_ps(f0, _mm512_mul_ps(d0, dx), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(f1, _mm512_mul_ps(d1, dx), acc[r][1]);
        }
    }
    let (b0, b1) = if t.bias.is_null() {
        (zf, zf)
    } else {
        (_mm512_loadu_ps(t.bias), _mm512_loadu_ps(t.bias.add(16)))
    };
    let bits = if t.nr >= 32 {
        u32::MAX
    } else {
        (1u32 << t.nr) - 1
    };
    let (m0, m1) = ((bits & 0xffff) as __mmask16, (bits >> 16) as __mmask16);
    for (r, acc) in acc.iter().enumerate().take(t.mr) {
        let ci = t.c.add(r * t.ldc);
        let (v0, v1) = if t.first {
            (_mm512_add_ps(acc[0], b0), _mm512_add_ps(acc[1], b1))
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

/// `MR2 x 8` tile (panel columns `col0 ..+8`) on `vpmaddwd` over 16-bit values: the weights
/// `qw + 128` zero-extended (the packing's bytes as they are), the activations sign-extended
/// once per call ([`Activations`]), so the products need no sign fix-up and every pair sum is
/// exact (`2·127·255 < 2^31`). Each 32-bit lane sums two depths of one column (the packing's
/// four depths per column span two lanes, added at the block's end); the block's sum starts
/// from `-128·Σ qx` as on VNNI.
///
/// Measured against `vpmaddubsw` with the sign trick (`vpsignb` on every product vector, as
/// ggml's AVX2 dot does): on Zen 4 `vpsignb`, `vpabsb`, `vpmaddubsw` and `vpmaddwd` share the
/// same two pipes, so the trick costs three multiply-pipe operations per 32 products against
/// two `vpmaddwd` here.
///
/// # Safety
/// AVX2, FMA and F16C present; as [`kernel_vnni`], with `MR2` rows of 16-bit activations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel_avx2(t: &Tile, col0: usize) {
    use std::arch::x86_64::*;
    let zi = _mm256_setzero_si256();
    // Accumulators in the column order `vphaddd` leaves: 0 1 4 5 2 3 6 7.
    let mut acc = [_mm256_setzero_ps(); MR2];
    // An opaque trip count keeps the group loop rolled: fully unrolled, LLVM reorders the
    // eight groups row by row and spills (as it did with the former `vpmaddubsw` kernel).
    let groups = std::hint::black_box(QK / 4);
    for b in 0..t.nblk {
        let mut s = [[zi; 2]; MR2];
        let mut wp = t.w.add(b * QK * NR + col0 * 4);
        let mut xp = t.qa16.add(b * QK);
        for _ in 0..groups {
            let w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(wp as *const _));
            let w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(wp.add(16) as *const _));
            for (r, s) in s.iter_mut().enumerate() {
                let x = _mm256_set1_epi64x((xp.add(r * t.lda) as *const i64).read_unaligned());
                s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(x, w0));
                s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(x, w1));
            }
            wp = wp.add(4 * NR);
            xp = xp.add(4);
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(t.ws.add(b * NR + col0) as *const _));
        let d = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(d), 0xd8));
        for (r, (s, acc)) in s.iter().zip(acc.iter_mut()).enumerate() {
            let sum = _mm256_add_epi32(
                _mm256_hadd_epi32(s[0], s[1]),
                _mm256_set1_epi32(*t.sa.add(r * t.ldd + b)),
            );
            let dx = _mm256_set1_ps(*t.da.add(r * t.ldd + b));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, dx), *acc);
        }
    }
    let cols = (t.nr - col0).min(8);
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(cols as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    // The bias is padded to whole panels.
    let base = if t.bias.is_null() {
        _mm256_setzero_ps()
    } else {
        _mm256_loadu_ps(t.bias.add(col0))
    };
    for (r, acc) in acc.iter().enumerate().take(t.mr) {
        let v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(*acc), 0xd8));
        let ci = t.c.add(r * t.ldc + col0);
        if cols == 8 {
            let prev = if t.first { base } else { _mm256_loadu_ps(ci) };
            _mm256_storeu_ps(ci, _mm256_add_ps(prev, v));
        } else {
            let prev = if t.first {
                base
            } else {
                _mm256_maskload_ps(ci, mask)
            };
            _mm256_maskstore_ps(ci, mask, _mm256_add_ps(prev, v));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_vnni(_: &Tile) {
    unreachable!("q8: no VNNI off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_avx2(_: &Tile, _: usize) {
    unreachable!("q8: no AVX2 off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise;

    #[test]
    fn quantisation_matches_candle_gguf_q8_0() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (n, k) = (5, 96);
        let mut w = test_noise(n * k, 9);
        w[7] = 0.0;
        w[40..72].iter_mut().for_each(|v| *v = 0.0); // an all-zero block: d = 0
        let t =
            candle_core::Tensor::from_vec(w.clone(), (n, k), &candle_core::Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let theirs = theirs.data().unwrap();
        let ours = Q8Weight::quantize(&w, n, k, None).unwrap();
        assert_eq!(ours.gguf_blocks(), &theirs[..]);
        let back = Q8Weight::from_gguf(&theirs, n, k, None).unwrap();
        assert_eq!(back.dequantize(), ours.dequantize());
    }

    #[test]
    fn every_path_matches_the_plain_integer_sums() {
        // Edges: m not a multiple of the micro-kernel heights or row blocks, n not a multiple
        // of 16 or 32 (masked columns), k over several depth passes with a short last one.
        for (m, n, k, bias) in [
            (1, 1, 32, false),
            (7, 33, 64, true),
            (13, 17, 96, true),
            (150, 70, 640, true),
            (300, 544, 1280, false),
            (37, 1030, 160, true),
        ] {
            let x = test_noise(m * k, 1 + m as u64);
            let w: Vec<f32> = test_noise(n * k, 2 + n as u64)
                .iter()
                .map(|v| 0.05 * v)
                .collect();
            let b = test_noise(n, 3);
            let b = bias.then_some(&b[..]);
            let q = Q8Weight::quantize(&w, n, k, b).unwrap();
            assert_eq!(q.bias(), b);
            super::super::assert_vector_paths_match_plain(&format!("{m}x{n}x{k}"), |path| {
                q.matmul_with(path, &x, m)
            });
        }
    }

    #[test]
    fn avx2_tile_edges_match_the_plain_integer_sums() {
        // The AVX2 kernel's edges: fewer rows than its height (6) and row counts past it, one
        // block of depth, column counts ending inside an 8-column slice or exactly on one.
        for (m, n, k, bias) in [
            (5, 8, 32, true),
            (6, 9, 32, false),
            (11, 41, 96, false),
            (12, 24, 32, true),
            (19, 63, 64, true),
        ] {
            let x = test_noise(m * k, 11 + m as u64);
            let w: Vec<f32> = test_noise(n * k, 12 + n as u64)
                .iter()
                .map(|v| 0.05 * v)
                .collect();
            let b = test_noise(n, 13);
            let b = bias.then_some(&b[..]);
            let q = Q8Weight::quantize(&w, n, k, b).unwrap();
            super::super::assert_vector_paths_match_plain(&format!("{m}x{n}x{k}"), |path| {
                q.matmul_with(path, &x, m)
            });
        }
    }

    #[test]
    fn weights_of_minus_128_are_exact_on_every_path() {
        // GGUF allows qw = -128 (ggml's quantiser never writes it); the former AVX2 sign trick
        // turned -(-128) into -128. Columns of -128 and 127 against mixed-sign activations.
        let (m, n, k) = (7, 20, 64);
        let mut blocks = Vec::new();
        for col in 0..n {
            for b in 0..k / QK {
                blocks.extend_from_slice(&f16::from_f32(0.01 * (1 + col + b) as f32).to_le_bytes());
                blocks.extend((0..QK).map(|i| match (col + i) % 3 {
                    0 => 0x80u8,
                    1 => 127,
                    _ => (i as u8).wrapping_mul(37),
                }));
            }
        }
        let q = Q8Weight::from_gguf(&blocks, n, k, None).unwrap();
        assert_eq!(q.gguf_blocks(), blocks);
        let x = test_noise(m * k, 21);
        super::super::assert_vector_paths_match_plain("qw = -128", |path| {
            q.matmul_with(path, &x, m)
        });
    }

    #[test]
    fn vectorised_activation_quantisation_matches_the_scalar_form() {
        // Noise at several magnitudes, an all-zero block, subnormal, huge, infinite and NaN
        // inputs (the latter take the scalar form inside the vector loop).
        let k = 32 * 9;
        let mut x: Vec<f32> = test_noise(k, 31)
            .iter()
            .enumerate()
            .map(|(i, v)| v * [1.0, 1e-3, 3e4][i / 32 % 3])
            .collect();
        x[32..64].fill(0.0);
        x[64..96].iter_mut().for_each(|v| *v *= 1e-40);
        x[100] = 3e38;
        x[130] = f32::INFINITY;
        x[170] = f32::NAN;
        x[200] = -f32::INFINITY;
        x[231] = 127.5; // one value far above the rest of its block
        let (mut q8, mut q16) = (vec![0i8; k], vec![0i16; k]);
        let (mut d8, mut d16) = (vec![0.0f32; k / QK], vec![0.0f32; k / QK]);
        let (mut c8, mut c16) = (vec![0i32; k / QK], vec![0i32; k / QK]);
        quantize_row(&x, &mut q8, &mut d8, &mut c8);
        quantize_row(&x, &mut q16, &mut d16, &mut c16);
        for (b, blk) in x.chunks_exact(QK).enumerate() {
            let mut qs = [0i8; QK];
            let (d, c) = quantize_block(blk, &mut qs);
            assert_eq!(&q8[b * QK..][..QK], &qs, "block {b}");
            let wide: Vec<i16> = qs.iter().map(|&v| v as i16).collect();
            assert_eq!(&q16[b * QK..][..QK], &wide[..], "block {b}");
            assert_eq!(d8[b].to_bits(), d.to_bits(), "block {b}");
            assert_eq!(d16[b].to_bits(), d.to_bits(), "block {b}");
            assert_eq!((c8[b], c16[b]), (c, c), "block {b}");
        }
    }

    #[test]
    fn the_product_is_close_to_f32() {
        // Q8_0 on both operands: relative error of a few tenths of a percent on noise.
        let (m, n, k) = (64, 96, 640);
        let x = test_noise(m * k, 5);
        let w = test_noise(n * k, 6);
        let q = Q8Weight::quantize(&w, n, k, None).unwrap();
        let y = q.matmul(&x, m);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                num += (y[i * n + j] as f64 - r).powi(2);
                den += r * r;
            }
        }
        let rel = (num / den).sqrt();
        assert!(rel < 0.01, "relative error {rel}");
        assert!(rel > 1e-5, "suspiciously exact: {rel}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q8Weight::quantize(&[0.0; 40], 2, 20, None).is_err());
        assert!(Q8Weight::from_gguf(&[0; 33], 1, 32, None).is_err());
        assert!(Q8Weight::quantize(&[0.0; 64], 2, 32, Some(&[0.0])).is_err());
    }
}
