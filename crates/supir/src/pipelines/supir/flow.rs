//! The SUPIR restoration pipeline: `SUPIR/models/SUPIR_model.py::SUPIRModel.batchify_sample`.
//!
//! 1. stage 1: `_z = scale * denoise_encoder(x).mode()` (the control latent), `x_stage1 =
//!    decode(_z)`, `z_stage1 = scale * encode(x_stage1).sample()` (the restoration-guidance
//!    target `x_center`; the posterior draw is the run's first random draw);
//! 2. conditioning: `caption + p_p` for c, `n_p` for uc, sizes 1024 / 0 / 1024;
//! 3. the initial latent `randn_like(_z)` (second draw), then the sampler with CFG on `[uc, c]`
//!    and `_z` (or its tile) as the control latent of both branches;
//! 4. `decode`, then the colour fix against `x_stage1`.
//!
//! Images are `[B, 3, H, W]` in [-1, 1] with H, W multiples of 8 (64 for SDXL practice).
//! Latent maths (sampler, guidance) runs in F32; the networks run in the model's dtype.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::pipelines::supir::conditioner::Conditioning;
use crate::pipelines::supir::model::SupirModel;
use crate::schedulers::sampler::{
    Denoise, LinearCfg, NoiseSource, Sampler, SamplerConfigParams, SamplerKind, SamplerOptions,
};
use crate::schedulers::tiling::TileWindow;
use crate::{Error, Result};

/// Stage-1 results: the control latent, the denoised image and the guidance target.
#[derive(Debug, Clone)]
pub struct Stage1 {
    /// `_z`: `scale * denoise_encoder(x).mode()` `[B, 4, H/8, W/8]`, F32.
    pub z: Tensor,
    /// `x_stage1 = decode(_z)` `[B, 3, H, W]`, F32: the colour-fix reference.
    pub x_stage1: Tensor,
    /// `z_stage1 = scale * encode(x_stage1).sample()`, F32: `x_center` of the samplers.
    pub z_stage1: Tensor,
}

/// Stage 1 (`encode_first_stage_with_denoise(use_sample=False)`, `decode_first_stage`,
/// `encode_first_stage`). Draws the posterior noise from `rng`. Runs in the VAE's dtype.
pub fn stage1(model: &SupirModel, x: &Tensor, rng: &mut dyn NoiseSource) -> Result<Stage1> {
    stage1_with(model, x, rng, None)
}

/// [`stage1`] with `on_pass` run after each of its three VAE passes (progress; an error from it,
/// e.g. [`crate::Error::Canceled`], stops there).
pub fn stage1_with(
    model: &SupirModel,
    x: &Tensor,
    rng: &mut dyn NoiseSource,
    mut on_pass: Option<OnCall<'_>>,
) -> Result<Stage1> {
    let mut pass = || on_pass.as_mut().map_or(Ok(()), |f| f());
    let dt = model.vae_dtype();
    let s = model.scale_factor;
    let x = x.to_dtype(dt)?;
    let z = model.vae.denoise_encode_scaled_mode(&x, s)?;
    crate::memory::release_free_heap();
    pass()?;
    let x_stage1 = model.vae.decode_scaled(&z, s)?.to_dtype(DType::F32)?;
    crate::memory::release_free_heap();
    pass()?;
    let moments = model.vae.encode_moments(&x_stage1.to_dtype(dt)?)?;
    crate::memory::release_free_heap();
    pass()?;
    let post = crate::models::vae::DiagonalGaussian::from_moments(&moments)?;
    let noise = rng.randn(post.mean.dims(), post.mean.device())?;
    let z_stage1 = (post.sample(&noise.to_dtype(dt)?)? * s)?;
    Ok(Stage1 {
        z: z.to_dtype(DType::F32)?,
        x_stage1,
        z_stage1: z_stage1.to_dtype(DType::F32)?,
    })
}

/// The positive (text) branch's conditioning: one for the whole latent, or one per tile of a
/// tiled sampler (the official "local prompts", `prepare_condition` with a list of captions),
/// indexed by [`TileWindow::index`]. Per-tile entries have one row each (batch of one image).
#[derive(Debug, Clone)]
pub enum PromptConditioning {
    Global(Conditioning),
    PerTile(Vec<Conditioning>),
}

impl From<Conditioning> for PromptConditioning {
    fn from(c: Conditioning) -> Self {
        Self::Global(c)
    }
}

