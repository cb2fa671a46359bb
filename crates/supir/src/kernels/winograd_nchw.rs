//! Winograd F(4x4, 3x3) convolution (stride 1, zero padding 1) on NCHW f32 maps with its 36
//! products as BLAS GEMMs (Lavin & Gray 2016; same matrices as [`super::winograd`]).
//!
//! `Y = Aᵀ [ U ⊙ V ] A` per 4x4 output tile, with `U = G g Gᵀ` (filter) and `V = Bᵀ d B`
//! (6x6 input patch). For each of the 36 positions `ξ`:
//! `M_ξ [cout x tiles] = U_ξ [cout x cin] · V_ξ [cin x tiles]` (one sgemm), so the NCHW planes
//! are read and written directly: the input transform walks each input plane, the output
//! transform writes each output plane. Tiles of all images in the batch are processed together,
//! in chunks that bound the `V`/`M` buffers. `U` is transformed per call (a few percent of the
//! GEMM work), so no second copy of the weights is kept.

use rayon::prelude::*;

use super::blas::sgemm_slices_st;
use super::conv::ConvShape;
use super::SyncPtr;

/// Floats of `V` + `M` per chunk of tiles.
const CHUNK_BUDGET: usize = 12 << 20;
/// Tiles per transform step (vector lanes).
const LN: usize = 8;

type Lanes = [f32; LN];

/// Filters per block of [`filter_transform`]: its 36 outputs are written as runs of this many
/// floats (whole cache lines instead of 36 scattered stores per filter).
const FB: usize = 64;

/// `[36][cout][cin]` filter transforms `U = G g Gᵀ` of `weight [cout][cin][3][3]`.
pub fn filter_transform(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let plane = cout * cin;
    assert_eq!(weight.len(), plane * 9, "Winograd: weight size");
    let mut u = Vec::<f32>::with_capacity(36 * plane);
    let up = SyncPtr(u.as_mut_ptr());
    (0..plane.div_ceil(FB)).into_par_iter().for_each(|blk| {
        let kc0 = blk * FB;
        let nb = FB.min(plane - kc0);
        // g[tap][lane], taps in row-major order.
        let mut g = [[0.0f32; FB]; 9];
        for (l, w) in weight[kc0 * 9..(kc0 + nb) * 9].chunks_exact(9).enumerate() {
            for (tap, v) in w.iter().enumerate() {
                g[tap][l] = *v;
            }
        }
        // G·(a, b, c)ᵀ for the 6 rows of G, lane by lane.
        let col = |a: &[f32; FB], b: &[f32; FB], c: &[f32; FB]| -> [[f32; FB]; 6] {
            let mut r = [[0.0f32; FB]; 6];
            for l in 0..FB {
                let (a, b, c) = (a[l], b[l], c[l]);
                r[0][l] = a / 4.0;
                r[1][l] = -(a + b + c) / 6.0;
                r[2][l] = -(a - b + c) / 6.0;
                r[3][l] = a / 24.0 + b / 12.0 + c / 6.0;
                r[4][l] = a / 24.0 - b / 12.0 + c / 6.0;
                r[5][l] = c;
            }
            r
        };
        // G g: one 6-vector per filter column.
        let c0 = col(&g[0], &g[3], &g[6]);
        let c1 = col(&g[1], &g[4], &g[7]);
        let c2 = col(&g[2], &g[5], &g[8]);
        for r in 0..6 {
            // (G g) Gᵀ, row r.
            let row = col(&c0[r], &c1[r], &c2[r]);
            for (j, v) in row.iter().enumerate() {
                // SAFETY: U[r*6+j][kc0..kc0+nb] belongs to this block only and is within the
                // capacity 36 * plane.
                unsafe { stream_store(v.as_ptr(), up.get().add((r * 6 + j) * plane + kc0), nb) };
            }
        }
    });
    #[cfg(target_arch = "x86_64")]
    // SAFETY: orders the streaming stores above before the buffer is handed out.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
    // SAFETY: the blocks above wrote every one of the 36 * plane elements.
    unsafe { u.set_len(36 * plane) };
    u
}

