//! Tests of the degradation: kernels against their formulas and BasicSR's numpy values,
//! operators against torch / cv2 semantics, the pipeline, the config and the file handling.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::SeedableRng;

use super::kernels::*;
use super::ops::*;
use super::*;

fn rng(seed: u64) -> DegradeRng {
    DegradeRng::seed_from_u64(seed)
}

fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b} (tol {tol})");
}

fn sum(k: &Kernel) -> f64 {
    k.data.iter().sum()
}

/// Offsets (x = column, y = row) of entry (i, j) from the centre.
fn offsets(k: &Kernel, i: usize, j: usize) -> (f64, f64) {
    let r = (k.size / 2) as f64;
    (j as f64 - r, i as f64 - r)
}

fn all_specs() -> Vec<KernelSpec> {
    vec![
        KernelSpec::Iso {
            size: 7,
            sigma: 1.2,
        },
        KernelSpec::Aniso {
            size: 9,
            sigma_x: 2.5,
            sigma_y: 0.6,
            theta: 0.7,
        },
        KernelSpec::GeneralizedIso {
            size: 11,
            sigma: 1.5,
            beta: 0.6,
        },
        KernelSpec::GeneralizedAniso {
            size: 13,
            sigma_x: 0.8,
            sigma_y: 2.2,
            theta: -2.0,
            beta: 3.5,
        },
        KernelSpec::PlateauIso {
            size: 15,
            sigma: 2.0,
            beta: 1.4,
        },
        KernelSpec::PlateauAniso {
            size: 21,
            sigma_x: 3.0,
            sigma_y: 0.5,
            theta: 1.1,
            beta: 2.0,
        },
        KernelSpec::Sinc {
            size: 17,
            omega_c: 1.3,
        },
        KernelSpec::Pulse,
    ]
}

// ---------------------------------------------------------------- kernels

#[test]
fn kernels_sum_to_one_are_padded_and_point_symmetric() {
    for spec in all_specs() {
        let k = spec.kernel(21);
        assert_eq!(k.size, 21, "{spec:?}");
        assert_eq!(k.data.len(), 21 * 21);
        assert_close(sum(&k), 1.0, 1e-12, &format!("{spec:?} sum"));
        for i in 0..21 {
            for j in 0..21 {
                // Every kind is even: k(v) = k(-v), so correlation == convolution.
                assert_close(
                    k.at(i, j),
                    k.at(20 - i, 20 - j),
                    1e-15,
                    &format!("{spec:?} ({i},{j})"),
                );
            }
        }
        // The padding ring is zero: the support is the drawn size.
        if let Some(size) = match spec {
            KernelSpec::Pulse => Some(1),
            KernelSpec::Iso { size, .. } | KernelSpec::Sinc { size, .. } => Some(size),
            _ => None,
        } {
            if size < 21 {
                assert_eq!(k.trimmed().size, size, "{spec:?}");
            }
        }
    }
}

#[test]
fn isotropic_gaussian_matches_closed_form() {
    let sigma = 1.7;
    let k = bivariate_gaussian(11, sigma, sigma, 0.0);
    let z: f64 = (0..121)
        .map(|n| {
            let (x, y) = offsets(&k, n / 11, n % 11);
            (-(x * x + y * y) / (2.0 * sigma * sigma)).exp()
        })
        .sum();
    for i in 0..11 {
        for j in 0..11 {
            let (x, y) = offsets(&k, i, j);
            let want = (-(x * x + y * y) / (2.0 * sigma * sigma)).exp() / z;
            assert_close(k.at(i, j), want, 1e-15, "iso gaussian");
            // Radial: transpose and mirror symmetric.
            assert_close(k.at(i, j), k.at(j, i), 1e-16, "transpose");
            assert_close(k.at(i, j), k.at(i, 10 - j), 1e-16, "mirror");
        }
    }
    // The rotation is irrelevant when σx = σy.
    let rotated = bivariate_gaussian(11, sigma, sigma, 1.234);
    for (a, b) in k.data.iter().zip(&rotated.data) {
        assert_close(*a, *b, 1e-15, "rotation of an isotropic kernel");
    }
}

#[test]
fn anisotropic_gaussian_axes_and_rotation() {
    let (sx, sy) = (2.0, 0.7);
    let k = bivariate_gaussian(9, sx, sy, 0.0);
    // θ = 0: separable, σx along the columns (x), σy along the rows (y).
    let gx: Vec<f64> = (0..9)
        .map(|j| (-((j as f64 - 4.0).powi(2)) / (2.0 * sx * sx)).exp())
        .collect();
    let gy: Vec<f64> = (0..9)
        .map(|i| (-((i as f64 - 4.0).powi(2)) / (2.0 * sy * sy)).exp())
        .collect();
    let z: f64 = gx.iter().sum::<f64>() * gy.iter().sum::<f64>();
    for (i, wy) in gy.iter().enumerate() {
        for (j, wx) in gx.iter().enumerate() {
            assert_close(k.at(i, j), wy * wx / z, 1e-15, "separable");
        }
    }
    assert!(k.at(4, 6) > k.at(6, 4), "wider along x");
    // θ = π/2 swaps the axes: the transpose.
    let r = bivariate_gaussian(9, sx, sy, PI / 2.0);
    for i in 0..9 {
        for j in 0..9 {
            assert_close(r.at(i, j), k.at(j, i), 1e-14, "rotated by π/2");
        }
    }
}

