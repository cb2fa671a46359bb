//! The official model config (`options/SUPIR_v0.yaml` schema), deserialised as written.
//!
//! Sizes come from here only: nothing is hard-coded to SDXL's widths.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Top level of `SUPIR_v0.yaml`.
#[derive(Debug, Clone, Deserialize)]
pub struct SupirConfig {
    pub model: Target<ModelParams>,
    #[serde(rename = "SDXL_CKPT", default)]
    pub sdxl_ckpt: Option<String>,
    #[serde(rename = "SUPIR_CKPT_F", default)]
    pub supir_ckpt_f: Option<String>,
    #[serde(rename = "SUPIR_CKPT_Q", default)]
    pub supir_ckpt_q: Option<String>,
    #[serde(rename = "SUPIR_CKPT", default)]
    pub supir_ckpt: Option<String>,
    #[serde(default)]
    pub default_setting: serde_yaml::Value,
}

/// `{target: <python class>, params: {...}}`, the `instantiate_from_config` form.
#[derive(Debug, Clone, Deserialize)]
pub struct Target<P> {
    pub target: String,
    pub params: P,
}

/// A `target` whose params are kept untyped and may be absent (scaling, discretization...).
#[derive(Debug, Clone, Deserialize)]
pub struct AnyTarget {
    pub target: String,
    #[serde(default)]
    pub params: serde_yaml::Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelParams {
    #[serde(default = "default_fp32")]
    pub ae_dtype: String,
    #[serde(default = "default_fp32")]
    pub diffusion_dtype: String,
    pub scale_factor: f64,
    pub denoiser_config: Target<DenoiserParams>,
    pub control_stage_config: Target<UNetParams>,
    pub network_config: Target<UNetParams>,
    pub conditioner_config: Target<ConditionerParams>,
    pub first_stage_config: Target<FirstStageParams>,
    pub sampler_config: AnyTarget,
    /// Default positive ("quality") prompt appended to the caption.
    #[serde(default)]
    pub p_p: String,
    /// Default negative prompt.
    #[serde(default)]
    pub n_p: String,
}

fn default_fp32() -> String {
    "fp32".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct DenoiserParams {
    pub num_idx: usize,
    pub scaling_config: AnyTarget,
    pub discretization_config: AnyTarget,
}

/// `UNetModel` / `GLVControl` / `LightGLVUNet` constructor arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetParams {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub attention_resolutions: Vec<usize>,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    #[serde(default = "minus_one")]
    pub num_head_channels: i64,
    #[serde(default = "minus_one")]
    pub num_heads: i64,
    #[serde(default)]
    pub use_spatial_transformer: bool,
    #[serde(default)]
    pub use_linear_in_transformer: bool,
    pub transformer_depth: Vec<usize>,
    pub context_dim: usize,
    pub adm_in_channels: Option<usize>,
    #[serde(default)]
    pub num_classes: Option<String>,
    #[serde(default)]
    pub legacy: bool,
    #[serde(default)]
    pub spatial_transformer_attn_type: Option<String>,
    /// GLVControl only.
    #[serde(default)]
    pub input_upscale: Option<f64>,
    /// LightGLVUNet only: `XL-base`.
    #[serde(default)]
    pub mode: Option<String>,
    /// LightGLVUNet only: `ZeroSFT`.
    #[serde(default)]
    pub project_type: Option<String>,
    /// LightGLVUNet only: multiplies the connector widths.
    #[serde(default)]
    pub project_channel_scale: Option<f64>,
}

fn minus_one() -> i64 {
    -1
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConditionerParams {
    pub emb_models: Vec<EmbModel>,
}

/// One entry of `GeneralConditioner.emb_models`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbModel {
    #[serde(default)]
    pub is_trainable: bool,
    pub input_key: String,
    pub target: String,
    #[serde(default)]
    pub params: serde_yaml::Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FirstStageParams {
    pub embed_dim: usize,
    pub ddconfig: DdConfig,
}

/// `ddconfig` of the SGM `Encoder` / `Decoder`.
#[derive(Debug, Clone, Deserialize)]
pub struct DdConfig {
    #[serde(default)]
    pub attn_type: Option<String>,
    pub double_z: bool,
    pub z_channels: usize,
    pub resolution: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_resolutions: Vec<usize>,
    #[serde(default)]
    pub dropout: f64,
}

impl SupirConfig {
    pub fn from_yaml_str(text: &str, path: &Path) -> Result<Self> {
        serde_yaml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str(&text, path)
    }
}
