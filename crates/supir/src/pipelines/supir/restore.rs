//! SUPIR restoration end to end, the flow of the official `test.py` / Gradio demos: an image in,
//! `PIL2Tensor` (upscale, min size, multiple of 64, Pillow bicubic), `batchify_sample` (stage 1,
//! conditioning, sampling, decoding, colour fix), `Tensor2PIL` back to the requested size.
//!
//! [`RestoreOptions`] is the one typed set of options shared by the CLI (and later a server):
//! [`Preset`]s fill it with the official defaults, callers override fields, and
//! [`RestoreOptions::validate`] checks every field in one place, naming the option and its range.
//! [`Restorer`] holds the loaded model, encodes the prompts once and then drops the text
//! encoders (they are not needed for sampling and hold about 1.4 G parameters).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::color_fix::ColorFix;
use crate::image_io::convert;
use crate::layers::Quant;
use crate::models::supir_config::SupirConfig;
use crate::models::tiled_vae::VaeTiling;
use crate::pipelines::supir::conditioner::Conditioning;
use crate::pipelines::supir::flow::{
    check_conditioning, check_tile_prompts, decode_and_fix, sample_from_stage1,
    sampler_from_config, stage1_with, OnCall, PromptConditioning, SampleOptions,
};
use crate::pipelines::supir::model::{DTypes, SupirModel};
use crate::schedulers::sampler::{NoiseSource, SamplerKind, SamplerOptions, SeededNoise};
use crate::schedulers::tiling::{sliding_windows, TileWindow};
use crate::{Error, Result};

/// The official model config `options/SUPIR_v0.yaml` (SDXL base + SUPIR, `RestoreEDMSampler`).
pub const OFFICIAL_CONFIG: &str = include_str!("../../../../../fixtures/official/SUPIR_v0.yaml");
/// The official `options/SUPIR_v0_Juggernautv9_lightning.yaml` (`RestoreDPMPP2MSampler`).
pub const LIGHTNING_CONFIG: &str =
    include_str!("../../../../../fixtures/official/SUPIR_v0_Juggernautv9_lightning.yaml");

/// `test.py`'s `--a_prompt` (also the Gradio demos' default positive prompt).
pub const DEFAULT_POSITIVE_PROMPT: &str =
    "Cinematic, High Contrast, highly detailed, taken using a \
    Canon EOS R camera, hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra \
    HD, extreme meticulous detailing, skin pore detailing, hyper sharpness, perfect without \
    deformations.";
/// `test.py`'s `--n_prompt`.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "painting, oil painting, illustration, drawing, art, \
    sketch, oil painting, cartoon, CG Style, 3D render, unreal engine, blurring, dirty, messy, \
    worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, \
    over-smooth";

/// Short side of the image `test.py` captions (`PIL2Tensor(..., fix_resize=512)`).
pub const CAPTION_SHORT_SIDE: f64 = 512.0;

/// Largest model input accepted (pixels after the `PIL2Tensor` resize).
pub const MAX_PIXELS: u64 = 8192 * 8192;

fn opt_err(msg: impl Into<String>) -> Error {
    Error::Option(msg.into())
}

/// Official parameter sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// `test.py`'s defaults: 50 steps, cfg 4 (linear from 1), s_churn 5, s_noise 1.01.
    #[default]
    Default,
    /// Gradio "Quality": cfg 7.5 (linear from 4), s_noise 1.003.
    Quality,
    /// Gradio "Fidelity": cfg 4 (linear from 1), s_noise 1.003.
    Fidelity,
    /// The lightning config's "Quality": `RestoreDPMPP2MSampler`, 8 steps, cfg 2 (from 2). Meant
    /// for an SDXL-Lightning base (the official config uses Juggernaut v9 Lightning).
    Lightning,
    /// The lightning config's "Fidelity": as `Lightning` with cfg 1.5 (from 1.5).
    LightningFidelity,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Self::Default,
        Self::Quality,
        Self::Fidelity,
        Self::Lightning,
        Self::LightningFidelity,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Quality => "quality",
            Self::Fidelity => "fidelity",
            Self::Lightning => "lightning",
            Self::LightningFidelity => "lightning-fidelity",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                opt_err(format!(
                    "unknown preset `{s}` (expected default, quality, fidelity, lightning or lightning-fidelity)"
                ))
            })
    }
}

