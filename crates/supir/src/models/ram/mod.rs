//! SeeSR's degradation-aware tagger (DAPE): RAM (`ram/models/ram_lora.py::RAMLora`, built by
//! `ram(image_size=384, vit='swin_l')`) with the DAPE LoRA merged into its weights.
//!
//! Official flow (`test_seesr.py::load_tag_model`, `get_validation_prompt`):
//! `ram_swin_large_14m.pth['model']` then `DAPE.pth` (both `strict=False`), `model.eval()`
//! (loralib merges every LoRA: [`lora`]); the input is [`preprocess`]ed; then
//! - `visual_features = visual_encoder(x)` (Swin, [`swin`]): `[B, 1 + L, vision_width]`;
//! - `image_embeds = image_proj(visual_features)` `[B, 1 + L, 512]` (`generate_image_embeds`,
//!   the input of the UNet / ControlNet image cross-attention);
//! - `logits = fc(tagging_head(relu(wordvec_proj(label_embed)), image_embeds))` `[B, classes]`
//!   ([`tagging_head`]); a class is tagged when `sigmoid(logit) > threshold[class]`
//!   (`ram_tag_list_threshold.txt`); the tag string is `', '.join` of `ram_tag_list.txt` at the
//!   tagged classes in class order (`generate_tag`, `inference_ram`).
//!
//! Tensors read from `ram_swin_large_14m.pth`: `visual_encoder.*` (less the
//! `relative_position_index` / `attn_mask` buffers, which the official loader drops and the
//! modules rebuild), `image_proj`, `label_embed`, `wordvec_proj` (absent when the tagging width
//! is 512: `nn.Identity`), `tagging_head.encoder.layer.*`, `fc`. Never read: `tag_encoder.*` and
//! `text_decoder.*` (the captioning parts; SeeSR never runs them, and the tagging head's tensors,
//! loaded after `tag_encoder`'s, are the ones the tie keeps).

pub mod lora;
pub mod preprocess;
pub mod swin;
pub mod tagging_head;

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

pub use lora::Lora;
pub use preprocess::{preprocess, preprocess_to, RAM_INPUT_SIZE};
pub use swin::SwinTransformer;
pub use tagging_head::TaggingHead;

use crate::layers::{compute_dtype, Linear};
use crate::weights::WeightSource;
use crate::{Error, Result};

/// `ram/data/ram_tag_list.txt` (4,585 English tags, one a line).
pub const TAG_LIST: &str = include_str!("../../../assets/ram/ram_tag_list.txt");
/// `ram/data/ram_tag_list_threshold.txt` (one threshold a line, same order).
pub const TAG_THRESHOLDS: &str = include_str!("../../../assets/ram/ram_tag_list_threshold.txt");

/// The settings of RAM that its tensors do not show. `Default` is the official model:
/// `ram(image_size=384, vit='swin_l')` with `configs/swin/config_swinL_384.json` (window 12)
/// and `configs/q2l_config.json` (4 heads, LayerNorm 1e-12), loralib `lora_alpha` 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RamConfig {
    /// Input side (`image_res`).
    pub image_size: usize,
    /// Swin window (`window_size`); a stage whose side is not larger uses its side, unshifted.
    pub window_size: usize,
    /// Tagging-head heads (`q2l_config` `num_attention_heads`).
    pub tagging_heads: usize,
    /// Tagging-head LayerNorm eps (`q2l_config` `layer_norm_eps`).
    pub tagging_layer_norm_eps: f64,
    /// loralib `lora_alpha` of every LoRA layer (merge scale `alpha / r`).
    pub lora_alpha: f64,
}

impl Default for RamConfig {
    fn default() -> Self {
        Self {
            image_size: 384,
            window_size: 12,
            tagging_heads: 4,
            tagging_layer_norm_eps: 1e-12,
            lora_alpha: 1.0,
        }
    }
}

