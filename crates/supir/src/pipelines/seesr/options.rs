//! The typed options of a SeeSR restore, shared by the CLI, the library and the server:
//! `test_seesr.py`'s arguments under clear names, its defaults, the two official presets, and one
//! `validate` that names the option and its range.

use std::fmt;
use std::str::FromStr;

use crate::color_fix::ColorFix;
pub use crate::models::tiled_vae::TileDtype;
use crate::pipelines::supir::restore::Precision;
pub use crate::pipelines::supir::restore::Residency;
use crate::{Error, Result};

/// `test_seesr.py`'s `--added_prompt`.
pub const DEFAULT_ADDED_PROMPT: &str = "clean, high-resolution, 8k";
/// `test_seesr.py`'s `--negative_prompt`.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "dotted, noise, blur, lowres, smooth";
/// Largest model input accepted (pixels after the resize chain).
pub const MAX_PIXELS: u64 = 8192 * 8192;

fn opt_err(msg: impl Into<String>) -> Error {
    Error::Option(msg.into())
}

/// Where sampling starts (`--start_point`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPoint {
    /// The LR image's latent noised to t = 999 (the paper's LR-embedding strategy).
    #[default]
    Lr,
    /// Pure Gaussian noise.
    Noise,
}

impl fmt::Display for StartPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Lr => "lr",
            Self::Noise => "noise",
        })
    }
}

impl FromStr for StartPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lr" => Ok(Self::Lr),
            "noise" => Ok(Self::Noise),
            _ => Err(opt_err(format!(
                "unknown start point `{s}` (expected lr or noise)"
            ))),
        }
    }
}

/// Official parameter sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeesrPreset {
    /// `test_seesr.py`: SD-2-base, 50 DDPM steps, guidance 5.5, latent tile overlap 4.
    #[default]
    Default,
    /// `test_seesr_turbo.py`: the sd-turbo base (its UNet with SeeSR's RCA weights, its
    /// trailing scheduler), 2 steps, guidance 1 (no negative prompt), overlap 32.
    Turbo,
}

impl SeesrPreset {
    pub const ALL: [SeesrPreset; 2] = [Self::Default, Self::Turbo];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Turbo => "turbo",
        }
    }
}

impl fmt::Display for SeesrPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SeesrPreset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                opt_err(format!(
                    "unknown SeeSR preset `{s}` (expected default or turbo)"
                ))
            })
    }
}

/// Everything one SeeSR restore is parametrised by (official argument in each doc comment).
#[derive(Debug, Clone, PartialEq)]
pub struct SeesrOptions {
    /// Which base the preset picked (`turbo`: sd-turbo's UNet and scheduler).
    pub preset: SeesrPreset,
    /// Integer scale factor of the output (`--upscale`).
    pub upscale: u32,
    /// Inputs whose short side is below `process_size / upscale` are first enlarged to it
    /// (`--process_size`).
    pub process_size: u32,
    /// DDPM steps (`--num_inference_steps`).
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 runs without the negative branch (`--guidance_scale`).
    pub guidance: f64,
    /// ControlNet residual scale (`--conditioning_scale`).
    pub conditioning_scale: f64,
    /// `--start_point`.
    pub start_point: StartPoint,
    /// Latent tile side; the latent is tiled when its area exceeds `tile^2`
    /// (`--latent_tiled_size`).
    pub latent_tile: usize,
    /// Latent tile overlap (`--latent_tiled_overlap`).
    pub latent_overlap: usize,
    /// Tiled VAE encoder tile, image pixels (`--vae_encoder_tiled_size`).
    pub vae_encoder_tile: usize,
    /// Tiled VAE decoder tile, latent pixels (`--vae_decoder_tiled_size`).
    pub vae_decoder_tile: usize,
    /// The dtype the tiled VAE holds its tiles in between layers ([`TileDtype`]; fp32 exact).
    pub vae_tile_dtype: TileDtype,
    /// `--align_method` (`adain`, `wavelet`, `nofix` = [`ColorFix::None`]).
    pub color_fix: ColorFix,
    /// The user's prompt, after the tags (`--prompt`).
    pub prompt: String,
    /// Appended after the prompt (`--added_prompt`).
    pub added_prompt: String,
    /// `--negative_prompt`.
    pub negative_prompt: String,
    /// Seed of every random draw; `None` picks one (and reports it).
    pub seed: Option<u64>,
    /// Restores per image (`--sample_times`).
    pub samples: usize,
    /// Write the prompt beside each output (`--save_prompts`).
    pub save_prompts: bool,
    /// Storage dtype of ControlNet + UNet weights (`--mixed_precision` for those).
    pub diffusion_dtype: Precision,
    /// Storage dtype of the VAE, text encoder and DAPE weights.
    pub vae_dtype: Precision,
    /// What stays in memory between the phases (read by [`super::SeesrModel::load`]):
    /// `Staged` frees DAPE + the text encoder after the prompts and ControlNet + UNet before
    /// the VAE decode, and reads them again for the next image; `Resident` keeps them all.
    pub residency: Residency,
}

