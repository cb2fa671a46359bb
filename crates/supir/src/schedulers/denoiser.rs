//! The discrete EDM denoiser of SDXL (`sgm/modules/diffusionmodules/denoiser.py`,
//! `denoiser_scaling.py::EpsScaling`, `discretizer.py::LegacyDDPMDiscretization`).
//!
//! `D(x, sigma) = x + c_out * F(c_in * x, t(sigma))` with `c_in = 1 / sqrt(sigma^2 + 1)`,
//! `c_out = -sigma`, where sigma is first snapped to the nearest of the 1000 training sigmas and
//! `t` is that sigma's index (the UNet's timestep).

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// LegacyDDPMDiscretization: betas linear in sqrt between `linear_start` and `linear_end`.
#[derive(Debug, Clone)]
pub struct LegacyDdpm {
    /// `alphas_cumprod`, float64 as in the official numpy code.
    alphas_cumprod: Vec<f64>,
}

impl Default for LegacyDdpm {
    fn default() -> Self {
        Self::new(0.00085, 0.0120, 1000)
    }
}

impl LegacyDdpm {
    pub fn new(linear_start: f64, linear_end: f64, num_timesteps: usize) -> Self {
        let (a, b) = (linear_start.sqrt(), linear_end.sqrt());
        let step = if num_timesteps > 1 {
            (b - a) / (num_timesteps - 1) as f64
        } else {
            0.0
        };
        let mut cum = 1.0;
        let alphas_cumprod = (0..num_timesteps)
            .map(|i| {
                let beta = (a + step * i as f64).powi(2);
                cum *= 1.0 - beta;
                cum
            })
            .collect();
        Self { alphas_cumprod }
    }

    pub fn num_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `get_sigmas(n)`: `n` roughly equally spaced training sigmas, descending (float32).
    pub fn sigmas_descending(&self, n: usize) -> Result<Vec<f32>> {
        let total = self.num_timesteps();
        if n == 0 || n > total {
            return Err(Error::Option(format!(
                "number of steps must be in 1..={total}, got {n}"
            )));
        }
        // np.linspace(total - 1, 0, n, endpoint=False).astype(int)[::-1]
        let idx: Vec<usize> = if n == total {
            (0..total).collect()
        } else {
            let start = (total - 1) as f64;
            let step = -start / n as f64;
            (0..n)
                .rev()
                .map(|i| (start + step * i as f64) as usize)
                .collect()
        };
        Ok(idx
            .iter()
            .rev()
            .map(|&i| {
                let ac = self.alphas_cumprod[i];
                (((1.0 - ac) / ac) as f32).sqrt()
            })
            .collect())
    }

    /// The sampler's schedule: `n` sigmas descending, then a final 0 (`Discretization.__call__`).
    pub fn sampling_sigmas(&self, n: usize) -> Result<Vec<f32>> {
        let mut s = self.sigmas_descending(n)?;
        s.push(0.0);
        Ok(s)
    }

    /// All training sigmas, ascending: index `i` is timestep `i` (the denoiser's table).
    pub fn sigma_table(&self) -> Vec<f32> {
        let mut s = self
            .sigmas_descending(self.num_timesteps())
            .expect("full table");
        s.reverse();
        s
    }
}

/// `DiscreteDenoiserWithControl` with `EpsScaling`.
#[derive(Debug, Clone)]
pub struct DiscreteDenoiser {
    /// Ascending training sigmas; index = timestep.
    sigmas: Vec<f32>,
}

impl DiscreteDenoiser {
    pub fn new(discretization: &LegacyDdpm) -> Self {
        Self {
            sigmas: discretization.sigma_table(),
        }
    }

    /// Index of the nearest training sigma (the first on ties, as `argmin`).
    pub fn sigma_to_idx(&self, sigma: f32) -> usize {
        let mut best = (0, f32::INFINITY);
        for (i, &s) in self.sigmas.iter().enumerate() {
            let d = (sigma - s).abs();
            if d < best.1 {
                best = (i, d);
            }
        }
        best.0
    }

    pub fn idx_to_sigma(&self, idx: usize) -> f32 {
        self.sigmas[idx]
    }

    /// Denoises a batch: `x` [B,C,H,W], one sigma per batch row. `network(c_in * x, t)` is the
    /// control + UNet call returning eps; `t` [B] holds the timestep indices as f32.
    pub fn denoise<F>(&self, x: &Tensor, sigmas: &[f32], network: F) -> Result<Tensor>
    where
        F: FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
    {
        let b = x.dim(0)?;
        if sigmas.len() != b {
            return Err(Error::Option(format!(
                "denoiser: {} sigmas for a batch of {b}",
                sigmas.len()
            )));
        }
        let idx: Vec<usize> = sigmas.iter().map(|&s| self.sigma_to_idx(s)).collect();
        let q: Vec<f32> = idx.iter().map(|&i| self.sigmas[i]).collect();
        let c_in: Vec<f32> = q.iter().map(|&s| 1.0 / (s * s + 1.0).sqrt()).collect();
        let c_out: Vec<f32> = q.iter().map(|&s| -s).collect();
        let dev = x.device();
        let col = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), dev)?.to_dtype(x.dtype())?)
        };
        let t = Tensor::from_vec(
            idx.iter().map(|&i| i as f32).collect::<Vec<_>>(),
            b,
            &Device::Cpu,
        )?
        .to_device(dev)?;
        // The network may run in another dtype (f16/bf16 diffusion): its output comes back to
        // `x`'s dtype, as torch's type promotion does under autocast.
        let eps = network(&x.broadcast_mul(&col(c_in)?)?, &t)?.to_dtype(x.dtype())?;
        Ok((eps.broadcast_mul(&col(c_out)?)? + x)?)
    }
}
