//! SUPIR's samplers (`sgm/modules/diffusionmodules/sampling.py`: `RestoreEDMSampler`,
//! `TiledRestoreEDMSampler`, `RestoreDPMPP2MSampler`, `TiledRestoreDPMPP2MSampler`) and the
//! guiders (`guiders.py`: `LinearCFG`, `VanillaCFG`), independent of the networks.
//!
//! A sampler walks a sigma schedule calling a [`Denoise`] callback that returns the
//! classifier-free-guided `denoised` for a latent `x` `[B, C, H, W]`: the pipeline implements it
//! by batching `[uc, c]`, running control + UNet through the discrete denoiser and applying
//! [`LinearCfg::guide`]. Every random draw comes from a [`NoiseSource`], in the official order,
//! so recorded draws can be replayed ([`ReplayNoise`]) or a seed reproduces an image
//! ([`SeededNoise`]).
//!
//! Scalar schedule maths is done in f32, as the official code does it on f32 tensors.

use std::collections::VecDeque;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::schedulers::denoiser::LegacyDdpm;
use crate::schedulers::tiling::{gaussian_weights, sliding_windows, TileWindow};
use crate::{Error, Result};

/// The constant SUPIR's schedules divide by (`RestoreEDMSampler.sigma_max`, `LinearCFG`): the
/// largest sigma of the 1000-step SDXL table, fixed whatever the first sigma of the schedule.
pub const SIGMA_MAX: f32 = 14.6146;

// ---------------------------------------------------------------------------------------------
// Guidance and schedules.

/// `LinearCFG(scale, scale_min)`: the guidance scale falls linearly with sigma,
/// `s(sigma) = (scale - scale_min) * sigma / 14.6146 + scale_min`. `VanillaCFG(scale)` is the
/// constant case `scale == scale_min`.
///
/// `batchify_sample` builds it as `LinearCfg { scale: cfg_scale_start, scale_min: cfg_scale }`
/// with `use_linear_CFG`, else `{ scale: cfg_scale, scale_min: cfg_scale }`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearCfg {
    pub scale: f64,
    pub scale_min: f64,
}

impl LinearCfg {
    pub fn new(scale: f64, scale_min: f64) -> Self {
        Self { scale, scale_min }
    }

    /// `VanillaCFG(scale)`.
    pub fn vanilla(scale: f64) -> Self {
        Self::new(scale, scale)
    }

    /// The guidance scale at `sigma` (the sigma the network sees, i.e. `sigma_hat` under churn).
    pub fn scale_at(&self, sigma: f32) -> f32 {
        (self.scale - self.scale_min) as f32 * sigma / SIGMA_MAX + self.scale_min as f32
    }

    /// `uncond + s(sigma) * (cond - uncond)` (`NoDynamicThresholding`).
    pub fn combine(&self, uncond: &Tensor, cond: &Tensor, sigma: f32) -> Result<Tensor> {
        let s = self.scale_at(sigma) as f64;
        Ok((uncond + ((cond - uncond)? * s)?)?)
    }

    /// The guider call on a `[2B, ...]` denoiser output whose first half is the unconditional
    /// branch and second half the conditional one (`prepare_inputs` order `[uc, c]`).
    pub fn guide(&self, denoised: &Tensor, sigma: f32) -> Result<Tensor> {
        let b2 = denoised.dim(0)?;
        if !b2.is_multiple_of(2) {
            return Err(Error::Option(format!(
                "guider: batch {b2} is not [uncond, cond] pairs"
            )));
        }
        let uncond = denoised.narrow(0, 0, b2 / 2)?;
        let cond = denoised.narrow(0, b2 / 2, b2 / 2)?;
        self.combine(&uncond, &cond, sigma)
    }
}

