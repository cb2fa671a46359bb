//! LPIPS (AlexNet layout) against the `lpips` package's own forward pass, with tiny seeded random weights
//! (`tests/data/metrics/make_lpips_data.py`): the backbone as safetensors with torchvision keys, the linear
//! layers as a legacy (non-zip) `torch.save` file like the `alex.pth` in the `lpips` wheel.

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::RgbImage;
use supir::eval::metrics::lpips::Lpips;
use supir::eval::metrics::torch_legacy::LegacyPth;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/metrics")
}

fn load(name: &str) -> RgbImage {
    image::open(data_dir().join(name)).unwrap().to_rgb8()
}

fn model() -> Lpips {
    Lpips::load(
        data_dir().join("lpips_tiny_lin.pth"),
        data_dir().join("lpips_tiny_backbone.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn matches_the_lpips_package() {
    let text = std::fs::read_to_string(data_dir().join("expected_lpips.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = model();
    let pairs = expected["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 4);
    for p in pairs {
        let a = load(p["restored"].as_str().unwrap());
        let b = load(p["reference"].as_str().unwrap());
        let want = p["lpips"].as_f64().unwrap();
        let got = m.distance(&a, &b).unwrap();
        let swapped = m.distance(&b, &a).unwrap();
        println!(
            "{}: {got} (lpips {want}, rel {:.2e})",
            p["restored"],
            (got - want) / want
        );
        // float32 convolutions in a different summation order: relative 1e-4 is ~1000 f32 ulps of slack on
        // a sum of five means, far below the changes a wrong layer or constant makes (tens of percent).
        assert!(((got - want) / want).abs() < 1e-4, "{got} vs {want}");
        assert!(
            ((swapped - got) / got).abs() < 1e-5,
            "not symmetric: {got} vs {swapped}"
        );
    }
    let a = load("coffee_ref.png");
    assert_eq!(m.distance(&a, &a).unwrap(), 0.0);
}

#[test]
fn reads_legacy_torch_files() {
    let f = LegacyPth::open(data_dir().join("lpips_tiny_lin.pth")).unwrap();
    let mut keys: Vec<&str> = f.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "lin0.model.1.weight",
            "lin1.model.1.weight",
            "lin2.model.1.weight",
            "lin3.model.1.weight",
            "lin4.model.1.weight"
        ]
    );
    assert_eq!(f.shape("lin2.model.1.weight").unwrap(), [1, 16, 1, 1]);
    let t = f
        .load("lin0.model.1.weight", &Device::Cpu)
        .unwrap()
        .unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v.len(), 8);
    assert!(v.iter().all(|x| (0.0..0.2).contains(x)), "{v:?}");
    assert!(f.load("nope", &Device::Cpu).unwrap().is_none());
}

#[test]
fn bad_weights_and_inputs_are_reported() {
    // Backbone and linear layers swapped: the backbone keys are missing from the lin file.
    let err = Lpips::load(
        data_dir().join("lpips_tiny_backbone.safetensors"),
        data_dir().join("lpips_tiny_lin.pth"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("lpips_tiny_lin.pth") && err.contains("features.0.weight"),
        "{err}"
    );
    let m = model();
    let small = RgbImage::new(30, 40);
    let err = m.distance(&small, &small).unwrap_err().to_string();
    assert!(err.contains("at least 31x31"), "{err}");
    let err = m
        .distance(&load("coffee_ref.png"), &load("astronaut_ref.png"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sizes differ"), "{err}");
}
