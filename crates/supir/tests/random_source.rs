//! The benchmark's random weight source: deterministic per key, scaled like trained weights, and
//! able to build a whole model from a config plus the key list its text encoders read sizes from.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use supir::models::supir_config::SupirConfig;
use supir::pipelines::supir::model::SupirModel;
use supir::weights::{Checkpoint, RandomSource};

fn stats(t: &Tensor) -> (f32, f32) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
    (mean, var.sqrt())
}

#[test]
fn values_depend_on_seed_and_key_only_and_are_scaled() {
    let a = RandomSource::new(HashMap::new(), 7);
    let b = RandomSource::new(HashMap::new(), 7);
    let c = RandomSource::new(HashMap::new(), 8);
    // Larger than one fill chunk, so the threaded path runs.
    let shape = [1280, 1280];
    let w = a.tensor("x.weight", &shape).unwrap();
    let _ = b.tensor("other", &[3]).unwrap();
    let same = b.tensor("x.weight", &shape).unwrap();
    let diff = (&w - &same).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    let other = c.tensor("x.weight", &shape).unwrap();
    assert_ne!(stats(&(&w - &other).unwrap()).1, 0.0);

    let (mean, std) = stats(&w);
    assert!(mean.abs() < 1e-3, "{mean}");
    assert!((std * 1280f32.sqrt() - 1.0).abs() < 0.01, "{std}");
    let (mean, _) = stats(&a.tensor("norm.weight", &[320]).unwrap());
    assert!((mean - 1.0).abs() < 0.05, "{mean}");
    let (mean, std) = stats(&a.tensor("conv.bias", &[320]).unwrap());
    assert!(mean.abs() < 0.01 && std < 0.02, "{mean} {std}");
}

#[test]
fn builds_and_runs_the_tiny_model() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny");
    let cfg = SupirConfig::load(dir.join("config.yaml")).unwrap();
    let known = Checkpoint::open(dir.join("weights.safetensors"))
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(k, m)| (k, m.shape))
        .collect();
    let dev = Device::Cpu;
    let vb = RandomSource::new(known, 0).into_var_builder(DType::F32, &dev);
    let model = SupirModel::new(vb, &cfg).unwrap();
    let p = &cfg.model.params;
    let (c, uc) = model
        .conditioner
        .prepare_condition(&["a cat"], &p.p_p, &p.n_p)
        .unwrap();
    let crossattn = Tensor::cat(&[&c.crossattn, &uc.crossattn], 0).unwrap();
    let vector = Tensor::cat(&[&c.vector, &uc.vector], 0).unwrap();
    let img = Tensor::rand(-1f32, 1f32, (1, 3, 64, 64), &dev).unwrap();
    let z = model
        .vae
        .denoise_encode_scaled_mode(&img, model.scale_factor)
        .unwrap();
    let z2 = Tensor::cat(&[&z, &z], 0).unwrap();
    let x = Tensor::randn(0f32, 1f32, z2.shape(), &dev).unwrap();
    let out = model
        .denoise(&x, &[5.0, 5.0], &crossattn, &vector, &z2, 1.0)
        .unwrap();
    assert_eq!(out.dims(), z2.dims());
    let img = model
        .vae
        .decode_scaled(&out.narrow(0, 0, 1).unwrap(), model.scale_factor);
    let v: Vec<f32> = img.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}
