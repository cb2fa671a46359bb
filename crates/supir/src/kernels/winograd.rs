//! Winograd F(4x4, 3x3): 3x3 convolution (cross-correlation, stride 1, zero padding 1) on
//! channels-last f32 maps.
//!
//! Per 4x4 output tile `Y` with its 6x6 input patch `d` (one pixel of context each side) and
//! kernel `g` (Lavin & Gray 2016, interpolation points 0, ±1, ±2, ∞):
//!
//! `Y = Aᵀ [ Σ_ci (G g G ᵀ) ⊙ (Bᵀ d B) ] A`
//!
//! - filter transform `U = G g Gᵀ` (6x6), once per layer at load;
//! - input transform `V = Bᵀ d B` (6x6) per tile and input channel;
//! - for each of the 36 positions `ξ`, one GEMM `M_ξ = V_ξ U_ξ`: `[tiles x cin] @ [cin x cout]`;
//! - output transform `Y = Aᵀ M A` (4x4) per tile and output channel, then bias and a caller's
//!   per-pixel epilogue.
//!
//! Multiplications per output: 36/16 · cin · cout, against 9 · cin · cout for the direct form.
//! Rounding: `Bᵀ` and `Aᵀ` have entries up to 5 and 8, so errors grow about 10² over the direct
//! sum: in f32 the relative error stays around 1e-5 of the output's magnitude.
//!
//! Tiles are processed in chunks (in parallel with rayon), so the transformed chunk stays in cache.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::SyncPtr;

/// Output tile side.
const TM: usize = 4;
/// Input tile side (`TM + 3 - 1`).
const TA: usize = 6;
/// Positions in the transformed domain.
const NXI: usize = TA * TA;
/// Channels per transform step (vector lanes).
const L: usize = 16;

/// `G` (6x3).
const G: [[f64; 3]; TA] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A 3x3 convolution with its filter transform `U = G g Gᵀ` as `[36][cin][coutp]` (`cout`
/// rounded up to 8, the extra columns zero).
pub struct Winograd3x3 {
    cin: usize,
    cout: usize,
    coutp: usize,
    u: Vec<f32>,
    bias: Vec<f32>,
}

impl Winograd3x3 {
    /// From `weight [cout][cin][3][3]` (PyTorch layout, row-major) and an optional `bias [cout]`.
    pub fn new(weight: &[f32], bias: Option<&[f32]>, cout: usize, cin: usize) -> Self {
        assert_eq!(
            weight.len(),
            cout * cin * 9,
            "weight is not [cout, cin, 3, 3]"
        );
        let bias = match bias {
            Some(b) => {
                assert_eq!(b.len(), cout, "bias is not [cout]");
                b.to_vec()
            }
            None => vec![0.0; cout],
        };
        let coutp = cout.next_multiple_of(8);
        let mut u = vec![0.0f32; NXI * cin * coutp];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &weight[(co * cin + ci) * 9..][..9];
                // Gg (6x3), then (Gg)Gᵀ (6x6), in f64.
                let mut gg = [[0.0f64; 3]; TA];
                for (i, row) in gg.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|k| G[i][k] * g[k * 3 + j] as f64).sum();
                    }
                }
                for i in 0..TA {
                    for j in 0..TA {
                        let v: f64 = (0..3).map(|k| gg[i][k] * G[j][k]).sum();
                        u[((i * TA + j) * cin + ci) * coutp + co] = v as f32;
                    }
                }
            }
        }
        Self {
            cin,
            cout,
            coutp,
            u,
            bias,
        }
    }

    /// From candle tensors `weight [cout, cin, 3, 3]` and `bias [cout]` (any float dtype, any device).
    pub fn from_tensors(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Winograd3x3: expected a 3x3 kernel, got {kh}x{kw}");
        }
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self::new(&w, b.as_deref(), cout, cin))
    }

    pub fn cin(&self) -> usize {
        self.cin
    }

    pub fn cout(&self) -> usize {
        self.cout
    }
}

/// A channels-last input map: channel `c` of pixel `(y, x)` at `ptr + y * row + x * pix + c`.
#[derive(Clone, Copy)]
pub struct Input {
    ptr: *const f32,
    h: usize,
    w: usize,
    row: usize,
    pix: usize,
}

// SAFETY: an `Input` is only read, and its constructors require the memory to stay valid and
// unwritten (in the channels read) for the convolutions it is passed to.
unsafe impl Send for Input {}
unsafe impl Sync for Input {}

