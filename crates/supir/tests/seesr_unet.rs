//! SeeSR's UNet and ControlNet with the representation cross-attention: parity with the
//! official code on `fixtures/seesr-tiny`, and the exact official key set at full size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use supir::inspect::seesr_file_keys;

use candle_core::{DType, Device, Tensor};
use supir::models::controlnet::{ControlNetConfig, ControlNetModel};
use supir::models::unet::sd2::{
    orig_var_builder, PerBlock, UNet2DConditionConfig, UNet2DConditionModel, WEIGHTS_NAME,
};
use supir::parity::fixture::{max_abs_diff, Fixture};
use supir::weights::{ShapeSource, WeightSource};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

/// Runs the cases whose name contains `filter` and checks that exactly `expected` ran and passed.
fn check_cases(filter: &str, expected: &[&str]) {
    let report = supir::parity::run(fixture_dir(), Some(filter), |r| {
        for c in &r.checks {
            println!(
                "{} {}: max abs err {:.3e} (atol {:.3e})",
                r.name, c.name, c.max_err, c.atol
            );
        }
    })
    .unwrap();
    let mut ran: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    ran.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(ran, want, "cases run (skipped: {:?})", report.skipped);
    for r in &report.results {
        assert!(r.error.is_none(), "{}: {:?}", r.name, r.error);
        assert!(!r.checks.is_empty(), "{}: no outputs compared", r.name);
        assert!(r.passed(), "{} failed: {:?}", r.name, r.worst());
    }
}

#[test]
fn controlnet_cases_match_official() {
    check_cases("controlnet", &["controlnet", "controlnet_cs06"]);
}

#[test]
fn unet_cases_match_official() {
    check_cases("unet", &["unet", "unet_no_control"]);
}

// ---------------------------------------------------------------------------- full size

/// `(key, shape)` rows of `assets/seesr-keys.tsv` in the file `<prefix>/diffusion_pytorch_model.safetensors`.
fn official_keys(prefix: &str) -> BTreeMap<String, Vec<usize>> {
    seesr_file_keys(&format!("{prefix}/diffusion_pytorch_model.safetensors"))
}

/// The release configs (`fixtures/official/seesr/<model>_config.json`): the keys of the tiny
/// fixture's configs (SeeSR's `save_pretrained` output) with SD-2-base's sizes, which the
/// key shapes confirm (widths 320/640/1280/1280, text width 1024, 32 groups; heads 5/10/20/20).
fn release_config(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/official/seesr")
        .join(format!("{model}_config.json"))
}

