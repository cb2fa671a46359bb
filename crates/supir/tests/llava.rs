//! LLaVA-1.5 captioner: parity with the official code on the tiny fixtures (tokenizer, image
//! preprocessing, vision tower, projector, first logits, greedy continuation, caption), both
//! published layouts, the GGUF pair, sampling determinism and the error cases.

use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn run_parity(name: &str) {
    let report = supir::parity::run(data(name), None, |r| {
        for c in &r.checks {
            eprintln!(
                "{} {}: max err {:.3e} (atol {:.1e})",
                r.name, c.name, c.max_err, c.atol
            );
        }
        if let Some(e) = &r.error {
            eprintln!("{}: error {e}", r.name);
        }
    })
    .unwrap();
    assert!(report.results.len() >= 4, "{name}: too few cases");
    let failed: Vec<_> = report
        .results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.name.clone())
        .collect();
    assert!(failed.is_empty(), "{name}: failed {failed:?}");
}

#[test]
fn parity_llava_tiny() {
    run_parity("llava-tiny");
}

#[test]
fn parity_llava_alt() {
    run_parity("llava-alt");
}

use candle_core::{DType, Device, Tensor};
use supir::image_io::{convert, file};
use supir::models::llava::{Llava, LlavaPaths};
use supir::pipelines::captions::{LlavaCaptioner, LlavaOptions};

fn tiny_paths() -> LlavaPaths {
    LlavaPaths {
        model: data("llava-tiny/llava"),
        clip: Some(data("llava-tiny/clip")),
    }
}

fn image() -> image::RgbImage {
    convert::pil_convert_rgb8(&file::load(&data("llava-tiny/image.png")).unwrap())
}