impl Input {
    /// A map over `data` whose pixels hold at least `channels` values; panics when out of bounds.
    pub fn new(data: &[f32], h: usize, w: usize, row: usize, pix: usize, channels: usize) -> Self {
        if h > 0 && w > 0 {
            assert!((h - 1) * row + (w - 1) * pix + channels <= data.len());
        }
        Self {
            ptr: data.as_ptr(),
            h,
            w,
            row,
            pix,
        }
    }

    /// # Safety
    /// For every `y < h`, `x < w`, the `cin` values at `ptr + y * row + x * pix` of every
    /// convolution this map is passed to must be readable, and not written during it.
    pub unsafe fn from_raw(ptr: *const f32, h: usize, w: usize, row: usize, pix: usize) -> Self {
        Self {
            ptr,
            h,
            w,
            row,
            pix,
        }
    }

    pub fn height(&self) -> usize {
        self.h
    }

    pub fn width(&self) -> usize {
        self.w
    }
}

/// Tiles per chunk (measured on a 2-core Zen 4, `examples/conv_bench.rs`): 16 while a `U_ξ`
/// (`cin · coutp` f32) fits in 64 KiB, so the chunk's `V` and `M` stay in L2; 64 for larger
/// layers, where reading `U` (36 `U_ξ` per chunk) costs more than missing L2 on `V` and `M`.
/// At most `tiles / threads`, so every thread gets work.
fn default_chunk(cin: usize, coutp: usize, tiles: usize) -> usize {
    let t = if cin * coutp <= 16 * 1024 { 16 } else { 64 };
    t.min(tiles.div_ceil(rayon::current_num_threads())).max(1)
}

/// `epi(y, x, v)` for every output pixel, with `v[co] = bias[co] + Σ conv` (`cout` values, which
/// the epilogue may modify in place). Pixels are visited once each, from several threads.
pub fn conv<F>(k: &Winograd3x3, x: Input, epi: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    conv_chunked(k, x, 0, epi)
}

/// [`conv`] with `chunk` tiles per GEMM batch (0: the default).
pub fn conv_chunked<F>(k: &Winograd3x3, x: Input, chunk: usize, epi: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let (ty, tx) = (x.h.div_ceil(TM), x.w.div_ceil(TM));
    let tiles = ty * tx;
    if tiles == 0 {
        return;
    }
    let chunk = if chunk == 0 {
        default_chunk(k.cin, k.coutp, tiles)
    } else {
        chunk
    };
    let chunk = chunk.clamp(1, tiles);
    let (cin, cout, coutp) = (k.cin, k.cout, k.coutp);
    (0..tiles.div_ceil(chunk)).into_par_iter().for_each(|ci| {
        SCRATCH.with_borrow_mut(|s| {
            s.v.resize(s.v.len().max(NXI * chunk * cin), 0.0);
            s.m.resize(s.m.len().max(NXI * chunk * coutp), 0.0);
            s.out.resize(s.out.len().max(TM * TM * cout), 0.0);
            let t0 = ci * chunk;
            let n = chunk.min(tiles - t0);
            // SAFETY: `x`'s contract (readable `cin` channels at each in-bounds pixel).
            unsafe { input_transform(x, tx, t0, n, cin, &mut s.v[..NXI * n * cin]) };
            for xi in 0..NXI {
                gemm(
                    &s.v[xi * n * cin..][..n * cin],
                    &k.u[xi * cin * coutp..][..cin * coutp],
                    &mut s.m[xi * n * coutp..][..n * coutp],
                    n,
                    cin,
                    coutp,
                );
            }
            for t in 0..n {
                let (tyi, txi) = ((t0 + t) / tx, (t0 + t) % tx);
                output_transform(&s.m[..NXI * n * coutp], n, t, k, &mut s.out);
                for dy in 0..TM.min(x.h - tyi * TM) {
                    for dx in 0..TM.min(x.w - txi * TM) {
                        let p = dy * TM + dx;
                        epi(
                            tyi * TM + dy,
                            txi * TM + dx,
                            &mut s.out[p * cout..(p + 1) * cout],
                        );
                    }
                }
            }
        })
    });
}

thread_local! {
    /// Per-thread buffers, grown to the largest convolution seen.
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            v: Vec::new(),
            m: Vec::new(),
            out: Vec::new(),
        })
    };
}

