//! LLaVA-1.5 (CLIP ViT-L/14-336 tower, `mlp2x_gelu` projector, Vicuna/LLaMA decoder) as SUPIR's
//! `llava/llava_agent.py` runs it, composed from candle-transformers' pieces:
//! [`ClipVisionTransformer`] (transformers' `hidden_states[select_layer]`, taken from its
//! per-layer outputs), [`MMProjector`] and [`Llama`] (`embed` + `forward_input_embed`, KV cache).
//!
//! candle's own `LLaVA::load` is not used: it requires `image_newline` (a LLaVA-1.6 tensor that
//! 1.5 lacks), and its `ClipVisionTower` picks `hidden_states[-2]` one layer too late (its list
//! has no embeddings entry but does end with the pooled output).
//!
//! Weights: [`config::Layout::Original`] (`liuhaotian/llava-v1.5-*` + `openai/clip-vit-large-
//! patch14-336`) or [`config::Layout::Hf`] (`llava-hf/llava-1.5-*-hf`), safetensors or torch
//! pickles, f32/f16/bf16; and llama.cpp's GGUF pair ([`gguf`]).

pub mod config;
pub mod gguf;
pub mod preprocess;
pub mod sampling;
pub mod sentencepiece;
pub mod tokenizer;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::vision_model::ClipVisionTransformer;
use candle_transformers::models::llama::{Cache, Config as LlamaConfig, Llama};
use candle_transformers::models::llava::config::LLaVAConfig;
use candle_transformers::models::llava::MMProjector;

use crate::weights::WeightSource;
use crate::{Error, Result};
use config::{Layout, LlavaConfig};
use preprocess::ClipProcessorConfig;
use sampling::Sampler;
use tokenizer::{LlavaTokenizer, IMAGE_TOKEN_INDEX};

/// The language model: candle's f32/f16/bf16 Llama, or the quantised GGUF decoder.
pub enum Decoder {
    Full { llama: Llama, cfg: LlamaConfig },
    Quantized(gguf::QuantizedLlama),
}

/// A decoding session's state.
pub enum DecoderCache {
    Full(Cache),
    Quantized(gguf::QuantizedCache),
}

impl Decoder {
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Full { llama, .. } => llama.embed(ids)?,
            Self::Quantized(q) => q.embed(ids)?,
        })
    }

    fn new_cache(&self, dtype: DType, dev: &Device) -> Result<DecoderCache> {
        Ok(match self {
            Self::Full { cfg, .. } => DecoderCache::Full(Cache::new(true, dtype, cfg, dev)?),
            Self::Quantized(q) => DecoderCache::Quantized(q.new_cache()),
        })
    }

    /// Logits `[1, V]` (f32) of the last position of `embeds` `[1, T, H]` at `pos`.
    fn forward_embeds(
        &self,
        embeds: &Tensor,
        pos: usize,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        Ok(match (self, cache) {
            (Self::Full { llama, .. }, DecoderCache::Full(c)) => {
                llama.forward_input_embed(embeds, pos, c)?
            }
            (Self::Quantized(q), DecoderCache::Quantized(c)) => q.forward_embeds(embeds, pos, c)?,
            _ => return Err(Error::Option("decoder / cache mismatch".into())),
        })
    }

    fn hidden_size(&self) -> usize {
        match self {
            Self::Full { cfg, .. } => cfg.hidden_size,
            Self::Quantized(q) => q.hidden_size(),
        }
    }
}

/// The outcome of [`Llava::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens, the EOS included when it stopped the generation.
    pub ids: Vec<u32>,
    /// The first step's logits `[V]` (the last prompt position).
    pub first_logits: Tensor,
}

/// Where a LLaVA model is: the model folder (original or llava-hf layout, or a GGUF pair's
/// folder) and, for the original layout, the CLIP folder.
#[derive(Debug, Clone)]
pub struct LlavaPaths {
    pub model: PathBuf,
    pub clip: Option<PathBuf>,
}

/// LLaVA-1.5: vision tower, projector, decoder, tokenizer and image processor.
pub struct Llava {
    vision: ClipVisionTransformer,
    projector: MMProjector,
    decoder: Decoder,
    pub config: LlavaConfig,
    pub tokenizer: LlavaTokenizer,
    pub processor: ClipProcessorConfig,
    dtype: DType,
    device: Device,
}