impl RamConfig {
    /// From the official JSON configs: the Swin one (`image_res`, `window_size`) and
    /// `q2l_config.json` (`num_attention_heads`, `layer_norm_eps`; `hidden_act` must be `gelu`).
    pub fn from_official(swin: &serde_json::Value, q2l: &serde_json::Value) -> Result<Self> {
        let d = Self::default();
        let uint = |v: &serde_json::Value, k: &str, def: usize| -> Result<usize> {
            match v.get(k) {
                None => Ok(def),
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| Error::Option(format!("RAM config `{k}`: {x} is not a size"))),
            }
        };
        if let Some(act) = q2l.get("hidden_act") {
            if act.as_str() != Some("gelu") {
                return Err(Error::Option(format!(
                    "RAM q2l_config `hidden_act` {act}: only \"gelu\" is implemented"
                )));
            }
        }
        Ok(Self {
            image_size: uint(swin, "image_res", d.image_size)?,
            window_size: uint(swin, "window_size", d.window_size)?,
            tagging_heads: uint(q2l, "num_attention_heads", d.tagging_heads)?,
            tagging_layer_norm_eps: q2l
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(d.tagging_layer_norm_eps),
            lora_alpha: d.lora_alpha,
        })
    }
}

/// What one RAM call gives (`B` batch items, `C` classes).
#[derive(Debug, Clone)]
pub struct RamOutput {
    /// `visual_encoder(x)` `[B, 1 + L, vision_width]`.
    pub visual_features: Tensor,
    /// `image_proj(visual_features)` `[B, 1 + L, 512]`: SeeSR's `ram_encoder_hidden_states`.
    pub image_embeds: Tensor,
    /// `[B, C]`.
    pub logits: Tensor,
    /// `sigmoid(logits)` `[B, C]`.
    pub probs: Tensor,
    /// `probs > threshold` as f32 0 / 1 `[B, C]`.
    pub targets: Tensor,
    /// Per batch item, the tags `', '`-joined in class order (`inference_ram`'s string).
    pub tags: Vec<String>,
}

/// `nn.Linear` (or a loralib layer) under `vb` with LoRA merge terms `deltas` added in f32, in
/// order, then stored in `vb`'s dtype; without terms the weight is loaded as stored.
pub(crate) fn merged_linear(
    vb: &VarBuilder,
    in_dim: usize,
    out_dim: usize,
    deltas: Vec<Tensor>,
) -> Result<Linear> {
    if deltas.is_empty() {
        return Ok(Linear::load(vb.clone(), in_dim, out_dim, true)?);
    }
    let w = vb
        .clone()
        .set_dtype(DType::F32)
        .get((out_dim, in_dim), "weight")?;
    let w = lora::merge(w, &deltas, vb.dtype())?;
    Ok(Linear::new(w, Some(vb.get(out_dim, "bias")?)))
}

/// RAM with DAPE merged: image encoder, projection and tagging head.
#[derive(Debug, Clone)]
pub struct Ram {
    visual_encoder: SwinTransformer,
    image_proj: Linear,
    label_embed: Tensor,
    wordvec_proj: Option<Linear>,
    tagging_head: TaggingHead,
    fc: Linear,
    /// `relu(wordvec_proj(label_embed))` `[C, hidden]`, input-independent: made on first use.
    queries: OnceLock<Tensor>,
    /// `class_threshold` `[C]` f32.
    thresholds: Tensor,
    tags: Vec<&'static str>,
    cdt: DType,
}

impl Ram {
    /// Loads `ram_swin_large_14m.pth` (torch zip `{'model': state_dict}`, or a plain state dict
    /// / safetensors) and, if given, the DAPE LoRA file, merged as `eval()` does. Weights are
    /// kept in `dtype` (merges are computed in f32).
    pub fn load(
        ram_pth: &Path,
        dape_pth: Option<&Path>,
        cfg: &RamConfig,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let vb = WeightSource::open(&[ram_pth])?.into_var_builder(dtype, dev);
        let lora = dape_pth
            .map(|p| Lora::open(p, cfg.lora_alpha, dev))
            .transpose()?;
        Self::new(vb, lora.as_ref(), cfg)
    }