/// EDM churn: `gamma = min(s_churn / (num_sigmas - 1), sqrt(2) - 1)` when
/// `s_tmin <= sigma <= s_tmax`, else 0. `num_sigmas` counts the final zero (steps + 1).
pub fn churn_gamma(s_churn: f64, num_sigmas: usize, sigma: f32, s_tmin: f64, s_tmax: f64) -> f64 {
    let in_range = s_tmin as f32 <= sigma && sigma <= s_tmax as f32;
    if in_range && num_sigmas > 1 {
        (s_churn / (num_sigmas - 1) as f64).min(std::f64::consts::SQRT_2 - 1.0)
    } else {
        0.0
    }
}

/// Restoration-guidance weight `(sigma / 14.6146) ^ restore_cfg`: `denoised` is pulled toward
/// `x_center` by this fraction (`RestoreEDMSampler.sampler_step`, with the step's `sigma`, not
/// `sigma_hat`).
pub fn restoration_weight(sigma: f32, restore_cfg: f64) -> f32 {
    (sigma / SIGMA_MAX).powf(restore_cfg as f32)
}

/// Whether restoration guidance applies on a step ending at `next_sigma`:
/// `next_sigma > restore_cfg_s_tmin and restore_cfg > 0`.
pub fn restoration_active(next_sigma: f32, restore_cfg: f64, restore_cfg_s_tmin: f64) -> bool {
    next_sigma > restore_cfg_s_tmin as f32 && restore_cfg > 0.0
}

/// Linear control scale (`use_linear_control_scale`), from the step's `sigma`:
/// `sigma / 14.6146 * (control_scale_start - control_scale) + control_scale` (python floats).
pub fn linear_control_scale(sigma: f32, control_scale: f64, control_scale_start: f64) -> f64 {
    sigma as f64 / SIGMA_MAX as f64 * (control_scale_start - control_scale) + control_scale
}

/// `torch.linspace(0, 1, n)` in f32 (the first half stepped from the start, the second half
/// from the end, as torch does).
fn linspace01_f32(n: usize) -> Vec<f32> {
    match n {
        0 => vec![],
        1 => vec![0.0],
        _ => {
            let step = 1.0f32 / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step * i as f32
                    } else {
                        1.0 - step * (n - 1 - i) as f32
                    }
                })
                .collect()
        }
    }
}

/// `k_diffusion.sampling.get_sigmas_karras(n, sigma_min, sigma_max, rho)` in f32:
/// `(max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho)))^rho` for `ramp = linspace(0, 1, n)`,
/// then a final 0 (`n + 1` values, descending).
pub fn karras_sigmas(n: usize, sigma_min: f32, sigma_max: f32, rho: f64) -> Vec<f32> {
    let inv = (1.0 / rho) as f32;
    let (min_inv, max_inv) = (sigma_min.powf(inv), sigma_max.powf(inv));
    let mut s: Vec<f32> = linspace01_f32(n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho as f32))
        .collect();
    s.push(0.0);
    s
}

// ---------------------------------------------------------------------------------------------
// Randomness.

/// Which generator call a draw stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawKind {
    /// `torch.randn` / `torch.randn_like`: standard normals.
    Gaussian,
    /// `BrownianTreeNoiseSampler(sigma, sigma_next)`: the Brownian increment over the interval
    /// divided by `sqrt(|sigma_next - sigma|)`, i.e. standard normals.
    Brownian,
}

