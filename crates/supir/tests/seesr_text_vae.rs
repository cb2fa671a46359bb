//! SeeSR's text and VAE path (SD-2-base's `tokenizer/`, `text_encoder/`, `vae/`) against the
//! official code's golden data in `fixtures/seesr-tiny`, the shared VAE under both naming
//! schemes, the full-size SD-2 key lists, and load errors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use supir::models::clip::{ClipActivation, ClipTextConfig, ClipTextTransformer};
use supir::models::supir_config::FirstStageParams;
use supir::models::vae::{AutoencoderKL, VaeConfig};
use supir::parity::fixture::max_abs_diff;
use supir::tokenizer::Tokenizer;
use supir::weights::{ShapeSource, WeightSource};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

fn sd2() -> PathBuf {
    fixture().join("stable-diffusion-2-base")
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/official/seesr")
}

/// Runs the parity cases whose name contains `filter` and checks that exactly `expected` ran
/// and passed.
fn parity(filter: &str, expected: &[&str]) {
    let report = supir::parity::run(fixture(), Some(filter), |r| {
        for c in &r.checks {
            println!(
                "{}/{}: max err {:.3e} (atol {:.3e})",
                r.name, c.name, c.max_err, c.atol
            );
        }
    })
    .unwrap();
    let ran: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    for name in expected {
        assert!(ran.contains(name), "case {name} did not run (ran {ran:?})");
    }
    for r in &report.results {
        assert!(r.passed(), "{}: {:?} {:?}", r.name, r.error, r.checks);
    }
}

#[test]
fn tokenizer_case_passes() {
    parity("tokenizer", &["tokenizer"]);
}

#[test]
fn text_encoder_case_passes() {
    parity("text_encoder", &["text_encoder"]);
}

#[test]
fn vae_cases_pass() {
    parity(
        "vae_",
        &[
            "vae_encode",
            "vae_decode",
            "tiled_vae_encode",
            "tiled_vae_decode",
        ],
    );
}

