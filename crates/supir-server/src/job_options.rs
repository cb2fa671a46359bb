//! A job's options per backend: the JSON object a client sends (the fields are `supir restore`'s
//! long flags, `tile_pad` or `tile-pad`), the server's defaults (its own flags), and the options
//! a job runs with once resolved (shown by `GET /v1/jobs/{id}` and written into the result's
//! metadata). Values are checked by the library's own validation, so a bad value gets the
//! message `supir restore` prints.

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use supir::color_fix::ColorFix;
use supir::models::supir_config::SupirConfig;
use supir::pipelines::captions::CaptionerConfig;
use supir::pipelines::realesrgan::{AlphaUpscale, Tiling, UpscaleOptions};
use supir::pipelines::seesr::{flow as seesr_flow, SeesrOptions, SeesrPaths, StartPoint};
use supir::pipelines::supir::restore::{Preset, RestoreOptions};
use supir::schedulers::sampler::SamplerKind;
use utoipa::ToSchema;

/// Largest `outscale` a Real-ESRGAN job may ask for (the output's pixels grow with its square).
pub const MAX_OUTSCALE: f64 = 16.0;
/// Largest `tile` / `tile_pad`, in input pixels.
pub const MAX_TILE: usize = 1 << 16;

/// The backends a server can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    RealEsrgan,
    Supir,
    Seesr,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Supir, Backend::Seesr, Backend::RealEsrgan];

    pub fn name(self) -> &'static str {
        match self {
            Backend::RealEsrgan => "realesrgan",
            Backend::Supir => "supir",
            Backend::Seesr => "seesr",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Backend::RealEsrgan => "Real-ESRGAN x4plus (embedded weights, CPU)",
            Backend::Supir => "SUPIR (SDXL prior; needs its weights: --model-dir, --supir-models, --sdxl/--supir or --config)",
            Backend::Seesr => "SeeSR (SD-2 prior with DAPE tags; needs its release: --seesr-models)",
        }
    }
}

/// How the alpha channel is upscaled (`--alpha`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AlphaChoice {
    /// Through the network, as Real-ESRGAN does.
    #[default]
    Model,
    /// Lanczos resampling (faster).
    Lanczos,
}

/// A Real-ESRGAN job's options; absent fields take the server's defaults.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RealEsrganJobOptions {
    /// Output size over input size.
    pub outscale: Option<f64>,
    /// Tile side in input pixels (0: whole image at once).
    pub tile: Option<usize>,
    /// Context around each tile, in input pixels.
    #[serde(alias = "tile-pad")]
    pub tile_pad: Option<usize>,
    /// How the alpha channel is upscaled.
    pub alpha: Option<AlphaChoice>,
}

/// The options a Real-ESRGAN job runs with.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RealEsrganResolved {
    /// `realesrgan`.
    pub backend: String,
    pub outscale: f64,
    pub tile: usize,
    pub tile_pad: usize,
    pub alpha: AlphaChoice,
}

impl Default for RealEsrganResolved {
    /// `supir restore`'s defaults.
    fn default() -> Self {
        let t = Tiling::default();
        Self {
            backend: Backend::RealEsrgan.name().into(),
            outscale: 4.0,
            tile: t.tile,
            tile_pad: t.pad,
            alpha: AlphaChoice::Model,
        }
    }
}

impl RealEsrganResolved {
    /// The options of `supir restore`'s flags.
    pub fn from_options(o: &UpscaleOptions) -> Self {
        Self {
            backend: Backend::RealEsrgan.name().into(),
            outscale: o.outscale,
            tile: o.tiling.tile,
            tile_pad: o.tiling.pad,
            alpha: match o.alpha {
                AlphaUpscale::Model => AlphaChoice::Model,
                AlphaUpscale::Lanczos => AlphaChoice::Lanczos,
            },
        }
    }