/// What stays in memory between the phases of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// GLVControl + UNet are read for sampling only and freed while the VAE runs (stage 1,
    /// final decode), so the big activations of the VAE never meet the big weights of the
    /// sampler. One image reads every weight once, as `Resident` does; each further image
    /// reads GLVControl + UNet again (about 3.9 G parameters).
    #[default]
    Staged,
    /// Every network stays loaded from the first image to the last.
    Resident,
}

impl fmt::Display for Residency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Staged => "staged",
            Self::Resident => "resident",
        })
    }
}

impl FromStr for Residency {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "staged" => Ok(Self::Staged),
            "resident" => Ok(Self::Resident),
            _ => Err(opt_err(format!(
                "unknown residency `{s}` (expected staged or resident)"
            ))),
        }
    }
}

/// A weight precision, under the official names, or a GGUF block quantisation of the linear
/// layers (diffusion networks only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    /// Linear layers in Q8_0, everything else in f16 (the published files' own dtype).
    Q8_0,
    /// Linear layers in Q4_K (those whose input width is not a multiple of 256 in Q8_0),
    /// everything else in f16.
    Q4K,
}

impl Precision {
    /// The dtype of the weights that are not quantised.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Fp32 => DType::F32,
            Self::Fp16 | Self::Q8_0 | Self::Q4K => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The linear layers' quantisation, if any.
    pub fn quant(&self) -> Option<Quant> {
        match self {
            Self::Q8_0 => Some(Quant::Q8_0),
            Self::Q4K => Some(Quant::Q4K),
            _ => None,
        }
    }

    /// Refuses a quantised precision for a part that has none (`part` names the option).
    pub fn check_unquantised(&self, part: &str) -> Result<()> {
        match self.quant() {
            Some(q) => Err(opt_err(format!(
                "{part} {}: quantisation is for the diffusion networks only; use fp32 or bf16",
                q.name()
            ))),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Self::Fp32),
            "fp16" | "f16" | "float16" | "half" => Ok(Self::Fp16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_k" | "q4k" => Ok(Self::Q4K),
            _ => Err(opt_err(format!(
                "unknown precision `{s}` (expected fp32, fp16, bf16, q8_0 or q4_k)"
            ))),
        }
    }
}

/// Everything one restoration run is parametrised by. Field names say what the option does;
/// the official name is in each doc comment.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreOptions {
    /// Sampler class; `None` takes the model config's `sampler_config.target`.
    pub sampler: Option<SamplerKind>,
    /// Sampling steps (`edm_steps` / `num_steps`).
    pub steps: usize,
    /// Classifier-free guidance scale at the end of sampling (`s_cfg` / `cfg_scale`).
    pub cfg_scale: f64,
    /// CFG scale at the start when `linear_cfg` (`spt_linear_CFG` / `cfg_scale_start`).
    pub cfg_scale_start: f64,
    /// CFG ramps linearly with sigma from `cfg_scale_start` to `cfg_scale` (`linear_CFG`).
    pub linear_cfg: bool,
    /// Adaptor strength (`s_stage2` / `control_scale`).
    pub control_scale: f64,
    /// Control scale at the start when `linear_control_scale` (`spt_linear_s_stage2`).
    pub control_scale_start: f64,
    /// Control scale ramps linearly with sigma (`linear_s_stage2`).
    pub linear_control_scale: bool,
    /// Restoration guidance tau_r (`s_stage1` / `restoration_scale`); <= 0 turns it off.
    pub restoration_scale: f64,
    /// EDM churn (`s_churn`).
    pub s_churn: f64,
    /// EDM churn noise scale (`s_noise`).
    pub s_noise: f64,
    /// Colour fix against the stage-1 image (`color_fix_type`).
    pub color_fix: ColorFix,
    /// Seed of every random draw (this crate's generator, not torch's stream).
    pub seed: u64,
    /// Samples per image (`num_samples`).
    pub num_samples: usize,
    /// Image description, prepended to the positive prompt (the official code's LLaVA caption).
    pub caption: String,
    /// Per-tile captions for the tiled samplers (the official local prompts): tile `j` of
    /// [`RestoreOptions::tile_layout`] is conditioned on `tile_prompts[j] + positive_prompt`
    /// instead of `caption`; the negative prompt stays shared. Empty: `caption` everywhere.
    /// One image and one sample at a time, one caption per tile.
    pub tile_prompts: Vec<String>,
    /// Appended to the caption (`a_prompt` / `p_p`).
    pub positive_prompt: String,
    /// The unconditional branch's prompt (`n_prompt` / `n_p`).
    pub negative_prompt: String,
    /// Output size over input size (`upscale`).
    pub upscale: f64,
    /// The model input's short side is raised to at least this (`min_size`).
    pub min_size: u32,
    /// Latent tile size / stride of the tiled samplers; `None` takes the config's.
    pub sampler_tile_size: Option<usize>,
    pub sampler_tile_stride: Option<usize>,
    /// Tiled VAE (`use_tile_vae`, `encoder_tile_size`, `decoder_tile_size`); `None`: whole image.
    pub vae_tiling: Option<VaeTiling>,
    /// Control + UNet precision (`diff_dtype`): the weights' dtype; the compute dtype on a
    /// GPU, f32 on the CPU ([`crate::layers::compute_dtype`]).
    pub diffusion_precision: Precision,
    /// VAE (and text encoder) precision (`ae_dtype`): fp32 or bf16, as `diffusion_precision`.
    pub vae_precision: Precision,
    /// Whether GLVControl + UNet stay loaded while the VAE runs.
    pub residency: Residency,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self::preset(Preset::Default)
    }
}