#[derive(Default)]
struct Scratch {
    /// `V`: `[36][n][cin]`.
    v: Vec<f32>,
    /// `M`: `[36][n][coutp]`.
    m: Vec<f32>,
    /// One output tile, `[16][cout]`.
    out: Vec<f32>,
}

/// `V = Bᵀ d B` for tiles `t0..t0+n` (row-major over `tx` tiles per row) into `v [36][n][cin]`.
///
/// # Safety
/// `x` must satisfy [`Input::from_raw`]'s contract for `cin` channels.
unsafe fn input_transform(x: Input, tx: usize, t0: usize, n: usize, cin: usize, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            assert!(v.len() >= NXI * n * cin);
            // SAFETY: the features are present, `v` holds `[36][n][cin]`; the rest is the
            // caller's contract.
            return unsafe { avx2::input_transform(x, tx, t0, n, cin, v.as_mut_ptr()) };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { input_transform_generic(x, tx, t0, n, cin, v) }
}

/// `dst[..n] = src[..n]` for `n = min(len)`, as one fixed-size move when both hold `L` lanes
/// (a slice copy of unknown length is a `memcpy` call).
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32]) {
    match (
        <&mut [f32; L]>::try_from(&mut *dst),
        <&[f32; L]>::try_from(src),
    ) {
        (Ok(d), Ok(s)) => *d = *s,
        _ => {
            let n = dst.len().min(src.len());
            for (d, s) in dst[..n].iter_mut().zip(&src[..n]) {
                *d = *s;
            }
        }
    }
}

/// `Bᵀ` applied along one axis of six lane vectors.
#[inline(always)]
fn bt6(d: [[f32; L]; TA]) -> [[f32; L]; TA] {
    let mut r = [[0.0f32; L]; TA];
    for l in 0..L {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][l] = (d3 + d4) - 4.0 * (d1 + d2);
        r[2][l] = (d4 - d3) + 4.0 * (d1 - d2);
        r[3][l] = (d4 - d2) + 2.0 * (d3 - d1);
        r[4][l] = (d4 - d2) - 2.0 * (d3 - d1);
        r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn input_transform_generic(
    x: Input,
    tx: usize,
    t0: usize,
    n: usize,
    cin: usize,
    v: &mut [f32],
) {
    for t in 0..n {
        let (tyi, txi) = ((t0 + t) / tx, (t0 + t) % tx);
        // Offsets of the 6x6 patch's pixels, `None` outside the map (zero padding).
        let mut off = [[None; TA]; TA];
        for (i, row) in off.iter_mut().enumerate() {
            let y = (tyi * TM + i).wrapping_sub(1);
            if y >= x.h {
                continue;
            }
            for (j, o) in row.iter_mut().enumerate() {
                let xx = (txi * TM + j).wrapping_sub(1);
                if xx < x.w {
                    *o = Some(y * x.row + xx * x.pix);
                }
            }
        }
        for c0 in (0..cin).step_by(L) {
            let nl = L.min(cin - c0);
            // d[i][j] lanes, then Bᵀ down the columns: cols[j] = Bᵀ d[:, j].
            let mut cols = [[[0.0f32; L]; TA]; TA];
            for (j, col) in cols.iter_mut().enumerate() {
                let mut d = [[0.0f32; L]; TA];
                for i in 0..TA {
                    if let Some(o) = off[i][j] {
                        // SAFETY: in-bounds pixel, channels c0..c0+nl < cin (caller's contract).
                        let src = unsafe { std::slice::from_raw_parts(x.ptr.add(o + c0), nl) };
                        copy_lanes(&mut d[i], src);
                    }
                }
                *col = bt6(d);
            }
            // Then along the rows: V[i][:] = (Bᵀ d)[i][:] B.
            for i in 0..TA {
                let row = bt6([
                    cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i], cols[5][i],
                ]);
                for (j, r) in row.iter().enumerate() {
                    let dst = ((i * TA + j) * n + t) * cin + c0;
                    copy_lanes(&mut v[dst..dst + nl], r);
                }
            }
        }
    }
}

