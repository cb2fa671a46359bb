//! SDXL conditioning as SUPIR uses it (`sgm.modules.GeneralConditionerWithControl`).
//!
//! The embedders run in config order; each output goes to `crossattn` (3-D, concatenated along
//! channels) or `vector` (2-D, concatenated along features):
//! - `FrozenCLIPEmbedder` (CLIP-L, layer "hidden"): `hidden_states[layer_idx]` -> crossattn;
//! - `FrozenOpenCLIPEmbedder2` (OpenCLIP bigG, layer "penultimate", pooled, not legacy):
//!   penultimate -> crossattn, pooled -> vector;
//! - `ConcatTimestepEmbedderND` (one per size key): each number's sinusoidal embedding of width
//!   `outdim`, concatenated -> vector.
//!
//! With SDXL's config: `crossattn` `[B, 77, 768 + 1280]`, `vector` `[B, 1280 + 3 * 2 * 256]`.
//! `prepare_condition` (SUPIR) builds c from caption + positive prompt (joined with no separator)
//! and uc from the negative prompt, with sizes 1024 / 0 / 1024.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::models::clip::{
    ClipTextConfig, ClipTextTransformer, OpenClipTextConfig, OpenClipTextTransformer,
};
use crate::models::supir_config::{ConditionerParams, EmbModel};
use crate::models::unet::timestep_embedding;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The conditioning dictionary entries used by the UNet.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, 77, ctx]`.
    pub crossattn: Tensor,
    /// `[B, adm]`.
    pub vector: Tensor,
}

/// The numbers fed to the `ConcatTimestepEmbedderND` embedders, by their `input_key`.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeConditioning {
    /// `original_size_as_tuple`.
    pub original_size: [f64; 2],
    /// `crop_coords_top_left`.
    pub crop_coords_top_left: [f64; 2],
    /// `target_size_as_tuple`.
    pub target_size: [f64; 2],
    /// `aesthetic_score` (set by SUPIR, unused by the SDXL base config).
    pub aesthetic_score: f64,
}

impl Default for SizeConditioning {
    /// SUPIR's `prepare_condition`: 1024x1024, crop (0, 0), 1024x1024, score 9.
    fn default() -> Self {
        Self {
            original_size: [1024.0, 1024.0],
            crop_coords_top_left: [0.0, 0.0],
            target_size: [1024.0, 1024.0],
            aesthetic_score: 9.0,
        }
    }
}

impl SizeConditioning {
    fn values(&self, key: &str) -> Result<Vec<f64>> {
        Ok(match key {
            "original_size_as_tuple" => self.original_size.to_vec(),
            "crop_coords_top_left" => self.crop_coords_top_left.to_vec(),
            "target_size_as_tuple" => self.target_size.to_vec(),
            "aesthetic_score" => vec![self.aesthetic_score],
            _ => return Err(Error::Option(format!("unknown conditioning key `{key}`"))),
        })
    }
}

/// Which CLIP-L output is used (`FrozenCLIPEmbedder.layer`).
#[derive(Debug, Clone, Copy)]
enum ClipLayer {
    /// `last_hidden_state` (with `final_layer_norm`).
    Last,
    /// `hidden_states[idx]`.
    Hidden(i64),
}

/// Which OpenCLIP output is used (`FrozenOpenCLIPEmbedder2.layer`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum OpenClipLayer {
    Last,
    Penultimate,
}

enum Embedder {
    ClipL {
        model: Option<ClipTextTransformer>,
        layer: ClipLayer,
    },
    OpenClip {
        model: Option<OpenClipTextTransformer>,
        layer: OpenClipLayer,
        pooled: bool,
        legacy: bool,
    },
    Size {
        input_key: String,
        outdim: usize,
    },
}

fn param_str<'a>(m: &'a EmbModel, key: &str) -> Option<&'a str> {
    m.params.get(key).and_then(|v| v.as_str())
}

fn param_bool(m: &EmbModel, key: &str, default: bool) -> bool {
    m.params
        .get(key)
        .and_then(|v| v.as_bool())
        .unwrap_or(default)
}

fn unsupported(m: &EmbModel, what: &str) -> Error {
    Error::Option(format!("conditioner embedder {}: {what}", m.target))
}

/// `GeneralConditioner` with the embedders SDXL / SUPIR configure.
pub struct Conditioner {
    embedders: Vec<Embedder>,
    tokenizer: Tokenizer,
    dtype: DType,
    device: Device,
}

impl Conditioner {
    /// Builds every embedder of `params.emb_models` from `vb` at the `conditioner` prefix
    /// (`embedders.N.transformer.text_model.*` for CLIP-L, `embedders.N.model.*` for OpenCLIP).
    /// Sizes are read from the weights (see [`crate::models::clip`] for the head-count rule).
    pub fn new(params: &ConditionerParams, vb: VarBuilder) -> Result<Self> {
        let mut embedders = Vec::with_capacity(params.emb_models.len());
        for (n, m) in params.emb_models.iter().enumerate() {
            let vb = vb.pp("embedders").pp(n);
            let class = m.target.rsplit('.').next().unwrap_or(&m.target);
            let e = match class {
                "FrozenCLIPEmbedder" => {
                    if param_bool(m, "always_return_pooled", false) {
                        return Err(unsupported(m, "always_return_pooled"));
                    }
                    let layer = match param_str(m, "layer").unwrap_or("last") {
                        "last" => ClipLayer::Last,
                        "hidden" => ClipLayer::Hidden(
                            m.params
                                .get("layer_idx")
                                .and_then(|v| v.as_i64())
                                .ok_or_else(|| unsupported(m, "layer hidden needs layer_idx"))?,
                        ),
                        other => return Err(unsupported(m, &format!("layer `{other}`"))),
                    };
                    let vb = vb.pp("transformer").pp("text_model");
                    let cfg = ClipTextConfig::from_weights(&vb)?;
                    Embedder::ClipL {
                        model: Some(ClipTextTransformer::new(vb, &cfg)?),
                        layer,
                    }
                }
                "FrozenOpenCLIPEmbedder2" => {
                    let layer = match param_str(m, "layer").unwrap_or("last") {
                        "last" => OpenClipLayer::Last,
                        "penultimate" => OpenClipLayer::Penultimate,
                        other => return Err(unsupported(m, &format!("layer `{other}`"))),
                    };
                    let pooled = param_bool(m, "always_return_pooled", false);
                    let legacy = param_bool(m, "legacy", true);
                    if pooled && legacy {
                        return Err(unsupported(m, "always_return_pooled needs legacy: false"));
                    }
                    let arch = param_str(m, "arch").unwrap_or("ViT-H-14");
                    let vb = vb.pp("model");
                    let cfg = OpenClipTextConfig::from_weights(&vb, arch)?;
                    Embedder::OpenClip {
                        model: Some(OpenClipTextTransformer::new(vb, &cfg)?),
                        layer,
                        pooled,
                        legacy,
                    }
                }
                "ConcatTimestepEmbedderND" => Embedder::Size {
                    input_key: m.input_key.clone(),
                    outdim: m
                        .params
                        .get("outdim")
                        .and_then(|v| v.as_u64())
                        .ok_or_else(|| unsupported(m, "missing outdim"))?
                        as usize,
                },
                _ => return Err(unsupported(m, "not supported")),
            };
            embedders.push(e);
        }
        Ok(Self {
            embedders,
            tokenizer: Tokenizer::new()?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Frees both text encoders (the size embedders need no weights). Encoding fails afterwards.
    pub fn drop_text_encoders(&mut self) {
        for e in &mut self.embedders {
            match e {
                Embedder::ClipL { model, .. } => *model = None,
                Embedder::OpenClip { model, .. } => *model = None,
                Embedder::Size { .. } => {}
            }
        }
    }

    /// Whether the text encoders are still loaded.
    pub fn has_text_encoders(&self) -> bool {
        self.embedders.iter().all(|e| match e {
            Embedder::ClipL { model, .. } => model.is_some(),
            Embedder::OpenClip { model, .. } => model.is_some(),
            Embedder::Size { .. } => true,
        })
    }

    /// Conditioning from token ids: `clip_l_ids` and `openclip_ids` `[B, 77]` (any integer
    /// dtype; see [`Tokenizer::clip_l_ids`] / [`Tokenizer::openclip_ids`]).
    pub fn encode_ids(
        &self,
        clip_l_ids: &Tensor,
        openclip_ids: &Tensor,
        sizes: &SizeConditioning,
    ) -> Result<Conditioning> {
        let b = clip_l_ids.dim(0)?;
        let gone = || Error::Option("text encoders were dropped".into());
        let mut crossattn = Vec::new();
        let mut vector = Vec::new();
        for e in &self.embedders {
            match e {
                Embedder::ClipL { model, layer } => {
                    let model = model.as_ref().ok_or_else(gone)?;
                    crossattn.push(match *layer {
                        ClipLayer::Last => model.forward(clip_l_ids)?,
                        ClipLayer::Hidden(i) => model.hidden_state(clip_l_ids, i)?,
                    });
                }
                Embedder::OpenClip {
                    model,
                    layer,
                    pooled,
                    legacy,
                } => {
                    let model = model.as_ref().ok_or_else(gone)?;
                    let out = model.forward(openclip_ids)?;
                    let z = match layer {
                        OpenClipLayer::Last => out.last,
                        OpenClipLayer::Penultimate => out.penultimate,
                    };
                    // legacy: ln_final on the chosen layer, no pooled output.
                    let z = if *legacy { model.ln_final(&z)? } else { z };
                    crossattn.push(z);
                    if *pooled {
                        vector.push(out.pooled);
                    }
                }
                Embedder::Size { input_key, outdim } => {
                    let values = sizes.values(input_key)?;
                    let d = values.len();
                    let flat: Vec<f32> = (0..b)
                        .flat_map(|_| values.iter().map(|&v| v as f32))
                        .collect();
                    let x = Tensor::from_vec(flat, b * d, &self.device)?;
                    let emb = timestep_embedding(&x, *outdim)?.reshape((b, d * outdim))?;
                    vector.push(emb.to_dtype(self.dtype)?);
                }
            }
        }
        Ok(Conditioning {
            crossattn: Tensor::cat(&crossattn, 2)?,
            vector: Tensor::cat(&vector, 1)?,
        })
    }

    /// Conditioning of a batch of texts, tokenized for each encoder.
    pub fn encode_texts(&self, texts: &[&str], sizes: &SizeConditioning) -> Result<Conditioning> {
        if texts.is_empty() {
            return Err(Error::Option("no text to encode".into()));
        }
        let ids = |f: &dyn Fn(&str) -> Vec<u32>| -> Result<Tensor> {
            let rows: Vec<u32> = texts.iter().flat_map(|t| f(t)).collect();
            let n = rows.len() / texts.len();
            Ok(Tensor::from_vec(rows, (texts.len(), n), &self.device)?)
        };
        let clip_l = ids(&|t| self.tokenizer.clip_l_ids(t))?;
        let openclip = ids(&|t| self.tokenizer.openclip_ids(t))?;
        self.encode_ids(&clip_l, &openclip, sizes)
    }

    /// `prepare_condition` with local prompts (one image): c of tile `j` from
    /// `tile_captions[j] + p_p`, each `[1, ...]` and encoded on its own as the official loop does
    /// (repeated captions once), and the shared uc from `n_p`. Returns `(c per tile, uc)`.
    pub fn prepare_tile_condition(
        &self,
        tile_captions: &[&str],
        p_p: &str,
        n_p: &str,
    ) -> Result<(Vec<Conditioning>, Conditioning)> {
        if tile_captions.is_empty() {
            return Err(Error::Option("no tile prompts".into()));
        }
        let sizes = SizeConditioning::default();
        let mut done: std::collections::HashMap<&str, Conditioning> = Default::default();
        let mut c = Vec::with_capacity(tile_captions.len());
        for &caption in tile_captions {
            if !done.contains_key(caption) {
                let text = format!("{caption}{p_p}");
                done.insert(caption, self.encode_texts(&[text.as_str()], &sizes)?);
            }
            c.push(done[caption].clone());
        }
        Ok((c, self.encode_texts(&[n_p], &sizes)?))
    }

    /// SUPIR's `prepare_condition` for one prompt per image: c from `caption + p_p` (no
    /// separator), uc from `n_p`, sizes 1024 / 0 / 1024. Returns `(c, uc)`.
    pub fn prepare_condition(
        &self,
        captions: &[&str],
        p_p: &str,
        n_p: &str,
    ) -> Result<(Conditioning, Conditioning)> {
        let sizes = SizeConditioning::default();
        let c_texts: Vec<String> = captions.iter().map(|c| format!("{c}{p_p}")).collect();
        let c_refs: Vec<&str> = c_texts.iter().map(String::as_str).collect();
        let uc_texts: Vec<&str> = captions.iter().map(|_| n_p).collect();
        Ok((
            self.encode_texts(&c_refs, &sizes)?,
            self.encode_texts(&uc_texts, &sizes)?,
        ))
    }
}
