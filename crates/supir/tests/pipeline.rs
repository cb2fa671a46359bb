//! `batchify_sample` end to end on `fixtures/supir-tiny`: every `sample` case (all four
//! samplers), replaying the recorded random draws, within the case's atol.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use supir::models::supir_config::SupirConfig;
use supir::parity;
use supir::parity::fixture::{max_abs_diff, Fixture};
use supir::pipelines::supir::flow::{batchify_sample, sampler_from_config, BatchifyArgs};
use supir::pipelines::supir::model::SupirModel;
use supir::schedulers::sampler::{SamplerKind, SeededNoise};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

fn check(name: &str) {
    let report = parity::run(tiny(), Some(name), |_| {}).unwrap();
    let r = report
        .results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("case `{name}` not run"));
    assert!(r.error.is_none(), "{name}: {:?}", r.error);
    for c in &r.checks {
        println!(
            "{name} {}: max abs err {:.3e} (atol {:.3e})",
            c.name, c.max_err, c.atol
        );
    }
    assert!(r.passed(), "{name} failed: {:?}", r.checks);
}

#[test]
fn sample_edm_restore() {
    check("sample_edm_restore");
}

#[test]
fn sample_edm_linear_control() {
    check("sample_edm_linear_control");
}

#[test]
fn sample_tiled_edm() {
    check("sample_tiled_edm");
}

#[test]
fn sample_dpmpp2m() {
    check("sample_dpmpp2m");
}

/// A seed reproduces the image; another seed changes it. Also reads the sampler from the
/// model config.
#[test]
fn seeded_runs_are_reproducible() {
    let fx = Fixture::load(tiny()).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let (kind, params) = sampler_from_config(&cfg).unwrap();
    assert_eq!(kind, SamplerKind::RestoreEdm);
    let model = SupirModel::load(&cfg, &[fx.weights_path()], DType::F32, &Device::Cpu).unwrap();
    let args: BatchifyArgs = serde_json::from_value(serde_json::json!({
        "num_steps": 2, "s_churn": 5, "use_linear_CFG": true, "color_fix_type": "Wavelet"
    }))
    .unwrap();
    let p = &cfg.model.params;
    let opts = args.to_options(kind, &params, &p.p_p, &p.n_p).unwrap();
    assert_eq!(opts.opts.num_steps, 2);
    assert_eq!(opts.p_p, p.p_p);
    let x = Tensor::rand(-1f32, 1f32, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let run =
        |seed| batchify_sample(&model, &x, &["a cat"], &opts, &mut SeededNoise::new(seed)).unwrap();
    let (a, b, c) = (run(3), run(3), run(4));
    assert_eq!(a.dims(), [1, 3, 64, 64]);
    assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
    assert!(max_abs_diff(&a, &c).unwrap() > 1e-4);
}