#[test]
fn generalized_and_plateau_match_their_formulas() {
    // β = 1: the generalized Gaussian is the Gaussian.
    let g = bivariate_generalized_gaussian(9, 1.3, 0.9, 0.4, 1.0);
    let n = bivariate_gaussian(9, 1.3, 0.9, 0.4);
    for (a, b) in g.data.iter().zip(&n.data) {
        assert_close(*a, *b, 1e-15, "generalized β=1");
    }
    // Isotropic closed forms with r² = x² + y².
    let (sigma, beta) = (1.6, 0.55);
    let check = |k: &Kernel, f: &dyn Fn(f64) -> f64, what: &str| {
        let z: f64 = (0..k.size * k.size)
            .map(|n| {
                let (x, y) = offsets(k, n / k.size, n % k.size);
                f((x * x + y * y) / (sigma * sigma))
            })
            .sum();
        for i in 0..k.size {
            for j in 0..k.size {
                let (x, y) = offsets(k, i, j);
                let want = f((x * x + y * y) / (sigma * sigma)) / z;
                assert_close(k.at(i, j), want, 1e-15, what);
            }
        }
    };
    check(
        &bivariate_generalized_gaussian(13, sigma, sigma, 0.0, beta),
        &|q| (-0.5 * q.powf(beta)).exp(),
        "generalized iso",
    );
    check(
        &bivariate_plateau(13, sigma, sigma, 0.0, 1.8),
        &|q| 1.0 / (1.0 + q.powf(1.8)),
        "plateau iso",
    );
    // A plateau has heavier tails than the Gaussian of the same σ.
    let p = bivariate_plateau(13, sigma, sigma, 0.0, 1.0);
    let gs = bivariate_gaussian(13, sigma, sigma, 0.0);
    assert!(p.at(6, 0) > gs.at(6, 0) && p.at(6, 6) < gs.at(6, 6));
}

/// Values printed by BasicSR's numpy formulas (`bivariate_Gaussian`,
/// `bivariate_generalized_Gaussian`, `bivariate_plateau`, `circular_lowpass_kernel` with
/// `scipy.special.j1`), anisotropic, at the given (row, column).
#[test]
fn kernels_match_basicsr_numpy_values() {
    type Case = (&'static str, Kernel, [(usize, usize, f64); 6]);
    let cases: Vec<Case> = vec![
        (
            "bivariate_Gaussian(7, 1.3, 0.7, 0.6)",
            bivariate_gaussian(7, 1.3, 0.7, 0.6),
            [
                (0, 0, 0.000547297702791405),
                (1, 4, 0.0011396806961993377),
                (3, 3, 0.17518652058714868),
                (2, 5, 0.0025052468071320795),
                (0, 6, 2.8782563791675746e-09),
                (5, 1, 6.078272253545134e-05),
            ],
        ),
        (
            "bivariate_generalized_Gaussian(9, 1.1, 2.0, -1.0, 0.7)",
            bivariate_generalized_gaussian(9, 1.1, 2.0, -1.0, 0.7),
            [
                (0, 0, 0.005038504340252628),
                (1, 4, 0.008831339612755994),
                (3, 3, 0.03606160562869904),
                (2, 5, 0.013103253627864981),
                (0, 6, 0.001451699181543614),
                (5, 1, 0.008702601544814354),
            ],
        ),
        (
            "bivariate_plateau(11, 1.5, 0.8, 2.2, 1.6)",
            bivariate_plateau(11, 1.5, 0.8, 2.2, 1.6),
            [
                (0, 0, 0.00013566161987918184),
                (1, 4, 0.001284931143276657),
                (3, 3, 0.0025032444698954324),
                (2, 5, 0.0054136782191010315),
                (0, 6, 0.0015497323822142503),
                (5, 1, 0.001277703131325572),
            ],
        ),
        (
            "circular_lowpass_kernel(1.7, 9)",
            circular_lowpass(1.7, 9),
            [
                (0, 0, 0.006790046846779228),
                (1, 4, -0.031785067325867666),
                (3, 3, 0.10386867073928287),
                (2, 5, 0.0015543620125663005),
                (0, 6, 0.010108934030210532),
                (5, 1, -0.0309322198242729),
            ],
        ),
        (
            "circular_lowpass_kernel(pi/4, 21)",
            circular_lowpass(PI / 4.0, 21),
            [
                (0, 0, -0.0015943442827809787),
                (1, 4, 0.0029600919169449785),
                (3, 3, 0.002328054498848281),
                (2, 5, 0.001393330308354433),
                (0, 6, 0.002966492724964598),
                (5, 1, 0.002801170593844204),
            ],
        ),
    ];
    for (name, k, values) in cases {
        for (i, j, want) in values {
            assert_close(
                k.at(i, j),
                want,
                1e-12 * want.abs().max(1e-3),
                &format!("{name} [{i},{j}]"),
            );
        }
    }
}

/// `J1` by its power series `Σ (-1)^m (x/2)^(2m+1) / (m! (m+1)!)`, independent of libm.
fn j1_series(x: f64) -> f64 {
    let mut term = x / 2.0;
    let mut total = term;
    for m in 1..60 {
        term *= -(x * x / 4.0) / (m as f64 * (m + 1) as f64);
        total += term;
    }
    total
}

#[test]
fn sinc_kernel_is_the_jinc_formula() {
    let (cutoff, size) = (2.1, 13);
    let k = circular_lowpass(cutoff, size);
    let raw = |x: f64, y: f64| {
        let r = (x * x + y * y).sqrt();
        if r == 0.0 {
            cutoff * cutoff / (4.0 * PI)
        } else {
            cutoff * j1_series(cutoff * r) / (2.0 * PI * r)
        }
    };
    let z: f64 = (0..size * size)
        .map(|n| {
            let (x, y) = offsets(&k, n / size, n % size);
            raw(x, y)
        })
        .sum();
    for i in 0..size {
        for j in 0..size {
            let (x, y) = offsets(&k, i, j);
            // (The series loses ~1e-10 to cancellation at large arguments.)
            assert_close(k.at(i, j), raw(x, y) / z, 1e-9, "jinc");
            assert_close(k.at(i, j), k.at(j, i), 1e-16, "radial");
        }
    }
    // The centre value is the r → 0 limit of the formula.
    let eps = 1e-7;
    assert_close(
        raw(eps, 0.0),
        cutoff * cutoff / (4.0 * PI),
        1e-9,
        "limit at 0",
    );
    // A jinc rings: negative lobes exist for a cutoff well below π.
    assert!(k.data.iter().any(|&v| v < 0.0));
}

#[test]
fn pad_and_trim_round_trip() {
    let k = bivariate_gaussian(7, 1.0, 1.0, 0.0);
    let p = k.padded(21);
    assert_eq!(p.size, 21);
    assert_eq!(p.at(10, 10), k.at(3, 3));
    assert_eq!(p.at(7, 7), k.at(0, 0));
    assert_eq!(p.at(6, 10), 0.0);
    assert_eq!(p.trimmed(), k);
    assert_eq!(Kernel::pulse(21).trimmed(), Kernel::pulse(1));
}

#[test]
fn kernel_draws_follow_the_published_ranges() {
    let cfg = DegradeConfig::default();
    let d = cfg.blur_draw(1);
    let mut r = rng(1);
    let n = 4000;
    let mut counts = [0usize; 7];
    for _ in 0..n {
        let spec = sample_blur(&d, &mut r);
        let in_sigma = |s: f64| (0.2..=3.0).contains(&s);
        let size = match spec {
            KernelSpec::Iso { size, sigma } => {
                counts[0] += 1;
                assert!(in_sigma(sigma));
                size
            }
            KernelSpec::Aniso {
                size,
                sigma_x,
                sigma_y,
                theta,
            } => {
                counts[1] += 1;
                assert!(in_sigma(sigma_x) && in_sigma(sigma_y) && theta.abs() <= PI);
                size
            }
            KernelSpec::GeneralizedIso { size, beta, .. } => {
                counts[2] += 1;
                assert!((0.5..=4.0).contains(&beta));
                size
            }
            KernelSpec::GeneralizedAniso { size, beta, .. } => {
                counts[3] += 1;
                assert!((0.5..=4.0).contains(&beta));
                size
            }
            KernelSpec::PlateauIso { size, beta, .. } => {
                counts[4] += 1;
                assert!((1.0..=2.0).contains(&beta));
                size
            }
            KernelSpec::PlateauAniso { size, beta, .. } => {
                counts[5] += 1;
                assert!((1.0..=2.0).contains(&beta));
                size
            }
            KernelSpec::Sinc { size, omega_c } => {
                counts[6] += 1;
                let lo = if size < 13 { PI / 3.0 } else { PI / 5.0 };
                assert!(
                    omega_c >= lo && omega_c <= PI,
                    "ωc {omega_c} for size {size}"
                );
                size
            }
            KernelSpec::Pulse => panic!("no pulse in a blur draw"),
        };
        assert!(size % 2 == 1 && (7..=21).contains(&size));
    }
    // sinc 10 %, then the mixture's probabilities of the remaining 90 %.
    let want = [
        0.45 * 0.9,
        0.25 * 0.9,
        0.12 * 0.9,
        0.03 * 0.9,
        0.12 * 0.9,
        0.03 * 0.9,
        0.1,
    ];
    for (c, p) in counts.iter().zip(want) {
        let f = *c as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (f - p).abs() < 5.0 * sd,
            "frequency {f} vs {p} ({counts:?})"
        );
    }
}