    fn resolve(&self, opts: &RealEsrganJobOptions) -> Result<Self, String> {
        let r = Self {
            backend: self.backend.clone(),
            outscale: opts.outscale.unwrap_or(self.outscale),
            tile: opts.tile.unwrap_or(self.tile),
            tile_pad: opts.tile_pad.unwrap_or(self.tile_pad),
            alpha: opts.alpha.unwrap_or(self.alpha),
        };
        r.validate()?;
        Ok(r)
    }

    /// The CLI's checks, with this server's bounds.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.outscale.is_finite() && self.outscale > 0.0) {
            return Err(format!(
                "--outscale {}: must be a positive number",
                self.outscale
            ));
        }
        if self.outscale > MAX_OUTSCALE {
            return Err(format!(
                "--outscale {}: at most {MAX_OUTSCALE} on this server",
                self.outscale
            ));
        }
        for (flag, v) in [("--tile", self.tile), ("--tile-pad", self.tile_pad)] {
            if v > MAX_TILE {
                return Err(format!("{flag} {v}: at most {MAX_TILE} on this server"));
            }
        }
        Ok(())
    }

    pub fn upscale_options(&self) -> UpscaleOptions {
        UpscaleOptions {
            tiling: Tiling {
                tile: self.tile,
                pad: self.tile_pad,
            },
            outscale: self.outscale,
            alpha: match self.alpha {
                AlphaChoice::Model => AlphaUpscale::Model,
                AlphaChoice::Lanczos => AlphaUpscale::Lanczos,
            },
        }
    }
}

/// A SUPIR job's options (`supir restore`'s SUPIR sampling and size flags); absent fields take
/// the server's defaults. A `preset` starts from that preset's values, except where the
/// server's own flags changed its preset's values.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SupirJobOptions {
    /// `default`, `quality`, `fidelity`, `lightning` or `lightning-fidelity`.
    pub preset: Option<String>,
    /// Sampling steps.
    pub steps: Option<usize>,
    /// Text guidance (CFG) scale at the end of sampling.
    pub cfg: Option<f64>,
    /// CFG scale at the start, when the CFG ramps linearly.
    #[serde(alias = "cfg-start")]
    pub cfg_start: Option<f64>,
    /// Ramp the CFG scale linearly with the noise level.
    #[serde(alias = "linear-cfg")]
    pub linear_cfg: Option<bool>,
    /// Adaptor (control) strength, 0..=2.
    #[serde(alias = "control-scale")]
    pub control_scale: Option<f64>,
    /// Control strength at the start, when it ramps linearly.
    #[serde(alias = "control-start")]
    pub control_start: Option<f64>,
    /// Ramp the control strength linearly with the noise level.
    #[serde(alias = "linear-control")]
    pub linear_control: Option<bool>,
    /// Restoration guidance tau_r; <= 0 turns it off.
    #[serde(alias = "restoration-scale")]
    pub restoration_scale: Option<f64>,
    /// EDM churn.
    #[serde(alias = "s-churn")]
    pub s_churn: Option<f64>,
    /// EDM churn noise scale.
    #[serde(alias = "s-noise")]
    pub s_noise: Option<f64>,
    /// `none`, `wavelet` or `adain`.
    #[serde(alias = "color-fix")]
    pub color_fix: Option<String>,
    /// Seed of every random draw; -1 picks one at random (reported in the job's options).
    pub seed: Option<i64>,
    /// Description of the image, put before the positive prompt.
    pub caption: Option<String>,
    /// Appended to the caption.
    #[serde(alias = "positive-prompt")]
    pub positive_prompt: Option<String>,
    #[serde(alias = "negative-prompt")]
    pub negative_prompt: Option<String>,
    /// `edm`, `tiled-edm`, `dpmpp2m` or `tiled-dpmpp2m`.
    pub sampler: Option<String>,
    /// Latent tile size of the tiled samplers.
    #[serde(alias = "sampler-tile")]
    pub sampler_tile: Option<usize>,
    /// Latent tile stride of the tiled samplers.
    #[serde(alias = "sampler-stride")]
    pub sampler_stride: Option<usize>,
    /// Output size over input size.
    pub upscale: Option<f64>,
    /// The short side is processed at no less than this many pixels.
    #[serde(alias = "min-size")]
    pub min_size: Option<u32>,
}