/// Source of every random tensor of a run, drawn in the official order: the VAE posterior
/// sample of `z_stage1`, the initial latent, then the sampler's draws. Tensors are F32 of the
/// requested shape on `dev`; callers cast to their working dtype.
pub trait NoiseSource {
    /// Standard normal tensor (`randn`, `randn_like`).
    fn randn(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor>;

    /// The DPM++2M noise for the step `sigma -> sigma_next`, already normalised to unit variance.
    fn brownian(
        &mut self,
        sigma: f32,
        sigma_next: f32,
        shape: &[usize],
        dev: &Device,
    ) -> Result<Tensor>;
}

/// A seeded generator: xoshiro256++ (seeded through SplitMix64) and Box-Muller, so a seed gives
/// the same draws on every platform and version of this crate (not torch's stream).
///
/// `brownian` returns fresh standard normals. The sampler queries one path of the Brownian
/// tree over consecutive, non-overlapping intervals; Brownian increments over disjoint
/// intervals are independent Gaussians, and the official sampler divides each by its standard
/// deviation, so independent standard normals have exactly the tree's distribution.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    s: [u64; 4],
    spare: Option<f64>,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
            spare: None,
        }
    }

    /// xoshiro256++ next output.
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in (0, 1]: 53 random bits, never 0 (safe under `ln`).
    fn uniform_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard normal (Box-Muller, both outputs used).
    pub fn normal(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1 = self.uniform_open0();
        let u2 = self.uniform_open0();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * th.sin());
        r * th.cos()
    }

    fn normals(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(dev)?)
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        self.normals(shape, dev)
    }

    fn brownian(&mut self, _: f32, _: f32, shape: &[usize], dev: &Device) -> Result<Tensor> {
        self.normals(shape, dev)
    }
}

/// Replays recorded draws in order (golden data: the `noise_NNN_<kind>` inputs of a `sample`
/// case). Errors if the draws run out, or a draw's kind or shape differs from the request.
#[derive(Debug, Clone)]
pub struct ReplayNoise {
    draws: VecDeque<(String, DrawKind, Tensor)>,
    served: usize,
}

impl ReplayNoise {
    pub fn new(draws: Vec<(String, DrawKind, Tensor)>) -> Self {
        Self {
            draws: draws.into(),
            served: 0,
        }
    }