#[test]
fn final_sinc_draw() {
    let range = [7, 9, 11];
    let mut r = rng(3);
    let draws: Vec<KernelSpec> = (0..400)
        .map(|_| sample_final_sinc(&range, 0.8, &mut r))
        .collect();
    let sincs = draws
        .iter()
        .filter(|k| matches!(k, KernelSpec::Sinc { .. }))
        .count();
    assert!((280..=360).contains(&sincs), "{sincs} of 400");
    for k in &draws {
        if let KernelSpec::Sinc { size, omega_c } = k {
            assert!(range.contains(size) && *omega_c >= PI / 3.0 && *omega_c <= PI);
        }
    }
    let none: Vec<KernelSpec> = (0..50)
        .map(|_| sample_final_sinc(&range, 0.0, &mut r))
        .collect();
    assert!(none.iter().all(|k| *k == KernelSpec::Pulse));
}

#[test]
fn weighted_choice_matches_random_choices() {
    let mut r = rng(5);
    let w = [0.2, 0.7, 0.1];
    let mut c = [0usize; 3];
    for _ in 0..10_000 {
        c[choose_weighted(&mut r, &w)] += 1;
    }
    for (n, p) in c.iter().zip(w) {
        assert!((*n as f64 / 10_000.0 - p).abs() < 0.02, "{c:?}");
    }
    // Zero weights are never drawn.
    for _ in 0..1000 {
        assert_eq!(choose_weighted(&mut r, &[0.0, 1.0, 0.0]), 1);
    }
}

// ---------------------------------------------------------------- operators

fn textured(h: usize, w: usize) -> Planes {
    Planes::from_fn(3, h, w, |c, y, x| {
        let v = 0.5
            + 0.3 * ((x as f32 * 0.9 + c as f32).sin() * (y as f32 * 0.7).cos())
            + 0.1 * ((x * y) % 5) as f32 / 5.0;
        v.clamp(0.0, 1.0)
    })
}

#[test]
fn reflect101_indices() {
    let got: Vec<usize> = (-4..9).map(|i| reflect101(i, 5)).collect();
    // dcb|abcde|dcb…: edge not repeated.
    assert_eq!(got, vec![4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0]);
    assert_eq!(reflect101(-3, 1), 0);
    assert_eq!(reflect101(-1, 2), 1);
    assert_eq!(reflect101(2, 2), 0);
}