/// A LLaVAConfig for candle's `MMProjector::load` (it reads the projector type, sizes and the
/// naming flag only).
fn projector_config(cfg: &LlavaConfig) -> LLaVAConfig {
    LLaVAConfig {
        architectures: vec![],
        bos_token_id: 1,
        eos_token_id: 2,
        hidden_size: cfg.text.hidden_size,
        image_aspect_ratio: "square".into(),
        image_crop_resolution: cfg.vision.image_size,
        image_grid_pinpoints: vec![],
        image_split_resolution: cfg.vision.image_size,
        intermediate_size: cfg.text.intermediate_size,
        max_position_embeddings: cfg.text.max_position_embeddings,
        mm_hidden_size: cfg.mm_hidden_size,
        mm_patch_merge_type: "flat".into(),
        mm_projector_type: cfg.projector_type.clone(),
        mm_use_im_start_end: false,
        mm_vision_select_feature: if cfg.keep_cls { "cls_patch" } else { "patch" }.into(),
        mm_vision_select_layer: cfg.select_layer,
        mm_vision_tower: None,
        model_type: "llava".into(),
        num_attention_heads: cfg.text.num_attention_heads,
        num_hidden_layers: cfg.text.num_hidden_layers,
        num_key_value_heads: cfg.text.num_key_value_heads,
        pad_token_id: 0,
        rms_norm_eps: cfg.text.rms_norm_eps as f32,
        rope_theta: cfg.text.rope_theta,
        tokenizer_model_max_length: None,
        torch_dtype: "float32".into(),
        use_cache: true,
        vocab_size: cfg.text.vocab_size,
        image_token_index: IMAGE_TOKEN_INDEX as isize,
        hf: cfg.layout == Layout::Hf,
        tie_word_embeddings: Some(cfg.text.tie_word_embeddings),
    }
}

/// Every weight candle's `Llama::load` reads, with its shape (it panics on a missing one, so
/// they are checked first).
pub fn llama_weight_shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let kv = h / c.num_attention_heads * c.num_key_value_heads;
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            out.push((format!("{p}.{n}.weight"), s));
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out
}

/// A candle error without the backtrace candle attaches under `RUST_BACKTRACE` (errors stay one
/// line: a missing key's or shape's message names the file).
pub(crate) fn map_candle(e: candle_core::Error) -> Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => map_candle(*inner),
        e => Error::Candle(e),
    }
}