/// The options a SUPIR job runs with (the job options' names, every default filled in).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SupirResolved {
    /// `supir`.
    pub backend: String,
    pub preset: String,
    pub steps: usize,
    pub cfg: f64,
    pub cfg_start: f64,
    pub linear_cfg: bool,
    pub control_scale: f64,
    pub control_start: f64,
    pub linear_control: bool,
    pub restoration_scale: f64,
    pub s_churn: f64,
    pub s_noise: f64,
    pub color_fix: String,
    /// `null` only in a server's defaults: each job then gets a random seed.
    pub seed: Option<u64>,
    pub caption: String,
    pub positive_prompt: String,
    pub negative_prompt: String,
    pub sampler: String,
    /// Latent tile size and stride (tiled samplers only).
    pub sampler_tile: Option<usize>,
    pub sampler_stride: Option<usize>,
    pub upscale: f64,
    pub min_size: u32,
}

/// A SeeSR job's options (`supir restore`'s flags as SeeSR reads them); absent fields take the
/// server's defaults.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeesrJobOptions {
    /// `default` or `turbo`; only the preset the server loaded.
    pub preset: Option<String>,
    /// DDPM steps.
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; <= 1 runs without the negative prompt.
    pub cfg: Option<f64>,
    /// Whole output scale factor, 1 to 16.
    pub upscale: Option<f64>,
    /// Inputs whose short side is under process-size / upscale are first enlarged to it.
    #[serde(alias = "process-size")]
    pub process_size: Option<u32>,
    /// ControlNet strength.
    #[serde(alias = "conditioning-scale")]
    pub conditioning_scale: Option<f64>,
    /// `lr` or `noise`.
    #[serde(alias = "start-point")]
    pub start_point: Option<String>,
    /// Latent tile side.
    #[serde(alias = "latent-tile")]
    pub latent_tile: Option<usize>,
    /// Latent tile overlap.
    #[serde(alias = "latent-overlap")]
    pub latent_overlap: Option<usize>,
    /// Tiled VAE encoder tile, image pixels.
    #[serde(alias = "encoder-tile")]
    pub encoder_tile: Option<usize>,
    /// Tiled VAE decoder tile, latent pixels.
    #[serde(alias = "decoder-tile")]
    pub decoder_tile: Option<usize>,
    /// Your words after DAPE's tags.
    pub prompt: Option<String>,
    /// The same as `prompt` (`auto` is ignored: the prompt starts with DAPE's tags anyway).
    pub caption: Option<String>,
    /// Appended to the prompt.
    #[serde(alias = "added-prompt")]
    pub added_prompt: Option<String>,
    #[serde(alias = "negative-prompt")]
    pub negative_prompt: Option<String>,
    /// `none`, `wavelet` or `adain`.
    #[serde(alias = "color-fix")]
    pub color_fix: Option<String>,
    /// Seed of every random draw; -1 picks one at random (reported in the job's options).
    pub seed: Option<i64>,
}

/// The options a SeeSR job runs with (the job options' names, every default filled in).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SeesrResolved {
    /// `seesr`.
    pub backend: String,
    pub preset: String,
    pub steps: usize,
    pub cfg: f64,
    pub upscale: u32,
    pub process_size: u32,
    pub conditioning_scale: f64,
    pub start_point: String,
    pub latent_tile: usize,
    pub latent_overlap: usize,
    pub encoder_tile: usize,
    pub decoder_tile: usize,
    pub prompt: String,
    pub added_prompt: String,
    pub negative_prompt: String,
    pub color_fix: String,
    /// `null` only in a server's defaults: each job then gets a random seed.
    pub seed: Option<u64>,
}