    /// From named tensors in call order; the kind comes from the name's suffix: `..._brownian`
    /// is a Brownian draw, `..._randn` / `..._randn_like` Gaussian.
    pub fn from_named(named: Vec<(String, Tensor)>) -> Result<Self> {
        let draws = named
            .into_iter()
            .map(|(name, t)| {
                let kind = if name.ends_with("_brownian") {
                    DrawKind::Brownian
                } else if name.ends_with("_randn") || name.ends_with("_randn_like") {
                    DrawKind::Gaussian
                } else {
                    return Err(Error::Option(format!(
                        "replay noise: cannot tell the kind of draw `{name}` (expected a _randn, _randn_like or _brownian suffix)"
                    )));
                };
                Ok((name, kind, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new(draws))
    }

    /// Draws not yet used (a complete run leaves 0).
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }

    fn take(&mut self, kind: DrawKind, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let index = self.served;
        let (name, got_kind, t) = self.draws.pop_front().ok_or_else(|| {
            Error::Option(format!(
                "replay noise: draw #{index} ({kind:?} {shape:?}) requested but only {index} were recorded"
            ))
        })?;
        self.served += 1;
        if got_kind != kind {
            return Err(Error::Option(format!(
                "replay noise: draw #{index} `{name}` is {got_kind:?}, the run asks for {kind:?}"
            )));
        }
        if t.dims() != shape {
            return Err(Error::Option(format!(
                "replay noise: draw #{index} `{name}` has shape {:?}, the run asks for {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_dtype(DType::F32)?.to_device(dev)?)
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        self.take(DrawKind::Gaussian, shape, dev)
    }

    fn brownian(&mut self, _: f32, _: f32, shape: &[usize], dev: &Device) -> Result<Tensor> {
        self.take(DrawKind::Brownian, shape, dev)
    }
}

// ---------------------------------------------------------------------------------------------
// Samplers.

/// The CFG-guided denoiser the samplers call: `denoise(x, sigma, control_scale, tile)` returns
/// `denoised` shaped like `x`. `sigma` is the noise level the network sees; `tile` says which
/// window of the full latent `x` is (the pipeline slices its control latent to match).
pub trait Denoise {
    fn denoise(
        &mut self,
        x: &Tensor,
        sigma: f32,
        control_scale: f64,
        tile: Option<&TileWindow>,
    ) -> Result<Tensor>;
}

impl<F> Denoise for F
where
    F: FnMut(&Tensor, f32, f64, Option<&TileWindow>) -> Result<Tensor>,
{
    fn denoise(
        &mut self,
        x: &Tensor,
        sigma: f32,
        control_scale: f64,
        tile: Option<&TileWindow>,
    ) -> Result<Tensor> {
        self(x, sigma, control_scale, tile)
    }
}

/// The official sampler classes (`sampler_config.target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    RestoreEdm,
    TiledRestoreEdm,
    RestoreDpmpp2m,
    TiledRestoreDpmpp2m,
}

impl SamplerKind {
    /// The official class name.
    pub fn official_name(&self) -> &'static str {
        match self {
            Self::RestoreEdm => "RestoreEDMSampler",
            Self::TiledRestoreEdm => "TiledRestoreEDMSampler",
            Self::RestoreDpmpp2m => "RestoreDPMPP2MSampler",
            Self::TiledRestoreDpmpp2m => "TiledRestoreDPMPP2MSampler",
        }
    }

    pub fn is_tiled(&self) -> bool {
        matches!(self, Self::TiledRestoreEdm | Self::TiledRestoreDpmpp2m)
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    /// Accepts the official class name, optionally with its module path
    /// (`sgm.modules.diffusionmodules.sampling.RestoreEDMSampler`), or the kebab-case forms
    /// `restore-edm`, `tiled-restore-edm`, `restore-dpmpp2m`, `tiled-restore-dpmpp2m`.
    fn from_str(s: &str) -> Result<Self> {
        let name = s.rsplit('.').next().unwrap_or(s);
        Ok(match name {
            "RestoreEDMSampler" | "restore-edm" => Self::RestoreEdm,
            "TiledRestoreEDMSampler" | "tiled-restore-edm" => Self::TiledRestoreEdm,
            "RestoreDPMPP2MSampler" | "restore-dpmpp2m" => Self::RestoreDpmpp2m,
            "TiledRestoreDPMPP2MSampler" | "tiled-restore-dpmpp2m" => Self::TiledRestoreDpmpp2m,
            _ => {
                return Err(Error::Option(format!(
                    "unknown sampler `{s}` (expected RestoreEDMSampler, TiledRestoreEDMSampler, RestoreDPMPP2MSampler or TiledRestoreDPMPP2MSampler)"
                )))
            }
        })
    }
}

/// Everything a sampling run is parametrised by: the `batchify_sample` arguments plus the
/// sampler-config-only ones (tiles, eta, churn range, guidance threshold). `Default` is
/// `batchify_sample`'s defaults with the classes' constructor defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    /// Number of sigmas walked (`num_steps`).
    pub num_steps: usize,
    /// CFG scale at sigma 0 (`cfg_scale`).
    pub cfg_scale: f64,
    /// CFG scale at sigma 14.6146 when `use_linear_cfg` (`cfg_scale_start`).
    pub cfg_scale_start: f64,
    pub use_linear_cfg: bool,
    /// Adaptor strength (`control_scale`); with `use_linear_control_scale` the value at sigma 0.
    pub control_scale: f64,
    /// Control scale at sigma 14.6146 when `use_linear_control_scale` (EDM samplers only).
    pub control_scale_start: f64,
    pub use_linear_control_scale: bool,
    /// Restoration-guidance exponent tau_r (`restoration_scale` / `restore_cfg`); <= 0 is off.
    /// EDM samplers only.
    pub restoration_scale: f64,
    /// Guidance applies while the next sigma is above this (`restore_cfg_s_tmin`).
    pub restore_cfg_s_tmin: f64,
    pub s_churn: f64,
    pub s_noise: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    /// DPM++2M stochasticity (`eta`).
    pub eta: f64,
    /// Latent tile size and stride of the tiled samplers.
    pub tile_size: usize,
    pub tile_stride: usize,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            num_steps: 100,
            cfg_scale: 4.0,
            cfg_scale_start: 1.0,
            use_linear_cfg: false,
            control_scale: 1.0,
            control_scale_start: 0.0,
            use_linear_control_scale: false,
            restoration_scale: 4.0,
            restore_cfg_s_tmin: 0.05,
            s_churn: 0.0,
            s_noise: 1.003,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            eta: 1.0,
            tile_size: 128,
            tile_stride: 64,
        }
    }
}

/// The sampler-config-only keys of `sampler_config.params` (the rest are overwritten by
/// `batchify_sample`). Deserialises from the YAML config or a JSON case.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplerConfigParams {
    pub tile_size: Option<usize>,
    pub tile_stride: Option<usize>,
    pub eta: Option<f64>,
    pub s_tmin: Option<f64>,
    pub s_tmax: Option<f64>,
    pub restore_cfg_s_tmin: Option<f64>,
}

impl SamplerOptions {
    /// The guider `batchify_sample` builds.
    pub fn guider(&self) -> LinearCfg {
        if self.use_linear_cfg {
            LinearCfg::new(self.cfg_scale_start, self.cfg_scale)
        } else {
            LinearCfg::vanilla(self.cfg_scale)
        }
    }