impl PromptConditioning {
    /// The conditioning of `tile` (`None`: the untiled samplers, global conditioning only).
    pub fn for_tile(&self, tile: Option<&TileWindow>) -> Result<&Conditioning> {
        match (self, tile) {
            (Self::Global(c), _) => Ok(c),
            (Self::PerTile(v), Some(t)) => v.get(t.index).ok_or_else(|| {
                Error::Option(format!(
                    "tile #{} has no prompt ({} tile prompts)",
                    t.index,
                    v.len()
                ))
            }),
            (Self::PerTile(_), None) => Err(Error::Option(
                "per-tile prompts need a tiled sampler (the untiled one asked for the whole latent)"
                    .into(),
            )),
        }
    }
}

/// Checks per-tile prompts against the run, as the official code does (`bs=1` only, one prompt
/// per latent tile) and refuses them with an untiled sampler. `x` is the model input
/// `[B, 3, H, W]`; the latent is `H/8 x W/8`.
pub fn check_tile_prompts(count: usize, x_dims: &[usize], o: &SampleOptions) -> Result<()> {
    if !o.sampler.is_tiled() {
        return Err(Error::Option(format!(
            "per-tile prompts need a tiled sampler (TiledRestoreEDMSampler or TiledRestoreDPMPP2MSampler), not {}",
            o.sampler.official_name()
        )));
    }
    let &[b, _, h, w] = x_dims else {
        return Err(Error::Option(format!(
            "expected a [B, 3, H, W] image, got {x_dims:?}"
        )));
    };
    if b != 1 {
        return Err(Error::Option(format!(
            "per-tile prompts take one image and one sample at a time (as the official code), got a batch of {b}"
        )));
    }
    let (lh, lw) = (h / 8, w / 8);
    let (tile_size, tile_stride) = (o.opts.tile_size, o.opts.tile_stride);
    let tiles = crate::schedulers::tiling::sliding_windows(lh, lw, tile_size, tile_stride)?.len();
    if count != tiles {
        return Err(Error::TilePromptCount {
            prompts: count,
            tiles,
            image_h: h,
            image_w: w,
            latent_h: lh,
            latent_w: lw,
            tile_size,
            tile_stride,
        });
    }
    Ok(())
}

/// The CFG-guided denoiser of `batchify_sample`: `x` `[B, ...]` is doubled into `[uc, c]`, run
/// through control + UNet at `sigma` with the control latent `z` (sliced to the tile), and
/// combined by `guider` (`DiscreteDenoiserWithControl` + `LinearCFG`). With per-tile prompts,
/// tile `j` uses `c[j]`; `uc` is shared. The networks run in the model's diffusion dtype; the
/// latent maths around them stays F32 (as under torch autocast). `on_call` runs after each
/// network call (progress); an error from it (e.g. [`Error::Canceled`]) stops the sampler there.
pub struct GuidedDenoiser<'a, 'f> {
    pub model: &'a SupirModel,
    /// The control latent `_z` of the whole image.
    pub z: &'a Tensor,
    pub c: &'a PromptConditioning,
    pub uc: &'a Conditioning,
    pub guider: LinearCfg,
    pub on_call: Option<OnCall<'f>>,
}

impl Denoise for GuidedDenoiser<'_, '_> {
    fn denoise(
        &mut self,
        x: &Tensor,
        sigma: f32,
        control_scale: f64,
        tile: Option<&TileWindow>,
    ) -> Result<Tensor> {
        let dt = self.model.diffusion_dtype();
        let b = x.dim(0)?;
        let ctrl = match tile {
            Some(t) => t.slice(self.z)?,
            None => self.z.clone(),
        }
        .to_dtype(dt)?;
        let c = self.c.for_tile(tile)?;
        let x = x.to_dtype(DType::F32)?;
        let x2 = Tensor::cat(&[&x, &x], 0)?;
        let crossattn = Tensor::cat(&[&self.uc.crossattn, &c.crossattn], 0)?.to_dtype(dt)?;
        let vector = Tensor::cat(&[&self.uc.vector, &c.vector], 0)?.to_dtype(dt)?;
        let control = Tensor::cat(&[&ctrl, &ctrl], 0)?;
        let sigmas = vec![sigma; 2 * b];
        let denoised =
            self.model
                .denoise(&x2, &sigmas, &crossattn, &vector, &control, control_scale)?;
        if let Some(f) = self.on_call.as_mut() {
            f()?;
        }
        self.guider.guide(&denoised.to_dtype(DType::F32)?, sigma)
    }
}

