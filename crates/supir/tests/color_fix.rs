//! Colour fix (`SUPIR/utils/colorfix.py`) against the official code's golden data, and properties of the
//! wavelet decomposition.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use supir::color_fix::{
    adaptive_instance_normalization, apply, calc_mean_std, wavelet_blur, wavelet_decomposition,
    wavelet_reconstruction, ColorFix,
};
use supir::parity::fixture::{max_abs_diff, Fixture};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

fn check_case(name: &str, fix: ColorFix) {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let case = fx.case(name).unwrap();
    assert_eq!(
        case.params["type"]
            .as_str()
            .unwrap()
            .parse::<ColorFix>()
            .unwrap(),
        fix
    );
    let content = fx.input(case, "content").unwrap();
    let style = fx.input(case, "style").unwrap();
    let out = apply(fix, &content, &style).unwrap();
    let expected = fx.output(case, "out").unwrap();
    let atol = case.outputs[0].atol;
    let err = max_abs_diff(&out, &expected).unwrap();
    println!("{name}: max abs err {err:e} (atol {atol:e})");
    assert!(err <= atol, "{name}: max abs err {err} > atol {atol}");
}

#[test]
fn colorfix_wavelet() {
    check_case("colorfix_wavelet", ColorFix::Wavelet);
}

#[test]
fn colorfix_adain() {
    check_case("colorfix_adain", ColorFix::AdaIn);
}

#[test]
fn names_parse_and_print() {
    for (s, f) in [
        ("None", ColorFix::None),
        ("Wavelet", ColorFix::Wavelet),
        ("AdaIn", ColorFix::AdaIn),
    ] {
        assert_eq!(s.parse::<ColorFix>().unwrap(), f);
        assert_eq!(s.to_lowercase().parse::<ColorFix>().unwrap(), f);
        assert_eq!(s.to_uppercase().parse::<ColorFix>().unwrap(), f);
        assert_eq!(f.to_string(), s);
    }
    assert!("adain2".parse::<ColorFix>().is_err());
    assert!("".parse::<ColorFix>().is_err());
}

fn ramp(shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn none_is_identity() {
    let a = ramp((1, 3, 5, 6));
    let b = ramp((1, 3, 5, 6)).affine(0.5, 0.1).unwrap();
    let out = apply(ColorFix::None, &a, &b).unwrap();
    assert_eq!(max_abs_diff(&out, &a).unwrap(), 0.0);
}

#[test]
fn blur_keeps_constants_and_blurs_with_dilation() {
    let c = Tensor::full(0.25f32, (1, 3, 7, 9), &Device::Cpu).unwrap();
    for r in [1, 2, 4, 8, 16] {
        let b = wavelet_blur(&c, r).unwrap();
        assert!(max_abs_diff(&b, &c).unwrap() < 1e-7);
    }
    // A unit impulse in the middle of a 9x9 zero image, radius 2: the kernel lands at offsets 0, +-2.
    let mut v = vec![0f32; 81];
    v[4 * 9 + 4] = 1.0;
    let x = Tensor::from_vec(v, (1, 1, 9, 9), &Device::Cpu).unwrap();
    let b = wavelet_blur(&x, 2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(b[4 * 9 + 4], 0.25);
    assert_eq!(b[4 * 9 + 2], 0.125);
    assert_eq!(b[2 * 9 + 6], 0.0625);
    assert_eq!(b[4 * 9 + 3], 0.0);
    assert!((b.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    // Replicate padding: an impulse in the corner keeps its mass inside (1/16 + 2/16*2 + 4/16... = 9/16).
    let mut v = vec![0f32; 25];
    v[0] = 1.0;
    let x = Tensor::from_vec(v, (1, 1, 5, 5), &Device::Cpu).unwrap();
    let b = wavelet_blur(&x, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(b[0], 0.5625);
}

#[test]
fn decomposition_sums_back() {
    let x = ramp((2, 3, 10, 12));
    let (high, low) = wavelet_decomposition(&x).unwrap();
    let back = (high + low).unwrap();
    assert!(max_abs_diff(&back, &x).unwrap() < 1e-5);
    // Same content and style: reconstruction returns the input.
    let y = wavelet_reconstruction(&x, &x).unwrap();
    assert!(max_abs_diff(&y, &x).unwrap() < 1e-5);
}

#[test]
fn adain_moves_statistics() {
    let a = ramp((1, 3, 6, 7));
    let s = ramp((1, 3, 4, 5)).affine(0.3, 0.2).unwrap();
    let out = adaptive_instance_normalization(&a, &s).unwrap();
    let (m_out, sd_out) = calc_mean_std(&out).unwrap();
    let (m_s, sd_s) = calc_mean_std(&s).unwrap();
    assert!(max_abs_diff(&m_out, &m_s).unwrap() < 1e-5);
    // std includes eps: sqrt(var + 1e-5); matching the style's std up to the eps term.
    assert!(max_abs_diff(&sd_out, &sd_s).unwrap() < 1e-4);
    // Unbiased variance: [0, 1] per channel -> var 0.5, std sqrt(0.5 + 1e-5).
    let t = Tensor::from_vec(vec![0f32, 1.0], (1, 1, 1, 2), &Device::Cpu).unwrap();
    let (m, sd) = calc_mean_std(&t).unwrap();
    assert_eq!(
        m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.5]
    );
    let sd = sd.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((sd as f64 - (0.5f64 + 1e-5).sqrt()).abs() < 1e-7);
}

#[test]
fn bad_shapes_are_errors() {
    let a = ramp((1, 3, 6, 7));
    let b = ramp((1, 3, 6, 8));
    assert!(wavelet_reconstruction(&a, &b).is_err());
    assert!(adaptive_instance_normalization(&a, &ramp((1, 2, 6, 7))).is_err());
    assert!(apply(ColorFix::Wavelet, &a.flatten_all().unwrap(), &a).is_err());
    let one = Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(adaptive_instance_normalization(&one, &one).is_err());
}
