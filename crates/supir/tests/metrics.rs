//! PSNR / SSIM against values computed with scikit-image (BasicSR settings) on real photo crops; see
//! `tests/data/metrics/make_metrics_data.py` for where the images and numbers come from.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use supir::eval::metrics::{psnr, rgb_to_y, ssim, MetricOptions};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/metrics")
}

fn load(name: &str) -> RgbImage {
    image::open(data_dir().join(name)).unwrap().to_rgb8()
}

#[test]
fn matches_scikit_image() {
    let text = std::fs::read_to_string(data_dir().join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let name = case["image"].as_str().unwrap();
        let opts = MetricOptions {
            crop_border: case["crop_border"].as_u64().unwrap() as u32,
            y_channel: case["y_channel"].as_bool().unwrap(),
        };
        let a = load(&format!("{name}_ref.png"));
        let b = load(&format!("{name}_deg.png"));
        let p = psnr(&a, &b, opts).unwrap();
        let s = ssim(&a, &b, opts).unwrap();
        let (pe, se) = (
            case["psnr"].as_f64().unwrap(),
            case["ssim"].as_f64().unwrap(),
        );
        println!("{name} {opts:?}: psnr {p} (expected {pe}), ssim {s} (expected {se})");
        assert!((p - pe).abs() < 1e-9, "{name} {opts:?}: psnr {p} vs {pe}");
        assert!((s - se).abs() < 1e-9, "{name} {opts:?}: ssim {s} vs {se}");
        // Symmetric in its arguments.
        assert!((psnr(&b, &a, opts).unwrap() - p).abs() < 1e-12);
        assert!((ssim(&b, &a, opts).unwrap() - s).abs() < 1e-12);
    }
}

#[test]
fn identical_images() {
    let a = load("coffee_ref.png");
    let o = MetricOptions::default();
    assert_eq!(psnr(&a, &a, o).unwrap(), f64::INFINITY);
    assert!((ssim(&a, &a, o).unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn known_psnr_of_a_constant_offset() {
    let a = RgbImage::from_fn(16, 12, |x, y| Rgb([(x * 7) as u8, (y * 9) as u8, 100]));
    let b = RgbImage::from_fn(16, 12, |x, y| {
        Rgb([(x * 7) as u8 + 10, (y * 9) as u8 + 10, 110])
    });
    let p = psnr(&a, &b, MetricOptions::default()).unwrap();
    assert!((p - 10.0 * (255.0f64 * 255.0 / 100.0).log10()).abs() < 1e-12);
    // Border crop only drops pixels: the error is uniform, so the PSNR is unchanged.
    let opts = MetricOptions {
        crop_border: 3,
        y_channel: false,
    };
    assert!((psnr(&a, &b, opts).unwrap() - p).abs() < 1e-12);
}

#[test]
fn luma_range() {
    // float32 values, as BasicSR's: within an f32 ulp (~1.5e-5 at 235) of the exact luma.
    assert!((rgb_to_y(0, 0, 0) - 16.0).abs() < 1e-12);
    assert!((rgb_to_y(255, 255, 255) - 235.0).abs() < 2e-5);
    assert!((rgb_to_y(255, 0, 0) - (16.0 + 65.481)).abs() < 1e-5);
}

#[test]
fn bad_input_is_an_error() {
    let a = RgbImage::new(20, 20);
    let b = RgbImage::new(20, 21);
    let o = MetricOptions::default();
    assert!(psnr(&a, &b, o).is_err());
    assert!(ssim(&a, &b, o).is_err());
    let big_crop = MetricOptions {
        crop_border: 10,
        y_channel: true,
    };
    assert!(psnr(&a, &a, big_crop).is_err());
    let small = MetricOptions {
        crop_border: 5,
        y_channel: false,
    };
    assert!(ssim(&a, &a, small).is_err()); // 10x10 left, window is 11
    assert!(psnr(&a, &a, small).is_ok());
}
