//! Real-ESRGAN x4plus against the ncnn reference (`fixtures/realesrgan`, made by
//! `scripts/realesrgan_reference.py`), and the image pipeline's invariants.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GenericImageView};
use supir::image_io::file;
use supir::realesrgan::{ConvEngine, RealEsrgan, Tiling, UpscaleOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/realesrgan")
        .join(name)
}

fn model() -> RealEsrgan {
    RealEsrgan::embedded(&Device::Cpu).unwrap()
}

/// PSNR in dB of two 8-bit RGB images of the same size.
fn psnr(a: &DynamicImage, b: &DynamicImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (a, b) = (a.to_rgb8(), b.to_rgb8());
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

fn untiled() -> UpscaleOptions {
    UpscaleOptions {
        tiling: Tiling::NONE,
        ..Default::default()
    }
}

#[test]
fn matches_ncnn_on_photo_crops() {
    let m = model();
    for name in ["chelsea_64", "coffee_64", "astronaut_64"] {
        let input = file::load(&fixture(&format!("{name}.png"))).unwrap();
        let expected = file::load(&fixture(&format!("{name}_ncnn_x4.png"))).unwrap();
        let out = m.upscale_image(&input, &untiled(), &mut || {}).unwrap();
        assert_eq!(out.dimensions(), (256, 256));
        let p = psnr(&out, &expected);
        eprintln!("{name}: PSNR vs ncnn {p:.2} dB");
        assert!(p >= 45.0, "{name}: PSNR {p:.2} dB < 45");
    }
}

/// A deterministic `[1, 3, h, w]` input in [0, 1].
fn pattern(h: usize, w: usize) -> Tensor {
    let v: Vec<f32> = (0..3 * h * w)
        .map(|i| ((i as f32 * 0.618).sin() * 0.5 + 0.5) * 0.9 + 0.05)
        .collect();
    Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn engines_and_tail_strips_agree() {
    let x = pattern(11, 9);
    let mut fast = RealEsrgan::embedded_with(&Device::Cpu, ConvEngine::PackedCpu).unwrap();
    let candle = RealEsrgan::embedded_with(&Device::Cpu, ConvEngine::Candle).unwrap();
    let a = fast.net().forward(&x).unwrap();
    let b = candle.net().forward(&x).unwrap();
    assert_eq!(a.dims(), [1, 3, 44, 36]);
    let d = max_abs(&a, &b);
    assert!(d < 1e-4, "PackedCpu vs Candle: max abs {d}");
    // Strips of 3 rows (with their halo) give the one-pass result.
    fast.net_mut().set_tail_rows(3);
    let c = fast.net().forward(&x).unwrap();
    let d = max_abs(&a, &c);
    assert!(d < 1e-5, "tail strips: max abs {d}");
}
