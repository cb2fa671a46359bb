//! SeeSR's DAPE tagger (RAM + DAPE LoRA) against the official outputs of `fixtures/seesr-tiny`
//! (cases `ram_preprocess`, `ram`), its DAPE key check, and the full-size key set.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use supir::models::ram::{Lora, Ram, RamConfig};
use supir::weights::ShapeSource;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

fn ram_case() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ram")
        .unwrap()
        .clone()
}

fn tiny_config() -> RamConfig {
    let case = ram_case();
    RamConfig::from_official(&case["params"]["ram_config"], &case["params"]["q2l_config"]).unwrap()
}

#[test]
fn ram_cases_match_the_official_outputs() {
    let report = supir::parity::run(fixture_dir(), Some("ram"), |r| {
        for c in &r.checks {
            eprintln!(
                "{} {}: max err {:.3e} (atol {:.3e})",
                r.name, c.name, c.max_err, c.atol
            );
        }
    })
    .unwrap();
    let names: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"ram_preprocess"), "ran {names:?}");
    assert!(names.contains(&"ram"), "ran {names:?}");
    for r in &report.results {
        assert!(r.passed(), "{}: {:?} {:?}", r.name, r.error, r.checks);
    }
}

#[test]
fn tag_string_is_the_official_one() {
    let dir = fixture_dir();
    let case = ram_case();
    let model = Ram::load(
        &dir.join("ram_swin_large_14m.pth"),
        Some(&dir.join("DAPE.pth")),
        &tiny_config(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu).unwrap();
    let image = &tensors["ram_preprocess/in/image_u8"];
    let x = supir::models::ram::preprocess(image).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.tags.len(), 1);
    assert_eq!(out.tags[0], case["params"]["tags"].as_str().unwrap());
    assert_eq!(out.image_embeds.dims(), &[1, 145, 512]);
    let idx: Vec<usize> = out
        .targets
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 1.0)
        .map(|(i, _)| i)
        .collect();
    let want: Vec<usize> = serde_json::from_value(case["params"]["tag_indices"].clone()).unwrap();
    assert_eq!(idx, want);
}