#[test]
fn filter2d_is_correlation_with_reflect101() {
    let img = textured(6, 7);
    // Identity.
    assert_eq!(filter2d(&img, &Kernel::pulse(21)), img);
    // A kernel picking the right-hand neighbour: out(y, x) = in(y, x + 1) (correlation).
    let mut data = vec![0.0; 9];
    data[5] = 1.0; // row 1, column 2
    let right = Kernel { size: 3, data };
    let out = filter2d(&img, &right);
    for c in 0..3 {
        for y in 0..6 {
            for x in 0..7 {
                let sx = reflect101(x as isize + 1, 7);
                assert_eq!(out.at(c, y, x), img.at(c, y, sx));
            }
        }
    }
    // A normalised kernel keeps a constant image; a blur is the weighted reflect-101 sum.
    let k = bivariate_gaussian(5, 1.0, 0.6, 0.3);
    let flat = filter2d(&Planes::filled(3, 4, 4, 0.25), &k);
    assert!(flat.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
    let out = filter2d(&img, &k);
    let (y, x) = (0, 6);
    let want: f64 = (0..5)
        .flat_map(|i| (0..5).map(move |j| (i, j)))
        .map(|(i, j)| {
            let sy = reflect101(y as isize + i as isize - 2, 6);
            let sx = reflect101(x as isize + j as isize - 2, 7);
            k.at(i, j) * f64::from(img.at(1, sy, sx))
        })
        .sum();
    assert_close(f64::from(out.at(1, y, x)), want, 1e-6, "corner");
    // Kernels larger than the image fold the reflection again.
    let tiny = filter2d(
        &Planes::filled(3, 2, 3, 0.5),
        &bivariate_gaussian(21, 3.0, 3.0, 0.0),
    );
    assert!(tiny.data.iter().all(|v| (v - 0.5).abs() < 1e-6));
}

#[test]
fn separable_filter_equals_the_outer_product_kernel() {
    let img = textured(9, 12);
    let k1 = cv2_gaussian_kernel(7);
    let k2 = Kernel {
        size: 7,
        data: (0..49).map(|n| k1[n / 7] * k1[n % 7]).collect(),
    };
    let (a, b) = (filter_separable(&img, &k1), filter2d(&img, &k2));
    for (x, y) in a.data.iter().zip(&b.data) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // cv2.getGaussianKernel(51, 0): σ = 8.
    let g = cv2_gaussian_kernel(51);
    assert_close(g.iter().sum(), 1.0, 1e-12, "sum");
    assert_close(g[25] / g[17], (64.0f64 / 128.0).exp(), 1e-12, "σ = 8");
}

#[test]
fn usm_sharpening_keeps_flat_areas_and_boosts_edges() {
    let flat = Planes::filled(3, 20, 20, 0.4);
    let out = usm_sharp(&flat);
    assert!(out.data.iter().all(|v| (v - 0.4).abs() < 1e-6));
    // A step 0.3 → 0.7: overshoot on both sides, values stay in [0, 1].
    let step = Planes::from_fn(3, 8, 60, |_, _, x| if x < 30 { 0.3 } else { 0.7 });
    let out = usm_sharp(&step);
    assert!(
        out.at(0, 4, 29) < 0.3 && out.at(0, 4, 30) > 0.7,
        "{} {}",
        out.at(0, 4, 29),
        out.at(0, 4, 30)
    );
    assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
    // Through the pipeline: recorded, and a different LQ.
    let cfg = DegradeConfig {
        gt_usm: true,
        ..DegradeConfig::default()
    };
    let hq = textured(24, 24);
    let (a, p) = degrade(&hq, &cfg, &mut rng(2)).unwrap();
    let (b, q) = degrade(&hq, &DegradeConfig::default(), &mut rng(2)).unwrap();
    assert!(p.gt_usm && !q.gt_usm);
    assert_ne!(a, b);
}

fn row(values: &[f32]) -> Planes {
    Planes::from_fn(1, 1, values.len(), |_, _, x| values[x])
}

#[test]
fn resize_area_is_adaptive_average_pooling() {
    let img = Planes::from_fn(1, 4, 4, |_, y, x| (y * 4 + x) as f32);
    let out = resize(&img, 2, 2, ResizeMode::Area, None);
    assert_eq!(out.data, vec![2.5, 4.5, 10.5, 12.5]);
    // Non-integer ratio: windows [floor(i·in/out), ceil((i+1)·in/out)), 5 → 3: [0,2) [1,4) [3,5).
    let out = resize(&row(&[0., 1., 2., 3., 4.]), 1, 3, ResizeMode::Area, None);
    assert_eq!(out.data, vec![0.5, 2.0, 3.5]);
    // Upscale by 2 repeats pixels.
    let out = resize(&row(&[1., 3.]), 1, 4, ResizeMode::Area, None);
    assert_eq!(out.data, vec![1., 1., 3., 3.]);
}

#[test]
fn resize_bilinear_matches_torch_half_pixel() {
    // torch: F.interpolate([0,1,2,3], scale_factor=2, mode='bilinear', align_corners=False).
    let out = resize(&row(&[0., 1., 2., 3.]), 1, 8, ResizeMode::Bilinear, None);
    assert_eq!(out.data, vec![0., 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.]);
    // Downscale by 2 without antialiasing: the mean of each pair.
    let out = resize(&row(&[0., 2., 4., 6.]), 1, 2, ResizeMode::Bilinear, None);
    assert_eq!(out.data, vec![1., 5.]);
    // A given scale_factor maps with 1/scale, not in/out: 5 → 7 at 1.5, out[1] at src 0.5.
    let ramp = row(&[0., 1., 2., 3., 4.]);
    let with_factor = resize(&ramp, 1, 7, ResizeMode::Bilinear, Some(1.5));
    let with_size = resize(&ramp, 1, 7, ResizeMode::Bilinear, None);
    assert_close(f64::from(with_factor.data[1]), 0.5, 1e-6, "1/scale mapping");
    assert_close(
        f64::from(with_size.data[1]),
        1.5 * 5.0 / 7.0 - 0.5,
        1e-6,
        "in/out mapping",
    );
}

#[test]
fn resize_bicubic_matches_torch() {
    let out = resize(&row(&[0., 1., 2., 3.]), 1, 8, ResizeMode::Bicubic, None);
    // out[0]: src -0.25, taps at clamped (-2,-1,0,1) → (0,0,0,1), weight of 1 is
    // W(1.25) = a(x³ - 5x² + 8x - 4), a = -0.75 → -0.10546875 (torch's overshoot at the edge).
    assert_close(f64::from(out.data[0]), -0.10546875, 1e-6, "edge");
    // out[3]: src 1.25, taps 0..3 with weights W(1.25), W(0.25), W(0.75), W(1.75) =
    // (-0.10546875, 0.87890625, 0.26171875, -0.03515625); on the ramp 0·… + 1·… + 2·… + 3·…
    // = 1.296875 (a = -0.75 does not reproduce linear ramps exactly; a = -0.5 would give 1.25).
    assert_close(f64::from(out.data[3]), 1.296875, 1e-6, "interior");
    // out[4] mirrors it on the reversed ramp: 3 - 1.296875.
    assert_close(f64::from(out.data[4]), 1.703125, 1e-6, "interior");
    // Weights sum to 1: constants are kept.
    let flat = resize(
        &Planes::filled(3, 5, 7, 0.3),
        11,
        3,
        ResizeMode::Bicubic,
        None,
    );
    assert!(flat.data.iter().all(|v| (v - 0.3).abs() < 1e-6));
}

#[test]
fn resize_sizes_and_identity() {
    let img = textured(9, 13);
    for mode in ResizeMode::ALL {
        let out = resize(&img, 4, 20, mode, None);
        assert_eq!((out.channels, out.height, out.width), (3, 4, 20));
        assert_eq!(resize(&img, 9, 13, mode, None), img, "{mode:?} keep");
        assert_eq!(resize(&img, 9, 13, mode, Some(1.0)), img, "{mode:?} keep");
    }
}

fn stats(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = v.collect();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn gaussian_noise_has_the_sampled_sigma() {
    let base = Planes::filled(3, 64, 64, 0.5);
    let mut img = base.clone();
    add_gaussian_noise(&mut img, 20.0, false, &mut rng(11));
    let (mean, sd) = stats(img.data.iter().map(|&v| f64::from(v) - 0.5));
    assert!(mean.abs() < 0.003, "mean {mean}");
    assert_close(sd, 20.0 / 255.0, 0.003, "sd");
    // Colour noise differs across channels; gray noise is shared.
    assert_ne!(img.plane(0), img.plane(1));
    let mut gray = base.clone();
    add_gaussian_noise(&mut gray, 20.0, true, &mut rng(11));
    assert_eq!(gray.plane(0), gray.plane(1));
    assert_eq!(gray.plane(1), gray.plane(2));
    // Clipped to [0, 1].
    let mut dark = Planes::filled(3, 16, 16, 0.0);
    add_gaussian_noise(&mut dark, 30.0, false, &mut rng(2));
    assert!(dark.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(dark.data.iter().any(|&v| v > 0.0));
}

#[test]
fn poisson_vals_is_next_power_of_two_of_distinct_levels() {
    assert_eq!(poisson_vals([7u8].into_iter()), 1.0);
    assert_eq!(poisson_vals([1u8, 2, 3].into_iter()), 4.0);
    assert_eq!(poisson_vals([1u8, 2, 3, 4].into_iter()), 4.0);
    assert_eq!(poisson_vals(0..=255u8), 256.0);
    assert_eq!(poisson_vals((0..=128u8).chain([0, 1])), 256.0);
}

#[test]
fn poisson_noise_has_shot_statistics() {
    // 256 distinct levels → vals = 256; at x = 128/255 the noise variance is x / vals · scale².
    let (h, w) = (128, 128);
    let mut img = Planes::from_fn(3, h, w, |_, y, x| {
        if y == 0 && x < 256 {
            x as f32 / 255.0
        } else {
            128.0 / 255.0
        }
    });
    for x in 0..w {
        img.data[x] = x as f32 / 255.0;
        img.data[h * w + x] = (x + 128) as f32 / 255.0;
    }
    let base = img.clone();
    let scale = 2.0;
    add_poisson_noise(&mut img, scale, false, &mut rng(9));
    let x: f64 = 128.0 / 255.0;
    let noise = img
        .data
        .iter()
        .zip(&base.data)
        .skip(w)
        .take(h * w - w)
        .map(|(a, b)| f64::from(a - b));
    let (mean, sd) = stats(noise);
    assert!(mean.abs() < 0.004, "mean {mean}");
    assert_close(sd, scale * (x / 256.0).sqrt(), 0.004, "shot noise sd");
    // Gray: same noise on every channel (the image is gray here, so equal planes stay equal).
    let mut gray = Planes::filled(3, 32, 32, 0.4);
    add_poisson_noise(&mut gray, 1.0, true, &mut rng(4));
    assert_eq!(gray.plane(0), gray.plane(2));
    assert!(gray.data.iter().all(|v| (0.0..=1.0).contains(v)));
    // Black stays black (rate 0).
    let mut black = Planes::zeros(3, 8, 8);
    add_poisson_noise(&mut black, 3.0, false, &mut rng(4));
    assert!(black.data.iter().all(|&v| v == 0.0));
}

fn mean_abs_err(a: &Planes, b: &Planes) -> f64 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| f64::from((x - y).abs()))
        .sum::<f64>()
        / a.data.len() as f64
}

#[test]
fn jpeg_round_trip_keeps_size_and_lower_quality_costs_more() {
    let mut img = textured(37, 51); // not a multiple of 8 or 16
    img.quantize8();
    let q90 = jpeg_roundtrip(&img, 90).unwrap();
    let q30 = jpeg_roundtrip(&img, 30).unwrap();
    let q10 = jpeg_roundtrip(&img, 10).unwrap();
    for out in [&q90, &q30, &q10] {
        assert_eq!((out.channels, out.height, out.width), (3, 37, 51));
        assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    let (e90, e30, e10) = (
        mean_abs_err(&img, &q90),
        mean_abs_err(&img, &q30),
        mean_abs_err(&img, &q10),
    );
    assert!(
        e90 > 0.0 && e90 < e30 && e30 < e10,
        "errors {e90} {e30} {e10}"
    );
    assert!(e90 < 6.0 / 255.0, "quality 90 error {e90}");
}

#[test]
fn quantize8_rounds_to_the_byte_grid() {
    let mut p = row(&[-0.2, 0.0, 0.5, 0.9999, 1.3, 100.4 / 255.0, 100.6 / 255.0]);
    p.quantize8();
    let bytes: Vec<f32> = p.data.iter().map(|v| v * 255.0).collect();
    let want = [0.0, 0.0, 128.0, 255.0, 255.0, 100.0, 101.0];
    for (b, w) in bytes.iter().zip(want) {
        assert_close(f64::from(*b), w, 1e-4, "byte");
    }
}

// ---------------------------------------------------------------- pipeline

#[test]
fn degrade_is_reproducible_and_has_the_target_size() {
    let hq = textured(48, 40);
    let cfg = DegradeConfig::default();
    let (a, pa) = degrade(&hq, &cfg, &mut rng(42)).unwrap();
    let (b, pb) = degrade(&hq, &cfg, &mut rng(42)).unwrap();
    assert_eq!(a, b);
    assert_eq!(pa, pb);
    assert_eq!((a.channels, a.height, a.width), (3, 12, 10));
    assert_eq!(pa.lq_size, [12, 10]);
    assert_eq!(pa.hq_size, [48, 40]);
    assert!(a.data.iter().all(|v| {
        let b = v * 255.0;
        (b - b.round()).abs() < 1e-4 && (0.0..=255.0).contains(&b)
    }));
    let (c, _) = degrade(&hq, &cfg, &mut rng(43)).unwrap();
    assert_ne!(a, c, "another seed, another degradation");
    // Not a multiple of the scale: floor.
    let (d, _) = degrade(&textured(50, 43), &cfg, &mut rng(1)).unwrap();
    assert_eq!((d.height, d.width), (12, 10));
}

#[test]
fn recorded_sizes_follow_the_published_formulas() {
    let hq = textured(40, 32);
    let cfg = DegradeConfig::default();
    let mut orders = std::collections::HashSet::new();
    let mut directions = std::collections::HashSet::new();
    for seed in 0..120 {
        let (_, p) = degrade(&hq, &cfg, &mut rng(seed)).unwrap();
        let r1 = &p.stage1.resize;
        assert_eq!(
            r1.size,
            [
                (40.0 * r1.scale).floor() as usize,
                (32.0 * r1.scale).floor() as usize
            ]
        );
        match r1.direction {
            Updown::Up => assert!((1.0..=1.5).contains(&r1.scale)),
            Updown::Down => assert!((0.15..=1.0).contains(&r1.scale)),
            Updown::Keep => assert_eq!(r1.scale, 1.0),
        }
        let r2 = &p.stage2.resize;
        assert_eq!(
            r2.size,
            [
                (10.0 * r2.scale).floor().max(1.0) as usize,
                (8.0 * r2.scale).floor().max(1.0) as usize
            ]
        );
        assert!((0.3..=1.2).contains(&r2.scale));
        for n in [&p.stage1.noise, &p.stage2.noise] {
            match n.kind {
                NoiseKind::Gaussian => assert!((1.0..=30.0).contains(&n.level)),
                NoiseKind::Poisson => assert!((0.05..=3.0).contains(&n.level)),
            }
        }
        for j in [&p.stage1.jpeg, &p.final_step.jpeg] {
            assert!((30.0..=95.0).contains(&j.quality_sampled));
            assert_eq!(j.quality, j.quality_sampled.round() as u8);
        }
        orders.insert(p.final_step.order);
        directions.insert(r1.direction);
    }
    assert_eq!(orders.len(), 2, "both final orders occur");
    assert_eq!(directions.len(), 3);
}

/// Equal up to the last bit of JSON float parsing (serde_json's default parser may be 1 ulp off).
fn assert_params_eq(a: &DegradeParams, b: &DegradeParams) {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
        use serde_json::Value::*;
        match (a, b) {
            (Number(x), Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-14 * x.abs().max(1.0),
                    "{at}: {x} vs {y}"
                );
            }
            (Object(x), Object(y)) => {
                assert_eq!(x.len(), y.len(), "{at}");
                for (k, v) in x {
                    walk(v, &y[k], &format!("{at}.{k}"));
                }
            }
            (Array(x), Array(y)) => {
                assert_eq!(x.len(), y.len(), "{at}");
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(u, v, &format!("{at}[{i}]"));
                }
            }
            _ => assert_eq!(a, b, "{at}"),
        }
    }
    walk(
        &serde_json::to_value(a).unwrap(),
        &serde_json::to_value(b).unwrap(),
        "params",
    );
}

