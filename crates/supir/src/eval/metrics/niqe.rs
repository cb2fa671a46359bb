//! NIQE, the no-reference "Natural Image Quality Evaluator" (Mittal et al. 2013), computed as BasicSR
//! 1.4.2's `calculate_niqe(img, crop_border)` does (lower is better):
//!
//! 1. MATLAB `rgb2ycbcr` luma in `[16, 235]`, border crop, rounded to integers (BasicSR rounds to match
//!    MATLAB); the image is cut down to whole 96x96 blocks.
//! 2. At two scales (the image, then MATLAB-`imresize` bicubic by 1/2 with antialiasing): MSCN coefficients
//!    `(I - mu) / (sigma + 1)` with the 7x7 Gaussian window (sigma 7/6) and replicate ('nearest') padding;
//!    per block, an AGGD fit of the coefficients and of their products with the 4 neighbours (horizontal,
//!    vertical, two diagonals, circular shifts), 18 features per scale.
//! 3. A Gaussian fitted to the 36-dimensional block features (NaN rows dropped) is compared with the pristine
//!    model: `sqrt((mu_p - mu)^T pinv((cov_p + cov) / 2) (mu_p - mu))`.
//!
//! BasicSR runs this in float32 numpy/torch (numpy 1.x promotion rules); the element-wise float32 roundings
//! and numpy's float32 summation order (pairwise, in 8192-element chunks) are reproduced here so the
//! discrete gamma-table look-up picks the same entries. The one order left to chance is the BLAS dot
//! product in the column pass of BasicSR's `imresize` (MKL, CPU-dependent): with it rounded exactly we agree
//! with BasicSR to ~1e-13, and with stock BasicSR (MKL, AVX-512) to ~3e-5, the spread BasicSR itself has.

use std::sync::OnceLock;

use image::RgbImage;

use crate::{Error, Result};

/// Block size of the features (the official recommendation, BasicSR's default).
const BLOCK: usize = 96;
/// Number of features per block and scale.
const NFEAT: usize = 18;

/// The pristine model shipped in BasicSR's `niqe_pris_params.npz` (see `data/niqe/README.md`).
struct Pristine {
    mu: Vec<f64>,
    /// Row-major 36x36.
    cov: Vec<f64>,
    /// 7x7 Gaussian window, row-major.
    window: [[f64; 7]; 7],
}

fn pristine() -> &'static Pristine {
    static P: OnceLock<Pristine> = OnceLock::new();
    P.get_or_init(|| {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../../data/niqe/niqe_pris_params.json"))
                .expect("embedded niqe_pris_params.json is valid JSON");
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            let flat: Vec<&serde_json::Value> = match v.as_array() {
                Some(a) if a.iter().all(|x| x.is_array()) => a
                    .iter()
                    .flat_map(|r| r.as_array().expect("row").iter())
                    .collect(),
                Some(a) => a.iter().collect(),
                None => panic!("embedded NIQE parameters: expected an array"),
            };
            flat.iter()
                .map(|x| x.as_f64().expect("embedded NIQE parameters: number"))
                .collect()
        };
        let mu = floats(&v["mu_pris_param"]);
        let cov = floats(&v["cov_pris_param"]);
        let w = floats(&v["gaussian_window"]);
        assert!(mu.len() == 2 * NFEAT && cov.len() == 4 * NFEAT * NFEAT && w.len() == 49);
        let mut window = [[0.0; 7]; 7];
        for (i, row) in window.iter_mut().enumerate() {
            row.copy_from_slice(&w[i * 7..i * 7 + 7]);
        }
        Pristine { mu, cov, window }
    })
}

/// A float32 grey plane, row-major.
#[derive(Clone)]
struct Plane {
    w: usize,
    h: usize,
    px: Vec<f32>,
}