/// A job's options in the API: those of the loaded backend (see `GET /v1/models`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum JobOptions {
    RealEsrgan(RealEsrganJobOptions),
    Supir(SupirJobOptions),
    Seesr(SeesrJobOptions),
}

/// The options a job runs with, per backend (`backend` says which).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ResolvedOptions {
    RealEsrgan(RealEsrganResolved),
    Supir(SupirResolved),
    Seesr(SeesrResolved),
}

impl ResolvedOptions {
    pub fn backend(&self) -> &str {
        match self {
            Self::RealEsrgan(o) => &o.backend,
            Self::Supir(o) => &o.backend,
            Self::Seesr(o) => &o.backend,
        }
    }

    pub fn seed(&self) -> Option<u64> {
        match self {
            Self::RealEsrgan(_) => None,
            Self::Supir(o) => o.seed,
            Self::Seesr(o) => o.seed,
        }
    }
}

/// What a SUPIR server loads, and its jobs' defaults.
#[derive(Debug, Clone)]
pub struct SupirSetup {
    pub config: SupirConfig,
    /// SDXL base then SUPIR (or one merged file).
    pub checkpoints: Vec<PathBuf>,
    /// The weights, in words (for the log and `/v1/models`).
    pub description: String,
    /// The preset `defaults` were built from.
    pub preset: Preset,
    /// Every job's options unless it gives others. `num_samples` must be 1 and `tile_prompts`
    /// empty (one image per job); precisions and VAE tiling are the loaded model's.
    pub defaults: RestoreOptions,
    /// Jobs without a `seed` get a random one (`--seed -1`).
    pub random_seed: bool,
    /// The captioner behind `caption: "auto"` (`--captioner`), loaded for each such job and
    /// freed after it; `None`: such jobs are refused.
    pub captioner: Option<CaptionerConfig>,
}

/// Why `caption: "auto"` cannot be served without a captioner.
const NO_CAPTIONER: &str = "caption `auto`: this server has no captioner; start it with \
     --captioner tags and the DAPE weights (--seesr-models DIR, or --ram / --dape), or \
     --captioner llava --llava DIR";

/// What a SeeSR server loads, and its jobs' defaults (`seed: None`: a random seed per job).
#[derive(Debug, Clone)]
pub struct SeesrSetup {
    pub paths: SeesrPaths,
    /// `samples` must be 1 (one image per job); the preset and dtypes are the loaded model's.
    pub defaults: SeesrOptions,
}

/// The backend a server loads, its weights and its jobs' defaults.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    RealEsrgan(RealEsrganResolved),
    Supir(Box<SupirSetup>),
    Seesr(Box<SeesrSetup>),
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::RealEsrgan(RealEsrganResolved::default())
    }
}

/// What the worker runs a job with.
#[derive(Debug, Clone)]
pub enum RunOptions {
    RealEsrgan(UpscaleOptions),
    Supir(Box<RestoreOptions>),
    /// `seed` is set.
    Seesr(Box<SeesrOptions>),
}

/// A job's options, resolved: what it runs with and how the API shows it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub view: ResolvedOptions,
    pub run: RunOptions,
}

/// Why an image is refused for a job's options: `too_large` (413) or not (400).
#[derive(Debug, Clone)]
pub struct SizeError {
    pub too_large: bool,
    pub msg: String,
}

fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % (1 << 32)
}

/// A job's `seed`: itself when >= 0, a random one for -1 (`supir restore --seed`).
fn job_seed(s: i64) -> Result<u64, String> {
    match s {
        -1 => Ok(random_seed()),
        s if s >= 0 => Ok(s as u64),
        s => Err(format!("--seed {s}: must be >= 0, or -1 for a random seed")),
    }
}