#[test]
fn sidecar_json_round_trips() {
    let (_, p) = degrade(&textured(16, 16), &DegradeConfig::default(), &mut rng(8)).unwrap();
    let json = serde_json::to_string_pretty(&p).unwrap();
    let back: DegradeParams = serde_json::from_str(&json).unwrap();
    assert_params_eq(&back, &p);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["stage1"]["blur"]["kind"].is_string());
    assert!(v["final"]["order"].is_string());
}

#[test]
fn image_seed_is_stable_and_name_dependent() {
    // Pinned: changing the derivation changes every dataset made before.
    assert_eq!(image_seed(0, "a.png"), image_seed(0, "a.png"));
    assert_ne!(image_seed(0, "a.png"), image_seed(0, "b.png"));
    assert_ne!(image_seed(0, "a.png"), image_seed(1, "a.png"));
    assert_eq!(image_seed(7, "a.png"), 2923555716767862411);
}

#[test]
fn too_small_images_are_refused() {
    let err = degrade(&textured(3, 8), &DegradeConfig::default(), &mut rng(0)).unwrap_err();
    assert!(
        err.to_string().contains("smaller than the scale 4"),
        "{err}"
    );
    // At the minimum size the pipeline runs (1x2 LQ).
    let (out, _) = degrade(&textured(4, 8), &DegradeConfig::default(), &mut rng(0)).unwrap();
    assert_eq!((out.height, out.width), (1, 2));
}