/// `m [n][coutp] = v [n][cin] @ u [cin][coutp]` (row-major; `coutp` a multiple of 8).
fn gemm(v: &[f32], u: &[f32], m: &mut [f32], n: usize, cin: usize, coutp: usize) {
    debug_assert!(coutp.is_multiple_of(8));
    assert!(v.len() >= n * cin && u.len() >= cin * coutp && m.len() >= n * coutp);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the features are present; the slices were checked to hold the operands.
            return unsafe { avx2::gemm(v.as_ptr(), u.as_ptr(), m.as_mut_ptr(), n, cin, coutp) };
        }
    }
    for (vr, mr) in v.chunks_exact(cin).zip(m.chunks_exact_mut(coutp)).take(n) {
        mr.fill(0.0);
        for (&a, ur) in vr.iter().zip(u.chunks_exact(coutp)) {
            for (o, &b) in mr.iter_mut().zip(ur) {
                *o += a * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The transforms and the transformed-domain GEMM with AVX2 + FMA, 8 channels per vector.: register blocks of 6 rows (tiles) x 16 or 8
/// columns (output channels), `U` read in place (it is stored in the order the kernel reads).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA present; `v` holds `n * cin`, `u` `cin * coutp`, `m` `n * coutp` values,
    /// `coutp` a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(
        v: *const f32,
        u: *const f32,
        m: *mut f32,
        n: usize,
        cin: usize,
        coutp: usize,
    ) {
        let mut c0 = 0;
        while c0 < coutp {
            let wide = coutp - c0 >= 16;
            let mut t = 0;
            while t < n {
                let r = (n - t).min(6);
                // SAFETY: rows t..t+r < n, columns c0..c0+8 or +16 <= coutp.
                unsafe {
                    match (r, wide) {
                        (6, true) => block::<6, 2>(v, u, m, cin, coutp, t, c0),
                        (5, true) => block::<5, 2>(v, u, m, cin, coutp, t, c0),
                        (4, true) => block::<4, 2>(v, u, m, cin, coutp, t, c0),
                        (3, true) => block::<3, 2>(v, u, m, cin, coutp, t, c0),
                        (2, true) => block::<2, 2>(v, u, m, cin, coutp, t, c0),
                        (1, true) => block::<1, 2>(v, u, m, cin, coutp, t, c0),
                        (6, false) => block::<6, 1>(v, u, m, cin, coutp, t, c0),
                        (5, false) => block::<5, 1>(v, u, m, cin, coutp, t, c0),
                        (4, false) => block::<4, 1>(v, u, m, cin, coutp, t, c0),
                        (3, false) => block::<3, 1>(v, u, m, cin, coutp, t, c0),
                        (2, false) => block::<2, 1>(v, u, m, cin, coutp, t, c0),
                        _ => block::<1, 1>(v, u, m, cin, coutp, t, c0),
                    }
                }
                t += r;
            }
            c0 += if wide { 16 } else { 8 };
        }
    }

    /// Lanes `0..nl` set.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lane_mask(nl: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(nl as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// Eight channels at `p + c0` (lanes `nl..` zero), or zeros for a null `p`.
    ///
    /// # Safety
    /// A non-null `p` has `c0 + nl` readable values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load(p: *const f32, c0: usize, nl: usize, mask: __m256i) -> __m256 {
        if p.is_null() {
            return _mm256_setzero_ps();
        }
        // SAFETY: caller.
        let p = unsafe { p.add(c0) };
        if nl == 8 {
            // SAFETY: caller.
            unsafe { _mm256_loadu_ps(p) }
        } else {
            // SAFETY: caller; masked lanes are not read.
            unsafe { _mm256_maskload_ps(p, mask) }
        }
    }

    /// # Safety
    /// `p` has `nl` writable values.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store(p: *mut f32, x: __m256, nl: usize, mask: __m256i) {
        if nl == 8 {
            // SAFETY: caller.
            unsafe { _mm256_storeu_ps(p, x) }
        } else {
            // SAFETY: caller; masked lanes are not written.
            unsafe { _mm256_maskstore_ps(p, mask, x) }
        }
    }

    /// `Bᵀ d` for six vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn bt6(d: [__m256; 6]) -> [__m256; 6] {
        let (two, four, five) = (
            _mm256_set1_ps(2.0),
            _mm256_set1_ps(4.0),
            _mm256_set1_ps(5.0),
        );
        let [d0, d1, d2, d3, d4, d5] = d;
        let (s12, d12) = (_mm256_add_ps(d1, d2), _mm256_sub_ps(d1, d2));
        let (s34, d43) = (_mm256_add_ps(d3, d4), _mm256_sub_ps(d4, d3));
        let (d31, d42) = (_mm256_sub_ps(d3, d1), _mm256_sub_ps(d4, d2));
        [
            _mm256_fmadd_ps(four, d0, _mm256_fnmadd_ps(five, d2, d4)),
            _mm256_fnmadd_ps(four, s12, s34),
            _mm256_fmadd_ps(four, d12, d43),
            _mm256_fmadd_ps(two, d31, d42),
            _mm256_fnmadd_ps(two, d31, d42),
            _mm256_fmadd_ps(four, d1, _mm256_fnmadd_ps(five, d3, d5)),
        ]
    }

    /// `Aᵀ m` for six vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn at6(m: [__m256; 6]) -> [__m256; 4] {
        let (two, four, eight) = (
            _mm256_set1_ps(2.0),
            _mm256_set1_ps(4.0),
            _mm256_set1_ps(8.0),
        );
        let (a, b) = (_mm256_add_ps(m[1], m[2]), _mm256_sub_ps(m[1], m[2]));
        let (c, d) = (_mm256_add_ps(m[3], m[4]), _mm256_sub_ps(m[3], m[4]));
        [
            _mm256_add_ps(_mm256_add_ps(m[0], a), c),
            _mm256_fmadd_ps(two, d, b),
            _mm256_fmadd_ps(four, c, a),
            _mm256_add_ps(_mm256_fmadd_ps(eight, d, b), m[5]),
        ]
    }

    /// `V = Bᵀ d B` for tiles `t0..t0+n` into `v [36][n][cin]`.
    ///
    /// # Safety
    /// AVX2 and FMA present; `v` holds `36 * n * cin` values; `x` satisfies
    /// [`Input::from_raw`](super::Input::from_raw)'s contract for `cin` channels.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn input_transform(
        x: super::Input,
        tx: usize,
        t0: usize,
        n: usize,
        cin: usize,
        v: *mut f32,
    ) {
        for t in 0..n {
            let (tyi, txi) = ((t0 + t) / tx, (t0 + t) % tx);
            let mut ptrs = [[std::ptr::null::<f32>(); 6]; 6];
            for (i, row) in ptrs.iter_mut().enumerate() {
                let y = (tyi * 4 + i).wrapping_sub(1);
                if y >= x.h {
                    continue;
                }
                for (j, p) in row.iter_mut().enumerate() {
                    let xx = (txi * 4 + j).wrapping_sub(1);
                    if xx < x.w {
                        // SAFETY: an in-bounds pixel (caller).
                        *p = unsafe { x.ptr.add(y * x.row + xx * x.pix) };
                    }
                }
            }
            let mut c0 = 0;
            while c0 < cin {
                let nl = (cin - c0).min(8);
                let mask = lane_mask(nl);
                // tmp[i] = row i of d B (Bᵀ applied along the row).
                let mut tmp = [[_mm256_setzero_ps(); 6]; 6];
                for (row, p) in tmp.iter_mut().zip(&ptrs) {
                    // SAFETY: channels c0..c0+nl of in-bounds pixels (caller).
                    let d = std::array::from_fn(|j| unsafe { load(p[j], c0, nl, mask) });
                    *row = bt6(d);
                }
                for j in 0..6 {
                    let col = bt6(std::array::from_fn(|i| tmp[i][j]));
                    for (i, &c) in col.iter().enumerate() {
                        // SAFETY: inside `v [36][n][cin]` (caller).
                        unsafe { store(v.add(((i * 6 + j) * n + t) * cin + c0), c, nl, mask) };
                    }
                }
                c0 += 8;
            }
        }
    }

    /// `Y = Aᵀ M A + bias` of tile `t` from `m [36][n][coutp]` into `out [16][cout]`.
    ///
    /// # Safety
    /// AVX2 and FMA present; `m` holds `36 * n * coutp` values, `out` `16 * cout`; `t < n`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn output_transform(
        m: *const f32,
        n: usize,
        t: usize,
        k: &super::Winograd3x3,
        out: *mut f32,
    ) {
        let (cout, coutp) = (k.cout, k.coutp);
        let mut c0 = 0;
        while c0 < cout {
            let nl = (cout - c0).min(8);
            let mask = lane_mask(nl);
            // tmp[..][j] = Aᵀ M[:, j].
            let mut tmp = [[_mm256_setzero_ps(); 6]; 4];
            for j in 0..6 {
                // SAFETY: inside `m` (caller); coutp - c0 >= 8.
                let col = at6(std::array::from_fn(|i| unsafe {
                    _mm256_loadu_ps(m.add(((i * 6 + j) * n + t) * coutp + c0))
                }));
                for (i, &c) in col.iter().enumerate() {
                    tmp[i][j] = c;
                }
            }
            // SAFETY: bias has `cout` values.
            let b = unsafe { load(k.bias.as_ptr(), c0, nl, mask) };
            for (i, r) in tmp.iter().enumerate() {
                for (j, &y) in at6(*r).iter().enumerate() {
                    // SAFETY: inside `out [16][cout]` (caller).
                    unsafe {
                        store(
                            out.add((i * 4 + j) * cout + c0),
                            _mm256_add_ps(y, b),
                            nl,
                            mask,
                        )
                    };
                }
            }
            c0 += 8;
        }
    }

    /// `m[t..t+R][c0..c0+8·NV] = v[t..t+R][..] @ u[..][c0..c0+8·NV]`, accumulated in registers.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const R: usize, const NV: usize>(
        v: *const f32,
        u: *const f32,
        m: *mut f32,
        cin: usize,
        coutp: usize,
        t: usize,
        c0: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        let rows: [*const f32; R] = std::array::from_fn(|r| unsafe { v.add((t + r) * cin) });
        for ci in 0..cin {
            // SAFETY: ci < cin and the column block is inside `coutp` (caller).
            unsafe {
                let up = u.add(ci * coutp + c0);
                let b: [__m256; NV] = std::array::from_fn(|k| _mm256_loadu_ps(up.add(8 * k)));
                for r in 0..R {
                    let a = _mm256_broadcast_ss(&*rows[r].add(ci));
                    for k in 0..NV {
                        acc[r][k] = _mm256_fmadd_ps(a, b[k], acc[r][k]);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (k, &a) in row.iter().enumerate() {
                // SAFETY: row t + r < n, columns inside `coutp` (caller).
                unsafe { _mm256_storeu_ps(m.add((t + r) * coutp + c0 + 8 * k), a) };
            }
        }
    }
}

/// `Aᵀ` applied along one axis of six lane vectors.
#[inline(always)]
fn at6(m: [[f32; L]; TA]) -> [[f32; L]; TM] {
    let mut r = [[0.0f32; L]; TM];
    for l in 0..L {
        let (a, b) = (m[1][l] + m[2][l], m[1][l] - m[2][l]);
        let (c, d) = (m[3][l] + m[4][l], m[3][l] - m[4][l]);
        r[0][l] = m[0][l] + a + c;
        r[1][l] = b + 2.0 * d;
        r[2][l] = a + 4.0 * c;
        r[3][l] = b + 8.0 * d + m[5][l];
    }
    r
}

/// `Y = Aᵀ M A + bias` of tile `t` from `m [36][n][coutp]` into `out [16][cout]`.
fn output_transform(m: &[f32], n: usize, t: usize, k: &Winograd3x3, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            assert!(m.len() >= NXI * n * k.coutp && out.len() >= TM * TM * k.cout && t < n);
            // SAFETY: the features are present and the buffers hold what the kernel reads.
            return unsafe { avx2::output_transform(m.as_ptr(), n, t, k, out.as_mut_ptr()) };
        }
    }
    output_transform_generic(m, n, t, k, out)
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn output_transform_generic(m: &[f32], n: usize, t: usize, k: &Winograd3x3, out: &mut [f32]) {
    let (cout, coutp, bias) = (k.cout, k.coutp, &k.bias);
    for c0 in (0..cout).step_by(L) {
        let nl = L.min(cout - c0);
        // cols[j] = Aᵀ M[:, j].
        let mut cols = [[[0.0f32; L]; TM]; TA];
        for (j, col) in cols.iter_mut().enumerate() {
            let mut mm = [[0.0f32; L]; TA];
            for (i, lane) in mm.iter_mut().enumerate() {
                let src = ((i * TA + j) * n + t) * coutp + c0;
                copy_lanes(lane, &m[src..src + nl]);
            }
            *col = at6(mm);
        }
        let mut b = [0.0f32; L];
        copy_lanes(&mut b, &bias[c0..c0 + nl]);
        for i in 0..TM {
            let row = at6([
                cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i], cols[5][i],
            ]);
            for (j, r) in row.iter().enumerate() {
                let dst = (i * TM + j) * cout + c0;
                let mut y = [0.0f32; L];
                for l in 0..L {
                    y[l] = r[l] + b[l];
                }
                copy_lanes(&mut out[dst..dst + nl], &y);
            }
        }
    }
}