/// `get_validation_prompt` on the pipeline cases' LR images (upscaled in both directions to
/// 384): the tags of `params.tags` and the recorded `ram_encoder_hidden_states`, within the
/// single-component tolerance 1e-4 x max(1, max |x|).
#[test]
fn pipeline_images_give_the_official_tags_and_embeddings() {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let model = Ram::load(
        &dir.join("ram_swin_large_14m.pth"),
        Some(&dir.join("DAPE.pth")),
        &tiny_config(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu).unwrap();
    let mut n = 0;
    for case in all["cases"].as_array().unwrap() {
        if case["kind"] != "pipeline" {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let img = &tensors[&format!("{name}/in/image_u8")];
        let out = model
            .forward(&supir::models::ram::preprocess(img).unwrap())
            .unwrap();
        assert_eq!(
            out.tags[0],
            case["params"]["tags"].as_str().unwrap(),
            "{name}"
        );
        let want = &tensors[&format!("{name}/out/ram_encoder_hidden_states")];
        let max_abs = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = (&out.image_embeds - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{name}: embeds max err {err:.3e}");
        assert!(
            err <= 1e-4 * max_abs.max(1.0),
            "{name}: {err} (max {max_abs})"
        );
        n += 1;
    }
    assert_eq!(n, 4);
}

/// The RAM checkpoint of the fixture as a tensor map, for building on an in-memory source.
fn fixture_ram_tensors() -> HashMap<String, Tensor> {
    let ck =
        supir::weights::Checkpoint::open(fixture_dir().join("ram_swin_large_14m.pth")).unwrap();
    ck.tensors()
        .into_keys()
        .filter(|k| !k.ends_with("relative_position_index") && !k.ends_with("attn_mask"))
        .map(|k| {
            let t = ck.load(&k, DType::F32, &Device::Cpu).unwrap().unwrap();
            (k, t)
        })
        .collect()
}

#[test]
fn dape_key_matching_no_layer_is_an_error_naming_it() {
    let ram = fixture_ram_tensors();
    let dape_ck = supir::weights::Checkpoint::open(fixture_dir().join("DAPE.pth")).unwrap();
    let mut dape: HashMap<String, Tensor> = dape_ck
        .tensors()
        .into_keys()
        .map(|k| {
            let t = dape_ck.load(&k, DType::F32, &Device::Cpu).unwrap().unwrap();
            (k, t)
        })
        .collect();
    let cfg = tiny_config();
    let build = |dape: &HashMap<String, Tensor>| {
        let vb = candle_nn::VarBuilder::from_tensors(ram.clone(), DType::F32, &Device::Cpu);
        let lvb = candle_nn::VarBuilder::from_tensors(dape.clone(), DType::F32, &Device::Cpu);
        let lora = Lora::new(lvb, dape.keys().cloned(), "DAPE.pth", cfg.lora_alpha);
        Ram::new(vb, Some(&lora), &cfg).map(|_| ())
    };
    build(&dape).expect("the fixture's DAPE file loads");

    // A LoRA pair on a layer that has no LoRA in RAMLora (the Swin MLP).
    let bad = "visual_encoder.layers.0.blocks.0.mlp.fc1.lora_A";
    dape.insert(
        bad.into(),
        Tensor::zeros((8, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    dape.insert(
        bad.replace("lora_A", "lora_B"),
        Tensor::zeros((64, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = build(&dape).unwrap_err().to_string();
    assert!(err.contains("DAPE.pth") && err.contains(bad), "{err}");

    // A wrong prefix (the official strict=False load would skip it silently).
    let mut dape2: HashMap<String, Tensor> = dape
        .iter()
        .filter(|(k, _)| !k.contains("mlp.fc1"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let k = "module.tagging_head.encoder.layer.0.crossattention.self.query.lora_A";
    dape2.insert(
        k.into(),
        Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = build(&dape2).unwrap_err().to_string();
    assert!(err.contains(k), "{err}");

    // A misshapen LoRA tensor names its key.
    let mut dape3: HashMap<String, Tensor> = dape2
        .into_iter()
        .filter(|(k, _)| !k.starts_with("module."))
        .collect();
    let k = "visual_encoder.layers.0.blocks.0.attn.qkv.lora_B";
    dape3.insert(
        k.into(),
        Tensor::zeros((48, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = build(&dape3).unwrap_err().to_string();
    assert!(err.contains(k), "{err}");
}

/// The file-level errors: a DAPE file (safetensors here; torch zips load the same way) with a
/// key matching no layer, and a RAM file lacking a weight, name the file and the key.
#[test]
fn bad_files_are_errors_naming_file_and_key() {
    let dir = fixture_dir();
    let tmp = std::env::temp_dir().join(format!("supir-seesr-ram-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let dape_ck = supir::weights::Checkpoint::open(dir.join("DAPE.pth")).unwrap();
    let mut dape: HashMap<String, Tensor> = dape_ck
        .tensors()
        .into_keys()
        .map(|k| {
            let t = dape_ck.load(&k, DType::F32, &Device::Cpu).unwrap().unwrap();
            (k, t)
        })
        .collect();
    let bad = "tagging_head.encoder.layer.0.crossattention.self.value.lora_A";
    dape.insert(
        bad.into(),
        Tensor::zeros((8, 512), DType::F32, &Device::Cpu).unwrap(),
    );
    dape.insert(
        bad.replace("lora_A", "lora_B"),
        Tensor::zeros((32, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    let bad_dape = tmp.join("DAPE_bad.safetensors");
    candle_core::safetensors::save(&dape, &bad_dape).unwrap();
    let cfg = tiny_config();
    let err = Ram::load(
        &dir.join("ram_swin_large_14m.pth"),
        Some(&bad_dape),
        &cfg,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("DAPE_bad.safetensors") && err.contains(bad),
        "{err}"
    );

    let mut ram = fixture_ram_tensors();
    let gone = "visual_encoder.layers.2.blocks.1.mlp.fc2.weight";
    assert!(ram.remove(gone).is_some());
    let bad_ram = tmp.join("ram_bad.safetensors");
    candle_core::safetensors::save(&ram, &bad_ram).unwrap();
    let err = Ram::load(&bad_ram, None, &cfg, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ram_bad.safetensors") && err.contains(gone),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Rows of `seesr-keys.tsv` of one file: key -> shape.
fn key_rows(file: &str) -> BTreeMap<String, Vec<usize>> {
    supir::inspect::seesr_file_keys(file)
}

#[test]
fn full_size_model_requests_exactly_the_used_official_keys() {
    let ram = key_rows("ram_swin_large_14m.pth");
    let dape = key_rows("DAPE.pth");
    assert_eq!((ram.len(), dape.len()), (1042, 248));
    let all: HashMap<String, Vec<usize>> = ram
        .iter()
        .chain(dape.iter())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let src = ShapeSource::new(all.clone());
    let vb = src.clone().into_var_builder(DType::F32, &Device::Cpu);
    let lora = Lora::new(
        src.clone().into_var_builder(DType::F32, &Device::Cpu),
        dape.keys().cloned(),
        "DAPE.pth",
        1.0,
    );
    let model = Ram::new(vb, Some(&lora), &RamConfig::default()).unwrap();
    assert_eq!(model.image_size(), 384);
    let requested = src.requested();

    // Not read, by design:
    // - `relative_position_index`, `attn_mask`: buffers the official loader deletes (rebuilt);
    // - `tag_encoder.*`, `text_decoder.*` of the RAM file: the captioning encoder / decoder,
    //   never run by SeeSR (the tagging head's own tensors are the ones the tie keeps);
    // - their DAPE LoRA, except `tag_encoder` layers 0-1 cross-attention query / key, which
    //   the tie merges into the tagging head.
    let tied = |k: &str| {
        (k.starts_with("tag_encoder.encoder.layer.0.crossattention.self.")
            || k.starts_with("tag_encoder.encoder.layer.1.crossattention.self."))
            && k.contains(".lora_")
    };
    let expected: BTreeMap<String, Vec<usize>> = all
        .iter()
        .filter(|(k, _)| {
            !k.ends_with("relative_position_index")
                && !k.ends_with("attn_mask")
                && (!(k.starts_with("tag_encoder.") || k.starts_with("text_decoder.")) || tied(k))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    let extra: Vec<_> = requested
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let wrong: Vec<_> = requested
        .iter()
        .filter(|(k, s)| expected.get(*k).is_some_and(|o| o != *s))
        .collect();
    assert!(missing.is_empty(), "not requested: {missing:?}");
    assert!(extra.is_empty(), "not expected: {extra:?}");
    assert!(wrong.is_empty(), "wrong shapes: {wrong:?}");
    // Swin: 24 blocks x 13 + 3 merges x 3 + 6; tagging head 2 x 16; 7 others; DAPE: Swin 24 x 2,
    // tagging head 2 x 4, tied tag_encoder 2 x 4.
    assert_eq!(requested.len(), 24 * 13 + 9 + 6 + 32 + 7 + 48 + 8 + 8);
}

/// Full-size RAM (Swin-L 384 + DAPE) on seeded random weights: time of one forward
/// (`cargo test --release -p supir --test seesr_ram full_size_forward -- --ignored --nocapture`).
#[test]
#[ignore = "timing run: builds the full-size model (~1 GB)"]
fn full_size_forward_timing() {
    let ram = key_rows("ram_swin_large_14m.pth");
    let dape = key_rows("DAPE.pth");
    let all: HashMap<String, Vec<usize>> = ram
        .iter()
        .chain(dape.iter())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let src = supir::weights::RandomSource::new(all, 0);
    let t0 = std::time::Instant::now();
    let lora = Lora::new(
        src.clone().into_var_builder(DType::F32, &Device::Cpu),
        dape.keys().cloned(),
        "DAPE.pth",
        1.0,
    );
    let vb = src.into_var_builder(DType::F32, &Device::Cpu);
    let model = Ram::new(vb, Some(&lora), &RamConfig::default()).unwrap();
    eprintln!("build {:.2?}", t0.elapsed());
    let img = Tensor::zeros((300, 400, 3), DType::U8, &Device::Cpu).unwrap();
    let x = supir::models::ram::preprocess(&img).unwrap();
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let (v, e) = model.image_embeds(&x).unwrap();
        let te = t.elapsed();
        let out = model.forward(&x).unwrap();
        eprintln!(
            "image_embeds {te:.2?}, forward {:.2?} ({:?} {:?}, {} tags)",
            t.elapsed() - te,
            v.dims(),
            e.dims(),
            out.tags[0].split(", ").count()
        );
    }
}