/// NIQE of an 8-bit RGB image with `crop_border` pixels dropped on each side, as BasicSR's
/// `calculate_niqe(img, crop_border)` (input order HWC, `convert_to='y'`). Needs at least two 96x96 blocks
/// after cropping.
pub fn niqe(img: &RgbImage, crop_border: u32) -> Result<f64> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let c = crop_border as usize;
    if 2 * c >= w || 2 * c >= h {
        return Err(Error::Option(format!(
            "niqe: crop_border {c} leaves nothing of a {w}x{h} image"
        )));
    }
    let (cw, ch) = (w - 2 * c, h - 2 * c);
    let (nbw, nbh) = (cw / BLOCK, ch / BLOCK);
    if nbw * nbh < 2 {
        return Err(Error::Option(format!(
            "niqe: needs at least two {BLOCK}x{BLOCK} blocks (e.g. 192x96 pixels) after the border crop, \
             got {cw}x{ch}"
        )));
    }
    let raw = img.as_raw();
    let (bw, bh) = (nbw * BLOCK, nbh * BLOCK);
    let mut px = Vec::with_capacity(bw * bh);
    for y in 0..bh {
        for x in 0..bw {
            let i = ((y + c) * w + (x + c)) * 3;
            // Exact: the luma is a float32 value.
            px.push((super::rgb_to_y(raw[i], raw[i + 1], raw[i + 2]) as f32).round_ties_even());
        }
    }
    niqe_plane(Plane { w: bw, h: bh, px }, nbw, nbh)
}

fn niqe_plane(mut img: Plane, nbw: usize, nbh: usize) -> Result<f64> {
    let p = pristine();
    let nblocks = nbw * nbh;
    let mut feats = vec![[f64::NAN; 2 * NFEAT]; nblocks];
    for scale in 0..2 {
        let mscn = mscn(&img, &p.window);
        let bs = BLOCK >> scale;
        let mut k = 0;
        for bx in 0..nbw {
            for by in 0..nbh {
                let mut block = Vec::with_capacity(bs * bs);
                for y in by * bs..(by + 1) * bs {
                    block.extend_from_slice(
                        &mscn.px[y * mscn.w + bx * bs..y * mscn.w + (bx + 1) * bs],
                    );
                }
                let f = block_features(&block, bs, bs);
                feats[k][scale * NFEAT..(scale + 1) * NFEAT].copy_from_slice(&f);
                k += 1;
            }
        }
        if scale == 0 {
            img.px.iter_mut().for_each(|v| *v /= 255.0);
            img = imresize_half(&img);
            img.px.iter_mut().for_each(|v| *v *= 255.0);
        }
    }
    let n = 2 * NFEAT;
    // np.nanmean over blocks.
    let mu: Vec<f64> = (0..n)
        .map(|j| {
            let (s, c) = feats
                .iter()
                .filter(|r| !r[j].is_nan())
                .fold((0.0, 0usize), |(s, c), r| (s + r[j], c + 1));
            s / c as f64
        })
        .collect();
    // np.cov(rowvar=False) over the blocks without NaN features (ddof 1).
    let rows: Vec<&[f64; 36]> = feats
        .iter()
        .filter(|r| r.iter().all(|v| !v.is_nan()))
        .collect();
    if rows.len() < 2 {
        return Err(Error::Option(format!(
            "niqe: only {} of {nblocks} blocks have finite features; the image is too flat or too small",
            rows.len()
        )));
    }
    let m = rows.len();
    let avg: Vec<f64> = (0..n)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / m as f64)
        .collect();
    let fact = 1.0 / (m - 1) as f64;
    let mut a = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let c: f64 = rows.iter().map(|r| (r[i] - avg[i]) * (r[j] - avg[j])).sum();
            a[i * n + j] = (p.cov[i * n + j] + c * fact) / 2.0;
        }
    }
    let inv = pinv_symmetric(&a, n);
    let d: Vec<f64> = (0..n).map(|i| p.mu[i] - mu[i]).collect();
    let mut q = 0.0;
    for i in 0..n {
        let row: f64 = (0..n).map(|j| d[j] * inv[j * n + i]).sum();
        q += row * d[i];
    }
    Ok(q.sqrt())
}

/// MSCN coefficients `(I - mu) / (sigma + 1)` in float32, `mu`/`sigma` the local Gaussian-weighted mean and
/// standard deviation (`scipy.ndimage.convolve(mode='nearest')`: f64 accumulation, float32 output).
fn mscn(img: &Plane, win: &[[f64; 7]; 7]) -> Plane {
    let mu = convolve_nearest(img, win);
    let sq = Plane {
        w: img.w,
        h: img.h,
        px: img.px.iter().map(|v| v * v).collect(),
    };
    let e2 = convolve_nearest(&sq, win);
    let px = img
        .px
        .iter()
        .zip(&mu)
        .zip(&e2)
        .map(|((&v, &m), &e)| (v - m) / ((e - m * m).abs().sqrt() + 1.0))
        .collect();
    Plane {
        w: img.w,
        h: img.h,
        px,
    }
}

