//! DDPM as SeeSR samples with it: diffusers 0.21 `DDPMScheduler` loaded from a folder's
//! `scheduler_config.json` (SD-2-base ships a PNDM config, sd-turbo an Euler one; `test_seesr.py`
//! reads either into `DDPMScheduler`, so only the keys DDPM knows matter).
//!
//! Schedule maths runs in f32 as the official code does on f32 tensors: `betas` from an f32
//! `linspace` (torch's two-sided evaluation), `alphas_cumprod` an f32 running product.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::{Error, Result};

/// How `betas` are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end)) ** 2` (Stable Diffusion).
    ScaledLinear,
}

/// Where the inference timesteps sit (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// `round(linspace(0, T - 1, n))`, descending.
    Linspace,
    /// `arange(n) * (T // n) + steps_offset`, descending (SD-2-base: 981, 961, ..., 1 for 50).
    Leading,
    /// `round(arange(T, 0, -T / n)) - 1` (sd-turbo: 999, 499 for 2).
    Trailing,
}

/// What the network predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    Sample,
    VPrediction,
}

/// The added variance of a step (`variance_type`; the learned kinds need a variance output,
/// which SD UNets do not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// `(1 - acp_prev) / (1 - acp_t) * beta_t`, clamped at 1e-20.
    FixedSmall,
    /// `beta_t`.
    FixedLarge,
}

fn d_train() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn d_variance() -> VarianceType {
    VarianceType::FixedSmall
}
fn d_true() -> bool {
    true
}
fn d_prediction() -> Prediction {
    Prediction::Epsilon
}
fn d_range() -> f64 {
    1.0
}
fn d_spacing() -> Spacing {
    Spacing::Leading
}

/// `DDPMScheduler`'s config keys with their diffusers 0.21 defaults; other keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct DdpmConfig {
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_schedule")]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_variance")]
    pub variance_type: VarianceType,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_prediction")]
    pub prediction_type: Prediction,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "d_range")]
    pub clip_sample_range: f64,
    #[serde(default = "d_spacing")]
    pub timestep_spacing: Spacing,
    #[serde(default)]
    pub steps_offset: usize,
}

impl DdpmConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Option(msg) => Error::Config {
                path: path.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| Error::Option(format!("not a DDPM scheduler config: {e}")))?;
        if cfg.thresholding {
            return Err(Error::Option(
                "scheduler config: `thresholding` is not supported".into(),
            ));
        }
        if cfg.num_train_timesteps < 2 {
            return Err(Error::Option(format!(
                "scheduler config: num_train_timesteps {} (need at least 2)",
                cfg.num_train_timesteps
            )));
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                return Err(Error::Option(format!(
                    "scheduler config: {} trained_betas for {} timesteps",
                    b.len(),
                    cfg.num_train_timesteps
                )));
            }
        }
        Ok(cfg)
    }
}

/// torch's f32 `linspace(start, end, steps)`: the first half counted up from `start`, the second
/// half down from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `DDPMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    cfg: DdpmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
}

