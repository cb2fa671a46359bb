//! GLVControl / LightGLVUNet: parity with the official code on `fixtures/supir-tiny`, and the
//! exact official key set for the full-size config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use supir::inspect::full_size_keys;
use supir::models::glv_control::GLVControl;
use supir::models::supir_config::SupirConfig;
use supir::models::unet::LightGLVUNet;
use supir::parity::fixture::{max_abs_diff, Fixture};
use supir::weights::ShapeSource;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

struct Tiny {
    fx: Fixture,
    cfg: SupirConfig,
    vb: VarBuilder<'static>,
}

fn tiny() -> Tiny {
    let dir = fixtures().join("supir-tiny");
    let fx = Fixture::load(&dir).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[fx.weights_path()], DType::F32, &Device::Cpu)
    }
    .unwrap();
    Tiny { fx, cfg, vb }
}

#[test]
fn control_matches_official() {
    let t = tiny();
    let case = t.fx.case("control").expect("case `control`");
    let p = &t.cfg.model.params.control_stage_config.params;
    let model = GLVControl::new(t.vb.pp("model.control_model"), p).unwrap();
    let inp = |n: &str| t.fx.input(case, n).unwrap();
    let hints = model
        .forward(
            &inp("control"),
            &inp("timesteps"),
            &inp("xt"),
            &inp("context"),
            &inp("y"),
        )
        .unwrap();
    assert_eq!(hints.len(), case.outputs.len());
    for (i, out) in case.outputs.iter().enumerate() {
        assert_eq!(out.name, format!("hint_{i:02}"));
        let want = t.fx.output(case, &out.name).unwrap();
        let err = max_abs_diff(&hints[i], &want).unwrap();
        println!(
            "control {}: max abs err {err:.3e} (atol {:.3e})",
            out.name, out.atol
        );
        assert!(err <= out.atol, "{}: {err} > {}", out.name, out.atol);
    }
}

fn unet_case(name: &str) {
    let t = tiny();
    let case = t.fx.case(name).unwrap_or_else(|| panic!("case `{name}`"));
    let p = &t.cfg.model.params.network_config.params;
    let model = LightGLVUNet::new(t.vb.pp("model.diffusion_model"), p).unwrap();
    let inp = |n: &str| t.fx.input(case, n).unwrap();
    let hints: Vec<Tensor> = case
        .inputs
        .iter()
        .filter(|n| n.starts_with("hint_"))
        .map(|n| inp(n))
        .collect();
    assert_eq!(hints.len(), model.num_hints());
    let cs = case.params["control_scale"]
        .as_f64()
        .expect("control_scale");
    let eps = model
        .forward(
            &inp("xt"),
            &inp("timesteps"),
            &inp("context"),
            &inp("y"),
            &hints,
            cs,
        )
        .unwrap();
    for out in &case.outputs {
        let want = t.fx.output(case, &out.name).unwrap();
        let err = max_abs_diff(&eps, &want).unwrap();
        println!(
            "{name} {}: max abs err {err:.3e} (atol {:.3e})",
            out.name, out.atol
        );
        assert!(err <= out.atol, "{name} {}: {err} > {}", out.name, out.atol);
    }
}

#[test]
fn unet_cs1_matches_official() {
    unet_case("unet_cs1");
}

#[test]
fn unet_cs05_matches_official() {
    unet_case("unet_cs05");
}

#[test]
fn full_size_requests_exactly_the_official_keys() {
    let cfg = SupirConfig::load(fixtures().join("official/SUPIR_v0.yaml")).unwrap();
    let official = full_size_keys();
    let src = ShapeSource::new(official.clone().into_iter().collect());
    let vb = src.clone().into_var_builder(DType::F32, &Device::Cpu);
    let p = &cfg.model.params;
    GLVControl::new(vb.pp("model.control_model"), &p.control_stage_config.params).unwrap();
    LightGLVUNet::new(vb.pp("model.diffusion_model"), &p.network_config.params).unwrap();
    assert!(
        src.repeated().is_empty(),
        "requested twice: {:?}",
        src.repeated()
    );
    let got = src.requested();
    let want: BTreeMap<String, Vec<usize>> = official
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("model.diffusion_model.") || k.starts_with("model.control_model.")
        })
        .collect();

    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let wrong: Vec<_> = want
        .iter()
        .filter_map(|(k, s)| match got.get(k) {
            Some(g) if g != s => Some((k, s, g)),
            _ => None,
        })
        .collect();
    assert!(missing.is_empty(), "missing keys: {missing:?}");
    assert!(extra.is_empty(), "extra keys: {extra:?}");
    assert!(wrong.is_empty(), "wrong shapes (key, want, got): {wrong:?}");
    println!("{} keys match", want.len());
}