// ---------------------------------------------------------------- config

fn origin() -> PathBuf {
    PathBuf::from("test.yml")
}

fn config_err(text: &str) -> String {
    DegradeConfig::from_str_at(text, false, &origin())
        .unwrap_err()
        .to_string()
}

#[test]
fn defaults_are_the_published_values() {
    let c = DegradeConfig::default();
    c.validate(&origin()).unwrap();
    assert_eq!(c.kernel_range, vec![7, 9, 11, 13, 15, 17, 19, 21]);
    assert_eq!(c.kernel_prob, vec![0.45, 0.25, 0.12, 0.03, 0.12, 0.03]);
    assert_eq!(
        (c.sinc_prob, c.blur_sigma, c.betag_range, c.betap_range),
        (0.1, [0.2, 3.0], [0.5, 4.0], [1.0, 2.0])
    );
    assert_eq!(
        (c.resize_prob, c.resize_range),
        ([0.2, 0.7, 0.1], [0.15, 1.5])
    );
    assert_eq!(
        (c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range),
        (0.5, [1.0, 30.0], [0.05, 3.0])
    );
    assert_eq!((c.gray_noise_prob, c.jpeg_range), (0.4, [30.0, 95.0]));
    assert_eq!((c.second_blur_prob, c.blur_sigma2), (0.8, [0.2, 1.5]));
    assert_eq!(
        (c.resize_prob2, c.resize_range2),
        ([0.3, 0.4, 0.3], [0.3, 1.2])
    );
    assert_eq!(
        (c.noise_range2, c.poisson_scale_range2, c.jpeg_range2),
        ([1.0, 25.0], [0.05, 2.5], [30.0, 95.0])
    );
    assert_eq!((c.final_sinc_prob, c.scale), (0.8, 4));
    // An empty file is the defaults.
    assert_eq!(DegradeConfig::from_str_at("", false, &origin()).unwrap(), c);
}

