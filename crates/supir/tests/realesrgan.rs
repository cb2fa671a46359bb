//! Real-ESRGAN x4plus against the ncnn reference (`fixtures/realesrgan`, made by
//! `scripts/realesrgan_reference.py`), and the image pipeline's invariants.

use std::path::PathBuf;

use candle_core::Device;
use image::{DynamicImage, GenericImageView};
use supir::image_io::file;
use supir::realesrgan::{RealEsrgan, Tiling, UpscaleOptions};

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