/// Builds a model on a [`ShapeSource`] and checks it requests exactly `official`, each once.
fn assert_exact_keys(
    official: &BTreeMap<String, Vec<usize>>,
    build: impl FnOnce(candle_nn::VarBuilder<'static>),
) {
    let src = ShapeSource::new(official.clone().into_iter().collect());
    build(src.clone().into_var_builder(DType::F16, &Device::Cpu));
    let requested = src.requested();
    let missing: Vec<_> = official
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    let extra: Vec<_> = requested
        .keys()
        .filter(|k| !official.contains_key(*k))
        .collect();
    let wrong: Vec<_> = requested
        .iter()
        .filter(|(k, s)| official.get(*k).is_some_and(|o| o != *s))
        .collect();
    assert!(missing.is_empty(), "not requested: {missing:?}");
    assert!(extra.is_empty(), "not in the official model: {extra:?}");
    assert!(wrong.is_empty(), "wrong shapes: {wrong:?}");
    assert!(
        src.repeated().is_empty(),
        "asked twice: {:?}",
        src.repeated()
    );
}

#[test]
fn full_size_unet_requests_exactly_the_official_keys() {
    let official = official_keys("seesr/unet");
    assert_eq!(official.len(), 1102);
    assert!(official.keys().any(|k| k.contains("image_attentions")));
    let cfg = UNet2DConditionConfig::from_file(release_config("unet")).unwrap();
    assert!(cfg.use_image_cross_attention);
    assert_exact_keys(&official, |vb| {
        let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
        assert_eq!(unet.num_down_residuals(), 12);
    });
}

#[test]
fn full_size_controlnet_requests_exactly_the_official_keys() {
    let official = official_keys("seesr/controlnet");
    assert_eq!(official.len(), 522);
    let cfg = ControlNetConfig::from_file(release_config("controlnet")).unwrap();
    assert_exact_keys(&official, |vb| {
        ControlNetModel::new(vb, &cfg).unwrap();
    });
}

// ---------------------------------------------------------------------------- loading

#[test]
fn shape_mismatch_names_the_key() {
    let dir = fixture_dir().join("seesr/unet");
    let mut cfg = UNet2DConditionConfig::from_file(dir.join("config.json")).unwrap();
    // A text width the weights do not have: the first text cross-attention's `to_k` fails.
    cfg.cross_attention_dim = PerBlock::All(24);
    let vb = WeightSource::open(&[dir.join(WEIGHTS_NAME)])
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::new(vb, &cfg).unwrap_err().to_string();
    assert!(
        err.contains("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        "{err}"
    );
    assert!(err.contains("[8, 24]") && err.contains("[8, 16]"), "{err}");
}

#[test]
fn turbo_unet_takes_only_image_attentions_from_seesr() {
    let fx = fixture_dir();
    let (turbo, seesr) = (fx.join("sd-turbo/unet"), fx.join("seesr/unet"));
    let load = |dir: &Path, key: &str| {
        let vb = WeightSource::open(&[dir.join(WEIGHTS_NAME)])
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu);
        vb.get_unchecked(key).unwrap()
    };
    let routed = orig_var_builder(
        &turbo.join(WEIGHTS_NAME),
        &seesr.join(WEIGHTS_NAME),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (key, from_seesr) in [
        ("conv_in.weight", false),
        ("down_blocks.0.attentions.0.proj_in.weight", false),
        ("mid_block.resnets.0.conv1.weight", false),
        ("down_blocks.0.image_attentions.0.proj_in.weight", true),
        (
            "up_blocks.3.image_attentions.2.transformer_blocks.0.attn2.to_k.weight",
            true,
        ),
    ] {
        let got = routed.get_unchecked(key).unwrap();
        let (want, other) = if from_seesr {
            (load(&seesr, key), Some(&turbo))
        } else {
            (load(&turbo, key), Some(&seesr))
        };
        assert_eq!(max_abs_diff(&got, &want).unwrap(), 0.0, "{key}");
        // The two files differ there (else the test would not tell them apart); sd-turbo has
        // no image attentions at all.
        let other = other.unwrap();
        let vb = WeightSource::open(&[other.join(WEIGHTS_NAME)])
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu);
        if vb.contains_tensor(key) {
            assert!(max_abs_diff(&got, &vb.get_unchecked(key).unwrap()).unwrap() > 0.0);
        } else {
            assert!(from_seesr, "{key}");
        }
    }
    let unet = UNet2DConditionModel::from_pretrained_orig(&turbo, &seesr, DType::F32, &Device::Cpu)
        .unwrap();
    let f = Fixture::load(&fx).unwrap();
    let case = f.case("unet_no_control").unwrap();
    let inp = |n: &str| f.input(case, n).unwrap();
    let out = unet
        .forward(
            &inp("sample"),
            &inp("timestep"),
            &inp("encoder_hidden_states"),
            Some(&inp("image_encoder_hidden_states")),
            None,
        )
        .unwrap();
    assert_eq!(out.dims(), inp("sample").dims());
    // A UNet with image attentions needs the RAM embeddings.
    let err = unet
        .forward(
            &inp("sample"),
            500.0,
            &inp("encoder_hidden_states"),
            None,
            None,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("image_encoder_hidden_states"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------- K/V memo

fn copy(t: &Tensor) -> Tensor {
    Tensor::from_vec(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        t.dims(),
        t.device(),
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

/// The text and RAM K/V memos: repeated calls with fresh equal contexts give the same bits as a
/// fresh model, and a changed context is followed (no stale keys/values).
#[test]
fn remembered_contexts_give_the_bits_of_a_fresh_model() {
    let fx = fixture_dir();
    let f = Fixture::load(&fx).unwrap();
    let case = f.case("controlnet").unwrap();
    let inp = |n: &str| f.input(case, n).unwrap();
    let (x, t, text, image, cond) = (
        inp("sample"),
        inp("timestep"),
        inp("encoder_hidden_states"),
        inp("image_encoder_hidden_states"),
        inp("controlnet_cond"),
    );
    let image2 = (&image * 0.5).unwrap();
    let text2 = (&text + 0.25).unwrap();
    let dev = Device::Cpu;
    let cn = |_: ()| {
        ControlNetModel::from_pretrained(fx.join("seesr/controlnet"), DType::F32, &dev).unwrap()
    };
    let un = |_: ()| {
        UNet2DConditionModel::from_pretrained(fx.join("seesr/unet"), DType::F32, &dev).unwrap()
    };
    let run = |c: &ControlNetModel, u: &UNet2DConditionModel, text: &Tensor, image: &Tensor| {
        let r = c.forward(&x, &t, text, Some(image), &cond, 1.0).unwrap();
        bits(&u.forward(&x, &t, text, Some(image), Some(&r)).unwrap())
    };
    let (c, u) = (cn(()), un(()));
    let first = run(&c, &u, &text, &image);
    let changed_image = run(&c, &u, &text, &image2);
    let changed_text = run(&c, &u, &text2, &image2);
    let again = run(&c, &u, &copy(&text), &copy(&image));
    assert_eq!(again, first);
    assert_ne!(changed_image, first);
    assert_eq!(changed_image, run(&cn(()), &un(()), &text, &image2));
    assert_eq!(changed_text, run(&cn(()), &un(()), &text2, &image2));
}