#[test]
fn config_overrides_yaml_and_json() {
    let c = DegradeConfig::from_str_at(
        "scale: 2\nkernel_list: [iso, aniso]\nkernel_prob: [0.5, 0.5]\njpeg_range2: [60, 90]\n",
        false,
        &origin(),
    )
    .unwrap();
    assert_eq!(c.scale, 2);
    assert_eq!(c.kernel_list, vec![KernelKind::Iso, KernelKind::Aniso]);
    assert_eq!(c.jpeg_range2, [60.0, 90.0]);
    assert_eq!(
        c.noise_range,
        [1.0, 30.0],
        "untouched fields keep their defaults"
    );
    let j = DegradeConfig::from_str_at(
        r#"{"final_sinc_prob": 0.0, "resize_prob": [0, 1, 0]}"#,
        true,
        &origin(),
    )
    .unwrap();
    assert_eq!(j.final_sinc_prob, 0.0);
    assert_eq!(j.resize_prob, [0.0, 1.0, 0.0]);
}

#[test]
fn realesrgan_training_options_are_read() {
    let text = "\
name: train_RealESRNetx4plus
scale: 2
gt_usm: True
resize_prob: [0.1, 0.8, 0.1]
noise_range: [2, 20]
network_g:
  type: RRDBNet
datasets:
  train:
    name: DF2K+OST
    blur_kernel_size: 21
    kernel_list: ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    sinc_prob: 0.2
    blur_sigma2: [0.2, 1.0]
    final_sinc_prob: 0.5
    gt_size: 256
";
    let c = DegradeConfig::from_str_at(text, false, &origin()).unwrap();
    assert_eq!(c.scale, 2);
    assert_eq!(c.resize_prob, [0.1, 0.8, 0.1]);
    assert_eq!(c.noise_range, [2.0, 20.0]);
    assert_eq!(c.sinc_prob, 0.2);
    assert_eq!(c.blur_sigma2, [0.2, 1.0]);
    assert_eq!(c.final_sinc_prob, 0.5);
    assert_eq!(c.jpeg_range, [30.0, 95.0]);
}