    /// Overrides the fields present in the sampler config.
    pub fn with_config_params(mut self, p: &SamplerConfigParams) -> Self {
        if let Some(v) = p.tile_size {
            self.tile_size = v;
        }
        if let Some(v) = p.tile_stride {
            self.tile_stride = v;
        }
        if let Some(v) = p.eta {
            self.eta = v;
        }
        if let Some(v) = p.s_tmin {
            self.s_tmin = v;
        }
        if let Some(v) = p.s_tmax {
            self.s_tmax = v;
        }
        if let Some(v) = p.restore_cfg_s_tmin {
            self.restore_cfg_s_tmin = v;
        }
        self
    }
}

/// A configured sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub kind: SamplerKind,
    pub opts: SamplerOptions,
    discretization: LegacyDdpm,
}

impl Sampler {
    /// Checks the options (steps in 1..=1000; positive tile and stride for the tiled kinds).
    pub fn new(kind: SamplerKind, opts: SamplerOptions) -> Result<Self> {
        let discretization = LegacyDdpm::default();
        if opts.num_steps == 0 || opts.num_steps > discretization.num_timesteps() {
            return Err(Error::Option(format!(
                "num_steps must be in 1..={}, got {}",
                discretization.num_timesteps(),
                opts.num_steps
            )));
        }
        if kind.is_tiled() && (opts.tile_size == 0 || opts.tile_stride == 0) {
            return Err(Error::Option(format!(
                "tile size ({}) and stride ({}) must be positive",
                opts.tile_size, opts.tile_stride
            )));
        }
        Ok(Self {
            kind,
            opts,
            discretization,
        })
    }

    /// `LegacyDDPMDiscretization()(num_steps)`: the EDM samplers' schedule, `num_steps + 1`
    /// sigmas ending in 0. Its first value scales the initial noise for every kind.
    pub fn discrete_sigmas(&self) -> Result<Vec<f32>> {
        self.discretization.sampling_sigmas(self.opts.num_steps)
    }

    /// The sigmas the loop walks: the discrete schedule for EDM, Karras sigmas (rho 7) between
    /// its smallest non-zero and its largest sigma for DPM++2M.
    pub fn sigmas(&self) -> Result<Vec<f32>> {
        let s = self.discrete_sigmas()?;
        Ok(match self.kind {
            SamplerKind::RestoreEdm | SamplerKind::TiledRestoreEdm => s,
            SamplerKind::RestoreDpmpp2m | SamplerKind::TiledRestoreDpmpp2m => {
                karras_sigmas(self.opts.num_steps, s[s.len() - 2], s[0], 7.0)
            }
        })
    }