/// Copies `n` floats to `dst` with non-temporal stores where aligned (x86-64): `U` is written
/// once and read much later, so bypassing the cache saves the read-for-ownership traffic.
///
/// # Safety
/// `src` and `dst` must be valid for `n` floats and not overlap.
#[inline(always)]
unsafe fn stream_store(src: *const f32, dst: *mut f32, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        if (dst as usize).is_multiple_of(16) {
            let mut i = 0;
            while i + 4 <= n {
                _mm_stream_ps(dst.add(i), _mm_loadu_ps(src.add(i)));
                i += 4;
            }
            std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), n - i);
            return;
        }
    }
    std::ptr::copy_nonoverlapping(src, dst, n);
}

/// `Bᵀ d` on six lane vectors.
#[inline(always)]
fn bt(d: &[Lanes; 6]) -> [Lanes; 6] {
    let mut r = [[0.0f32; LN]; 6];
    for l in 0..LN {
        let (d0, d1, d2, d3, d4, d5) = (d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]);
        r[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        r[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        r[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        r[3][l] = -2.0 * (d1 - d3) - d2 + d4;
        r[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        r[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    r
}

/// `Aᵀ m` on six lane vectors.
#[inline(always)]
fn at(m: &[Lanes; 6]) -> [Lanes; 4] {
    let mut y = [[0.0f32; LN]; 4];
    for l in 0..LN {
        let (m0, m1, m2, m3, m4, m5) = (m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]);
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        y[0][l] = m0 + s12 + s34;
        y[1][l] = d12 + 2.0 * d34;
        y[2][l] = s12 + 4.0 * s34;
        y[3][l] = d12 + 8.0 * d34 + m5;
    }
    y
}

/// Geometry of the tiles of one call.
#[derive(Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    /// Tiles per row and per image.
    tw: usize,
    per_img: usize,
}

impl Tiles {
    /// (image, top row, left column) of global tile `t`.
    fn origin(&self, t: usize) -> (usize, usize, usize) {
        let (img, r) = (t / self.per_img, t % self.per_img);
        (img, (r / self.tw) * 4, (r % self.tw) * 4)
    }
}

/// A per-(image, channel) affine map (+ SiLU) applied to the input as it is read: `a`, `b`
/// `[n][cin]`. `y = x·a + b` and `y·sigmoid(y)` are the same operations as
/// `kernels::norm::group_norm_with_stats`, so a fused norm + conv gives the bits of the two
/// run one after the other, without the normalised map in memory.
#[derive(Clone, Copy)]
pub struct Affine<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub silu: bool,
}

/// The stored map: f32, or held in half precision (the tiled VAE's `--vae-tile-dtype`), widened
/// exactly to f32 row band by row band as the input transform reads it, so a half map
/// convolves to the bits of its f32 copy without that copy in memory.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(x) => x.len(),
            Self::Bf16(x) => x.len(),
            Self::F16(x) => x.len(),
        }
    }

    /// Elements `range` widened to f32 into `out` (same length).
    fn widen(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            Self::F32(x) => out.copy_from_slice(&x[range]),
            Self::Bf16(x) => x[range].convert_to_f32_slice(out),
            Self::F16(x) => x[range].convert_to_f32_slice(out),
        }
    }
}

/// How the convolved map is read from the stored `x`.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub x: Src<'a>,
    /// `x` is the map at half the size, upsampled x2 by nearest neighbour as it is read.
    pub up2: bool,
    pub affine: Option<Affine<'a>>,
}