/// 2-D convolution with a 7x7 window, edges replicated.
fn convolve_nearest(img: &Plane, win: &[[f64; 7]; 7]) -> Vec<f32> {
    let (w, h) = (img.w as isize, img.h as isize);
    let mut out = Vec::with_capacity(img.px.len());
    for y in 0..h {
        for x in 0..w {
            let mut s = 0.0f64;
            for (a, wrow) in win.iter().rev().enumerate() {
                let yy = (y + a as isize - 3).clamp(0, h - 1) as usize;
                let row = &img.px[yy * img.w..(yy + 1) * img.w];
                for (b, wv) in wrow.iter().rev().enumerate() {
                    let xx = (x + b as isize - 3).clamp(0, w - 1) as usize;
                    s += wv * row[xx] as f64;
                }
            }
            out.push(s as f32);
        }
    }
    out
}

/// MATLAB `imresize(img, 0.5)` (bicubic, `a = -0.5`, antialiased: the kernel stretched by 2), as BasicSR's
/// `imresize`: separable, rows then columns, symmetric (half-sample) edge mirroring, float32 results.
/// For scale 1/2 the 8 taps are the same for every output pixel: `0.5 * cubic((4.5 - j - 1) / 2)`.
fn imresize_half(img: &Plane) -> Plane {
    fn cubic(x: f64) -> f64 {
        let a = x.abs();
        if a <= 1.0 {
            1.5 * a * a * a - 2.5 * a * a + 1.0
        } else if a <= 2.0 {
            -0.5 * a * a * a + 2.5 * a * a - 4.0 * a + 2.0
        } else {
            0.0
        }
    }
    let mut taps = [0.0f64; 8];
    for (j, t) in taps.iter_mut().enumerate() {
        *t = 0.5 * cubic((3.5 - j as f64) * 0.5);
    }
    let sum: f64 = taps.iter().sum();
    taps.iter_mut().for_each(|t| *t /= sum);
    // Output o reads inputs 2o-3 ..= 2o+4.
    let mirror = |i: isize, n: usize| -> usize {
        if i < 0 {
            (-i - 1) as usize
        } else if i as usize >= n {
            2 * n - 1 - i as usize
        } else {
            i as usize
        }
    };
    let (w, h) = (img.w, img.h);
    let (ow, oh) = (w.div_ceil(2), h.div_ceil(2));
    // Rows: torch's `mv` on the strided view accumulates tap by tap in float32 (axpy order).
    let mut rows = vec![0.0f32; oh * w];
    for o in 0..oh {
        let acc = &mut rows[o * w..(o + 1) * w];
        for (k, &t) in taps.iter().enumerate() {
            let src = mirror(2 * o as isize - 3 + k as isize, h) * w;
            for (a, &v) in acc.iter_mut().zip(&img.px[src..src + w]) {
                *a += t as f32 * v;
            }
        }
    }
    // Columns: a dot product of 8 contiguous values, whose float32 order depends on the BLAS kernel; the
    // exactly rounded sum is used (within an ulp of any order).
    let mut px = vec![0.0f32; oh * ow];
    for y in 0..oh {
        for o in 0..ow {
            let s: f64 = taps
                .iter()
                .enumerate()
                .map(|(k, t)| t * rows[y * w + mirror(2 * o as isize - 3 + k as isize, w)] as f64)
                .sum();
            px[y * ow + o] = s as f32;
        }
    }
    Plane { w: ow, h: oh, px }
}

