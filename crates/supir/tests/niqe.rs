//! NIQE against BasicSR 1.4.2's own `calculate_niqe` on real photo crops; see
//! `tests/data/metrics/make_niqe_data.py` for where the images and numbers come from.

use std::path::{Path, PathBuf};

use image::RgbImage;
use supir::eval::metrics::niqe;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/metrics")
}

fn load(name: &str) -> RgbImage {
    image::open(data_dir().join(name)).unwrap().to_rgb8()
}

/// Tolerance against stock BasicSR. BasicSR runs in float32 and its half-scale `imresize` hands a dot product
/// to the BLAS (MKL here), whose summation order depends on the library and CPU: the half-scale image then
/// differs by an ulp here and there, which moves a few discrete gamma-table picks and NIQE by up to ~3.4e-5
/// on these images. That is the spread of BasicSR itself across machines, so 1e-4.
const TOL_STOCK: f64 = 1e-4;
/// Tolerance against BasicSR with that one dot product rounded exactly (everything else stock): the same
/// float32 roundings everywhere, so only f64 summation noise remains.
const TOL_EXACT: f64 = 1e-9;

#[test]
fn matches_basicsr_calculate_niqe() {
    let text = std::fs::read_to_string(data_dir().join("expected_niqe.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let images = expected["images"].as_object().unwrap();
    assert_eq!(images.len(), 4);
    let (mut worst_stock, mut worst_exact) = (0.0f64, 0.0f64);
    for (file, values) in images {
        let img = load(file);
        for border in [0u32, 4] {
            let stock = values[format!("niqe_crop{border}")].as_f64().unwrap();
            let exact = values[format!("niqe_exact_resize_crop{border}")]
                .as_f64()
                .unwrap();
            let got = niqe(&img, border).unwrap();
            println!(
                "{file} crop {border}: {got} (basicsr {stock}, diff {:.2e}; exact-resize diff {:.2e})",
                got - stock,
                got - exact
            );
            worst_stock = worst_stock.max((got - stock).abs());
            worst_exact = worst_exact.max((got - exact).abs());
        }
    }
    assert!(
        worst_stock < TOL_STOCK,
        "worst difference to basicsr {worst_stock:.2e}"
    );
    assert!(
        worst_exact < TOL_EXACT,
        "worst difference to exact-resize basicsr {worst_exact:.2e}"
    );
}

#[test]
fn degraded_images_score_worse() {
    for name in ["astronaut_big", "coffee_big"] {
        let r = niqe(&load(&format!("{name}_ref.png")), 0).unwrap();
        let d = niqe(&load(&format!("{name}_deg.png")), 0).unwrap();
        assert!(
            d > r,
            "{name}: degraded {d} should score above reference {r}"
        );
    }
}

#[test]
fn too_small_images_are_rejected() {
    // One 96x96 block is not enough for a covariance; the 64x56 crops have none.
    let one = RgbImage::from_fn(100, 100, |x, y| {
        image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 9])
    });
    let err = niqe(&one, 0).unwrap_err().to_string();
    assert!(err.contains("at least two 96x96 blocks"), "{err}");
    let err = niqe(&load("astronaut_ref.png"), 0).unwrap_err().to_string();
    assert!(err.contains("56x64"), "{err}");
    let err = niqe(&load("astronaut_big_ref.png"), 120)
        .unwrap_err()
        .to_string();
    assert!(err.contains("crop_border 120"), "{err}");
}