/// `V[ξ][c][j] = (Bᵀ d B)_ξ` for the tiles `t0 + j`, `j < nb`, of input channel `c` (row stride
/// `ld` of `V`'s `[c][tiles]` blocks). With `UP = 1`, `x` holds the map at half the size and
/// pixel `(y, x)` of the convolved map is `x[y / 2][x / 2]` (nearest-neighbour x2 read in
/// place, so the upsampled map is never stored). With `affine`, the rows of `x` this chunk of
/// tiles reads are first mapped, per channel, into a small buffer (vectorised, as the norm
/// kernel maps a whole map), and the tiles read that buffer.
#[allow(clippy::too_many_arguments)]
fn input_transform<const UP: u32>(
    x: Src,
    affine: Option<&Affine>,
    cin: usize,
    g: Tiles,
    t0: usize,
    nb: usize,
    v: &mut [f32],
    ld: usize,
) {
    let (ph, pw) = (g.h >> UP, g.w >> UP);
    let vp = SyncPtr(v.as_mut_ptr());
    let xi_stride = cin * ld;
    let (img0, img1) = (g.origin(t0).0, g.origin(t0 + nb - 1).0);
    // Per image of the chunk: the stored rows `lo..hi` its tiles read (3x3 context included).
    let bands: Vec<(usize, usize)> = (img0..=img1)
        .map(|img| {
            let ta = t0.max(img * g.per_img);
            let tb = (t0 + nb).min((img + 1) * g.per_img) - 1;
            let ylo = g.origin(ta).1.saturating_sub(1);
            let yhi = (g.origin(tb).1 + 5).min(g.h);
            (ylo >> UP, ((yhi - 1) >> UP) + 1)
        })
        .collect();
    type Bufs = (Vec<f32>, Vec<f32>);
    (0..cin)
        .into_par_iter()
        .for_each_init(Bufs::default, |(buf, wide): &mut Bufs, c| {
            // Where row 0 of each image's plane would start in `src` (`x` as stored, or `buf`
            // holding only rows `lo..hi`, hence the wrapping offsets).
            let mut starts = vec![0usize; bands.len()];
            let src: &[f32] = match (x, affine) {
                (Src::F32(x), None) => {
                    for (i, s) in starts.iter_mut().enumerate() {
                        *s = ((img0 + i) * cin + c) * ph * pw;
                    }
                    x
                }
                _ => {
                    buf.clear();
                    for (i, &(lo, hi)) in bands.iter().enumerate() {
                        let plane = (img0 + i) * cin + c;
                        let range = plane * ph * pw + lo * pw..plane * ph * pw + hi * pw;
                        starts[i] = buf.len().wrapping_sub(lo * pw);
                        let at = buf.len();
                        buf.resize(at + range.len(), 0.0);
                        let rows: &[f32] = match x {
                            Src::F32(x) => &x[range],
                            half => {
                                wide.resize(range.len(), 0.0);
                                half.widen(range, wide);
                                wide
                            }
                        };
                        match affine {
                            Some(af) => super::norm::affine(
                                rows,
                                &mut buf[at..],
                                af.a[plane],
                                af.b[plane],
                                af.silu,
                            ),
                            None => buf[at..].copy_from_slice(rows),
                        }
                    }
                    buf
                }
            };
            let mut j = 0;
            while j < nb {
                let lanes = LN.min(nb - j);
                // d[row][col][lane]
                let mut d = [[[0.0f32; LN]; 6]; 6];
                for l in 0..lanes {
                    let (img, y0, x0) = g.origin(t0 + j + l);
                    let start = starts[img - img0];
                    for (r, drow) in d.iter_mut().enumerate() {
                        let iy = y0 as isize + r as isize - 1;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let row = &src[start.wrapping_add((iy as usize >> UP) * pw)..][..pw];
                        for (col, dv) in drow.iter_mut().enumerate() {
                            let ix = x0 as isize + col as isize - 1;
                            if ix >= 0 && ix < g.w as isize {
                                dv[l] = row[ix as usize >> UP];
                            }
                        }
                    }
                }
                // Rows: Bᵀ d, column by column; then columns: (Bᵀ d) B, row by row.
                let mut t = [[[0.0f32; LN]; 6]; 6];
                for col in 0..6 {
                    let cv = [
                        d[0][col], d[1][col], d[2][col], d[3][col], d[4][col], d[5][col],
                    ];
                    let r = bt(&cv);
                    for row in 0..6 {
                        t[row][col] = r[row];
                    }
                }
                for (row, trow) in t.iter().enumerate() {
                    let r = bt(trow);
                    for (col, rv) in r.iter().enumerate() {
                        let xi = row * 6 + col;
                        // SAFETY: V[xi][c][j..j+lanes] belongs to this c only and is in bounds.
                        unsafe {
                            let dst = vp.get().add(xi * xi_stride + c * ld + j);
                            std::ptr::copy_nonoverlapping(rv.as_ptr(), dst, lanes);
                        }
                    }
                }
                j += LN;
            }
        });
}