    /// Runs the sampler. `noise` is the unscaled initial latent draw (`randn_like(_z)`), scaled
    /// here by `sqrt(1 + sigma_0^2)` (`prepare_sampling_loop`); `x_center` is the restoration
    /// guidance target (`z_stage1`), required by the EDM kinds when guidance is on. The sampler
    /// draws its own churn / Brownian noise from `rng`.
    pub fn sample(
        &self,
        denoiser: &mut dyn Denoise,
        rng: &mut dyn NoiseSource,
        noise: &Tensor,
        x_center: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s0 = self.discrete_sigmas()?[0];
        let x = (noise * (1.0f32 + s0 * s0).sqrt() as f64)?;
        let restoring = self.opts.restoration_scale > 0.0;
        if let (true, Some(xc)) = (restoring, x_center) {
            if xc.dims() != x.dims() {
                return Err(Error::Option(format!(
                    "x_center shape {:?} differs from the latent {:?}",
                    xc.dims(),
                    x.dims()
                )));
            }
        }
        match self.kind {
            SamplerKind::RestoreEdm => self.edm(denoiser, rng, x, x_center),
            SamplerKind::TiledRestoreEdm => self.tiled_edm(denoiser, rng, x, x_center),
            SamplerKind::RestoreDpmpp2m => self.dpmpp2m(denoiser, rng, x),
            SamplerKind::TiledRestoreDpmpp2m => self.tiled_dpmpp2m(denoiser, rng, x),
        }
    }

    /// `RestoreEDMSampler.sampler_step`: churn (`eps` is the standard-normal draw, used when
    /// `gamma > 0`), CFG denoise at `sigma_hat`, restoration guidance, Euler step to
    /// `next_sigma`.
    #[allow(clippy::too_many_arguments)]
    pub fn edm_step(
        &self,
        denoiser: &mut dyn Denoise,
        x: &Tensor,
        sigma: f32,
        next_sigma: f32,
        gamma: f64,
        eps: Option<&Tensor>,
        x_center: Option<&Tensor>,
        tile: Option<&TileWindow>,
    ) -> Result<Tensor> {
        let o = &self.opts;
        let sigma_hat = sigma * (gamma + 1.0) as f32;
        let mut x = x.clone();
        if gamma > 0.0 {
            let eps = eps.ok_or_else(|| Error::Option("edm step: churn without noise".into()))?;
            let eps = (eps.to_dtype(x.dtype())? * o.s_noise)?;
            let amp = (sigma_hat * sigma_hat - sigma * sigma).sqrt();
            x = (x + (eps * amp as f64)?)?;
        }
        let control_scale = if o.use_linear_control_scale {
            linear_control_scale(sigma, o.control_scale, o.control_scale_start)
        } else {
            o.control_scale
        };
        let mut denoised = denoiser.denoise(&x, sigma_hat, control_scale, tile)?;
        if restoration_active(next_sigma, o.restoration_scale, o.restore_cfg_s_tmin) {
            let xc = x_center.ok_or_else(|| {
                Error::Option("restoration guidance is on but no x_center was given".into())
            })?;
            let w = restoration_weight(sigma, o.restoration_scale);
            let d_center = (&denoised - xc.to_dtype(x.dtype())?)?;
            denoised = (&denoised - (d_center * w as f64)?)?;
        }
        let d = ((&x - &denoised)? / sigma_hat as f64)?;
        Ok((x + (d * (next_sigma - sigma_hat) as f64)?)?)
    }

    fn edm(
        &self,
        denoiser: &mut dyn Denoise,
        rng: &mut dyn NoiseSource,
        mut x: Tensor,
        x_center: Option<&Tensor>,
    ) -> Result<Tensor> {
        let o = &self.opts;
        let sigmas = self.sigmas()?;
        let n = sigmas.len();
        for i in 0..n - 1 {
            let gamma = churn_gamma(o.s_churn, n, sigmas[i], o.s_tmin, o.s_tmax);
            let eps = if gamma > 0.0 {
                Some(rng.randn(x.dims(), x.device())?)
            } else {
                None
            };
            x = self.edm_step(
                denoiser,
                &x,
                sigmas[i],
                sigmas[i + 1],
                gamma,
                eps.as_ref(),
                x_center,
                None,
            )?;
        }
        Ok(x)
    }