fn color_fix_name(c: ColorFix) -> String {
    c.to_string().to_ascii_lowercase()
}

/// `supir restore --sampler`'s names, or the official class names.
fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    Ok(match s.trim() {
        "edm" => SamplerKind::RestoreEdm,
        "tiled-edm" => SamplerKind::TiledRestoreEdm,
        "dpmpp2m" => SamplerKind::RestoreDpmpp2m,
        "tiled-dpmpp2m" => SamplerKind::TiledRestoreDpmpp2m,
        other => other.parse().map_err(|_| {
            format!("--sampler {other:?}: expected edm, tiled-edm, dpmpp2m or tiled-dpmpp2m")
        })?,
    })
}

fn sampler_name(k: SamplerKind) -> &'static str {
    match k {
        SamplerKind::RestoreEdm => "edm",
        SamplerKind::TiledRestoreEdm => "tiled-edm",
        SamplerKind::RestoreDpmpp2m => "dpmpp2m",
        SamplerKind::TiledRestoreDpmpp2m => "tiled-dpmpp2m",
    }
}

fn parse_object<T: DeserializeOwned>(
    options: &serde_json::Map<String, serde_json::Value>,
) -> Result<T, String> {
    T::deserialize(serde_json::Value::Object(options.clone()))
        .map_err(|e| format!("`options`: {e}"))
}

impl SupirSetup {
    /// Checks the defaults as a job would use them.
    fn validate(&self) -> Result<(), String> {
        if self.defaults.num_samples != 1 {
            return Err(format!(
                "--samples {}: `supir serve` makes one image per job",
                self.defaults.num_samples
            ));
        }
        if self.defaults.caption == "auto" && self.captioner.is_none() {
            return Err(format!("--{NO_CAPTIONER}"));
        }
        if !self.defaults.tile_prompts.is_empty() {
            return Err("--tile-prompts: per-tile prompts are for one image of `supir restore`, not a server".into());
        }
        self.defaults.validate().map_err(|e| e.to_string())?;
        self.defaults
            .sample_options(&self.config)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn resolve(&self, j: &SupirJobOptions, pick_seed: bool) -> Result<Resolved, String> {
        let mut o = self.defaults.clone();
        let preset = match &j.preset {
            Some(p) => p.parse::<Preset>().map_err(|e| e.to_string())?,
            None => self.preset,
        };
        if preset != self.preset {
            // What the server's flags left at its preset's values follows the job's preset.
            let (base, target) = (
                RestoreOptions::preset(self.preset),
                RestoreOptions::preset(preset),
            );
            macro_rules! follow {
                ($($f:ident),*) => { $(if o.$f == base.$f { o.$f = target.$f.clone(); })* };
            }
            follow!(
                sampler,
                steps,
                cfg_scale,
                cfg_scale_start,
                linear_cfg,
                control_scale,
                control_scale_start,
                linear_control_scale,
                restoration_scale,
                s_churn,
                s_noise,
                color_fix
            );
        }
        macro_rules! set {
            ($($field:ident = $v:expr),* $(,)?) => { $(if let Some(v) = &$v { o.$field = v.clone(); })* };
        }
        set!(
            steps = j.steps,
            cfg_scale = j.cfg,
            cfg_scale_start = j.cfg_start,
            linear_cfg = j.linear_cfg,
            control_scale = j.control_scale,
            control_scale_start = j.control_start,
            linear_control_scale = j.linear_control,
            restoration_scale = j.restoration_scale,
            s_churn = j.s_churn,
            s_noise = j.s_noise,
            caption = j.caption,
            positive_prompt = j.positive_prompt,
            negative_prompt = j.negative_prompt,
            upscale = j.upscale,
            min_size = j.min_size,
        );
        if o.caption == "auto" && self.captioner.is_none() {
            return Err(NO_CAPTIONER.into());
        }
        if let Some(c) = &j.color_fix {
            o.color_fix = c.parse().map_err(|e: supir::Error| e.to_string())?;
        }
        if let Some(s) = &j.sampler {
            o.sampler = Some(parse_sampler(s)?);
        }
        if j.sampler_tile.is_some() {
            o.sampler_tile_size = j.sampler_tile;
        }
        if j.sampler_stride.is_some() {
            o.sampler_tile_stride = j.sampler_stride;
        }
        let seed = match j.seed {
            Some(s) => Some(job_seed(s)?),
            None if self.random_seed => pick_seed.then(random_seed),
            None => Some(o.seed),
        };
        if let Some(s) = seed {
            o.seed = s;
        }
        o.validate().map_err(|e| e.to_string())?;
        let so = o.sample_options(&self.config).map_err(|e| e.to_string())?;
        let tiled = so.sampler.is_tiled();
        let view = SupirResolved {
            backend: Backend::Supir.name().into(),
            preset: preset.name().into(),
            steps: o.steps,
            cfg: o.cfg_scale,
            cfg_start: o.cfg_scale_start,
            linear_cfg: o.linear_cfg,
            control_scale: o.control_scale,
            control_start: o.control_scale_start,
            linear_control: o.linear_control_scale,
            restoration_scale: o.restoration_scale,
            s_churn: o.s_churn,
            s_noise: o.s_noise,
            color_fix: color_fix_name(o.color_fix),
            seed,
            caption: o.caption.clone(),
            positive_prompt: o.positive_prompt.clone(),
            negative_prompt: o.negative_prompt.clone(),
            sampler: sampler_name(so.sampler).into(),
            sampler_tile: tiled.then_some(so.opts.tile_size),
            sampler_stride: tiled.then_some(so.opts.tile_stride),
            upscale: o.upscale,
            min_size: o.min_size,
        };
        Ok(Resolved {
            view: ResolvedOptions::Supir(view),
            run: RunOptions::Supir(Box::new(o)),
        })
    }
}

impl SeesrSetup {
    fn validate(&self) -> Result<(), String> {
        if self.defaults.samples != 1 {
            return Err(format!(
                "--samples {}: `supir serve` makes one image per job",
                self.defaults.samples
            ));
        }
        if self.defaults.save_prompts {
            return Err(
                "--save-prompts: `supir serve` writes each prompt into its result (PNG text `supir:prompt`)"
                    .into(),
            );
        }
        self.defaults.validate().map_err(|e| e.to_string())
    }