/// A scratch copy of a fixture sub-folder.
fn scratch(name: &str, from: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("supir-llava-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(data(from)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(paths: &LlavaPaths) -> String {
    match Llava::load(paths, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loaded {paths:?}"),
        Err(e) => {
            let e = e.to_string();
            assert!(!e.contains('\n'), "one line: {e}");
            e
        }
    }
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let model = Llava::load(&tiny_paths(), DType::F32, &Device::Cpu).unwrap();
    let opts = |seed| LlavaOptions {
        temperature: 1.0,
        top_p: 0.9,
        max_new_tokens: 24,
        seed,
        ..LlavaOptions::default()
    };
    let c = LlavaCaptioner::new(model, opts(1)).unwrap();
    let img = image();
    let a = c.generate_ids(&img).unwrap();
    let b = c.generate_ids(&img).unwrap();
    assert_eq!(a, b, "same seed, same image: same tokens");
    assert_eq!(a.len(), 24);
    let model = Llava::load(&tiny_paths(), DType::F32, &Device::Cpu).unwrap();
    let c2 = LlavaCaptioner::new(model, opts(2)).unwrap();
    assert_ne!(
        a,
        c2.generate_ids(&img).unwrap(),
        "another seed draws other tokens"
    );
    // The official settings (temperature 0.2, top-p 0.7) through the caption path.
    let model = Llava::load(&tiny_paths(), DType::F32, &Device::Cpu).unwrap();
    let official = LlavaCaptioner::new(
        model,
        LlavaOptions {
            max_new_tokens: 16,
            ..LlavaOptions::default()
        },
    )
    .unwrap();
    let x = official.caption(&img).unwrap();
    assert_eq!(x, official.caption(&img).unwrap());
    assert!(!x.is_empty());
}

#[test]
fn missing_or_wrong_files_are_one_line_errors_naming_the_file() {
    // No CLIP folder for the original layout.
    let e = load_err(&LlavaPaths {
        model: data("llava-tiny/llava"),
        clip: None,
    });
    assert!(
        e.contains("config.json") && e.contains("--llava-clip"),
        "{e}"
    );
    // A CLIP folder of another size.
    let e = load_err(&LlavaPaths {
        model: data("llava-tiny/llava"),
        clip: Some(data("llava-alt/clip")),
    });
    assert!(
        e.contains("llava-alt/clip") && e.contains("mm_hidden_size"),
        "{e}"
    );
    // No weights in the CLIP folder.
    let clip = scratch("noclipweights", "llava-tiny/clip");
    std::fs::remove_file(clip.join("pytorch_model.bin")).unwrap();
    let e = load_err(&LlavaPaths {
        model: data("llava-tiny/llava"),
        clip: Some(clip.clone()),
    });
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
    // Model weights of the other fixture: a shape mismatch naming the file and key.
    let model = scratch("wrongweights", "llava-tiny/llava");
    std::fs::copy(
        data("llava-alt/llava/pytorch_model.bin"),
        model.join("pytorch_model.bin"),
    )
    .unwrap();
    let e = load_err(&LlavaPaths {
        model: model.clone(),
        clip: Some(data("llava-tiny/clip")),
    });
    assert!(
        e.contains("pytorch_model.bin") && e.contains("shape"),
        "{e}"
    );
    // No tokenizer.
    let model = scratch("notok", "llava-tiny/llava");
    std::fs::remove_file(model.join("tokenizer.model")).unwrap();
    let e = load_err(&LlavaPaths {
        model: model.clone(),
        clip: Some(data("llava-tiny/clip")),
    });
    assert!(
        e.contains("tokenizer.model") && e.contains("not found"),
        "{e}"
    );
    // A corrupt tokenizer.
    std::fs::write(
        model.join("tokenizer.model"),
        b"\xff\xff\xff not a protobuf",
    )
    .unwrap();
    let e = load_err(&LlavaPaths {
        model: model.clone(),
        clip: Some(data("llava-tiny/clip")),
    });
    assert!(
        e.contains("tokenizer.model") && e.contains("SentencePiece"),
        "{e}"
    );
    // A GGUF LLM without its mmproj.
    let g = scratch("nommproj", "llava-tiny/gguf");
    std::fs::remove_file(g.join("mmproj-f16.gguf")).unwrap();
    let e = load_err(&LlavaPaths {
        model: g.join("llm-f16.gguf"),
        clip: None,
    });
    assert!(e.contains("mmproj"), "{e}");
    // The mmproj given as the LLM.
    std::fs::copy(
        data("llava-tiny/gguf/mmproj-f16.gguf"),
        g.join("x-mmproj.gguf"),
    )
    .unwrap();
    std::fs::copy(
        data("llava-tiny/gguf/mmproj-f16.gguf"),
        g.join("llm-f16.gguf"),
    )
    .unwrap();
    let e = load_err(&LlavaPaths {
        model: g.join("llm-f16.gguf"),
        clip: None,
    });
    assert!(e.contains("llm-f16.gguf") && e.contains("llama"), "{e}");
    for d in [clip, model, g] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn an_empty_caption_is_an_error() {
    // llava-hf weights with a zero LM head: every logit 0, greedy argmax = id 0 (<unk>), which
    // decoding skips: the answer is empty.
    let dir = scratch("emptycaption", "llava-tiny/llava-hf");
    let st = dir.join("model.safetensors");
    let mut ts = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let head = ts.get("language_model.lm_head.weight").unwrap();
    let zero = Tensor::zeros(head.shape(), head.dtype(), &Device::Cpu).unwrap();
    ts.insert("language_model.lm_head.weight".into(), zero);
    candle_core::safetensors::save(&ts, &st).unwrap();
    let model = Llava::load(
        &LlavaPaths {
            model: dir.clone(),
            clip: None,
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let c = LlavaCaptioner::new(
        model,
        LlavaOptions {
            temperature: 0.0,
            max_new_tokens: 4,
            ..LlavaOptions::default()
        },
    )
    .unwrap();
    let e = c.caption(&image()).unwrap_err();
    assert!(matches!(e, supir::Error::EmptyCaption { .. }), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fast_tokenizer_json_agrees_where_transformers_fast_tokenizer_does() {
    // A folder with tokenizer.json only (the slow tokenizer.model is preferred when present, as
    // the official builder loads it): the cases the 4.28.1 fast tokenizer also gets right.
    let dir = scratch("fasttok", "llava-tiny/llava-hf");
    std::fs::remove_file(dir.join("tokenizer.model")).unwrap();
    let tok = supir::models::llava::tokenizer::LlavaTokenizer::from_dir(&dir).unwrap();
    assert!(!tok.is_slow());
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("llava-tiny/case.json")).unwrap())
            .unwrap();
    let skip: Vec<&str> = case["fast_tokenizer_mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let mut checked = 0;
    for c in case["tokenizer_cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        if skip.contains(&text) {
            continue;
        }
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        checked += 1;
    }
    assert!(checked >= 10);
    assert_eq!(tok.base_vocab_size(), 512);
    let _ = std::fs::remove_dir_all(dir);
}

/// The tiny mmproj rewritten as newer converters write it: every layer kept (here one more
/// layer, a copy of layer 0, after the fixture's), `block_count` counting it, and
/// `clip.vision.feature_layer` (when `feature` is given) naming the hidden state LLaVA reads.
fn mmproj_variant(name: &str, feature: Option<Vec<i32>>) -> PathBuf {
    use candle_core::quantized::{gguf_file, QTensor};
    let dir = scratch(name, "llava-tiny/gguf");
    std::fs::remove_file(dir.join("llm-q8_0.gguf")).unwrap();
    let path = dir.join("mmproj-f16.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let n = c.metadata["clip.vision.block_count"].to_u32().unwrap();
    let mut md: Vec<(String, gguf_file::Value)> = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in md.iter_mut() {
        if k == "clip.vision.block_count" {
            *v = gguf_file::Value::U32(n + 1);
        }
    }
    if let Some(fl) = feature {
        md.push((
            "clip.vision.feature_layer".into(),
            gguf_file::Value::Array(fl.into_iter().map(gguf_file::Value::I32).collect()),
        ));
    }
    let mut ts: Vec<(String, QTensor)> = vec![];
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let t = c.tensor(&mut f, name, &Device::Cpu).unwrap();
        if let Some(rest) = name.strip_prefix("v.blk.0.") {
            let copy = c.tensor(&mut f, name, &Device::Cpu).unwrap();
            ts.push((format!("v.blk.{n}.{rest}"), copy));
        }
        ts.push((name.clone(), t));
    }
    drop(f);
    let mut out = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &md, &ts).unwrap();
    dir
}

#[test]
fn mmproj_feature_layer_names_the_hidden_state_read() {
    let golden =
        candle_core::safetensors::load(data("llava-tiny/golden.safetensors"), &Device::Cpu)
            .unwrap();
    let features = |dir: &Path| -> f32 {
        let m = Llava::load(
            &LlavaPaths {
                model: dir.join("llm-f16.gguf"),
                clip: None,
            },
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let got = m.image_features(&golden["pixel_values"]).unwrap();
        (got - &golden["image_features"])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // Every layer kept, the key naming hidden_states[2] of 3 (the fixture's `[-2]`): the
    // goldens, within their tolerance.
    let keyed = mmproj_variant("fl-2", Some(vec![2]));
    let err = features(&keyed);
    assert!(err < 1e-4, "feature_layer 2: max err {err:.3e}");
    // Without the key the tower reads its last layer (the extra one): other features.
    let unkeyed = mmproj_variant("fl-none", None);
    let err = features(&unkeyed);
    assert!(
        err > 1e-2,
        "no feature_layer: max err {err:.3e}, the key made no difference"
    );
    // Out of range, several layers: one-line errors naming the file and the key.
    for (name, fl, what) in [
        ("fl-9", vec![9], "outside"),
        ("fl-12", vec![1, 2], "several"),
    ] {
        let dir = mmproj_variant(name, Some(fl));
        let e = load_err(&LlavaPaths {
            model: dir.join("llm-f16.gguf"),
            clip: None,
        });
        assert!(
            e.contains("mmproj-f16.gguf") && e.contains("feature_layer") && e.contains(what),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
    std::fs::remove_dir_all(keyed).unwrap();
    std::fs::remove_dir_all(unkeyed).unwrap();
}