impl RestoreOptions {
    /// The options of `preset` (precisions fp32: the CPU-friendly choice; the official GPU
    /// defaults are fp16 diffusion, bf16 VAE).
    pub fn preset(preset: Preset) -> Self {
        // Gradio `load_and_reset`: the common part of the presets.
        let mut o = Self {
            sampler: None,
            steps: 50,
            cfg_scale: 4.0,
            cfg_scale_start: 1.0,
            linear_cfg: true,
            control_scale: 1.0,
            control_scale_start: 0.0,
            linear_control_scale: false,
            restoration_scale: -1.0,
            s_churn: 5.0,
            s_noise: 1.003,
            color_fix: ColorFix::Wavelet,
            seed: 1234,
            num_samples: 1,
            caption: String::new(),
            tile_prompts: Vec::new(),
            positive_prompt: DEFAULT_POSITIVE_PROMPT.into(),
            negative_prompt: DEFAULT_NEGATIVE_PROMPT.into(),
            upscale: 1.0,
            min_size: 1024,
            sampler_tile_size: None,
            sampler_tile_stride: None,
            vae_tiling: None,
            diffusion_precision: Precision::Fp32,
            vae_precision: Precision::Fp32,
            residency: Residency::Staged,
        };
        let (cfg, start) = match preset {
            Preset::Default => {
                o.s_noise = 1.01;
                (4.0, 1.0)
            }
            Preset::Quality => (7.5, 4.0),
            Preset::Fidelity => (4.0, 1.0),
            Preset::Lightning | Preset::LightningFidelity => {
                o.sampler = Some(SamplerKind::RestoreDpmpp2m);
                o.steps = 8;
                if preset == Preset::Lightning {
                    (2.0, 2.0)
                } else {
                    (1.5, 1.5)
                }
            }
        };
        o.cfg_scale = cfg;
        o.cfg_scale_start = start;
        o
    }