    fn resolve(&self, j: &SeesrJobOptions, pick_seed: bool) -> Result<Resolved, String> {
        let mut o = self.defaults.clone();
        if let Some(p) = &j.preset {
            let p: supir::pipelines::seesr::SeesrPreset =
                p.parse().map_err(|e: supir::Error| e.to_string())?;
            if p != o.preset {
                return Err(format!(
                    "--preset {p}: this server loaded SeeSR's {} preset (start `supir serve --preset {p}` for it)",
                    o.preset
                ));
            }
        }
        macro_rules! set {
            ($($field:ident = $v:expr),* $(,)?) => { $(if let Some(v) = &$v { o.$field = v.clone(); })* };
        }
        set!(
            steps = j.steps,
            guidance = j.cfg,
            process_size = j.process_size,
            conditioning_scale = j.conditioning_scale,
            latent_tile = j.latent_tile,
            latent_overlap = j.latent_overlap,
            vae_encoder_tile = j.encoder_tile,
            vae_decoder_tile = j.decoder_tile,
            added_prompt = j.added_prompt,
            negative_prompt = j.negative_prompt,
        );
        if let Some(u) = j.upscale {
            if !(u.fract() == 0.0 && (1.0..=16.0).contains(&u)) {
                return Err(format!(
                    "--upscale {u}: SeeSR upscales by a whole factor, 1 to 16"
                ));
            }
            o.upscale = u as u32;
        }
        let caption = j.caption.clone().filter(|c| c != "auto");
        if let Some(p) = j.prompt.clone().or(caption) {
            o.prompt = p;
        }
        if let Some(s) = &j.start_point {
            o.start_point = s.parse::<StartPoint>().map_err(|e| e.to_string())?;
        }
        if let Some(c) = &j.color_fix {
            o.color_fix = c.parse().map_err(|e: supir::Error| e.to_string())?;
        }
        match j.seed {
            Some(s) => o.seed = Some(job_seed(s)?),
            None if o.seed.is_none() && pick_seed => o.seed = Some(random_seed()),
            None => {}
        }
        o.validate().map_err(|e| e.to_string())?;
        let view = SeesrResolved {
            backend: Backend::Seesr.name().into(),
            preset: o.preset.name().into(),
            steps: o.steps,
            cfg: o.guidance,
            upscale: o.upscale,
            process_size: o.process_size,
            conditioning_scale: o.conditioning_scale,
            start_point: o.start_point.to_string(),
            latent_tile: o.latent_tile,
            latent_overlap: o.latent_overlap,
            encoder_tile: o.vae_encoder_tile,
            decoder_tile: o.vae_decoder_tile,
            prompt: o.prompt.clone(),
            added_prompt: o.added_prompt.clone(),
            negative_prompt: o.negative_prompt.clone(),
            color_fix: color_fix_name(o.color_fix),
            seed: o.seed,
        };
        Ok(Resolved {
            view: ResolvedOptions::Seesr(view),
            run: RunOptions::Seesr(Box::new(o)),
        })
    }
}

impl ModelConfig {
    pub fn backend(&self) -> Backend {
        match self {
            Self::RealEsrgan(_) => Backend::RealEsrgan,
            Self::Supir(_) => Backend::Supir,
            Self::Seesr(_) => Backend::Seesr,
        }
    }