/// `out[img][k]` tile pixels `= bias[k] + (Aᵀ M A)` for the tiles `t0 + j`, `j < nb`.
#[allow(clippy::too_many_arguments)]
fn output_transform(
    m: &[f32],
    cout: usize,
    g: Tiles,
    t0: usize,
    nb: usize,
    ld: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let op = SyncPtr(out.as_mut_ptr());
    let xi_stride = cout * ld;
    (0..cout).into_par_iter().for_each(|k| {
        let b = bias.map_or(0.0, |b| b[k]);
        let mut j = 0;
        while j < nb {
            let lanes = LN.min(nb - j);
            let mut mv = [[[0.0f32; LN]; 6]; 6];
            for (xi, dst) in mv.iter_mut().flatten().enumerate() {
                let src = &m[xi * xi_stride + k * ld + j..][..lanes];
                dst[..lanes].copy_from_slice(src);
            }
            // Aᵀ M (4x6) then (Aᵀ M) A (4x4).
            let mut t = [[[0.0f32; LN]; 6]; 4];
            for col in 0..6 {
                let cv = [
                    mv[0][col], mv[1][col], mv[2][col], mv[3][col], mv[4][col], mv[5][col],
                ];
                let r = at(&cv);
                for row in 0..4 {
                    t[row][col] = r[row];
                }
            }
            for (row, trow) in t.iter().enumerate() {
                let y = at(trow);
                for l in 0..lanes {
                    let (img, y0, x0) = g.origin(t0 + j + l);
                    let oy = y0 + row;
                    if oy >= g.h {
                        continue;
                    }
                    let base = (img * cout + k) * g.h * g.w + oy * g.w;
                    for (col, yv) in y.iter().enumerate() {
                        let ox = x0 + col;
                        if ox < g.w {
                            // SAFETY: pixel (img, k, oy, ox) is written by this k only.
                            unsafe { *op.get().add(base + ox) = yv[l] + b };
                        }
                    }
                }
            }
            j += LN;
        }
    });
}

/// 3x3, stride 1, padding 1 convolution; shapes as [`super::conv::conv2d`].
pub fn conv3x3(s: &ConvShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let u = filter_transform(weight, s.cout, s.cin);
    conv3x3_transformed(s, x, &u, bias, out)
}

/// [`conv3x3`] of the map `input` describes ([`conv3x3_transformed_input`]).
pub fn conv3x3_input(
    s: &ConvShape,
    input: Input,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let u = filter_transform(weight, s.cout, s.cin);
    conv3x3_transformed_input(s, input, &u, bias, out)
}

/// [`conv3x3`] with the filter transforms `u` ([`filter_transform`]) computed beforehand: at
/// small maps the transform costs as much as the products, so layers with f32 weights keep it.
pub fn conv3x3_transformed(
    s: &ConvShape,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    conv3x3_impl::<0>(s, Src::F32(x), None, u, bias, out)
}

