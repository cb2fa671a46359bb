//! The assembled SUPIR model (`SUPIR/models/SUPIR_model.py::SUPIRModel`): conditioner, VAE with
//! denoise encoder, GLVControl, LightGLVUNet and the discrete denoiser, from one config and a
//! list of checkpoints (SDXL base first, then the SUPIR file).

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::SupirConfig;
use crate::denoiser::{DiscreteDenoiser, LegacyDdpm};
use crate::vae::AutoencoderKL;
use crate::weights::WeightSource;
use crate::Result;

pub struct SupirModel {
    /// `first_stage_model`, with `denoise_encoder`.
    pub vae: AutoencoderKL,
    pub denoiser: DiscreteDenoiser,
    pub scale_factor: f64,
}

impl SupirModel {
    /// Builds every network from `vb` (the root of the official state dict).
    pub fn new(vb: VarBuilder, cfg: &SupirConfig) -> Result<Self> {
        let p = &cfg.model.params;
        let vae = AutoencoderKL::new(
            vb.pp("first_stage_model"),
            &p.first_stage_config.params,
            true,
        )?;
        Ok(Self {
            vae,
            denoiser: DiscreteDenoiser::new(&LegacyDdpm::default()),
            scale_factor: p.scale_factor,
        })
    }

    /// Loads the checkpoints (later files override earlier ones) in `dtype` on `dev`.
    pub fn load<P: AsRef<Path>>(
        cfg: &SupirConfig,
        checkpoints: &[P],
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let vb = WeightSource::open(checkpoints)?.into_var_builder(dtype, dev);
        Self::new(vb, cfg)
    }
}