/// BasicSR `compute_feature`: AGGD shape and mean scale of the block, then for each neighbour product
/// (`np.roll` shifts (0,1), (1,0), (1,1), (1,-1)) shape, mean, left and right scale.
fn block_features(block: &[f32], w: usize, h: usize) -> [f64; NFEAT] {
    let mut f = [0.0; NFEAT];
    let (alpha, bl, br) = aggd_fit(block);
    f[0] = alpha;
    f[1] = (bl + br) / 2.0;
    let shifts: [(usize, usize); 4] = [(0, 1), (1, 0), (1, 1), (1, w - 1)];
    let mut prod = vec![0.0f32; w * h];
    for (s, &(dy, dx)) in shifts.iter().enumerate() {
        for y in 0..h {
            let sy = (y + h - dy) % h;
            for x in 0..w {
                let sx = (x + w - dx) % w;
                prod[y * w + x] = block[y * w + x] * block[sy * w + sx];
            }
        }
        let (alpha, bl, br) = aggd_fit(&prod);
        let mean = (br - bl) * (gamma(2.0 / alpha) / gamma(1.0 / alpha));
        f[2 + 4 * s..6 + 4 * s].copy_from_slice(&[alpha, mean, bl, br]);
    }
    f
}

/// The shape grid `0.2, 0.201, ..., 10.0` (as `np.arange(0.2, 10.001, 0.001)` fills it) and
/// `r(g) = Gamma(2/g)^2 / (Gamma(1/g) Gamma(3/g))`.
fn gamma_table() -> &'static (Vec<f64>, Vec<f64>) {
    static T: OnceLock<(Vec<f64>, Vec<f64>)> = OnceLock::new();
    T.get_or_init(|| {
        let (start, stop, step) = (0.2f64, 10.001f64, 0.001f64);
        let n = ((stop - start) / step).ceil() as usize;
        let delta = (start + step) - start;
        let gam: Vec<f64> = (0..n)
            .map(|i| match i {
                0 => start,
                1 => start + step,
                _ => start + i as f64 * delta,
            })
            .collect();
        let r = gam
            .iter()
            .map(|g| {
                let rec = 1.0 / g;
                let a = gamma(rec * 2.0);
                a * a / (gamma(rec) * gamma(rec * 3.0))
            })
            .collect();
        (gam, r)
    })
}

/// BasicSR `estimate_aggd_param`: `(alpha, beta_l, beta_r)` of an asymmetric generalised Gaussian by
/// moment matching against the gamma table (first best entry; entry 0 when the ratio is NaN, as
/// `np.argmin`).
fn aggd_fit(x: &[f32]) -> (f64, f64, f64) {
    let neg: Vec<f32> = x.iter().filter(|v| **v < 0.0).map(|v| v * v).collect();
    let pos: Vec<f32> = x.iter().filter(|v| **v > 0.0).map(|v| v * v).collect();
    let left = np_mean_f32(&neg).sqrt();
    let right = np_mean_f32(&pos).sqrt();
    let gh = (left / right) as f64;
    let abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let sq: Vec<f32> = x.iter().map(|v| v * v).collect();
    let m_abs = np_mean_f32(&abs) as f64;
    let rhat = m_abs.powi(2) / np_mean_f32(&sq) as f64;
    let rhatnorm = (rhat * (gh.powf(3.0) + 1.0) * (gh + 1.0)) / (gh.powi(2) + 1.0).powi(2);
    let (gam, r) = gamma_table();
    let mut best = 0;
    if !rhatnorm.is_nan() {
        let mut best_d = f64::INFINITY;
        for (i, rv) in r.iter().enumerate() {
            let d = (rv - rhatnorm) * (rv - rhatnorm);
            if d < best_d {
                best_d = d;
                best = i;
            }
        }
    }
    let alpha = gam[best];
    let c = (gamma(1.0 / alpha) / gamma(3.0 / alpha)).sqrt();
    (alpha, left as f64 * c, right as f64 * c)
}

/// `np.mean` of a contiguous float32 array: float32 pairwise summation (numpy's `pairwise_sum`) over chunks
/// of 8192 elements (the ufunc buffer size), then a float32 division; NaN when empty.
fn np_mean_f32(x: &[f32]) -> f32 {
    fn pairwise(a: &[f32]) -> f32 {
        let n = a.len();
        if n < 8 {
            let mut r = 0.0f32;
            for v in a {
                r += v;
            }
            r
        } else if n <= 128 {
            let mut r = [0.0f32; 8];
            r.copy_from_slice(&a[..8]);
            let mut i = 8;
            while i < n - n % 8 {
                for j in 0..8 {
                    r[j] += a[i + j];
                }
                i += 8;
            }
            let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            for v in &a[i..] {
                res += v;
            }
            res
        } else {
            let mut n2 = n / 2;
            n2 -= n2 % 8;
            pairwise(&a[..n2]) + pairwise(&a[n2..])
        }
    }
    if x.is_empty() {
        return f32::NAN;
    }
    let mut s = 0.0f32;
    for chunk in x.chunks(8192) {
        s += pairwise(chunk);
    }
    (s as f64 / x.len() as f64) as f32
}