    /// Checks every option; the error names the option and its allowed range.
    pub fn validate(&self) -> Result<()> {
        fn range(name: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(opt_err(format!("{name} {v}: must be in {lo}..={hi}")))
            }
        }
        fn irange(name: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(opt_err(format!("{name} {v}: must be in {lo}..={hi}")))
            }
        }
        irange("steps", self.steps, 1, 1000)?;
        range("cfg scale", self.cfg_scale, 0.0, 100.0)?;
        range("cfg scale start", self.cfg_scale_start, 0.0, 100.0)?;
        range("control scale", self.control_scale, 0.0, 2.0)?;
        range("control scale start", self.control_scale_start, 0.0, 2.0)?;
        range("restoration scale", self.restoration_scale, -1.0e3, 20.0)?;
        range("s_churn", self.s_churn, 0.0, 100.0)?;
        range("s_noise", self.s_noise, 0.0, 2.0)?;
        irange("samples", self.num_samples, 1, 16)?;
        if !self.tile_prompts.is_empty() && self.num_samples != 1 {
            return Err(opt_err(format!(
                "tile prompts with {} samples: per-tile prompts take one sample at a time (as the official code)",
                self.num_samples
            )));
        }
        range("upscale", self.upscale, 0.01, 32.0)?;
        irange("min size", self.min_size as usize, 0, 8192)?;
        if let Some(t) = self.sampler_tile_size {
            irange("sampler tile size", t, 1, 1024)?;
        }
        if let Some(s) = self.sampler_tile_stride {
            irange(
                "sampler tile stride",
                s,
                1,
                self.sampler_tile_size.unwrap_or(1024),
            )?;
        }
        if let Some(t) = &self.vae_tiling {
            if t.encoder_tile < 64 || t.encoder_tile % 8 != 0 {
                return Err(opt_err(format!(
                    "encoder tile size {}: must be a multiple of 8, at least 64",
                    t.encoder_tile
                )));
            }
            irange("decoder tile size", t.decoder_tile, 8, 4096)?;
        }
        self.vae_precision.check_unquantised("vae precision")?;
        if self.vae_precision == Precision::Fp16 {
            return Err(opt_err(
                "vae precision fp16: not offered (the official code refuses it: NaNs in the VAE); use fp32 or bf16",
            ));
        }
        Ok(())
    }

    /// The compute dtypes of the model.
    pub fn dtypes(&self) -> DTypes {
        DTypes::new(self.diffusion_precision.dtype(), self.vae_precision.dtype())
            .with_diffusion_quant(self.diffusion_precision.quant())
    }

    /// `batchify_sample`'s arguments for the model config `cfg` (its sampler and sampler-only
    /// keys, unless overridden here).
    pub fn sample_options(&self, cfg: &SupirConfig) -> Result<SampleOptions> {
        let (config_kind, params) = sampler_from_config(cfg)?;
        let mut opts = SamplerOptions {
            num_steps: self.steps,
            cfg_scale: self.cfg_scale,
            cfg_scale_start: self.cfg_scale_start,
            use_linear_cfg: self.linear_cfg,
            control_scale: self.control_scale,
            control_scale_start: self.control_scale_start,
            use_linear_control_scale: self.linear_control_scale,
            restoration_scale: self.restoration_scale,
            s_churn: self.s_churn,
            s_noise: self.s_noise,
            ..SamplerOptions::default()
        }
        .with_config_params(&params);
        if let Some(t) = self.sampler_tile_size {
            opts.tile_size = t;
        }
        if let Some(s) = self.sampler_tile_stride {
            opts.tile_stride = s;
        }
        Ok(SampleOptions {
            sampler: self.sampler.unwrap_or(config_kind),
            opts,
            p_p: self.positive_prompt.clone(),
            n_p: self.negative_prompt.clone(),
            color_fix: self.color_fix,
        })
    }

    /// `PIL2Tensor`'s sizes for a `width x height` input, refusing absurd sizes.
    pub fn model_size(&self, width: u32, height: u32) -> Result<convert::Pil2TensorSize> {
        let size = convert::pil2tensor_size(width, height, self.upscale, self.min_size, None)?;
        let px = size.width as u64 * size.height as u64;
        if px > MAX_PIXELS {
            return Err(opt_err(format!(
                "a {width}x{height} image at upscale {} is processed at {}x{} ({:.0} Mpx), above the limit of {:.0} Mpx",
                self.upscale,
                size.width,
                size.height,
                px as f64 / 1e6,
                MAX_PIXELS as f64 / 1e6
            )));
        }
        Ok(size)
    }
}

