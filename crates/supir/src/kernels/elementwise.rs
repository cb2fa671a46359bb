//! Element-wise activations on f32 rows, fused where the networks chain them.

use rayon::prelude::*;

use super::norm::exp;

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (1.5e-7 in exact arithmetic, within 1e-6 evaluated in
/// f32), branch-free so loops vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = if x < 0.0 { -x } else { x };
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-ax * ax);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// Exact (erf) GELU: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

super::avx2_dispatch! {
    fn geglu_rows(p: &[f32], out: &mut [f32], inner: usize) {
        for (src, dst) in p.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
            let (a, gate) = src.split_at(inner);
            for ((o, &av), &g) in dst.iter_mut().zip(a).zip(gate) {
                *o = av * gelu(g);
            }
        }
    }
}

/// GEGLU (`sgm` `GEGLU`): rows of `p` `[rows][2·inner]` are `[a, gate]`; `out[rows][inner] =
/// a · gelu(gate)`, in one pass instead of narrow, GELU and product.
pub fn geglu(p: &[f32], inner: usize, out: &mut [f32]) {
    assert!(
        inner > 0 && p.len().is_multiple_of(2 * inner),
        "geglu: rows of 2·{inner}"
    );
    assert_eq!(out.len() * 2, p.len(), "geglu: output size");
    let rows_per_task = (1 << 16) / inner + 1;
    p.par_chunks(2 * inner * rows_per_task)
        .zip(out.par_chunks_mut(inner * rows_per_task))
        .for_each(|(src, dst)| geglu_rows(src, dst, inner));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_geglu_match_libm() {
        let mut worst = 0.0f64;
        let mut x = -6.0f64;
        while x < 6.0 {
            worst = worst.max((erf(x as f32) as f64 - libm::erf(x)).abs());
            x += 0.001;
        }
        assert!(worst < 1e-6, "erf error {worst}");
        let inner = 5;
        let p: Vec<f32> = (0..3 * 2 * inner).map(|i| i as f32 * 0.37 - 4.0).collect();
        let mut out = vec![0.0; 3 * inner];
        geglu(&p, inner, &mut out);
        for r in 0..3 {
            for i in 0..inner {
                let a = p[r * 2 * inner + i] as f64;
                let g = p[r * 2 * inner + inner + i] as f64;
                let want = a * 0.5 * g * (1.0 + libm::erf(g / 2f64.sqrt()));
                assert!((out[r * inner + i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
    }
}