    /// The loaded model, in words.
    pub fn description(&self) -> String {
        match self {
            Self::RealEsrgan(_) => Backend::RealEsrgan.description().into(),
            Self::Supir(s) => format!("SUPIR, {}", s.description),
            Self::Seesr(s) => format!(
                "SeeSR, {}, preset {}",
                s.paths.seesr.display(),
                s.defaults.preset
            ),
        }
    }

    /// Checks the defaults (the server's flags), with the messages of `supir restore`.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::RealEsrgan(d) => d.validate(),
            Self::Supir(s) => s.validate(),
            Self::Seesr(s) => s.validate(),
        }
    }

    /// The options a job that gives none runs with (a random seed shows as `null`).
    pub fn defaults_view(&self) -> Result<ResolvedOptions, String> {
        Ok(self.resolve_with(&Default::default(), false)?.view)
    }

    /// A job's `options` object over the defaults, validated.
    pub fn resolve(
        &self,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Resolved, String> {
        self.resolve_with(options, true)
    }

    fn resolve_with(
        &self,
        options: &serde_json::Map<String, serde_json::Value>,
        pick_seed: bool,
    ) -> Result<Resolved, String> {
        match self {
            Self::RealEsrgan(d) => {
                let r = d.resolve(&parse_object(options)?)?;
                Ok(Resolved {
                    run: RunOptions::RealEsrgan(r.upscale_options()),
                    view: ResolvedOptions::RealEsrgan(r),
                })
            }
            Self::Supir(s) => s.resolve(&parse_object(options)?, pick_seed),
            Self::Seesr(s) => s.resolve(&parse_object(options)?, pick_seed),
        }
    }

    /// The most pixels a `w x h` input makes the job hold at once (processed or output), or
    /// why the options refuse that size.
    pub fn work_pixels(&self, run: &RunOptions, w: u32, h: u32) -> Result<f64, SizeError> {
        let px = w as f64 * h as f64;
        match run {
            // x4 inside the network, then `outscale`.
            RunOptions::RealEsrgan(o) => {
                let s = o.outscale.max(4.0);
                Ok(px * s * s)
            }
            RunOptions::Supir(o) => {
                let size = o.model_size(w, h).map_err(|e| SizeError {
                    too_large: true,
                    msg: e.to_string(),
                })?;
                let model = size.width as f64 * size.height as f64;
                Ok(model.max(px * o.upscale * o.upscale))
            }
            RunOptions::Seesr(o) => {
                let out = px * (o.upscale as f64).powi(2);
                if out > supir::pipelines::seesr::options::MAX_PIXELS as f64 * 4.0 {
                    return Err(SizeError {
                        too_large: true,
                        msg: format!(
                            "a {w}x{h} image at --upscale {} is too large for SeeSR",
                            o.upscale
                        ),
                    });
                }
                let (cw, ch) =
                    seesr_flow::control_size(w, h, o.upscale, o.process_size).map_err(|e| {
                        let msg = e.to_string();
                        SizeError {
                            too_large: msg.contains("limit"),
                            msg,
                        }
                    })?;
                Ok(out.max(cw as f64 * ch as f64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supir_setup(defaults: RestoreOptions, preset: Preset) -> ModelConfig {
        let config = SupirConfig::from_yaml_str(
            supir::pipelines::supir::restore::OFFICIAL_CONFIG,
            std::path::Path::new("SUPIR_v0.yaml"),
        )
        .unwrap();
        ModelConfig::Supir(Box::new(SupirSetup {
            config,
            checkpoints: vec![],
            description: "test".into(),
            preset,
            defaults,
            random_seed: false,
            captioner: None,
        }))
    }

    fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn supir_job_presets_keep_the_servers_own_flags() {
        // The server ran with `--preset default --steps 20`.
        let mut d = RestoreOptions::preset(Preset::Default);
        d.steps = 20;
        let m = supir_setup(d, Preset::Default);
        let r = m
            .resolve(&obj(serde_json::json!({"preset": "quality", "seed": 7})))
            .unwrap();
        let RunOptions::Supir(o) = &r.run else {
            panic!()
        };
        let q = RestoreOptions::preset(Preset::Quality);
        assert_eq!(o.steps, 20);
        assert_eq!(
            (o.cfg_scale, o.cfg_scale_start),
            (q.cfg_scale, q.cfg_scale_start)
        );
        assert_eq!(o.s_noise, q.s_noise);
        assert_eq!(o.seed, 7);
        let ResolvedOptions::Supir(v) = &r.view else {
            panic!()
        };
        assert_eq!(v.preset, "quality");
        assert_eq!(v.sampler, "edm");
        assert_eq!(v.seed, Some(7));
        // The library's messages for bad values; unknown names are refused.
        let e = m
            .resolve(&obj(serde_json::json!({"steps": 0})))
            .unwrap_err();
        assert_eq!(e, "invalid option: steps 0: must be in 1..=1000");
        let e = m
            .resolve(&obj(serde_json::json!({"seed": -2})))
            .unwrap_err();
        assert!(e.contains("--seed -2"), "{e}");
        let e = m
            .resolve(&obj(serde_json::json!({"outscale": 2})))
            .unwrap_err();
        assert!(e.contains("unknown field `outscale`"), "{e}");
        let e = m
            .resolve(&obj(serde_json::json!({"preset": "turbo"})))
            .unwrap_err();
        assert!(e.contains("unknown preset"), "{e}");
        let r = m
            .resolve(&obj(
                serde_json::json!({"seed": -1, "sampler": "tiled-edm"}),
            ))
            .unwrap();
        let ResolvedOptions::Supir(v) = &r.view else {
            panic!()
        };
        assert!(v.seed.is_some());
        assert_eq!(v.sampler, "tiled-edm");
        assert!(v.sampler_tile.is_some());
    }
}
