//! SDXL UNet (`sgm/modules/diffusionmodules/openaimodel.py`) with SUPIR's LightGLVUNet changes.

use candle_core::{DType, Result, Tensor, D};

/// Sinusoidal embedding of (fractional) timesteps `[N]` -> `[N, dim]`: `[cos, sin]` halves
/// (`sgm.modules.diffusionmodules.util.timestep_embedding`, max_period 10000).
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let dev = timesteps.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32) * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?;
    if dim % 2 == 1 {
        let zeros = Tensor::zeros((emb.dim(0)?, 1), DType::F32, dev)?;
        return Tensor::cat(&[emb, zeros], D::Minus1);
    }
    Ok(emb)
}