/// The gamma function for positive arguments (Lanczos approximation, g = 7, 9 terms; relative error
/// ~1e-15 on the range NIQE uses, 0.1..15).
pub(crate) fn gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

/// Moore-Penrose pseudo-inverse of a symmetric `n x n` matrix (row-major) through a cyclic Jacobi
/// eigen-decomposition; eigenvalues below `1e-15 * max |lambda|` are dropped, as `np.linalg.pinv`'s
/// default `rcond` does with singular values.
fn pinv_symmetric(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        let diag: f64 = (0..n).map(|i| m[i * n + i] * m[i * n + i]).sum();
        if off <= 1e-32 * diag {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let lambda: Vec<f64> = (0..n).map(|i| m[i * n + i]).collect();
    let cutoff = 1e-15 * lambda.iter().fold(0.0f64, |a, l| a.max(l.abs()));
    let mut out = vec![0.0; n * n];
    for (k, &l) in lambda.iter().enumerate() {
        if l.abs() <= cutoff {
            continue;
        }
        let inv = 1.0 / l;
        for i in 0..n {
            let vi = v[i * n + k] * inv;
            for j in 0..n {
                out[i * n + j] += vi * v[j * n + k];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_matches_known_values() {
        // Gamma(1/2) = sqrt(pi), Gamma(5) = 24, Gamma(0.2) = 4.590843711998803 (A&S table).
        assert!((gamma(0.5) - std::f64::consts::PI.sqrt()).abs() < 1e-14);
        assert!((gamma(5.0) - 24.0).abs() < 1e-12);
        assert!((gamma(0.2) - 4.590_843_711_998_803).abs() < 1e-13);
        assert!((gamma(1.5) - 0.886_226_925_452_758).abs() < 1e-14);
    }

    #[test]
    fn gamma_table_spans_the_numpy_grid() {
        let (g, r) = gamma_table();
        assert_eq!(g.len(), 9801);
        assert!((g[9800] - 10.0).abs() < 1e-9);
        // r(2) = Gamma(1)^2 / (Gamma(1/2) Gamma(3/2)) = 2 / pi (the Gaussian).
        assert!((r[1800] - 2.0 / std::f64::consts::PI).abs() < 1e-12);
    }

    #[test]
    fn pinv_inverts_a_symmetric_matrix() {
        let a = [4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let inv = pinv_symmetric(&a, 3);
        for i in 0..3 {
            for j in 0..3 {
                let e: f64 = (0..3).map(|k| a[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!(
                    (e - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12,
                    "{i} {j} {e}"
                );
            }
        }
        // Rank-deficient: pinv of [[1,1],[1,1]] is [[.25,.25],[.25,.25]].
        let p = pinv_symmetric(&[1.0, 1.0, 1.0, 1.0], 2);
        assert!(p.iter().all(|v| (v - 0.25).abs() < 1e-12), "{p:?}");
    }

    #[test]
    fn imresize_half_keeps_constants_and_halves_size() {
        let img = Plane {
            w: 10,
            h: 7,
            px: vec![0.25; 70],
        };
        let out = imresize_half(&img);
        assert_eq!((out.w, out.h), (5, 4));
        assert!(out.px.iter().all(|v| (v - 0.25).abs() < 1e-7));
    }

    #[test]
    fn numpy_float32_mean_uses_pairwise_chunks() {
        // 0.1 summed 10000 times: a naive f32 loop drifts to ~999.9; pairwise stays within a few ulp.
        let x = vec![0.1f32; 10000];
        let m = np_mean_f32(&x);
        assert!((m - 0.1).abs() < 1e-6, "{m}");
        assert!(np_mean_f32(&[]).is_nan());
    }
}
