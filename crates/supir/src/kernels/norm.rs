//! GroupNorm (optionally fused with the SiLU that follows it in every ResBlock) on NCHW f32.
//!
//! `y = (x - mean_g) / sqrt(var_g + eps) · gamma[c] + beta[c]`, statistics over each group's
//! `C/G · H·W` values (biased variance, as `torch.nn.GroupNorm`), then `y · sigmoid(y)` when
//! fused. One read for the mean, one for the variance (two-pass, f64 sums), one write: the
//! unfused candle form makes about eight passes over the map.

use rayon::prelude::*;

/// In place over `x` `[n][c][hw]`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    silu: bool,
    out: &mut [f32],
) {
    let cg = check(x, n, c, hw, groups, out);
    if cg * hw == 0 {
        return;
    }
    out.par_chunks_mut(cg * hw)
        .zip(x.par_chunks(cg * hw))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            let g = i % groups;
            normalize_group(src, dst, hw, g * cg, eps, gamma, beta, silu);
        });
}

/// Checks the sizes of a group norm; returns the channels per group.
fn check(x: &[f32], n: usize, c: usize, hw: usize, groups: usize, out: &[f32]) -> usize {
    assert!(
        groups > 0 && c.is_multiple_of(groups),
        "group_norm: {c} channels, {groups} groups"
    );
    assert_eq!(x.len(), n * c * hw, "group_norm: input size");
    assert_eq!(out.len(), x.len(), "group_norm: output size");
    c / groups
}

/// The affine map (+ SiLU) of [`group_norm`] with given per-(item, group) statistics `mean`
/// and `rstd = 1 / sqrt(var + eps)` (`[n][groups]`): the tiled VAE normalises each tile with
/// statistics gathered over all tiles.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with_stats(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
    out: &mut [f32],
) {
    let cg = check(x, n, c, hw, groups, out);
    assert!(
        mean.len() == n * groups && rstd.len() == n * groups,
        "group_norm: stats size"
    );
    if cg * hw == 0 {
        return;
    }
    out.par_chunks_mut(cg * hw)
        .zip(x.par_chunks(cg * hw))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            let g = i % groups;
            for ci in 0..cg {
                let ch = g * cg + ci;
                let a = gamma[ch] * rstd[i];
                let b = beta[ch] - mean[i] * a;
                affine(
                    &src[ci * hw..(ci + 1) * hw],
                    &mut dst[ci * hw..(ci + 1) * hw],
                    a,
                    b,
                    silu,
                );
            }
        });
}

super::avx2_dispatch! {
    /// `y = x·a + b`, then `y·sigmoid(y)` when `silu`.
    pub(crate) fn affine(s: &[f32], d: &mut [f32], a: f32, b: f32, silu: bool) {
        if silu {
            for (o, &v) in d.iter_mut().zip(s) {
                let y = v * a + b;
                *o = y * sigmoid(y);
            }
        } else {
            for (o, &v) in d.iter_mut().zip(s) {
                *o = v * a + b;
            }
        }
    }
}

super::avx2_dispatch! {
    /// One group (`cg` channels of `hw` values from channel `c0`): statistics, then the affine
    /// map and the optional SiLU.
    fn normalize_group(
        src: &[f32],
        dst: &mut [f32],
        hw: usize,
        c0: usize,
        eps: f64,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        silu: bool,
    ) {
        let glen = src.len();
        let mean = lane_sum(src, |v| v) / glen as f64;
        let m32 = mean as f32;
        let var = lane_sum(src, |v| (v - m32) * (v - m32)) / glen as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for (ci, (s, d)) in src.chunks_exact(hw).zip(dst.chunks_exact_mut(hw)).enumerate() {
            let ch = c0 + ci;
            let gm = gamma.map_or(1.0, |w| w[ch] as f64);
            let bt = beta.map_or(0.0, |b| b[ch] as f64);
            let a = (gm * rstd) as f32;
            let b = (bt - mean * gm * rstd) as f32;
            affine(s, d, a, b, silu);
        }
    }
}