#[test]
fn bad_config_values_name_the_field() {
    let e = config_err("kernel_prob: [0.5, 0.25, 0.12, 0.03, 0.12, 0.03]\n");
    assert!(
        e.contains("test.yml") && e.contains("`kernel_prob`") && e.contains("sums to"),
        "{e}"
    );
    let e = config_err("resize_prob2: [0.5, 0.4, 0.3]\n");
    assert!(e.contains("`resize_prob2`"), "{e}");
    let e = config_err("noise_range: [-1, 30]\n");
    assert!(e.contains("`noise_range`") && e.contains(">= 0"), "{e}");
    let e = config_err("blur_sigma2: [2, 1]\n");
    assert!(e.contains("`blur_sigma2`") && e.contains("above"), "{e}");
    let e = config_err("jpeg_range: [30, 120]\n");
    assert!(e.contains("`jpeg_range`") && e.contains("100"), "{e}");
    let e = config_err("gray_noise_prob: 1.5\n");
    assert!(e.contains("`gray_noise_prob`"), "{e}");
    let e = config_err("kernel_list: [iso]\n");
    assert!(
        e.contains("`kernel_prob`") && e.contains("has 6 entries but kernel_list has 1"),
        "{e}"
    );
    let e = config_err("resize_range: [0.5, 0.9]\n");
    assert!(
        e.contains("`resize_range`") && e.contains("contain 1"),
        "{e}"
    );
    let e = config_err("kernel_range: [7, 8]\n");
    assert!(e.contains("`kernel_range`"), "{e}");
    let e = config_err("scale: 0\n");
    assert!(e.contains("`scale`"), "{e}");
    // Parse errors name the key too.
    let e = config_err("kernel_list: [iso, gaussian]\nkernel_prob: [0.5, 0.5]\n");
    assert!(
        e.contains("test.yml") && e.contains("kernel_list") && e.contains("gaussian"),
        "{e}"
    );
    let e = config_err("noise_rnage: [1, 2]\n");
    assert!(e.contains("noise_rnage"), "{e}");
    let e = config_err("resize_prob: [0.5, 0.5]\n");
    assert!(e.contains("resize_prob") && e.contains("length"), "{e}");
    let e = DegradeConfig::from_str_at("{\"sinc_prob\": \"high\"}", true, &origin())
        .unwrap_err()
        .to_string();
    assert!(e.contains("sinc_prob"), "{e}");
}

// ---------------------------------------------------------------- files

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// A fresh empty folder under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("supir-degrade-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_png(path: &Path, h: usize, w: usize) {
    textured(h, w).to_rgb8().save(path).unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn list_inputs_filters_and_refuses_empty_folders() {
    let d = temp_dir("list");
    let err = list_inputs(&d).unwrap_err().to_string();
    assert!(
        err.contains(&*d.to_string_lossy()) && err.contains("no image files"),
        "{err}"
    );
    std::fs::write(d.join("notes.txt"), "x").unwrap();
    assert!(list_inputs(&d).is_err());
    write_png(&d.join("b.png"), 8, 8);
    write_png(&d.join("a.PNG"), 8, 8);
    let got = list_inputs(&d).unwrap();
    assert_eq!(got, vec![d.join("a.PNG"), d.join("b.png")]);
    assert_eq!(
        list_inputs(&d.join("b.png")).unwrap(),
        vec![d.join("b.png")]
    );
    let missing = list_inputs(&d.join("nope")).unwrap_err().to_string();
    assert!(missing.contains("nope"), "{missing}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn plan_refuses_overwriting_inputs_and_name_clashes() {
    let d = temp_dir("plan");
    write_png(&d.join("a.png"), 8, 8);
    let err = plan_jobs(&[d.join("a.png")], &d).unwrap_err().to_string();
    assert!(err.contains("overwrite an input"), "{err}");
    let out = d.join("out");
    std::fs::write(d.join("a.jpg"), "x").unwrap();
    let err = plan_jobs(&[d.join("a.jpg"), d.join("a.png")], &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("same output name"), "{err}");
    let jobs = plan_jobs(&[d.join("a.png")], &out).unwrap();
    assert_eq!(jobs[0].image, out.join("a.png"));
    assert_eq!(jobs[0].sidecar, out.join("a.json"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn degrade_file_writes_image_and_sidecar_reproducibly() {
    let d = temp_dir("file");
    let (in_a, in_b) = (d.join("in"), d.join("in2"));
    std::fs::create_dir_all(&in_a).unwrap();
    std::fs::create_dir_all(&in_b).unwrap();
    write_png(&in_a.join("x.png"), 32, 24);
    std::fs::copy(in_a.join("x.png"), in_b.join("x.png")).unwrap();
    let cfg = DegradeConfig::default();
    let (o1, o2) = (d.join("o1"), d.join("o2"));
    std::fs::create_dir_all(&o1).unwrap();
    std::fs::create_dir_all(&o2).unwrap();
    let p1 = degrade_file(&plan_jobs(&[in_a.join("x.png")], &o1).unwrap()[0], &cfg, 5).unwrap();
    // Same name, same seed, another folder: the same stream.
    let p2 = degrade_file(&plan_jobs(&[in_b.join("x.png")], &o2).unwrap()[0], &cfg, 5).unwrap();
    assert_eq!(p1, p2);
    assert_eq!(
        std::fs::read(o1.join("x.png")).unwrap(),
        std::fs::read(o2.join("x.png")).unwrap()
    );
    assert_eq!(names(&o1), vec!["x.json", "x.png"], "no temporaries left");
    let lq = image::open(o1.join("x.png")).unwrap();
    assert_eq!((lq.width(), lq.height()), (6, 8));
    let side: DegradeParams =
        serde_json::from_slice(&std::fs::read(o1.join("x.json")).unwrap()).unwrap();
    assert_params_eq(&side, &p1);
    assert_eq!(
        (side.input.as_str(), side.seed, side.image_seed),
        ("x.png", 5, image_seed(5, "x.png"))
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unreadable_image_names_the_file_and_writes_nothing() {
    let d = temp_dir("bad");
    std::fs::write(d.join("broken.png"), b"not a png at all").unwrap();
    write_png(&d.join("small.png"), 2, 9);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let jobs = plan_jobs(&list_inputs(&d).unwrap(), &out).unwrap();
    for job in &jobs {
        let err = degrade_file(job, &DegradeConfig::default(), 0)
            .unwrap_err()
            .to_string();
        let name = job
            .input
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(err.contains(&name), "{err}");
    }
    assert!(names(&out).is_empty(), "{:?}", names(&out));
    let _ = std::fs::remove_dir_all(&d);
}