/// `conv2d(x, weight, bias, padding 1)` for an NCHW f32 CPU tensor `[n, cin, h, w]` ->
/// `[n, cout, h, w]` (goes through a channels-last copy each way).
pub fn conv2d_nchw(x: &Tensor, k: &Winograd3x3) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if c != k.cin {
        candle_core::bail!("Winograd3x3: input has {c} channels, the kernel {}", k.cin);
    }
    if !x.device().is_cpu() {
        candle_core::bail!("Winograd3x3: CPU tensors only");
    }
    let cout = k.cout;
    let nhwc = x
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0.0f32; n * h * w * cout];
    for (src, dst) in nhwc
        .chunks_exact(h * w * c)
        .zip(out.chunks_exact_mut(h * w * cout))
    {
        let input = Input::new(src, h, w, w * c, c, c);
        let dst = SyncPtr(dst.as_mut_ptr());
        conv(k, input, |y, x, v| {
            // SAFETY: each pixel is visited once, so the writes are disjoint and in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(v.as_ptr(), dst.get().add((y * w + x) * cout), cout)
            }
        });
    }
    Tensor::from_vec(out, (n, h, w, cout), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise as noise;
    use candle_core::Module;

    /// Max |winograd - candle conv2d| over max |candle conv2d|.
    fn rel_err(n: usize, cin: usize, cout: usize, h: usize, w: usize, chunk: usize) -> f32 {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(noise(n * cin * h * w, 1), (n, cin, h, w), &dev).unwrap();
        let wt = Tensor::from_vec(noise(cout * cin * 9, 2), (cout, cin, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(noise(cout, 3), cout, &dev).unwrap();
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let expected = candle_nn::Conv2d::new(wt.clone(), Some(b.clone()), cfg)
            .forward(&x)
            .unwrap();
        let k = Winograd3x3::from_tensors(&wt, Some(&b)).unwrap();
        let got = if chunk == 0 {
            conv2d_nchw(&x, &k).unwrap()
        } else {
            let nhwc = x.permute((0, 2, 3, 1)).unwrap().flatten_all().unwrap();
            let nhwc = nhwc.to_vec1::<f32>().unwrap();
            let mut out = vec![0.0f32; h * w * cout];
            let dst = SyncPtr(out.as_mut_ptr());
            conv_chunked(
                &k,
                Input::new(&nhwc, h, w, w * cin, cin, cin),
                chunk,
                |y, x, v| unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.as_ptr(),
                        dst.get().add((y * w + x) * cout),
                        cout,
                    )
                },
            );
            Tensor::from_vec(out, (1, h, w, cout), &dev)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
        };
        assert_eq!(got.dims(), expected.dims());
        let scale = expected
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let diff = (got - &expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        diff.max(0).unwrap().to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
    }

    /// Tolerance: a direct f32 sum of `9 cin` products errs by ~sqrt(9 cin) ulp; F(4,3)'s
    /// transforms (entries up to 5 in Bᵀ, 8 in Aᵀ, 1/6 and 1/24 in G) amplify that by ~10²,
    /// so 2e-5 of the output's range leaves ~3x margin at cin = 192.
    const TOL: f32 = 2e-5;

    #[test]
    fn matches_candle_conv2d_on_odd_shapes() {
        for &(n, cin, cout, h, w) in &[
            (1, 3, 64, 7, 5),
            (2, 5, 3, 1, 1),
            (1, 64, 32, 9, 13),
            (1, 17, 19, 4, 8),
            (1, 192, 64, 6, 3),
            (2, 33, 130, 5, 11),
        ] {
            let e = rel_err(n, cin, cout, h, w, 0);
            eprintln!("n={n} cin={cin} cout={cout} {h}x{w}: rel err {e:.2e}");
            assert!(e < TOL, "n={n} cin={cin} cout={cout} {h}x{w}: rel err {e}");
        }
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        for chunk in [1, 3, 8, 1000] {
            let e = rel_err(1, 20, 24, 10, 14, chunk);
            assert!(e < TOL, "chunk {chunk}: rel err {e}");
        }
    }
}
