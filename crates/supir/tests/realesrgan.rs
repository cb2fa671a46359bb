//! Real-ESRGAN x4plus against the ncnn reference (`fixtures/realesrgan`, made by
//! `scripts/realesrgan_reference.py`), and the image pipeline's invariants.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GenericImageView, ImageBuffer, Rgba};
use supir::image_io::file;
use supir::pipelines::realesrgan::{AlphaUpscale, ConvEngine, RealEsrgan, Tiling, UpscaleOptions};

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
    let wino = RealEsrgan::embedded_with(&Device::Cpu, ConvEngine::Winograd).unwrap();
    let a = fast.net().forward(&x).unwrap();
    let b = candle.net().forward(&x).unwrap();
    assert_eq!(a.dims(), [1, 3, 44, 36]);
    let d = max_abs(&a, &b);
    assert!(d < 1e-4, "PackedCpu vs Candle: max abs {d}");
    let w = wino.net().forward(&x).unwrap();
    let d = max_abs(&w, &b);
    eprintln!("Winograd vs Candle: max abs {d}");
    assert!(d < 1e-4, "Winograd vs Candle: max abs {d}");
    // Strips of 3 rows (with their halo) give the one-pass result.
    fast.net_mut().set_tail_rows(3);
    let c = fast.net().forward(&x).unwrap();
    let d = max_abs(&a, &c);
    assert!(d < 1e-5, "tail strips: max abs {d}");
}

/// Largest difference in 8-bit levels between two images of the same size.
fn max_levels(a: &DynamicImage, b: &DynamicImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (a, b) = (a.to_rgba16(), b.to_rgba16());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / 257.0)
        .fold(0.0, f64::max)
}

#[test]
fn tiled_equals_untiled_within_one_level() {
    // 192x16 photo strip, tile 64: the outer tiles lose context 64 px (the default pad) past
    // their core, the middle one has all of it.
    let m = model();
    let img = file::load(&fixture("coffee_192x16.png")).unwrap();
    let whole = m.upscale_image(&img, &untiled(), &mut || {}).unwrap();
    let tiling = Tiling {
        tile: 64,
        ..Tiling::default()
    };
    assert_eq!(tiling.cores(192, 16).len(), 3);
    let mut calls = 0;
    let opts = UpscaleOptions {
        tiling,
        ..Default::default()
    };
    let tiled = m.upscale_image(&img, &opts, &mut || calls += 1).unwrap();
    assert_eq!(calls, 3);
    let d = max_levels(&whole, &tiled);
    eprintln!("tiled vs untiled: max {d} levels");
    assert!(d <= 1.0, "tiled differs by {d} 8-bit levels");
}

#[test]
fn alpha_grey_sixteen_bit_and_outscale() {
    let m = model();
    // 16-bit RGBA with a horizontal alpha ramp and values off the 8-bit grid.
    let img = DynamicImage::ImageRgba16(ImageBuffer::from_fn(8, 6, |x, y| {
        Rgba([
            1000 + 7001 * x as u16,
            30_001 + 3001 * y as u16,
            12_345,
            (x * 9000) as u16,
        ])
    }));
    let lanczos = UpscaleOptions {
        alpha: AlphaUpscale::Lanczos,
        ..untiled()
    };
    let out = m.upscale_image(&img, &lanczos, &mut || {}).unwrap();
    let DynamicImage::ImageRgba16(out16) = &out else {
        panic!(
            "16-bit RGBA in must give 16-bit RGBA out, got {:?}",
            out.color()
        );
    };
    assert_eq!(out16.dimensions(), (32, 24));
    assert!(
        out16.as_raw().iter().any(|v| v % 257 != 0),
        "16-bit output carries no more than 8 bits"
    );
    // Alpha follows the ramp, and the colour does not depend on it.
    let a = |x: u32| out16.get_pixel(x, 12).0[3] as f64;
    assert!(
        a(2) < 8000.0 && a(29) > 50_000.0,
        "alpha {} .. {}",
        a(2),
        a(29)
    );
    assert!((a(0)..=a(31)).contains(&a(16)));
    let opaque = DynamicImage::ImageRgb16(img.to_rgb16());
    let rgb = m.upscale_image(&opaque, &untiled(), &mut || {}).unwrap();
    assert_eq!(rgb.color(), image::ColorType::Rgb16);
    assert_eq!(
        DynamicImage::ImageRgb16(out.to_rgb16()).to_rgb16(),
        rgb.to_rgb16()
    );
    // Through the network, an opaque alpha stays opaque.
    let opaque_rgba = DynamicImage::ImageRgba8(opaque.to_rgba8());
    let mut calls = 0;
    let out = m
        .upscale_image(&opaque_rgba, &untiled(), &mut || calls += 1)
        .unwrap();
    assert_eq!(calls, 2);
    assert_eq!(out.color(), image::ColorType::Rgba8);
    assert!(out.to_rgba8().pixels().all(|p| p.0[3] >= 250));
    // Grey stays grey; any outscale, floor(size * outscale).
    let grey = DynamicImage::ImageLuma8(img.to_luma8());
    for (scale, size) in [(2.5, (20, 15)), (1.0, (8, 6)), (4.0, (32, 24))] {
        let o = UpscaleOptions {
            outscale: scale,
            ..untiled()
        };
        let out = m.upscale_image(&grey, &o, &mut || {}).unwrap();
        assert_eq!(out.color(), image::ColorType::L8);
        assert_eq!(out.dimensions(), size, "outscale {scale}");
    }
}
