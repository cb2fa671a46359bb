//! VAE parity against the official code's golden data, and the full-size key/shape check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use supir::inspect::full_size_keys;
use supir::models::supir_config::SupirConfig;
use supir::models::vae::{AutoencoderKL, DiagonalGaussian};
use supir::parity::fixture::{max_abs_diff, Case, Fixture};
use supir::weights::ShapeSource;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tiny() -> (Fixture, AutoencoderKL, f64) {
    let fx = Fixture::load(fixtures().join("supir-tiny")).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[fx.weights_path()], DType::F32, &Device::Cpu).unwrap()
    };
    let vae = AutoencoderKL::new(
        vb.pp("first_stage_model"),
        &cfg.model.params.first_stage_config.params,
        true,
    )
    .unwrap();
    (fx, vae, cfg.model.params.scale_factor)
}

/// Case param `scale_factor` must agree with the config's.
fn case_scale(case: &Case, config_scale: f64) -> f64 {
    let s = case.params["scale_factor"].as_f64().unwrap_or(config_scale);
    assert_eq!(s, config_scale, "case scale_factor differs from config");
    s
}

fn check(fx: &Fixture, case: &Case, name: &str, got: &Tensor) {
    let want = fx.output(case, name).unwrap();
    let out = case.outputs.iter().find(|o| o.name == name).unwrap();
    let err = max_abs_diff(got, &want).unwrap();
    println!(
        "{}/{name}: max abs err {err:.3e} (atol {:.3e})",
        case.name, out.atol
    );
    assert!(
        err <= out.atol,
        "{}/{name}: max abs err {err:e} > atol {:e}",
        case.name,
        out.atol
    );
}

#[test]
fn vae_encode_matches_official() {
    let (fx, vae, scale) = tiny();
    for case in fx.cases.iter().filter(|c| c.kind == "vae_encode") {
        let scale = case_scale(case, scale);
        let x = fx.input(case, "x").unwrap();
        let moments = vae.encode_moments(&x).unwrap();
        let denoise_moments = vae.denoise_encode_moments(&x).unwrap();
        check(&fx, case, "moments", &moments);
        check(&fx, case, "denoise_moments", &denoise_moments);
        let z = (DiagonalGaussian::from_moments(&moments).unwrap().mode() * scale).unwrap();
        let zd = (DiagonalGaussian::from_moments(&denoise_moments)
            .unwrap()
            .mode()
            * scale)
            .unwrap();
        check(&fx, case, "z_mode_scaled", &z);
        check(&fx, case, "z_denoise_mode_scaled", &zd);
        // The helpers compute the same thing.
        let zd2 = vae.denoise_encode_scaled_mode(&x, scale).unwrap();
        assert_eq!(max_abs_diff(&zd, &zd2).unwrap(), 0.0);
    }
}

#[test]
fn vae_decode_matches_official() {
    let (fx, vae, scale) = tiny();
    let mut n = 0;
    for case in fx.cases.iter().filter(|c| c.kind == "vae_decode") {
        let scale = case_scale(case, scale);
        let z = fx.input(case, "z_scaled").unwrap();
        let x = vae.decode_scaled(&z, scale).unwrap();
        check(&fx, case, "x", &x);
        n += 1;
    }
    assert!(n > 0, "no vae_decode case");
}

#[test]
fn diagonal_gaussian_sample_and_clamp() {
    let dev = Device::Cpu;
    // mean 1, logvar 2 (std e), and a logvar beyond the clamp (-100 -> -30).
    let moments = Tensor::new(&[[[[1f32]], [[-2f32]], [[2f32]], [[-100f32]]]], &dev).unwrap();
    let g = DiagonalGaussian::from_moments(&moments).unwrap();
    assert_eq!(g.mode().dims(), &[1, 2, 1, 1]);
    let noise = Tensor::new(&[[[[1f32]], [[1f32]]]], &dev).unwrap();
    let s: Vec<f32> = g
        .sample(&noise)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!((s[0] - (1.0 + 1f32.exp())).abs() < 1e-6);
    assert!((s[1] - (-2.0 + (-15f32).exp())).abs() < 1e-6);
}

#[test]
fn full_size_vae_requests_exactly_the_official_keys() {
    let cfg = SupirConfig::load(fixtures().join("official/SUPIR_v0.yaml")).unwrap();
    let official = full_size_keys();
    let src = ShapeSource::new(official.clone().into_iter().collect());
    let vb = src.clone().into_var_builder(DType::F32, &Device::Cpu);
    AutoencoderKL::new(
        vb.pp("first_stage_model"),
        &cfg.model.params.first_stage_config.params,
        true,
    )
    .unwrap();
    assert!(
        src.repeated().is_empty(),
        "requested twice: {:?}",
        src.repeated()
    );
    let seen = src.requested();
    let expected: BTreeMap<String, Vec<usize>> = official
        .into_iter()
        .filter(|(k, _)| k.starts_with("first_stage_model."))
        .collect();
    assert!(!expected.is_empty());

    let missing: Vec<_> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
    let extra: Vec<_> = seen.keys().filter(|k| !expected.contains_key(*k)).collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter_map(|(k, v)| {
            let got = seen.get(k)?;
            (got != v).then(|| format!("{k}: want {v:?}, got {got:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "missing {missing:?}\nextra {extra:?}\nwrong shapes {wrong:?}"
    );
    println!("{} first_stage_model keys match", expected.len());
}