    /// Tile windows, the `[1, 1, t, t]` Gaussian weights, and the per-pixel weight sum
    /// `count` `[1, 1, H, W]` (the same every step).
    fn tiles(&self, x: &Tensor) -> Result<(Vec<TileWindow>, Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let t = self.opts.tile_size;
        let windows = sliding_windows(h, w, t, self.opts.tile_stride)?;
        let weights = gaussian_weights(t, t, x.device())?
            .to_dtype(x.dtype())?
            .reshape((1, 1, t, t))?;
        let mut count = Tensor::zeros((1, 1, h, w), x.dtype(), x.device())?;
        for win in &windows {
            count = (count + place(&weights, win, h, w)?)?;
        }
        Ok((windows, weights, count))
    }

    /// `TiledRestoreEDMSampler`: per step one full-size noise draw (whatever gamma), an EDM step
    /// per tile on its slices of `x`, the noise and `x_center`, blended with Gaussian weights.
    fn tiled_edm(
        &self,
        denoiser: &mut dyn Denoise,
        rng: &mut dyn NoiseSource,
        mut x: Tensor,
        x_center: Option<&Tensor>,
    ) -> Result<Tensor> {
        let o = &self.opts;
        let (_, _, h, w) = x.dims4()?;
        let (windows, weights, count) = self.tiles(&x)?;
        let sigmas = self.sigmas()?;
        let n = sigmas.len();
        for i in 0..n - 1 {
            let gamma = churn_gamma(o.s_churn, n, sigmas[i], o.s_tmin, o.s_tmax);
            let eps = rng.randn(x.dims(), x.device())?;
            let mut acc = x.zeros_like()?;
            for win in &windows {
                let xc = x_center.map(|t| win.slice(t)).transpose()?;
                let out = self.edm_step(
                    denoiser,
                    &win.slice(&x)?,
                    sigmas[i],
                    sigmas[i + 1],
                    gamma,
                    Some(&win.slice(&eps)?),
                    xc.as_ref(),
                    Some(win),
                )?;
                acc = (acc + place(&out.broadcast_mul(&weights)?, win, h, w)?)?;
            }
            x = acc.broadcast_div(&count)?;
        }
        Ok(x)
    }

    /// `RestoreDPMPP2MSampler.sampler_step`: returns the new `x` and this step's `denoised`.
    /// `eps` (unit-variance Brownian noise) is needed on the second-order steps with eta != 0.
    #[allow(clippy::too_many_arguments)]
    pub fn dpmpp2m_step(
        &self,
        denoiser: &mut dyn Denoise,
        x: &Tensor,
        old_denoised: Option<&Tensor>,
        previous_sigma: Option<f32>,
        sigma: f32,
        next_sigma: f32,
        eps: Option<&Tensor>,
        tile: Option<&TileWindow>,
    ) -> Result<(Tensor, Tensor)> {
        let o = &self.opts;
        let denoised = denoiser.denoise(x, sigma, o.control_scale, tile)?;
        if next_sigma <= 0.0 {
            // t_next = +inf: mult1 = 0, mult2 = expm1(-inf) = -1, so x_standard = denoised.
            // (The official code computes the same for eta > 0; with eta = 0 it yields NaN.)
            return Ok((denoised.clone(), denoised));
        }
        let eta = o.eta as f32;
        let (t, t_next) = (-sigma.ln(), -next_sigma.ln());
        let h = t_next - t;
        let eta_h = eta * h;
        let mult1 = (-t_next).exp() / (-t).exp() * (-eta_h).exp();
        let mult2 = (-h - eta_h).exp_m1();
        let x_standard = ((x * mult1 as f64)? - (&denoised * mult2 as f64)?)?;
        let (old, prev) = match (old_denoised, previous_sigma) {
            (Some(old), Some(prev)) if next_sigma >= 1e-14 => (old, prev),
            _ => return Ok((x_standard, denoised)),
        };
        let h_last = t - (-prev.ln());
        let r = h_last / h;
        let mult3 = 1.0 + 1.0 / (2.0 * r);
        let mult4 = 1.0 / (2.0 * r);
        let denoised_d = ((&denoised * mult3 as f64)? - (old * mult4 as f64)?)?;
        let mut x = ((x * mult1 as f64)? - (denoised_d * mult2 as f64)?)?;
        if o.eta != 0.0 {
            let eps =
                eps.ok_or_else(|| Error::Option("dpm++2m step: eta > 0 without noise".into()))?;
            let amp = next_sigma * (-(-2.0 * eta_h).exp_m1()).sqrt() * o.s_noise as f32;
            let noise = (eps.to_dtype(x.dtype())? * amp as f64)?;
            x = (x + noise)?;
        }
        Ok((x, denoised))
    }