/// [`conv3x3_transformed`] of the map `input` describes (`s` is the convolved map's shape):
/// upsampled x2 by nearest neighbour (`Upsample` layers: even `s.h`, `s.w`, `input.x` is
/// `[n][cin][h/2][w/2]`), and/or with an affine map + SiLU applied per pixel (a GroupNorm
/// before the conv). The same products in the same order as convolving the stored map, so the
/// same values bit for bit, without that map (4x the input, or the normalised copy) in memory.
pub fn conv3x3_transformed_input(
    s: &ConvShape,
    input: Input,
    u: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if input.up2 {
        assert!(
            s.h.is_multiple_of(2) && s.w.is_multiple_of(2),
            "Winograd x2: odd upsampled size"
        );
    }
    if let Some(af) = &input.affine {
        assert!(
            af.a.len() == s.n * s.cin && af.b.len() == s.n * s.cin,
            "Winograd: affine size"
        );
    }
    if input.up2 {
        conv3x3_impl::<1>(s, input.x, input.affine.as_ref(), u, bias, out)
    } else {
        conv3x3_impl::<0>(s, input.x, input.affine.as_ref(), u, bias, out)
    }
}

fn conv3x3_impl<const UP: u32>(
    s: &ConvShape,
    x: Src,
    affine: Option<&Affine>,
    u: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    conv3x3_chunked::<UP>(s, x, affine, u, bias, out, CHUNK_BUDGET)
}