/// `Σ f(x)` with 16 f32 lanes over blocks of 256 values, each block's total added in f64
/// (vectorises; the f32 partial sums hold 16 values each).
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(256) {
        let mut acc = [0.0f32; 16];
        let mut it = block.chunks_exact(16);
        for c in &mut it {
            for l in 0..16 {
                acc[l] += f(c[l]);
            }
        }
        let mut t = it.remainder().iter().map(|&v| f(v) as f64).sum::<f64>();
        t += acc.iter().map(|&a| a as f64).sum::<f64>();
        total += t;
    }
    total
}

/// `1 / (1 + e^-x)` with [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x` to about 2 ulp in straight-line arithmetic (vectorises): `2^i · p(y)` after
/// `x = i ln 2 + y`, `|y| <= ln2/2`, degree-6 Taylor polynomial; saturates outside ±87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Selects rather than f32::clamp/max (whose NaN rules keep the loop scalar).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 87.0 { 87.0 } else { x };
    // Round x·log2(e) to the nearest integer i with the 1.5·2^23 trick: the sum's low mantissa
    // bits hold i, so 2^i is built with integer ops (no float->int conversion, no libm call).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let i = t - MAGIC;
    // Cody-Waite: y = x - i·ln2 with ln2 split so that i·LN2_HI is exact; |y| <= ln2/2.
    let y = x - i * 0.693_145_75 - i * 1.428_606_8e-6;
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    let two_i = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * two_i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 87.0 {
            let r = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(r);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(200.0) <= 1.0);
    }

    #[test]
    fn given_statistics_reproduce_group_norm() {
        let (n, c, hw, groups) = (2, 8, 12, 4);
        let x: Vec<f32> = (0..n * c * hw)
            .map(|i| ((i * 29 % 97) as f32) / 7.0 - 5.0)
            .collect();
        let gamma: Vec<f32> = (0..c).map(|i| 1.0 - i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 * 0.05).collect();
        let glen = c / groups * hw;
        let (mut mean, mut rstd) = (Vec::new(), Vec::new());
        for g in x.chunks(glen) {
            let m = g.iter().map(|&v| v as f64).sum::<f64>() / glen as f64;
            let v = g.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / glen as f64;
            mean.push(m as f32);
            rstd.push((1.0 / (v + 1e-6).sqrt()) as f32);
        }
        for silu in [false, true] {
            let mut a = vec![0.0; x.len()];
            let mut b = vec![0.0; x.len()];
            group_norm(
                &x,
                n,
                c,
                hw,
                groups,
                1e-6,
                Some(&gamma),
                Some(&beta),
                silu,
                &mut a,
            );
            group_norm_with_stats(
                &x, n, c, hw, groups, &mean, &rstd, &gamma, &beta, silu, &mut b,
            );
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 2e-6, "{silu}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn group_norm_matches_formula() {
        let (n, c, hw, groups) = (2, 6, 10, 3);
        let x: Vec<f32> = (0..n * c * hw)
            .map(|i| ((i * 37 % 101) as f32) / 9.0 - 3.0)
            .collect();
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 * 0.1 - 0.2).collect();
        for silu in [false, true] {
            let mut out = vec![0.0; x.len()];
            group_norm(
                &x,
                n,
                c,
                hw,
                groups,
                1e-5,
                Some(&gamma),
                Some(&beta),
                silu,
                &mut out,
            );
            let cg = c / groups;
            for b in 0..n {
                for g in 0..groups {
                    let s = &x[(b * c + g * cg) * hw..(b * c + (g + 1) * cg) * hw];
                    let mean = s.iter().map(|&v| v as f64).sum::<f64>() / s.len() as f64;
                    let var =
                        s.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / s.len() as f64;
                    for ci in 0..cg {
                        let ch = g * cg + ci;
                        for p in 0..hw {
                            let i = (b * c + ch) * hw + p;
                            let mut y = (x[i] as f64 - mean) / (var + 1e-5).sqrt()
                                * gamma[ch] as f64
                                + beta[ch] as f64;
                            if silu {
                                y /= 1.0 + (-y).exp();
                            }
                            assert!(
                                (out[i] as f64 - y).abs() < 2e-6,
                                "{silu} {i}: {} vs {y}",
                                out[i]
                            );
                        }
                    }
                }
            }
        }
    }
}
