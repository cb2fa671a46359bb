//! SeeSR parity cases of the text path: SD-2-base's `CLIPTokenizer` (transformers 4.25, no ftfy)
//! and `CLIPTextModel` (`last_hidden_state`, as `_encode_prompt` uses it).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::parity::fixture::{Case, Fixture};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &["tokenizer", "text_encoder"];

/// Models this module loaded, kept across cases.
#[derive(Default)]
pub(super) struct Cache {
    tokenizer: Option<Tokenizer>,
    encoder: Option<ClipTextTransformer>,
}

fn sd2(fx: &Fixture) -> PathBuf {
    fx.dir.join("stable-diffusion-2-base")
}

fn prompts(case: &Case) -> Result<Vec<String>> {
    case.params["prompts"]
        .as_array()
        .and_then(|a| a.iter().map(|p| p.as_str().map(String::from)).collect())
        .ok_or_else(|| Error::Option(format!("case {}: params.prompts missing", case.name)))
}

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    match case.kind.as_str() {
        "tokenizer" => {
            if cache.tokenizer.is_none() {
                cache.tokenizer = Some(Tokenizer::from_folder(&sd2(fx).join("tokenizer"))?);
            }
            let tok = cache.tokenizer.as_ref().expect("loaded");
            let prompts = prompts(case)?;
            let mut ids = Vec::new();
            for p in &prompts {
                ids.extend(tok.padded_ids(p)?);
            }
            let len = tok.special_tokens().max_length;
            let ids = Tensor::from_vec(ids, (prompts.len(), len), &Device::Cpu)?;
            Ok(vec![("input_ids".into(), ids)])
        }
        _ => {
            if cache.encoder.is_none() {
                let dir = sd2(fx).join("text_encoder");
                let cfg = ClipTextConfig::from_hf_config(dir.join("config.json"))?;
                let vb = WeightSource::open(&[dir.join("model.safetensors")])?
                    .into_var_builder(DType::F32, &Device::Cpu);
                cache.encoder = Some(ClipTextTransformer::from_text_model(vb, &cfg)?);
            }
            let ids = fx.input(case, "input_ids")?;
            let enc = cache.encoder.as_ref().expect("loaded");
            Ok(vec![("last_hidden_state".into(), enc.forward(&ids)?)])
        }
    }
}