/// The latent tiles of the tiled samplers over one image (what [`RestoreOptions::tile_prompts`]
/// must match).
#[derive(Debug, Clone, PartialEq)]
pub struct TileLayout {
    pub sampler: SamplerKind,
    /// The model input (the image after `PIL2Tensor`'s resize), pixels.
    pub width: usize,
    pub height: usize,
    /// Latent size (`width / 8 x height / 8`) and the tile size / stride in latent pixels.
    pub latent_width: usize,
    pub latent_height: usize,
    pub tile_size: usize,
    pub tile_stride: usize,
    /// Latent windows in sampling order (`index` 0, 1, ...: the order of the tile prompts).
    pub tiles: Vec<TileWindow>,
}

impl TileLayout {
    /// The tiles in model-input pixels (latent windows x 8), as the official Gradio demo cuts the
    /// stage-1 image to caption each tile.
    pub fn pixel_windows(&self) -> Vec<TileWindow> {
        self.tiles.iter().map(|t| t.scaled(8)).collect()
    }
}

impl RestoreOptions {
    /// The tiles a `width x height` image is sampled in under these options and the model config
    /// `cfg` (no weights needed). Errors unless the sampler is a tiled one.
    pub fn tile_layout(&self, cfg: &SupirConfig, width: u32, height: u32) -> Result<TileLayout> {
        let so = self.sample_options(cfg)?;
        if !so.sampler.is_tiled() {
            return Err(opt_err(format!(
                "the sampler is {}, which does not tile the latent; choose a tiled sampler (TiledRestoreEDMSampler or TiledRestoreDPMPP2MSampler)",
                so.sampler.official_name()
            )));
        }
        let size = self.model_size(width, height)?;
        let (w, h) = (size.width as usize, size.height as usize);
        let (t, st) = (so.opts.tile_size, so.opts.tile_stride);
        Ok(TileLayout {
            sampler: so.sampler,
            width: w,
            height: h,
            latent_width: w / 8,
            latent_height: h / 8,
            tile_size: t,
            tile_stride: st,
            tiles: sliding_windows(h / 8, w / 8, t, st)?,
        })
    }
}

/// The positive texts of a prompt set and whether they are per tile, with the negative prompt.
type PromptKey = (bool, Vec<String>, String);

/// VAE passes of one restore counted as progress units: stage 1's denoise encode, decode and
/// encode, and the final decode. The callback runs after each (a cancel takes effect there).
pub const VAE_PASSES: usize = 4;

/// The loaded model with its config and the encoded prompts.
pub struct Restorer {
    pub model: SupirModel,
    pub cfg: SupirConfig,
    /// The prompts and their one-row conditioning `(c, uc)` (c per tile with tile prompts).
    prompts: Option<(PromptKey, PromptConditioning, Conditioning)>,
    /// The checkpoints GLVControl + UNet are read from again under [`Residency::Staged`];
    /// empty for a model built by the caller (it then stays resident).
    checkpoints: Vec<PathBuf>,
}

impl Restorer {
    /// Loads `checkpoints` (SDXL base first, then the SUPIR file; or one merged file) for the
    /// model config `cfg` in the precisions of `opts`. Under [`Residency::Staged`] GLVControl +
    /// UNet are only checked (keys, shapes) and read when the first image is sampled.
    pub fn load<P: AsRef<Path>>(
        cfg: SupirConfig,
        checkpoints: &[P],
        opts: &RestoreOptions,
        dev: &Device,
    ) -> Result<Self> {
        opts.validate()?;
        let mut model = match opts.residency {
            Residency::Staged => {
                SupirModel::load_without_diffusion(&cfg, checkpoints, opts.dtypes(), dev)?
            }
            Residency::Resident => SupirModel::load_with(&cfg, checkpoints, opts.dtypes(), dev)?,
        };
        model.vae.tiling = opts.vae_tiling;
        let mut r = Self::from_model(cfg, model);
        r.checkpoints = checkpoints
            .iter()
            .map(|p| p.as_ref().to_path_buf())
            .collect();
        Ok(r)
    }

    /// Wraps a model built by the caller (GLVControl + UNet must be loaded; they stay so
    /// whatever the residency).
    pub fn from_model(cfg: SupirConfig, model: SupirModel) -> Self {
        Self {
            model,
            cfg,
            prompts: None,
            checkpoints: Vec::new(),
        }
    }

