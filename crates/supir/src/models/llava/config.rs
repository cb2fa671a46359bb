//! LLaVA-1.5 configs as published: the original `LlavaLlamaForCausalLM` `config.json` (with
//! `mm_*` keys) beside a separate CLIP folder, or llava-hf's `LlavaForConditionalGeneration`
//! `config.json` (`text_config`, `vision_config`). Missing fields take transformers' defaults.

use std::path::{Path, PathBuf};

use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use candle_transformers::models::llama::{Config as LlamaConfig, LlamaEosToks};
use serde_json::Value;

use crate::{Error, Result};

/// Where the weights are named from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `liuhaotian/llava-v1.5-*`: `model.*`, `lm_head.*`, `model.mm_projector.{0,2}.*`; the
    /// CLIP tower (`vision_model.*`) in its own folder.
    Original,
    /// `llava-hf/llava-1.5-*-hf`: `language_model.*`, `vision_tower.vision_model.*`,
    /// `multi_modal_projector.linear_{1,2}.*`.
    Hf,
}

/// Everything the captioner needs to build the three networks.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub layout: Layout,
    pub text: LlamaConfig,
    pub vision: ClipVisionConfig,
    /// `mm_vision_select_layer` / `vision_feature_layer` (an index into transformers'
    /// `hidden_states`, whose entry 0 is the embeddings).
    pub select_layer: isize,
    /// `patch` drops the CLS token (`default` in llava-hf), `cls_patch` keeps it (`full`).
    pub keep_cls: bool,
    pub projector_type: String,
    pub mm_hidden_size: usize,
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            path: path.to_path_buf(),
            what: "model config".into(),
        },
        _ => Error::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn usize_or(&self, k: &str, d: usize) -> usize {
        self.v
            .get(k)
            .and_then(Value::as_u64)
            .map_or(d, |x| x as usize)
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.v
            .get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| self.err(format!("no integer `{k}`")))
    }
    fn f64_or(&self, k: &str, d: f64) -> f64 {
        self.v.get(k).and_then(Value::as_f64).unwrap_or(d)
    }
    fn str_or<'s>(&'s self, k: &str, d: &'s str) -> &'s str {
        self.v.get(k).and_then(Value::as_str).unwrap_or(d)
    }
    fn err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            msg,
        }
    }
}