/// The tiled cases tile: the whole-image VAE misses their golden outputs.
#[test]
fn tiled_cases_differ_from_the_whole_image_vae() {
    let fx = supir::parity::fixture::Fixture::load(fixture()).unwrap();
    let (cfg, tensors) = fixture_vae();
    let vae = AutoencoderKL::from_diffusers(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let case = fx.case("tiled_vae_encode").unwrap();
    let whole = vae.encode_moments(&fx.input(case, "x").unwrap()).unwrap();
    let err = max_abs_diff(&whole, &fx.output(case, "moments").unwrap()).unwrap();
    assert!(err > case.outputs[0].atol, "encode: whole vs tiled {err}");
    let case = fx.case("tiled_vae_decode").unwrap();
    let z = fx.input(case, "latents_scaled").unwrap();
    let whole = vae.decode_scaled(&z, cfg.scaling_factor).unwrap();
    let err = max_abs_diff(&whole, &fx.output(case, "x").unwrap()).unwrap();
    assert!(err > case.outputs[0].atol, "decode: whole vs tiled {err}");
}

#[test]
fn sd2_tokenizer_folder_settings() {
    let tok = Tokenizer::from_folder(&sd2().join("tokenizer")).unwrap();
    let sp = tok.special_tokens();
    // special_tokens_map.json's pad `!` overrides tokenizer_config.json's `<|endoftext|>`.
    assert_eq!(
        (sp.bos, sp.eos, sp.pad, sp.max_length),
        (49406, 49407, 0, 77)
    );
    let ids = tok.padded_ids("wow!").unwrap();
    // `!` is a special token there: split off before BPE, id 0 (not `!</w>` = 256).
    assert_eq!(
        &ids[..4],
        &[49406, tok.padded_ids("wow").unwrap()[1], 0, 49407]
    );
    assert!(ids[4..].iter().all(|&i| i == 0));
    // BERT cleaning: case, accents and punctuation.
    assert_eq!(
        tok.padded_ids("Café, DÉJÀ").unwrap(),
        tok.padded_ids("cafe , deja").unwrap()
    );
}

/// The inverse of the loader's name mapping, written out independently: diffusers key ->
/// (SGM key, Linear weight to reshape to a 1x1 conv).
fn sgm_name(key: &str, levels: usize) -> (String, bool) {
    let p: Vec<&str> = key.split('.').collect();
    let leaf = |rest: &[&str]| rest.join(".").replace("conv_shortcut", "nin_shortcut");
    let name = match p.as_slice() {
        [net, "down_blocks", i, "resnets", j, rest @ ..] => {
            format!("{net}.down.{i}.block.{j}.{}", leaf(rest))
        }
        [net, "down_blocks", i, "downsamplers", "0", rest @ ..] => {
            format!("{net}.down.{i}.downsample.{}", rest.join("."))
        }
        [net, "up_blocks", i, kind, j, rest @ ..] => {
            let level = levels - 1 - i.parse::<usize>().unwrap();
            match *kind {
                "resnets" => format!("{net}.up.{level}.block.{j}.{}", leaf(rest)),
                _ => format!("{net}.up.{level}.upsample.{}", rest.join(".")),
            }
        }
        [net, "mid_block", "resnets", r, rest @ ..] => {
            let b = if *r == "0" { "block_1" } else { "block_2" };
            format!("{net}.mid.{b}.{}", leaf(rest))
        }
        [net, "mid_block", "attentions", "0", proj, rest @ ..] => {
            let sgm = match *proj {
                "group_norm" => "norm",
                "query" => "q",
                "key" => "k",
                "value" => "v",
                "proj_attn" => "proj_out",
                other => panic!("unexpected attention tensor {other}"),
            };
            let weight = sgm != "norm" && rest == ["weight"];
            return (format!("{net}.mid.attn_1.{sgm}.{}", rest.join(".")), weight);
        }
        [net, "conv_norm_out", rest @ ..] => format!("{net}.norm_out.{}", rest.join(".")),
        _ => key.to_string(),
    };
    (name, false)
}

fn fixture_vae() -> (VaeConfig, HashMap<String, Tensor>) {
    let dir = sd2().join("vae");
    let cfg = VaeConfig::from_diffusers_config(dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (cfg, tensors)
}

/// Encodes and decodes a fixed input with `vae`.
fn run_vae(vae: &AutoencoderKL) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, (3 * 24 * 32) as f32, &dev)
        .unwrap()
        .reshape((1, 3, 24, 32))
        .unwrap();
    let x = ((x * 0.37).unwrap().sin().unwrap() * 0.9).unwrap();
    let moments = vae.encode_moments(&x).unwrap();
    let z = moments.narrow(1, 0, 4).unwrap();
    (moments, vae.decode(&z).unwrap())
}

#[test]
fn one_vae_under_sgm_and_both_diffusers_namings() {
    let (cfg, tensors) = fixture_vae();
    assert_eq!(cfg.scaling_factor, 0.18215, "diffusers default");
    let levels = cfg.block_out_channels.len();
    assert!(tensors.contains_key("encoder.mid_block.attentions.0.query.weight"));
    let dev = Device::Cpu;
    let diffusers = AutoencoderKL::from_diffusers(
        VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    let reference = run_vae(&diffusers);

    // The current diffusers names (`to_q`, `to_k`, `to_v`, `to_out.0`).
    let renamed: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace(".query.", ".to_q.")
                .replace(".key.", ".to_k.")
                .replace(".value.", ".to_v.")
                .replace(".proj_attn.", ".to_out.0.");
            (k, v.clone())
        })
        .collect();
    assert!(renamed.contains_key("decoder.mid_block.attentions.0.to_out.0.bias"));
    let new_names =
        AutoencoderKL::from_diffusers(VarBuilder::from_tensors(renamed, DType::F32, &dev), &cfg)
            .unwrap();
    let out = run_vae(&new_names);
    assert_eq!(max_abs_diff(&out.0, &reference.0).unwrap(), 0.0);
    assert_eq!(max_abs_diff(&out.1, &reference.1).unwrap(), 0.0);

    // The SGM names SUPIR's checkpoints use (attention as 1x1 convs), through the SGM config.
    let sgm: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| {
            let (name, linear) = sgm_name(k, levels);
            let v = if linear {
                v.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
            } else {
                v.clone()
            };
            (name, v)
        })
        .collect();
    let c = &cfg.block_out_channels;
    let mult: Vec<String> = c.iter().map(|w| (w / c[0]).to_string()).collect();
    let yaml = format!(
        "embed_dim: {z}\nddconfig: {{double_z: true, z_channels: {z}, resolution: 256, \
         in_channels: 3, out_ch: 3, ch: {}, ch_mult: [{}], num_res_blocks: {}, \
         attn_resolutions: []}}",
        c[0],
        mult.join(", "),
        cfg.layers_per_block,
        z = cfg.latent_channels
    );
    let params: FirstStageParams = serde_yaml::from_str(&yaml).unwrap();
    let sgm_vae = AutoencoderKL::new(
        VarBuilder::from_tensors(sgm, DType::F32, &dev),
        &params,
        false,
    )
    .unwrap();
    let out = run_vae(&sgm_vae);
    assert_eq!(max_abs_diff(&out.0, &reference.0).unwrap(), 0.0);
    assert_eq!(max_abs_diff(&out.1, &reference.1).unwrap(), 0.0);
}