impl DdpmScheduler {
    /// The schedule of `cfg` with `num_inference_steps` timesteps.
    pub fn new(cfg: DdpmConfig, num_inference_steps: usize) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => {
                linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(cfg.beta_start.sqrt() as f32, cfg.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|r| r * r)
                    .collect()
            }
        };
        let mut acc = 1f32;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let mut s = Self {
            cfg,
            alphas_cumprod,
            timesteps: vec![],
        };
        s.set_timesteps(num_inference_steps)?;
        Ok(s)
    }

    /// `set_timesteps(n)`: the descending inference timesteps for the configured spacing.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let t = self.cfg.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error::Option(format!(
                "steps {steps} out of range 1..={t} (the scheduler's training timesteps)"
            )));
        }
        let ts: Vec<i64> = match self.cfg.timestep_spacing {
            Spacing::Linspace => {
                // numpy float64 linspace, rounded half to even.
                let step = (t - 1) as f64 / (steps.max(2) - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|i| {
                        let v = if steps == 1 { 0.0 } else { i as f64 * step };
                        v.round_ties_even() as i64
                    })
                    .collect()
            }
            Spacing::Leading => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.cfg.steps_offset) as i64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                // numpy arange(T, 0, -ratio): T - i * ratio while > 0.
                (0..)
                    .map(|i| t as f64 - i as f64 * ratio)
                    .take_while(|&v| v > 0.0)
                    .map(|v| v.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        // diffusers 0.21 sets such timesteps (leading spacing: 1000 steps with steps_offset 1
        // give 1000, 999, ..., 1) and then fails in the first `step`, indexing
        // `alphas_cumprod[1000]`: refused here, before any work.
        if let Some(bad) = ts.iter().find(|&&x| x < 0 || x as usize >= t) {
            return Err(Error::Option(format!(
                "scheduler: {steps} steps ({} spacing, steps_offset {}) start at timestep {bad}, outside the {t} trained timesteps 0..{t}; use fewer steps",
                format!("{:?}", self.cfg.timestep_spacing).to_lowercase(),
                self.cfg.steps_offset
            )));
        }
        self.timesteps = ts.into_iter().map(|x| x as usize).collect();
        Ok(())
    }

    pub fn config(&self) -> &DdpmConfig {
        &self.cfg
    }

    /// The inference timesteps, descending.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// `alphas_cumprod` over the training timesteps (f32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `init_noise_sigma` (1 for DDPM).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn acp(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::Option(format!(
                "timestep {t} outside the schedule's 0..{}",
                self.alphas_cumprod.len()
            ))
        })
    }

    /// `add_noise`: `sqrt(acp_t) x0 + sqrt(1 - acp_t) noise`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        let a = self.acp(t)?;
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        Ok(((original * sa as f64)? + (noise * sb as f64)?)?)
    }

    /// `previous_timestep`: `t - T // n` (negative: before the schedule, `acp` 1).
    fn prev_alpha(&self, t: usize) -> Result<f32> {
        let stride = self.cfg.num_train_timesteps / self.timesteps.len().max(1);
        if t >= stride {
            self.acp(t - stride)
        } else {
            Ok(1.0)
        }
    }

    /// Whether `step` at `t` adds variance noise (and so draws one): `t > 0`.
    pub fn draws_noise(&self, t: usize) -> bool {
        t > 0
    }

    /// `step(model_output, t, sample)` -> `prev_sample`; `variance_noise` is the standard normal
    /// draw the official step makes when `t > 0` (ignored, and may be `None`, at `t = 0`).
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        variance_noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let a_t = self.acp(t)?;
        let a_prev = self.prev_alpha(t)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let x0 = match self.cfg.prediction_type {
            Prediction::Epsilon => {
                ((sample - (model_output * b_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?
            }
            Prediction::Sample => model_output.clone(),
            Prediction::VPrediction => {
                ((sample * a_t.sqrt() as f64)? - (model_output * b_t.sqrt() as f64)?)?
            }
        };
        let x0 = if self.cfg.clip_sample {
            let r = self.cfg.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let c_x0 = a_prev.sqrt() * cur_beta / b_t;
        let c_x = cur_alpha.sqrt() * b_prev / b_t;
        let prev = ((x0 * c_x0 as f64)? + (sample * c_x as f64)?)?;
        if !self.draws_noise(t) {
            return Ok(prev);
        }
        let noise = variance_noise.ok_or_else(|| {
            Error::Option(format!("DDPM step at t = {t} needs a variance noise draw"))
        })?;
        let variance = match self.cfg.variance_type {
            VarianceType::FixedSmall => (b_prev / b_t * cur_beta).max(1e-20),
            VarianceType::FixedLarge => cur_beta,
        };
        Ok((prev + (noise * variance.sqrt() as f64)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd2(spacing: &str) -> DdpmConfig {
        DdpmConfig::from_json(&format!(
            r#"{{"num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "{spacing}",
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}}"#
        ))
        .unwrap()
    }

    /// diffusers 0.21 `set_timesteps` with leading spacing: `arange(n) * (1000 // n) + 1`,
    /// descending. For n = 1000 that starts at 1000, which its `step` cannot index (the
    /// official pipeline fails there): refused with a message naming the cause.
    #[test]
    fn leading_spacing_with_offset_refuses_1000_steps_and_accepts_999() {
        let s = DdpmScheduler::new(sd2("leading"), 999).unwrap();
        assert_eq!(s.timesteps().len(), 999);
        assert_eq!((s.timesteps()[0], s.timesteps()[998]), (999, 1));
        let s = DdpmScheduler::new(sd2("leading"), 50).unwrap();
        assert_eq!((s.timesteps()[0], s.timesteps()[49]), (981, 1));
        let e = DdpmScheduler::new(sd2("leading"), 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1000 steps") && e.contains("timestep 1000") && e.contains("fewer steps"),
            "{e}"
        );
        // Trailing spacing (SD-Turbo's) gives 999..0 for 1000 steps, as diffusers does.
        let s = DdpmScheduler::new(sd2("trailing"), 1000).unwrap();
        assert_eq!((s.timesteps()[0], s.timesteps()[999]), (999, 0));
    }
}
