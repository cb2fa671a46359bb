//! LLaVA fixture folders (made by `scripts/make_llava_fixture.py` with SUPIR's vendored `llava/`
//! and transformers 4.28.1): `llava/` + `clip/` (original layout), `llava-hf/`, optionally
//! `gguf/`, `image.png`, `golden.safetensors` and `case.json` (`"kind": "llava"`).
//!
//! Cases: the slow tokenizer's `tokenizer_cases` and `decode_cases`, the prompt's ids
//! (`tokenizer_image_token`), `pixel_values`, `vision_hidden`, `image_features`,
//! `inputs_embeds`, `logits0`, the greedy continuation and its caption; then the llava-hf layout
//! against the same goldens (logits over the unpadded vocabulary, greedy ids); then, when the
//! folder has `gguf/`, the GGUF pair's first logits within a measured bound and its greedy ids
//! against the f32 model's while their top-2 gaps are clear.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use super::fixture::max_abs_diff;
use super::{CaseResult, OutputCheck, Report};
use crate::image_io::{convert, file};
use crate::models::llava::sampling::{Sampler, SamplingParams};
use crate::models::llava::{Llava, LlavaPaths};
use crate::pipelines::captions::llava_postprocess;
use crate::{Error, Result};

/// Whether `dir` is a LLaVA fixture (`case.json` of kind `llava`).
pub fn is_fixture(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("case.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .is_some_and(|v| v.get("kind").and_then(Value::as_str) == Some("llava"))
}

/// Q8_0 (one scale per 32 weights, and the kernels quantise the activations to 8 bits too):
/// the first logits' max abs error relative to the largest |logit|. Measured 0.019 (llava-tiny)
/// and 0.021 (llava-alt) on our kernels, 0.018 and 0.024 on candle's `QMatMul`; the bound
/// leaves a factor of two.
pub const GGUF_Q8_LOGITS_REL: f64 = 0.05;

struct Fx {
    dir: std::path::PathBuf,
    case: Value,
    golden: HashMap<String, Tensor>,
}

impl Fx {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Fixture {
            path: self.dir.clone(),
            msg: msg.into(),
        }
    }

    fn golden(&self, k: &str) -> Result<&Tensor> {
        self.golden
            .get(k)
            .ok_or_else(|| self.err(format!("golden.safetensors has no `{k}`")))
    }

    fn atol(&self, k: &str) -> f64 {
        self.case
            .get("tolerances")
            .and_then(|t| t.get(k))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    }

    fn ids(&self, k: &str) -> Result<Vec<i64>> {
        Ok(self.golden(k)?.to_dtype(DType::I64)?.to_vec1::<i64>()?)
    }
}

fn check(name: &str, max_err: f64, atol: f64) -> OutputCheck {
    OutputCheck {
        name: name.into(),
        max_err,
        atol,
    }
}

/// Mismatching positions (a length difference counts each missing position).
fn mismatches<T: PartialEq>(a: &[T], b: &[T]) -> f64 {
    let common = a.iter().zip(b).filter(|(x, y)| x != y).count();
    (common + a.len().abs_diff(b.len())) as f64
}

fn greedy(model: &Llava, embeds: &Tensor, n: usize) -> Result<crate::models::llava::Generation> {
    let mut s = Sampler::new(SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    });
    model.generate(embeds, n, &mut s, model.tokenizer.eos_id(), |_| {})
}