/// Rows of `crates/supir/assets/seesr-keys.tsv` for one file: key -> shape.
fn official_keys(file: &str) -> BTreeMap<String, Vec<usize>> {
    supir::inspect::seesr_file_keys(file)
}

fn assert_same_keys(
    src: &ShapeSource,
    mut expected: BTreeMap<String, Vec<usize>>,
    buffers: &[&str],
) {
    assert!(
        src.repeated().is_empty(),
        "requested twice: {:?}",
        src.repeated()
    );
    for b in buffers {
        assert!(
            expected.remove(*b).is_some(),
            "buffer {b} not in the key list"
        );
    }
    let seen = src.requested();
    let missing: Vec<_> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
    let extra: Vec<_> = seen.keys().filter(|k| !expected.contains_key(*k)).collect();
    let wrong: Vec<_> = seen
        .iter()
        .filter(|(k, s)| expected.get(*k).is_some_and(|e| e != *s))
        .collect();
    assert!(missing.is_empty(), "not requested: {missing:?}");
    assert!(extra.is_empty(), "not in the release: {extra:?}");
    assert!(wrong.is_empty(), "wrong shapes: {wrong:?}");
    assert_eq!(seen.len(), expected.len());
}

#[test]
fn full_size_sd2_text_encoder_requests_the_release_keys() {
    let cfg = ClipTextConfig::from_hf_config(data().join("text_encoder_config.json")).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.max_position_embeddings,
            cfg.vocab_size,
            cfg.hidden_act
        ),
        (1024, 23, 16, 4096, 77, 49408, ClipActivation::Gelu)
    );
    let expected = official_keys("stable-diffusion-2-base/text_encoder/model.safetensors");
    let src = ShapeSource::new(expected.clone().into_iter().collect());
    let vb = src.clone().into_var_builder(DType::F32, &Device::Cpu);
    ClipTextTransformer::from_text_model(vb, &cfg).unwrap();
    // `position_ids` is a buffer (the positions 0..77), not a weight.
    assert_same_keys(&src, expected, &["text_model.embeddings.position_ids"]);
}

#[test]
fn full_size_sd2_vae_requests_the_release_keys() {
    let cfg = VaeConfig::from_diffusers_config(data().join("vae_config.json")).unwrap();
    let expected = official_keys("stable-diffusion-2-base/vae/diffusion_pytorch_model.safetensors");
    assert!(expected.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let src = ShapeSource::new(expected.clone().into_iter().collect());
    let vb = src.clone().into_var_builder(DType::F32, &Device::Cpu);
    AutoencoderKL::from_diffusers(vb, &cfg).unwrap();
    assert_same_keys(&src, expected, &[]);
}

#[test]
fn wrong_shaped_vae_tensor_is_named() {
    let (cfg, tensors) = fixture_vae();
    let dir = std::env::temp_dir().join(format!("seesr_text_vae_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for key in [
        "decoder.up_blocks.1.resnets.0.conv1.weight",
        "encoder.mid_block.attentions.0.value.weight",
    ] {
        let mut bad = tensors.clone();
        let t = &bad[key];
        let n = t.dim(0).unwrap();
        let wrong = Tensor::zeros((n, 1), DType::F32, &Device::Cpu).unwrap();
        bad.insert(key.to_string(), wrong);
        let path = dir.join("vae.safetensors");
        candle_core::safetensors::save(&bad, &path).unwrap();
        let vb = WeightSource::open(&[&path])
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu);
        let err = AutoencoderKL::from_diffusers(vb, &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "error does not name {key}: {err}");
        assert!(err.contains("shape"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