/// [`conv3x3_impl`] with `V` + `M` chunks of at most `budget` floats (tests use small ones).
fn conv3x3_chunked<const UP: u32>(
    s: &ConvShape,
    x: Src,
    affine: Option<&Affine>,
    u: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    budget: usize,
) {
    assert_eq!(
        x.len(),
        s.n * s.cin * (s.h >> UP) * (s.w >> UP),
        "Winograd: input size"
    );
    assert!(
        s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1,
        "Winograd: 3x3/s1/p1 only"
    );
    let (cin, cout) = (s.cin, s.cout);
    assert_eq!(u.len(), 36 * cin * cout, "Winograd: filter transform size");
    let tw = s.w.div_ceil(4);
    let g = Tiles {
        h: s.h,
        w: s.w,
        tw,
        per_img: s.h.div_ceil(4) * tw,
    };
    let nt = s.n * g.per_img;
    let tc = (budget / (36 * (cin + cout))).clamp(LN, nt.next_multiple_of(LN));
    let tc = tc.next_multiple_of(LN);
    // Stale scratch is fine: V's columns past `nb` and M are never read before written.
    let mut v = super::scratch::take(36 * cin * tc);
    let mut m = super::scratch::take(36 * cout * tc);
    let mut t0 = 0;
    while t0 < nt {
        let nb = tc.min(nt - t0);
        input_transform::<UP>(x, affine, cin, g, t0, nb, &mut v, tc);
        // The 36 products are independent: one single-threaded GEMM per task.
        m.par_chunks_mut(cout * tc)
            .enumerate()
            .for_each(|(xi, mx)| {
                sgemm_slices_st(
                    false,
                    false,
                    cout,
                    nb,
                    cin,
                    1.0,
                    &u[xi * cout * cin..(xi + 1) * cout * cin],
                    cin,
                    &v[xi * cin * tc..(xi + 1) * cin * tc],
                    tc,
                    0.0,
                    mx,
                    tc,
                );
            });
        output_transform(&m, cout, g, t0, nb, tc, bias, out);
        t0 += nb;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading the map through the x2 upsample and/or the affine map + SiLU, from f32 or a
    /// bf16 / f16 map, gives the bits of convolving the stored f32 map, also when chunks of
    /// tiles end inside an image and span two images (small budgets), and for maps whose size
    /// is not a multiple of the 4x4 tiles.
    #[test]
    fn reading_in_place_equals_the_stored_map_across_chunks() {
        use half::{bf16, f16};
        let (n, cin, cout) = (2, 5, 3);
        for &(h, w) in &[(10, 14), (7, 9)] {
            for (up2, src) in [(false, 0), (true, 0), (false, 1), (true, 2)] {
                for (silu, with_affine) in [(false, false), (true, true), (false, true)] {
                    let (sh, sw) = if up2 { (h / 2, w / 2) } else { (h, w) };
                    let (h, w) = if up2 { (2 * sh, 2 * sw) } else { (h, w) };
                    let x32 = crate::kernels::test_noise(n * cin * sh * sw, 3);
                    let xb: Vec<bf16> = x32.iter().map(|&v| bf16::from_f32(v)).collect();
                    let xh: Vec<f16> = x32.iter().map(|&v| f16::from_f32(v)).collect();
                    let (x, xs): (Vec<f32>, Src) = match src {
                        0 => (x32.clone(), Src::F32(&x32)),
                        1 => (xb.iter().map(|v| v.to_f32()).collect(), Src::Bf16(&xb)),
                        _ => (xh.iter().map(|v| v.to_f32()).collect(), Src::F16(&xh)),
                    };
                    let a = crate::kernels::test_noise(n * cin, 5);
                    let b = crate::kernels::test_noise(n * cin, 7);
                    let wt = crate::kernels::test_noise(cout * cin * 9, 9);
                    let bias = crate::kernels::test_noise(cout, 11);
                    let u = filter_transform(&wt, cout, cin);
                    // The stored map: upsampled, then mapped plane by plane.
                    let mut stored = vec![0.0f32; n * cin * h * w];
                    for p in 0..n * cin {
                        for y in 0..h {
                            for xx in 0..w {
                                let (yy, xs) = if up2 { (y / 2, xx / 2) } else { (y, xx) };
                                stored[(p * h + y) * w + xx] = x[(p * sh + yy) * sw + xs];
                            }
                        }
                        if with_affine {
                            let plane = stored[p * h * w..(p + 1) * h * w].to_vec();
                            let dst = &mut stored[p * h * w..(p + 1) * h * w];
                            crate::kernels::norm::affine(&plane, dst, a[p], b[p], silu);
                        }
                    }
                    let s = ConvShape::same3x3(n, cin, h, w, cout);
                    let af = Affine { a: &a, b: &b, silu };
                    let af = with_affine.then_some(&af);
                    let tiles = n * h.div_ceil(4) * w.div_ceil(4);
                    // Chunks of 8 tiles (the lane width) up to all tiles at once.
                    for tc in [8, 16, tiles.next_multiple_of(8)] {
                        let budget = tc * 36 * (cin + cout);
                        let mut want = vec![0.0f32; n * cout * h * w];
                        let st = Src::F32(&stored);
                        conv3x3_chunked::<0>(&s, st, None, &u, Some(&bias), &mut want, budget);
                        let mut got = vec![0.0f32; n * cout * h * w];
                        if up2 {
                            conv3x3_chunked::<1>(&s, xs, af, &u, Some(&bias), &mut got, budget);
                        } else {
                            conv3x3_chunked::<0>(&s, xs, af, &u, Some(&bias), &mut got, budget);
                        }
                        let differing = got
                            .iter()
                            .zip(&want)
                            .filter(|(p, q)| p.to_bits() != q.to_bits())
                            .count();
                        assert_eq!(
                            differing, 0,
                            "{h}x{w} up2 {up2} src {src} affine {with_affine} silu {silu} chunk {tc}"
                        );
                    }
                }
            }
        }
    }

    /// `U = G g Gᵀ` with the matrix `G` written out, in f64.
    #[test]
    fn filter_transform_matches_g_g_gt() {
        let gm: [[f64; 3]; 6] = [
            [1.0 / 4.0, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        // 3 x 43 = 129 filters: two full blocks of FB and a partial one.
        let (cout, cin) = (3, 43);
        let w = super::super::test_noise(cout * cin * 9, 7);
        let u = filter_transform(&w, cout, cin);
        let plane = cout * cin;
        for kc in 0..plane {
            let g = &w[kc * 9..kc * 9 + 9];
            for r in 0..6 {
                for c in 0..6 {
                    let mut want = 0.0f64;
                    for a in 0..3 {
                        for b in 0..3 {
                            want += gm[r][a] * g[a * 3 + b] as f64 * gm[c][b];
                        }
                    }
                    let got = u[(r * 6 + c) * plane + kc] as f64;
                    assert!(
                        (got - want).abs() < 1e-6,
                        "kc {kc} ({r},{c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