    /// Encodes the prompts of `opts` (kept for every later image with the same prompts). When
    /// they changed after [`Self::drop_text_encoders`], the text encoders are read again from the
    /// checkpoints (a model built by the caller has none to read: an error).
    pub fn prepare_prompts(&mut self, opts: &RestoreOptions) -> Result<()> {
        let per_tile = !opts.tile_prompts.is_empty();
        let captions = if per_tile {
            opts.tile_prompts.clone()
        } else {
            vec![opts.caption.clone()]
        };
        let key = (
            per_tile,
            captions
                .iter()
                .map(|c| format!("{c}{}", opts.positive_prompt))
                .collect(),
            opts.negative_prompt.clone(),
        );
        if self.prompts.as_ref().is_some_and(|(k, _, _)| *k == key) {
            return Ok(());
        }
        if !self.model.conditioner.has_text_encoders() {
            if self.checkpoints.is_empty() {
                return Err(opt_err(
                    "the prompts changed after the text encoders were dropped; load the model again",
                ));
            }
            self.model
                .load_text_encoders(&self.cfg, &self.checkpoints)?;
        }
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let cond = &self.model.conditioner;
        let (p, n) = (&opts.positive_prompt, &opts.negative_prompt);
        let (c, uc) = if per_tile {
            let (c, uc) = cond.prepare_tile_condition(&refs, p, n)?;
            (PromptConditioning::PerTile(c), uc)
        } else {
            let (c, uc) = cond.prepare_condition(&refs, p, n)?;
            (PromptConditioning::Global(c), uc)
        };
        self.prompts = Some((key, c, uc));
        Ok(())
    }

    /// Frees the text encoders; prompts already encoded stay usable.
    pub fn drop_text_encoders(&mut self) {
        self.model.conditioner.drop_text_encoders();
        crate::memory::release_free_heap();
    }

    /// Network calls one image takes (for progress): steps, times the tiles of a tiled sampler,
    /// plus the [`VAE_PASSES`] (stage 1's three, the final decode).
    pub fn network_calls(&self, opts: &RestoreOptions, width: u32, height: u32) -> Result<usize> {
        let so = opts.sample_options(&self.cfg)?;
        let size = opts.model_size(width, height)?;
        let tiles = if so.sampler.is_tiled() {
            sliding_windows(
                size.height as usize / 8,
                size.width as usize / 8,
                so.opts.tile_size,
                so.opts.tile_stride,
            )?
            .len()
        } else {
            1
        };
        Ok(opts.steps * tiles + VAE_PASSES)
    }