/// Runs every case; `filter` keeps cases whose name contains it.
pub fn run(
    dir: &Path,
    filter: Option<&str>,
    mut on_case: impl FnMut(&CaseResult),
) -> Result<Report> {
    let case_path = dir.join("case.json");
    let text = std::fs::read_to_string(&case_path).map_err(|source| Error::Io {
        path: case_path.clone(),
        source,
    })?;
    let case: Value = serde_json::from_str(&text).map_err(|e| Error::Fixture {
        path: case_path.clone(),
        msg: e.to_string(),
    })?;
    let golden_path = dir.join("golden.safetensors");
    let golden =
        candle_core::safetensors::load(&golden_path, &Device::Cpu).map_err(|e| Error::Fixture {
            path: golden_path.clone(),
            msg: e.to_string(),
        })?;
    let fx = Fx {
        dir: dir.to_path_buf(),
        case,
        golden,
    };

    let mut report = Report::default();
    let mut model: Option<Llava> = None;
    let mut f32_greedy: Option<Vec<u32>> = None;
    type CaseFn<'a> = Box<
        dyn FnMut(&Fx, &mut Option<Llava>, &mut Option<Vec<u32>>) -> Result<Vec<OutputCheck>> + 'a,
    >;
    let load_original = |m: &mut Option<Llava>| -> Result<()> {
        if m.is_none() {
            *m = Some(Llava::load(
                &LlavaPaths {
                    model: dir.join("llava"),
                    clip: Some(dir.join("clip")),
                },
                DType::F32,
                &Device::Cpu,
            )?);
        }
        Ok(())
    };
    let mut cases: Vec<(&str, &str, CaseFn)> = vec![];
    cases.push((
        "llava_tokenizer",
        "tokenizer",
        Box::new(move |fx, m, _| {
            load_original(m)?;
            let tok = &m.as_ref().expect("loaded").tokenizer;
            let mut bad = 0.0;
            for c in fx.case["tokenizer_cases"].as_array().into_iter().flatten() {
                let want: Vec<u32> = c["ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_u64().map(|x| x as u32))
                    .collect();
                let got = tok.encode(c["text"].as_str().unwrap_or_default())?;
                if got != want {
                    tracing::warn!("tokenizer case {:?}: got {got:?}, want {want:?}", c["text"]);
                    bad += 1.0;
                }
            }
            let mut dbad = 0.0;
            for c in fx.case["decode_cases"].as_array().into_iter().flatten() {
                let ids: Vec<u32> = c["ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_u64().map(|x| x as u32))
                    .collect();
                let got = tok.decode(&ids)?;
                if got != c["text"].as_str().unwrap_or_default() {
                    tracing::warn!("decode case: got {got:?}, want {:?}", c["text"]);
                    dbad += 1.0;
                }
            }
            let prompt = fx.case["prompt"].as_str().unwrap_or_default();
            let ids = tok.tokenizer_image_token(prompt)?;
            Ok(vec![
                check("tokenizer_cases (mismatches)", bad, 0.0),
                check("decode_cases (mismatches)", dbad, 0.0),
                check(
                    "input_ids (mismatches)",
                    mismatches(&ids, &fx.ids("input_ids")?),
                    0.0,
                ),
            ])
        }),
    ));
    cases.push((
        "llava_vision",
        "vision",
        Box::new(move |fx, m, _| {
            load_original(m)?;
            let model = m.as_ref().expect("loaded");
            let img = convert::pil_convert_rgb8(&file::load(&fx.dir.join("image.png"))?);
            let px = model.preprocess(&img)?;
            let vh = model.vision_hidden(fx.golden("pixel_values")?)?;
            let feats = model.image_features(fx.golden("pixel_values")?)?;
            let embeds =
                model.prompt_embeds(&fx.ids("input_ids")?, fx.golden("image_features")?)?;
            Ok(vec![
                check(
                    "pixel_values",
                    max_abs_diff(&px, fx.golden("pixel_values")?)?,
                    fx.atol("pixel_values"),
                ),
                check(
                    "vision_hidden",
                    max_abs_diff(&vh, fx.golden("vision_hidden")?)?,
                    fx.atol("vision_hidden"),
                ),
                check(
                    "image_features",
                    max_abs_diff(&feats, fx.golden("image_features")?)?,
                    fx.atol("image_features"),
                ),
                check(
                    "inputs_embeds",
                    max_abs_diff(&embeds, fx.golden("inputs_embeds")?)?,
                    fx.atol("inputs_embeds"),
                ),
            ])
        }),
    ));
    cases.push((
        "llava_generate",
        "generate",
        Box::new(move |fx, m, g| {
            load_original(m)?;
            let model = m.as_ref().expect("loaded");
            let want = fx.ids("greedy_ids")?;
            let embeds = fx.golden("inputs_embeds")?;
            let gen = greedy(model, embeds, want.len())?;
            let got: Vec<i64> = gen.ids.iter().map(|&i| i as i64).collect();
            let caption = llava_postprocess(&model.tokenizer.decode(&gen.ids)?);
            let want_caption = fx.case["greedy_caption"].as_str().unwrap_or_default();
            *g = Some(gen.ids.clone());
            Ok(vec![
                check(
                    "logits0",
                    max_abs_diff(&gen.first_logits, fx.golden("logits0")?)?,
                    fx.atol("logits0"),
                ),
                check("greedy_ids (mismatches)", mismatches(&got, &want), 0.0),
                check(
                    "greedy_caption (differs)",
                    (caption != want_caption) as u8 as f64,
                    0.0,
                ),
            ])
        }),
    ));
    cases.push((
        "llava_hf_layout",
        "layout",
        Box::new(move |fx, _, _| {
            let hf = Llava::load(
                &LlavaPaths {
                    model: fx.dir.join("llava-hf"),
                    clip: None,
                },
                DType::F32,
                &Device::Cpu,
            )?;
            let feats = hf.image_features(fx.golden("pixel_values")?)?;
            let embeds = hf.prompt_embeds(&fx.ids("input_ids")?, &feats)?;
            let want = fx.ids("greedy_ids")?;
            let gen = greedy(&hf, &embeds, want.len())?;
            let v = fx.golden("logits0")?.dim(0)?;
            let got: Vec<i64> = gen.ids.iter().map(|&i| i as i64).collect();
            Ok(vec![
                check(
                    "image_features",
                    max_abs_diff(&feats, fx.golden("image_features")?)?,
                    fx.atol("image_features"),
                ),
                check(
                    "logits0[:V]",
                    max_abs_diff(&gen.first_logits.i(..v)?, fx.golden("logits0")?)?,
                    fx.atol("logits0"),
                ),
                check("greedy_ids (mismatches)", mismatches(&got, &want), 0.0),
            ])
        }),
    ));
    for (file, atol) in [
        // The f16 pair holds the fixture's own f16 values: the f32 tolerance applies.
        ("llm-f16.gguf", f64::NAN),
        ("llm-q8_0.gguf", GGUF_Q8_LOGITS_REL),
    ] {
        if !dir.join("gguf").join(file).is_file() {
            continue;
        }
        let name: &'static str = if file.contains("q8") {
            "llava_gguf_q8_0"
        } else {
            "llava_gguf_f16"
        };
        cases.push((
            name,
            "gguf",
            Box::new(move |fx, m, g| {
                let q = Llava::load(
                    &LlavaPaths {
                        model: fx.dir.join("gguf").join(file),
                        clip: None,
                    },
                    DType::F32,
                    &Device::Cpu,
                )?;
                let feats = q.image_features(fx.golden("pixel_values")?)?;
                let embeds = q.prompt_embeds(&fx.ids("input_ids")?, &feats)?;
                let n = 16;
                let gen = greedy(&q, &embeds, n)?;
                let want = fx.golden("logits0")?;
                let err = max_abs_diff(&gen.first_logits, want)?;
                let prompt = fx.case["prompt"].as_str().unwrap_or_default();
                let ids = q.tokenizer.tokenizer_image_token(prompt)?;
                let mut checks = vec![
                    check(
                        "input_ids from the GGUF vocabulary (mismatches)",
                        mismatches(&ids, &fx.ids("input_ids")?),
                        0.0,
                    ),
                    check(
                        "image_features",
                        max_abs_diff(&feats, fx.golden("image_features")?)?,
                        fx.atol("image_features"),
                    ),
                ];
                if file.contains("q8") {
                    let scale = want.abs()?.max(0)?.to_scalar::<f32>()? as f64;
                    checks.push(check("logits0 (max err / max |logit|)", err / scale, atol));
                } else {
                    checks.push(check("logits0", err, fx.atol("logits0")));
                }
                if file.contains("f16") {
                    load_original(m)?;
                    let want: Vec<u32> = match g {
                        Some(ids) => ids[..n.min(ids.len())].to_vec(),
                        None => fx.ids("greedy_ids")?[..n]
                            .iter()
                            .map(|&i| i as u32)
                            .collect(),
                    };
                    checks.push(check(
                        "greedy_ids[:16] (mismatches)",
                        mismatches(&gen.ids, &want),
                        0.0,
                    ));
                }
                Ok(checks)
            }),
        ));
    }
    for (name, kind, mut f) in cases {
        if filter.is_some_and(|flt| !name.contains(flt)) {
            continue;
        }
        let result = match f(&fx, &mut model, &mut f32_greedy) {
            Ok(checks) => CaseResult {
                name: name.into(),
                kind: kind.into(),
                checks,
                error: None,
            },
            Err(e) => CaseResult {
                name: name.into(),
                kind: kind.into(),
                checks: vec![],
                error: Some(e.to_string()),
            },
        };
        on_case(&result);
        report.results.push(result);
    }
    Ok(report)
}