impl Default for SeesrOptions {
    fn default() -> Self {
        Self::preset(SeesrPreset::Default)
    }
}

impl SeesrOptions {
    /// The official defaults of a preset.
    pub fn preset(preset: SeesrPreset) -> Self {
        let (steps, guidance, overlap) = match preset {
            SeesrPreset::Default => (50, 5.5, 4),
            SeesrPreset::Turbo => (2, 1.0, 32),
        };
        Self {
            preset,
            upscale: 4,
            process_size: 512,
            steps,
            guidance,
            conditioning_scale: 1.0,
            start_point: StartPoint::Lr,
            latent_tile: 96,
            latent_overlap: overlap,
            vae_encoder_tile: 1024,
            vae_decoder_tile: 224,
            vae_tile_dtype: TileDtype::Fp32,
            color_fix: ColorFix::AdaIn,
            prompt: String::new(),
            added_prompt: DEFAULT_ADDED_PROMPT.into(),
            negative_prompt: DEFAULT_NEGATIVE_PROMPT.into(),
            seed: None,
            samples: 1,
            save_prompts: false,
            diffusion_dtype: Precision::Fp32,
            vae_dtype: Precision::Fp32,
            residency: Residency::Staged,
        }
    }

    /// Whether the negative branch runs (`guidance_scale > 1`).
    pub fn uses_cfg(&self) -> bool {
        self.guidance > 1.0
    }

    /// Checks every field; the message names the option (CLI spelling) and its range.
    pub fn validate(&self) -> Result<()> {
        let range = |name: &str, ok: bool, what: &str| -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(opt_err(format!("--{name}: {what}")))
            }
        };
        range(
            "upscale",
            (1..=16).contains(&self.upscale),
            "must be 1 to 16",
        )?;
        range(
            "process-size",
            (8..=8192).contains(&self.process_size),
            "must be 8 to 8192",
        )?;
        range(
            "steps",
            (1..=999).contains(&self.steps),
            "must be 1 to 999 (1000 DDPM steps with SD-2's leading spacing and steps_offset 1 start at timestep 1000, past the trained 0..999; diffusers fails there too)",
        )?;
        range(
            "cfg",
            self.guidance.is_finite() && (0.0..=50.0).contains(&self.guidance),
            "must be 0 to 50",
        )?;
        range(
            "conditioning-scale",
            self.conditioning_scale.is_finite() && (0.0..=4.0).contains(&self.conditioning_scale),
            "must be 0 to 4",
        )?;
        range(
            "latent-tile",
            (2..=1024).contains(&self.latent_tile),
            "must be 2 to 1024 latent pixels",
        )?;
        range(
            "latent-overlap",
            self.latent_overlap < self.latent_tile,
            "must be smaller than --latent-tile",
        )?;
        // The official hook takes any positive size (it shrinks tiles to fit the image).
        range(
            "encoder-tile",
            (16..=8192).contains(&self.vae_encoder_tile),
            "must be 16 to 8192 pixels",
        )?;
        range(
            "decoder-tile",
            (2..=1024).contains(&self.vae_decoder_tile),
            "must be 2 to 1024 latent pixels",
        )?;
        range(
            "samples",
            (1..=64).contains(&self.samples),
            "must be 1 to 64",
        )?;
        for (name, s) in [
            ("prompt", &self.prompt),
            ("added-prompt", &self.added_prompt),
            ("negative-prompt", &self.negative_prompt),
        ] {
            range(name, s.len() <= 16 * 1024, "longer than 16 KiB")?;
        }
        self.vae_dtype.check_unquantised("vae precision")?;
        Ok(())
    }
}