    /// `batchify_sample` on a model input `x` `[1, 3, H, W]` in [-1, 1] with `opts`'
    /// `num_samples` (the image repeated, as the official code does): `[N, 3, H, W]` F32.
    /// Every random draw comes from `rng`; `on_call` runs after each network call, and an
    /// error from it (e.g. [`Error::Canceled`]) stops the restore at that call.
    pub fn restore_tensor(
        &mut self,
        x: &Tensor,
        opts: &RestoreOptions,
        rng: &mut dyn NoiseSource,
        on_call: Option<OnCall<'_>>,
    ) -> Result<Tensor> {
        opts.validate()?;
        if x.dim(0)? != 1 {
            return Err(opt_err(format!(
                "restore_tensor: one image at a time, got a batch of {}",
                x.dim(0)?
            )));
        }
        let so = opts.sample_options(&self.cfg)?;
        if !opts.tile_prompts.is_empty() {
            check_tile_prompts(opts.tile_prompts.len(), x.dims(), &so)?;
        }
        self.prepare_prompts(opts)?;
        let staged = opts.residency == Residency::Staged && !self.checkpoints.is_empty();
        if staged && self.model.conditioner.has_text_encoders() {
            // Staged: the prompts are encoded; the text encoders are not kept beside GLVControl +
            // UNet (read again if a later image has other prompts).
            self.drop_text_encoders();
        }
        let (_, c, uc) = self.prompts.as_ref().expect("prompts prepared");
        let n = opts.num_samples;
        let rep = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![t; n], 0)?) };
        let c = match c {
            PromptConditioning::Global(c) => PromptConditioning::Global(Conditioning {
                crossattn: rep(&c.crossattn)?,
                vector: rep(&c.vector)?,
            }),
            // One sample (validated): the rows are already right.
            per_tile => per_tile.clone(),
        };
        let uc = Conditioning {
            crossattn: rep(&uc.crossattn)?,
            vector: rep(&uc.vector)?,
        };
        let x = rep(&x.to_device(&self.model.device())?)?;
        check_conditioning(&x, &c, &uc, &so)?;
        if staged {
            self.model.release_diffusion();
        }
        let mut on_call = on_call;
        let mut tick = || on_call.as_mut().map_or(Ok(()), |f| f());
        let st = stage1_with(&self.model, &x, rng, Some(&mut tick))?;
        crate::memory::release_free_heap();
        if !self.checkpoints.is_empty() {
            self.model.load_diffusion(&self.cfg, &self.checkpoints)?;
        }
        let s = sample_from_stage1(&self.model, st, &c, &uc, &so, rng, Some(&mut tick))?;
        if staged {
            self.model.release_diffusion();
        }
        crate::memory::release_free_heap();
        let out = decode_and_fix(&self.model, &s, so.color_fix);
        crate::memory::release_free_heap();
        let out = out?;
        tick()?;
        Ok(out)
    }

    /// `test.py`'s image for the captioner ("pre-denoise for LLaVA"): `PIL2Tensor` with
    /// `fix_resize = 512` (short side 512), `batchify_denoise` (the denoise encoder's posterior
    /// mode, decoded), `Tensor2PIL` to that size. Needs only the VAE.
    pub fn denoised_for_caption(
        &self,
        img: &DynamicImage,
        opts: &RestoreOptions,
    ) -> Result<RgbImage> {
        let rgb = convert::to_rgb8(img);
        let size = convert::pil2tensor_size(
            rgb.width(),
            rgb.height(),
            opts.upscale,
            opts.min_size,
            Some(CAPTION_SHORT_SIDE),
        )?;
        let resized = convert::pil_bicubic_resize_rgb8(&rgb, size.width, size.height)?;
        let clean = self.batchify_denoise(&convert::rgb8_to_tensor(&resized)?)?;
        convert::tensor2pil(&clean.get(0)?, size.h0, size.w0)
    }

    /// `batchify_denoise`: the denoise encoder's posterior mode, decoded; `x` `[1, 3, H, W]` in
    /// [-1, 1] -> the same shape, F32.
    fn batchify_denoise(&self, x: &Tensor) -> Result<Tensor> {
        let x = x
            .to_device(&self.model.device())?
            .to_dtype(self.model.vae_dtype())?;
        let s = self.model.scale_factor;
        let z = self.model.vae.denoise_encode_scaled_mode(&x, s)?;
        let clean = self.model.vae.decode_scaled(&z, s)?.to_dtype(DType::F32)?;
        crate::memory::release_free_heap();
        Ok(clean)
    }

    /// The tiled demo's images for per-tile captions (`gradio_demo_tiled.py` `llave_process`):
    /// the model input (`PIL2Tensor`) through `batchify_denoise`, cut into the tiled sampler's
    /// windows (pixels, sampling order), each `round(x * 127.5 + 127.5)` clipped to 8 bits.
    pub fn denoised_tiles_for_caption(
        &self,
        img: &DynamicImage,
        opts: &RestoreOptions,
    ) -> Result<Vec<RgbImage>> {
        let rgb = convert::to_rgb8(img);
        let layout = opts.tile_layout(&self.cfg, rgb.width(), rgb.height())?;
        let (x, _, _) = convert::pil2tensor(&rgb, opts.upscale, opts.min_size)?;
        let clean = self.batchify_denoise(&x)?.get(0)?;
        layout
            .tiles
            .iter()
            .map(|t| {
                let p = t.scaled(8);
                let tile = clean
                    .narrow(1, p.h0, p.h1 - p.h0)?
                    .narrow(2, p.w0, p.w1 - p.w0)?
                    .permute((1, 2, 0))?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let raw = tile
                    .into_iter()
                    .map(|v| (v * 127.5 + 127.5).round_ties_even().clamp(0.0, 255.0) as u8)
                    .collect();
                RgbImage::from_raw((p.w1 - p.w0) as u32, (p.h1 - p.h0) as u32, raw)
                    .ok_or_else(|| opt_err("tile buffer size mismatch"))
            })
            .collect()
    }

    /// Restores one decoded image: alpha flattened on white and 16-bit reduced to 8 as the
    /// official `HWC3` / PIL paths do, `PIL2Tensor`, [`Restorer::restore_tensor`] with a
    /// generator seeded by `opts.seed`, `Tensor2PIL` to `upscale` x the input size. One RGB
    /// image per sample.
    pub fn restore_image(
        &mut self,
        img: &DynamicImage,
        opts: &RestoreOptions,
        on_call: Option<OnCall<'_>>,
    ) -> Result<Vec<RgbImage>> {
        opts.validate()?;
        let rgb = convert::to_rgb8(img);
        opts.model_size(rgb.width(), rgb.height())?;
        let (x, h0, w0) = convert::pil2tensor(&rgb, opts.upscale, opts.min_size)?;
        let mut rng = SeededNoise::new(opts.seed);
        let out = self.restore_tensor(&x, opts, &mut rng, on_call)?;
        (0..out.dim(0)?)
            .map(|i| convert::tensor2pil(&out.get(i)?, h0, w0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_follow_the_official_configs() {
        let setting = |text: &str, key: &str| -> f64 {
            let cfg = SupirConfig::from_yaml_str(text, std::path::Path::new("x")).unwrap();
            cfg.default_setting[key].as_f64().unwrap()
        };
        let q = RestoreOptions::preset(Preset::Quality);
        assert_eq!(q.cfg_scale, setting(OFFICIAL_CONFIG, "s_cfg_Quality"));
        assert_eq!(
            q.cfg_scale_start,
            setting(OFFICIAL_CONFIG, "spt_linear_CFG_Quality")
        );
        assert_eq!(q.steps as f64, setting(OFFICIAL_CONFIG, "edm_steps"));
        let f = RestoreOptions::preset(Preset::Fidelity);
        assert_eq!(f.cfg_scale, setting(OFFICIAL_CONFIG, "s_cfg_Fidelity"));
        assert_eq!(
            f.cfg_scale_start,
            setting(OFFICIAL_CONFIG, "spt_linear_CFG_Fidelity")
        );
        let l = RestoreOptions::preset(Preset::Lightning);
        assert_eq!(l.cfg_scale, setting(LIGHTNING_CONFIG, "s_cfg_Quality"));
        assert_eq!(
            l.cfg_scale_start,
            setting(LIGHTNING_CONFIG, "spt_linear_CFG_Quality")
        );
        assert_eq!(l.steps as f64, setting(LIGHTNING_CONFIG, "edm_steps"));
        let lf = RestoreOptions::preset(Preset::LightningFidelity);
        assert_eq!(lf.cfg_scale, setting(LIGHTNING_CONFIG, "s_cfg_Fidelity"));
        let lcfg = SupirConfig::from_yaml_str(LIGHTNING_CONFIG, std::path::Path::new("x")).unwrap();
        assert_eq!(l.sampler, Some(sampler_from_config(&lcfg).unwrap().0));
        for p in Preset::ALL {
            RestoreOptions::preset(p).validate().unwrap();
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
    }

    #[test]
    fn validation_names_the_option() {
        let bad = |f: &dyn Fn(&mut RestoreOptions), needle: &str| {
            let mut o = RestoreOptions::default();
            f(&mut o);
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        bad(&|o| o.steps = 0, "steps 0");
        bad(&|o| o.cfg_scale = -1.0, "cfg scale -1");
        bad(&|o| o.s_noise = f64::NAN, "s_noise");
        bad(&|o| o.upscale = 0.0, "upscale");
        bad(&|o| o.num_samples = 0, "samples");
        bad(&|o| o.vae_precision = Precision::Fp16, "fp16");
        bad(
            &|o| {
                o.vae_tiling = Some(VaeTiling {
                    encoder_tile: 100,
                    decoder_tile: 64,
                    tile_dtype: Default::default(),
                })
            },
            "encoder tile",
        );
        let o = RestoreOptions::default();
        let e = o.model_size(100_000, 100_000).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
    }
}