/// Called after each network call of the sampler (progress); returning an error, e.g.
/// [`Error::Canceled`] from [`crate::jobs::CancelToken::check`], stops sampling at that call.
pub type OnCall<'a> = &'a mut dyn FnMut() -> Result<()>;

/// Everything `batchify_sample` takes besides the image and captions.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub sampler: SamplerKind,
    pub opts: SamplerOptions,
    /// Positive prompt appended to each caption (no separator).
    pub p_p: String,
    /// Negative prompt (the unconditional branch).
    pub n_p: String,
    /// `color_fix_type`.
    pub color_fix: crate::color_fix::ColorFix,
}

/// The sampled latent and stage-1 results, before decoding.
#[derive(Debug, Clone)]
pub struct SampleLatent {
    pub latent: Tensor,
    pub stage1: Stage1,
}

/// Stages 1 to 3 of `batchify_sample`: one caption per image.
pub fn sample_latent(
    model: &SupirModel,
    x: &Tensor,
    captions: &[&str],
    o: &SampleOptions,
    rng: &mut dyn NoiseSource,
) -> Result<SampleLatent> {
    let b = x.dim(0)?;
    if captions.len() != b {
        return Err(Error::Option(format!(
            "{} captions for {b} images",
            captions.len()
        )));
    }
    // Validate before any work, as the official code builds the sampler first.
    Sampler::new(o.sampler, o.opts.clone())?;
    let (c, uc) = model
        .conditioner
        .prepare_condition(captions, &o.p_p, &o.n_p)?;
    sample_latent_with(model, x, &c.into(), &uc, o, rng, None)
}

/// [`sample_latent`] with the conditioning already encoded (`c`, `uc` with one row per image of
/// `x`; `o.p_p` / `o.n_p` are not used). Conditioning draws no random numbers, so the draws are
/// those of [`sample_latent`]. Per-tile `c` is checked by [`check_tile_prompts`] before any
/// work. `on_call` runs after each network call; its error stops the run.
pub fn sample_latent_with(
    model: &SupirModel,
    x: &Tensor,
    c: &PromptConditioning,
    uc: &Conditioning,
    o: &SampleOptions,
    rng: &mut dyn NoiseSource,
    on_call: Option<OnCall<'_>>,
) -> Result<SampleLatent> {
    check_conditioning(x, c, uc, o)?;
    let st = stage1(model, x, rng)?;
    sample_from_stage1(model, st, c, uc, o, rng, on_call)
}

/// The checks [`sample_latent_with`] makes before any work: the sampler options, per-tile
/// prompts against the tiles of `x`, one conditioning row per image.
pub fn check_conditioning(
    x: &Tensor,
    c: &PromptConditioning,
    uc: &Conditioning,
    o: &SampleOptions,
) -> Result<()> {
    let b = x.dim(0)?;
    let mut conds = vec![("uc", uc)];
    match c {
        PromptConditioning::Global(c) => conds.push(("c", c)),
        PromptConditioning::PerTile(v) => {
            check_tile_prompts(v.len(), x.dims(), o)?;
            conds.extend(v.iter().map(|c| ("tile c", c)));
        }
    }
    for (name, cond) in conds {
        if cond.crossattn.dim(0)? != b || cond.vector.dim(0)? != b {
            return Err(Error::Option(format!(
                "conditioning {name} has {} rows for {b} images",
                cond.crossattn.dim(0)?
            )));
        }
    }
    Sampler::new(o.sampler, o.opts.clone())?;
    Ok(())
}

/// Stage 3 of `batchify_sample` after [`stage1`]: the initial latent (the run's next draw) and
/// the guided sampler. Needs GLVControl + UNet loaded; the VAE is not used.
pub fn sample_from_stage1(
    model: &SupirModel,
    st: Stage1,
    c: &PromptConditioning,
    uc: &Conditioning,
    o: &SampleOptions,
    rng: &mut dyn NoiseSource,
    on_call: Option<OnCall<'_>>,
) -> Result<SampleLatent> {
    model.diffusion()?;
    let sampler = Sampler::new(o.sampler, o.opts.clone())?;
    let noise = rng.randn(st.z.dims(), st.z.device())?;
    let mut den = GuidedDenoiser {
        model,
        z: &st.z,
        c,
        uc,
        guider: o.opts.guider(),
        on_call,
    };
    let latent = sampler.sample(&mut den, rng, &noise, Some(&st.z_stage1))?;
    Ok(SampleLatent { latent, stage1: st })
}