    /// Whether DPM++2M step `i` draws Brownian noise: `i > 0` and a non-zero next sigma.
    fn dpm_draws(i: usize, next_sigma: f32) -> bool {
        i > 0 && next_sigma > 1e-14
    }

    fn dpmpp2m(
        &self,
        denoiser: &mut dyn Denoise,
        rng: &mut dyn NoiseSource,
        mut x: Tensor,
    ) -> Result<Tensor> {
        let sigmas = self.sigmas()?;
        let mut old: Option<Tensor> = None;
        for i in 0..sigmas.len() - 1 {
            let (s, sn) = (sigmas[i], sigmas[i + 1]);
            let eps = if Self::dpm_draws(i, sn) {
                Some(rng.brownian(s, sn, x.dims(), x.device())?)
            } else {
                None
            };
            let prev = (i > 0).then(|| sigmas[i - 1]);
            let (nx, den) =
                self.dpmpp2m_step(denoiser, &x, old.as_ref(), prev, s, sn, eps.as_ref(), None)?;
            x = nx;
            old = Some(den);
        }
        Ok(x)
    }

    /// `TiledRestoreDPMPP2MSampler`: per tile DPM++2M steps on slices of `x`, the previous
    /// `denoised` and the step's Brownian draw; both `x` and `denoised` are blended.
    fn tiled_dpmpp2m(
        &self,
        denoiser: &mut dyn Denoise,
        rng: &mut dyn NoiseSource,
        mut x: Tensor,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (windows, weights, count) = self.tiles(&x)?;
        let sigmas = self.sigmas()?;
        let mut old: Option<Tensor> = None;
        for i in 0..sigmas.len() - 1 {
            let (s, sn) = (sigmas[i], sigmas[i + 1]);
            let eps = if Self::dpm_draws(i, sn) {
                rng.brownian(s, sn, x.dims(), x.device())?
            } else {
                x.zeros_like()?.to_dtype(DType::F32)?
            };
            let prev = (i > 0).then(|| sigmas[i - 1]);
            let mut acc_x = x.zeros_like()?;
            let mut acc_d = x.zeros_like()?;
            for win in &windows {
                let old_tile = old.as_ref().map(|t| win.slice(t)).transpose()?;
                let (tx, td) = self.dpmpp2m_step(
                    denoiser,
                    &win.slice(&x)?,
                    old_tile.as_ref(),
                    prev,
                    s,
                    sn,
                    Some(&win.slice(&eps)?),
                    Some(win),
                )?;
                acc_x = (acc_x + place(&tx.broadcast_mul(&weights)?, win, h, w)?)?;
                acc_d = (acc_d + place(&td.broadcast_mul(&weights)?, win, h, w)?)?;
            }
            x = acc_x.broadcast_div(&count)?;
            old = Some(acc_d.broadcast_div(&count)?);
        }
        Ok(x)
    }
}

/// A tile-sized tensor placed at its window in an `h x w` canvas of zeros.
fn place(t: &Tensor, win: &TileWindow, h: usize, w: usize) -> Result<Tensor> {
    Ok(t.pad_with_zeros(2, win.h0, h - win.h1)?
        .pad_with_zeros(3, win.w0, w - win.w1)?)
}