    /// Builds RAM from the RAM checkpoint's root `vb` (official key names) with the LoRA of
    /// `dape` merged; fails if `dape` holds a key that matches no LoRA layer of `RAMLora`.
    pub fn new(vb: VarBuilder, dape: Option<&Lora>, cfg: &RamConfig) -> Result<Self> {
        let cdt = compute_dtype(vb.dtype(), vb.device());
        let visual_encoder = SwinTransformer::new(
            vb.pp("visual_encoder"),
            dape,
            cfg.image_size,
            cfg.window_size,
        )?;
        let tagging_head =
            TaggingHead::new(&vb, dape, cfg.tagging_heads, cfg.tagging_layer_norm_eps)?;
        let width = tagging_head.encoder_width();
        let hidden = tagging_head.hidden_size();
        let vision = visual_encoder.num_features();
        let image_proj = Linear::load(vb.pp("image_proj"), vision, width, true)?;
        let label_embed = vb.get_unchecked("label_embed")?;
        let classes = label_embed.dim(0)?;
        let label_embed = vb.get((classes, width), "label_embed")?;
        // `nn.Identity` when the tagging width equals the label width (512 in the code).
        let wordvec_proj = if hidden != width {
            Some(Linear::load(vb.pp("wordvec_proj"), width, hidden, true)?)
        } else {
            None
        };
        let fc = Linear::load(vb.pp("fc"), hidden, 1, true)?;
        if let Some(l) = dape {
            l.finish(&vb)?;
        }
        let tags: Vec<&'static str> = TAG_LIST.lines().collect();
        let thresholds = TAG_THRESHOLDS
            .lines()
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .map(|t| t as f32)
                    .map_err(|e| Error::Option(format!("ram_tag_list_threshold.txt: `{s}`: {e}")))
            })
            .collect::<Result<Vec<f32>>>()?;
        if tags.len() != classes || thresholds.len() != classes {
            return Err(Error::Option(format!(
                "RAM: `label_embed` has {classes} classes, the tag list {} and the thresholds {}",
                tags.len(),
                thresholds.len()
            )));
        }
        Ok(Self {
            visual_encoder,
            image_proj,
            label_embed,
            wordvec_proj,
            tagging_head,
            fc,
            queries: OnceLock::new(),
            thresholds: Tensor::from_vec(thresholds, classes, vb.device())?,
            tags,
            cdt,
        })
    }

    /// Input side the image encoder takes.
    pub fn image_size(&self) -> usize {
        self.visual_encoder.image_size()
    }

    /// The tag names, in class order.
    pub fn tag_list(&self) -> &[&'static str] {
        &self.tags
    }

    /// `generate_image_embeds`: `(visual_features, image_embeds)` of `pixel_values [B, 3, S, S]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let visual = self.visual_encoder.forward(pixel_values)?;
        let embeds = self.image_proj.forward(&visual)?;
        Ok((visual, embeds))
    }

    /// Image embeddings, tagging logits, probabilities, targets and tag strings of
    /// `pixel_values [B, 3, S, S]` ([`preprocess`]'s output).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<RamOutput> {
        let (visual_features, image_embeds) = self.image_embeds(pixel_values)?;
        let b = image_embeds.dim(0)?;
        let label = match self.queries.get() {
            Some(q) => q.clone(),
            None => {
                let label = self.label_embed.to_dtype(self.cdt)?;
                let q = match &self.wordvec_proj {
                    Some(p) => p.forward(&label)?,
                    None => label,
                }
                .relu()?;
                self.queries.get_or_init(|| q).clone()
            }
        };
        let (classes, hidden) = label.dims2()?;
        let queries = label.unsqueeze(0)?.broadcast_as((b, classes, hidden))?;
        let h = self
            .tagging_head
            .forward(&queries.contiguous()?, &image_embeds)?;
        let logits = self.fc.forward(&h)?.squeeze(2)?;
        let probs = candle_nn::ops::sigmoid(&logits)?;
        let targets = probs
            .to_dtype(DType::F32)?
            .broadcast_gt(&self.thresholds.unsqueeze(0)?)?
            .to_dtype(DType::F32)?;
        let rows: Vec<Vec<f32>> = targets.to_device(&Device::Cpu)?.to_vec2()?;
        let tags = rows
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&self.tags)
                    .filter(|(t, _)| **t == 1.0)
                    .map(|(_, name)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        Ok(RamOutput {
            visual_features,
            image_embeds,
            logits,
            probs,
            targets,
            tags,
        })
    }
}