impl Llava {
    /// Loads a LLaVA-1.5 model folder: the original layout with `clip` (the CLIP folder), the
    /// llava-hf layout, or a GGUF pair (`*.gguf` LLM + `mmproj*.gguf`, see [`gguf`]). Weights are
    /// converted to `dtype`, the decoder's compute type (the CLIP tower and the projector run in
    /// f32).
    pub fn load(paths: &LlavaPaths, dtype: DType, dev: &Device) -> Result<Self> {
        let dir = &paths.model;
        if let Some(pair) = gguf::GgufPair::find(dir)? {
            return gguf::load(&pair, paths.clip.as_deref(), dtype, dev);
        }
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.clone(),
                what: "LLaVA model folder".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let clip_cfg = paths.clip.as_ref().map(|c| c.join("config.json"));
        if let Some(c) = &clip_cfg {
            if !c.is_file() {
                return Err(Error::NotFound {
                    path: c.clone(),
                    what: "CLIP vision config (--llava-clip folder)".into(),
                });
            }
        }
        let cfg = LlavaConfig::load(&cfg_path, clip_cfg.as_deref())?;
        let tokenizer = LlavaTokenizer::from_dir(dir)?;
        let (processor_path, mut files) = match cfg.layout {
            Layout::Original => {
                let clip = paths.clip.as_ref().expect("checked by LlavaConfig::load");
                (
                    clip.join("preprocessor_config.json"),
                    config::weight_files(clip)?,
                )
            }
            Layout::Hf => (dir.join("preprocessor_config.json"), vec![]),
        };
        let processor = sentencepiece::need_file(processor_path, "CLIP image processor config")
            .and_then(|p| ClipProcessorConfig::load(&p))?;
        // Model files last: a key in both wins from the model folder.
        files.extend(config::weight_files(dir)?);
        let source = WeightSource::open(&files)?;
        let (vision_prefix, llama_prefix) = match cfg.layout {
            Layout::Original => ("vision_model", None),
            Layout::Hf => ("vision_tower.vision_model", Some("language_model")),
        };
        // Check every key first (no data read): missing or misshapen weights are one error
        // naming the files.
        {
            let check = source.clone().into_checking_var_builder(dtype, dev);
            let lvb = match llama_prefix {
                Some(p) => check.pp(p),
                None => check.clone(),
            };
            for (name, shape) in llama_weight_shapes(&cfg.text) {
                lvb.get(shape, &name).map_err(map_candle)?;
            }
            check
                .pp(vision_prefix)
                .get(cfg.vision.embed_dim, "embeddings.class_embedding")
                .map_err(map_candle)?;
            Self::build_vision(check.pp(vision_prefix), &cfg)?;
            MMProjector::load(&check, &projector_config(&cfg)).map_err(map_candle)?;
        }
        // The tower and projector compute in f32 (candle's CPU conv has no bf16 kernel; they
        // are small), the decoder in `dtype`.
        let vvb = source.clone().into_var_builder(DType::F32, dev);
        let vb = source.into_var_builder(dtype, dev);
        let lvb = match llama_prefix {
            Some(p) => vb.pp(p),
            None => vb,
        };
        Self::assemble(
            cfg,
            tokenizer,
            processor,
            vvb,
            vision_prefix,
            lvb,
            dtype,
            dev,
        )
    }

    /// The model over var builders in the original layout's names (`vision` for the tower and
    /// projector, read in f32; `llm` for the decoder, in `dtype`): e.g. seeded random weights
    /// at full size for timing. `llm` must hold every decoder weight (candle's `Llama::load`
    /// panics on a missing one; [`Self::load`] checks them first).
    #[allow(clippy::too_many_arguments)]
    pub fn from_var_builders(
        cfg: LlavaConfig,
        tokenizer: LlavaTokenizer,
        processor: ClipProcessorConfig,
        vision: VarBuilder,
        llm: VarBuilder,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Self::assemble(
            cfg,
            tokenizer,
            processor,
            vision,
            "vision_model",
            llm,
            dtype,
            dev,
        )
    }