/// transformers' `LlamaConfig` with its defaults (4.28: no GQA, theta 10000).
fn llama_config(f: &Fields) -> Result<LlamaConfig> {
    let heads = f.usize_or("num_attention_heads", 32);
    if let Some(s) = f.v.get("rope_scaling").filter(|v| !v.is_null()) {
        return Err(f.err(format!(
            "rope_scaling {s} is not supported (LLaVA-1.5 has none)"
        )));
    }
    let act = f.str_or("hidden_act", "silu");
    if act != "silu" {
        return Err(f.err(format!("hidden_act `{act}` (LLaMA uses silu)")));
    }
    Ok(LlamaConfig {
        hidden_size: f.usize_or("hidden_size", 4096),
        intermediate_size: f.usize_or("intermediate_size", 11008),
        vocab_size: f.usize_or("vocab_size", 32000),
        num_hidden_layers: f.usize_or("num_hidden_layers", 32),
        num_attention_heads: heads,
        num_key_value_heads: f.usize_or("num_key_value_heads", heads),
        use_flash_attn: false,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6),
        rope_theta: f.f64_or("rope_theta", 10000.0) as f32,
        bos_token_id: Some(f.usize_or("bos_token_id", 1) as u32),
        eos_token_id: Some(LlamaEosToks::Single(f.usize_or("eos_token_id", 2) as u32)),
        rope_scaling: None,
        max_position_embeddings: f.usize_or("max_position_embeddings", 2048),
        tie_word_embeddings: f
            .v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// transformers' `CLIPVisionConfig` (defaults: ViT-B/32).
fn vision_config(f: &Fields) -> Result<ClipVisionConfig> {
    let act = f.str_or("hidden_act", "quick_gelu");
    if act != "quick_gelu" {
        return Err(f.err(format!("vision hidden_act `{act}` (CLIP uses quick_gelu)")));
    }
    let eps = f.f64_or("layer_norm_eps", 1e-5);
    if (eps - 1e-5).abs() > 1e-12 {
        return Err(f.err(format!(
            "vision layer_norm_eps {eps} (candle's CLIP uses 1e-5)"
        )));
    }
    Ok(ClipVisionConfig {
        embed_dim: f.usize_or("hidden_size", 768),
        activation: Activation::QuickGelu,
        intermediate_size: f.usize_or("intermediate_size", 3072),
        num_hidden_layers: f.usize_or("num_hidden_layers", 12),
        num_attention_heads: f.usize_or("num_attention_heads", 12),
        projection_dim: f.usize_or("projection_dim", 512),
        num_channels: f.usize_or("num_channels", 3),
        image_size: f.usize_or("image_size", 224),
        patch_size: f.usize_or("patch_size", 32),
    })
}

/// A CLIP folder's `config.json`: a `CLIPVisionConfig`, or a `CLIPConfig` with `vision_config`.
pub fn clip_vision_config(path: &Path) -> Result<ClipVisionConfig> {
    let v = read_json(path)?;
    let v = v.get("vision_config").cloned().unwrap_or(v);
    vision_config(&Fields { v: &v, path })
}

impl LlavaConfig {
    /// The model folder's `config.json`; for the original layout, `clip_config` is the CLIP
    /// folder's (`None`: the model's `mm_vision_tower` must be llava-hf's, which embeds it).
    pub fn load(model_config: &Path, clip_config: Option<&Path>) -> Result<Self> {
        let v = read_json(model_config)?;
        let f = Fields {
            v: &v,
            path: model_config,
        };
        if let Some(text) = v.get("text_config") {
            let tf = Fields {
                v: text,
                path: model_config,
            };
            let mut text_cfg = llama_config(&tf)?;
            if text.get("vocab_size").is_none() {
                text_cfg.vocab_size = f.usize_or("vocab_size", text_cfg.vocab_size);
            }
            let vision_v = v.get("vision_config").cloned().unwrap_or(Value::Null);
            let vision = vision_config(&Fields {
                v: &vision_v,
                path: model_config,
            })?;
            let act = f.str_or("projector_hidden_act", "gelu");
            if act != "gelu" {
                return Err(f.err(format!("projector_hidden_act `{act}` (expected gelu)")));
            }
            let strategy = f.str_or("vision_feature_select_strategy", "default");
            Ok(Self {
                layout: Layout::Hf,
                mm_hidden_size: vision.embed_dim,
                vision,
                text: text_cfg,
                select_layer: v
                    .get("vision_feature_layer")
                    .and_then(Value::as_i64)
                    .unwrap_or(-2) as isize,
                keep_cls: match strategy {
                    "default" => false,
                    "full" => true,
                    s => return Err(f.err(format!("vision_feature_select_strategy `{s}`"))),
                },
                projector_type: "mlp2x_gelu".into(),
            })
        } else {
            if v.get("mm_projector_type").is_none() && v.get("mm_hidden_size").is_none() {
                return Err(f.err(
                    "not a LLaVA config (no mm_projector_type / mm_hidden_size, no text_config)"
                        .into(),
                ));
            }
            let clip = clip_config.ok_or_else(|| {
                f.err("the original LLaVA layout needs the CLIP folder (--llava-clip)".into())
            })?;
            let vision = clip_vision_config(clip)?;
            let mm_hidden_size = f.usize("mm_hidden_size")?;
            if mm_hidden_size != vision.embed_dim {
                return Err(Error::Config {
                    path: clip.to_path_buf(),
                    msg: format!(
                        "CLIP hidden size {} but the LLaVA model's mm_hidden_size is {mm_hidden_size}",
                        vision.embed_dim
                    ),
                });
            }
            let select_feature = f.str_or("mm_vision_select_feature", "patch");
            Ok(Self {
                layout: Layout::Original,
                text: llama_config(&f)?,
                vision,
                select_layer: v
                    .get("mm_vision_select_layer")
                    .and_then(Value::as_i64)
                    .unwrap_or(-2) as isize,
                keep_cls: match select_feature {
                    "patch" => false,
                    "cls_patch" => true,
                    s => return Err(f.err(format!("mm_vision_select_feature `{s}`"))),
                },
                projector_type: f.str_or("mm_projector_type", "linear").to_string(),
                mm_hidden_size,
            })
        }
    }

    /// Index into candle's per-layer outputs (`[layer 1, ..., layer N]`, no embeddings entry) of
    /// transformers' `hidden_states[select_layer]`.
    pub fn select_index(&self) -> Result<usize> {
        let n = self.vision.num_hidden_layers as isize;
        let hf = if self.select_layer < 0 {
            n + 1 + self.select_layer
        } else {
            self.select_layer
        };
        if hf < 1 || hf > n {
            return Err(Error::Option(format!(
                "vision select layer {} of {n} layers is not supported",
                self.select_layer
            )));
        }
        Ok(hf as usize - 1)
    }

    /// Patches per image (the features spliced into the prompt).
    pub fn num_image_tokens(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size;
        side * side + self.keep_cls as usize
    }
}

/// The weight files of a model folder: an index json's files, else `model.safetensors` /
/// `pytorch_model.bin`, else every `*.safetensors` (or `*.bin`).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        let p = dir.join(index);
        if p.is_file() {
            let v = read_json(&p)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::Config {
                    path: p.clone(),
                    msg: "no weight_map".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(Value::as_str)
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            for f in &files {
                if !f.is_file() {
                    return Err(Error::NotFound {
                        path: f.clone(),
                        what: format!("weight shard listed in {index}"),
                    });
                }
            }
            return Ok(files);
        }
    }
    for single in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(single);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    for ext in ["safetensors", "bin"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
            .collect();
        files.sort();
        if !files.is_empty() {
            return Ok(files);
        }
    }
    Err(Error::NotFound {
        path: dir.join("model.safetensors"),
        what: "weights (model.safetensors, pytorch_model.bin or shards with an index json)".into(),
    })
}