/// Stage 4 of `batchify_sample`: decode the sampled latent (VAE dtype), colour fix against
/// `x_stage1`. Returns F32.
pub fn decode_and_fix(
    model: &SupirModel,
    s: &SampleLatent,
    color_fix: crate::color_fix::ColorFix,
) -> Result<Tensor> {
    let dt = model.vae_dtype();
    let samples = model
        .vae
        .decode_scaled(&s.latent.to_dtype(dt)?, model.scale_factor)?
        .to_dtype(DType::F32)?;
    crate::color_fix::apply(color_fix, &samples, &s.stage1.x_stage1)
}

/// `batchify_sample(x, captions, ...)`: restored images `[B, 3, H, W]` in about [-1, 1], F32
/// (before `Tensor2PIL`).
pub fn batchify_sample(
    model: &SupirModel,
    x: &Tensor,
    captions: &[&str],
    o: &SampleOptions,
    rng: &mut dyn NoiseSource,
) -> Result<Tensor> {
    let s = sample_latent(model, x, captions, o, rng)?;
    decode_and_fix(model, &s, o.color_fix)
}

/// The sampler class and its config-only keys from `model.params.sampler_config`.
pub fn sampler_from_config(
    cfg: &crate::models::supir_config::SupirConfig,
) -> Result<(SamplerKind, SamplerConfigParams)> {
    let sc = &cfg.model.params.sampler_config;
    let kind: SamplerKind = sc.target.parse()?;
    let params = if sc.params.is_null() {
        SamplerConfigParams::default()
    } else {
        serde_yaml::from_value(sc.params.clone())
            .map_err(|e| Error::Option(format!("sampler_config.params: {e}")))?
    };
    Ok((kind, params))
}

fn default_num_steps() -> usize {
    100
}
fn default_restoration_scale() -> f64 {
    4.0
}
fn default_s_noise() -> f64 {
    1.003
}
fn default_cfg_scale() -> f64 {
    4.0
}
fn default_one() -> f64 {
    1.0
}
fn default_color_fix() -> String {
    "None".into()
}

/// `batchify_sample`'s keyword arguments under their official names and defaults (the form
/// of a golden `sample` case's `params`). `p_p` / `n_p` absent or `"default"` take the
/// model config's prompts.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchifyArgs {
    #[serde(default = "default_num_steps")]
    pub num_steps: usize,
    #[serde(default = "default_restoration_scale")]
    pub restoration_scale: f64,
    #[serde(default)]
    pub s_churn: f64,
    #[serde(default = "default_s_noise")]
    pub s_noise: f64,
    #[serde(default = "default_cfg_scale")]
    pub cfg_scale: f64,
    #[serde(default = "default_one")]
    pub control_scale: f64,
    #[serde(default = "default_color_fix")]
    pub color_fix_type: String,
    #[serde(default, rename = "use_linear_CFG")]
    pub use_linear_cfg: bool,
    #[serde(default)]
    pub use_linear_control_scale: bool,
    #[serde(default = "default_one")]
    pub cfg_scale_start: f64,
    #[serde(default)]
    pub control_scale_start: f64,
    #[serde(default)]
    pub p_p: Option<String>,
    #[serde(default)]
    pub n_p: Option<String>,
}

impl BatchifyArgs {
    /// Typed options for `sampler` with the sampler config's own keys (`tile_size`, `eta`...)
    /// from `config_params`, and the model config's prompts as defaults.
    pub fn to_options(
        &self,
        sampler: SamplerKind,
        config_params: &SamplerConfigParams,
        default_p_p: &str,
        default_n_p: &str,
    ) -> Result<SampleOptions> {
        let pick = |v: &Option<String>, d: &str| match v.as_deref() {
            None | Some("default") => d.to_string(),
            Some(s) => s.to_string(),
        };
        let opts = SamplerOptions {
            num_steps: self.num_steps,
            cfg_scale: self.cfg_scale,
            cfg_scale_start: self.cfg_scale_start,
            use_linear_cfg: self.use_linear_cfg,
            control_scale: self.control_scale,
            control_scale_start: self.control_scale_start,
            use_linear_control_scale: self.use_linear_control_scale,
            restoration_scale: self.restoration_scale,
            s_churn: self.s_churn,
            s_noise: self.s_noise,
            ..SamplerOptions::default()
        }
        .with_config_params(config_params);
        Ok(SampleOptions {
            sampler,
            opts,
            p_p: pick(&self.p_p, default_p_p),
            n_p: pick(&self.n_p, default_n_p),
            color_fix: self.color_fix_type.parse()?,
        })
    }
}