    /// The tower under `vision.pp(vision_prefix)`, the projector under `vision`, the decoder
    /// under `llm`.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: LlavaConfig,
        tokenizer: LlavaTokenizer,
        processor: ClipProcessorConfig,
        vision: VarBuilder,
        vision_prefix: &str,
        llm: VarBuilder,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let tower = Self::build_vision(vision.pp(vision_prefix), &cfg)?;
        let projector = MMProjector::load(&vision, &projector_config(&cfg)).map_err(map_candle)?;
        let llama = Llama::load(llm, &cfg.text).map_err(map_candle)?;
        Ok(Self {
            vision: tower,
            projector,
            decoder: Decoder::Full {
                llama,
                cfg: cfg.text.clone(),
            },
            config: cfg,
            tokenizer,
            processor,
            dtype,
            device: dev.clone(),
        })
    }

    fn build_vision(vb: VarBuilder, cfg: &LlavaConfig) -> Result<ClipVisionTransformer> {
        ClipVisionTransformer::new(vb, &cfg.vision).map_err(map_candle)
    }

    /// Assembles a model from parts (the GGUF loader).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        vision: ClipVisionTransformer,
        projector: MMProjector,
        decoder: Decoder,
        config: LlavaConfig,
        tokenizer: LlavaTokenizer,
        processor: ClipProcessorConfig,
        dtype: DType,
        dev: &Device,
    ) -> Self {
        Self {
            vision,
            projector,
            decoder,
            config,
            tokenizer,
            processor,
            dtype,
            device: dev.clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the decoder is the quantised GGUF one.
    pub fn is_quantized(&self) -> bool {
        matches!(self.decoder, Decoder::Quantized(_))
    }

    /// `pixel_values` `[1, 3, S, S]` (f32) of an RGB image.
    pub fn preprocess(&self, image: &image::RgbImage) -> Result<Tensor> {
        self.processor.preprocess(image, &self.device)
    }

    /// transformers' `hidden_states[select_layer]` of the CLIP tower, CLS included `[1, 1+P, C]`.
    pub fn vision_hidden(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let idx = self.config.select_index()?;
        let x = pixel_values.to_dtype(DType::F32)?;
        let mut states = self.vision.output_hidden_states(&x)?;
        // candle's list: one entry per layer, then the pooled output.
        states.truncate(self.config.vision.num_hidden_layers);
        Ok(states.swap_remove(idx))
    }

    /// The projected image features `[1, P, H]` (the official `encode_images`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let h = self.vision_hidden(pixel_values)?;
        let h = if self.config.keep_cls {
            h
        } else {
            h.i((.., 1..))?.contiguous()?
        };
        Ok(self.projector.forward(&h)?)
    }

    /// The prompt's embeddings with the image features in place of each
    /// [`IMAGE_TOKEN_INDEX`] (`prepare_inputs_labels_for_multimodal`).
    pub fn prompt_embeds(&self, input_ids: &[i64], features: &Tensor) -> Result<Tensor> {
        let features = features.to_dtype(self.dtype)?;
        let mut parts = vec![];
        let mut text: Vec<u32> = vec![];
        let flush = |text: &mut Vec<u32>, parts: &mut Vec<Tensor>| -> Result<()> {
            if !text.is_empty() {
                let ids = Tensor::new(text.as_slice(), &self.device)?.unsqueeze(0)?;
                parts.push(self.decoder.embed(&ids)?.to_dtype(self.dtype)?);
                text.clear();
            }
            Ok(())
        };
        for &id in input_ids {
            if id == IMAGE_TOKEN_INDEX {
                flush(&mut text, &mut parts)?;
                parts.push(features.clone());
            } else if id < 0 {
                return Err(Error::Option(format!("prompt token id {id}")));
            } else {
                text.push(id as u32);
            }
        }
        flush(&mut text, &mut parts)?;
        if parts.is_empty() {
            return Err(Error::Option("empty prompt".into()));
        }
        let e = Tensor::cat(&parts, 1)?;
        if e.dim(2)? != self.decoder.hidden_size() {
            return Err(Error::Option(format!(
                "image features of width {} for a decoder of width {}",
                e.dim(2)?,
                self.decoder.hidden_size()
            )));
        }
        Ok(e)
    }

    /// Decodes from `embeds` `[1, T, H]`: the first step on the whole prompt, then one token at
    /// a time with the KV cache, until `eos` or `max_new_tokens` (transformers' `generate` with
    /// `use_cache=True`). `on_token` sees the count so far.
    pub fn generate(
        &self,
        embeds: &Tensor,
        max_new_tokens: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
        mut on_token: impl FnMut(usize),
    ) -> Result<Generation> {
        let mut cache = self.decoder.new_cache(self.dtype, &self.device)?;
        let prompt_len = embeds.dim(1)?;
        let mut logits = self
            .decoder
            .forward_embeds(embeds, 0, &mut cache)?
            .squeeze(0)?;
        let first_logits = logits.clone();
        // Tokens the tokenizer knows only: llava-hf's padding rows (and its added `<image>`,
        // `<pad>`) are never drawn, as in the original 32000-row model.
        let limit = self.tokenizer.base_vocab_size().min(logits.dim(0)?);
        let mut ids = vec![];
        while ids.len() < max_new_tokens {
            let row = logits.narrow(0, 0, limit)?.to_vec1::<f32>()?;
            let next = sampler.sample(&row);
            ids.push(next);
            on_token(ids.len());
            if Some(next) == eos || ids.len() == max_new_tokens {
                break;
            }
            let x = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            let e = self.decoder.embed(&x)?.to_dtype(self.dtype)?;
            logits = self
                .decoder
                .forward_embeds(&e, prompt_len + ids.len() - 1, &mut cache)?
                .squeeze(0)?;
        }
        Ok(Generation { ids, first_logits })
    }
}
