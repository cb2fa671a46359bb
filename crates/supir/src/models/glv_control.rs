//! SUPIR's adaptor `GLVControl` (`SUPIR/modules/SUPIR_v0.py`): a trimmed trainable copy of the
//! SDXL UNet encoder (time/label embeddings, input blocks, middle block) whose first block output
//! is offset by a conv of the LQ latent. Keys under `model.control_model`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::Conv2d;

use crate::models::supir_config::UNetParams;
use crate::models::unet::conv2d;
use crate::models::unet::sdxl::UNetTrunk;

/// GLVControl: `hints = [input block outputs..., middle block output]`, run on the noisy latent
/// `xt` with `input_hint_block(control)` added after the first input block.
#[derive(Debug, Clone)]
pub struct GLVControl {
    trunk: UNetTrunk,
    input_hint_block: Conv2d,
    input_upscale: f64,
}

impl GLVControl {
    /// `vb` at `model.control_model`.
    pub fn new(vb: VarBuilder, cfg: &UNetParams) -> Result<Self> {
        let trunk = UNetTrunk::new(vb.clone(), cfg)?;
        let input_hint_block = conv2d(
            cfg.in_channels,
            cfg.model_channels,
            3,
            1,
            vb.pp("input_hint_block.0"),
        )?;
        Ok(Self {
            trunk,
            input_hint_block,
            input_upscale: cfg.input_upscale.unwrap_or(1.0),
        })
    }

    /// Number of hints returned (input blocks + middle block).
    pub fn num_hints(&self) -> usize {
        self.trunk.input_blocks.len() + 1
    }

    /// - `control`: the LQ latent `[B, in_channels, H, W]` (resized by `input_upscale` first);
    /// - `timesteps`: `[B]`; `xt`: the noisy latent `[B, in_channels, H, W]`;
    /// - `context`: `[B, M, context_dim]`; `y`: `[B, adm_in_channels]`.
    ///
    /// Returns the hints in the official order: the output of every input block, then the
    /// middle block's.
    pub fn forward(
        &self,
        control: &Tensor,
        timesteps: &Tensor,
        xt: &Tensor,
        context: &Tensor,
        y: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let dtype = control.dtype();
        let (xt, context, y) = (
            xt.to_dtype(dtype)?,
            self.trunk
                .context_memo
                .canonical(&context.to_dtype(dtype)?)?,
            y.to_dtype(dtype)?,
        );
        let control = if self.input_upscale != 1.0 {
            resize_bilinear_aa(control, self.input_upscale)?
        } else {
            control.clone()
        };
        let emb = self.trunk.embed(timesteps, Some(&y), dtype)?;
        let guided_hint = self.input_hint_block.forward(&control)?;

        let mut hs = Vec::with_capacity(self.num_hints());
        let mut h = xt;
        for (i, block) in self.trunk.input_blocks.iter().enumerate() {
            h = block.forward(&h, &emb, &context)?;
            if i == 0 {
                h = (h + &guided_hint)?;
            }
            hs.push(h.clone());
        }
        hs.push(self.trunk.middle_block.forward(&h, &emb, &context)?);
        Ok(hs)
    }
}

/// `F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True)` (align_corners False):
/// separable triangle-filter weights, widened by `1/s` when downscaling, taps outside the
/// image dropped and the rest renormalised. `[B, C, H, W]` -> `[B, C, floor(H*s), floor(W*s)]`.
fn resize_bilinear_aa(x: &Tensor, s: f64) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = (
        (h as f64 * s).floor() as usize,
        (w as f64 * s).floor() as usize,
    );
    let wh = aa_weights(h, oh, s, x)?; // [oh, h]
    let ww = aa_weights(w, ow, s, x)?; // [ow, w]
                                       // Rows: [B, C, H, W] x [W, ow] -> [B, C, H, ow]; columns: [oh, H] x [B, C, H, ow].
    let t = x.broadcast_matmul(&ww.t()?)?;
    wh.broadcast_left(x.dims()[..2].to_vec())?
        .contiguous()?
        .matmul(&t.contiguous()?)
}

/// Interpolation matrix `[out, in]` of PyTorch's antialiased bilinear kernel along one axis.
fn aa_weights(in_size: usize, out_size: usize, s: f64, like: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / s; // input pixels per output pixel
    let (support, invscale) = if scale >= 1.0 {
        (scale, 1.0 / scale)
    } else {
        (1.0, 1.0)
    };
    let filter = |v: f64| if v.abs() < 1.0 { 1.0 - v.abs() } else { 0.0 };
    let mut m = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // `as i64` truncates toward zero, like the C++ cast.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let ws: Vec<f64> = (xmin..xmax)
            .map(|j| filter((j as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = ws.iter().sum();
        for (j, wgt) in (xmin..xmax).zip(ws) {
            m[i * in_size + j] = if total != 0.0 {
                (wgt / total) as f32
            } else {
                0.0
            };
        }
    }
    Tensor::from_vec(m, (out_size, in_size), like.device())?.to_dtype(like.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn aa_upscale_by_two_is_plain_bilinear() -> Result<()> {
        // 1-D check along W: [0, 1, 2, 3] -> half-pixel bilinear with edge clamping.
        let x = Tensor::from_vec(vec![0f32, 1., 2., 3.], (1, 1, 1, 4), &Device::Cpu)?;
        let y = resize_bilinear_aa(&x, 2.0)?;
        let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        assert_eq!(y.dims(), &[1, 1, 2, 8]);
        for (g, w) in got.iter().zip(want.iter().chain(want.iter())) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        Ok(())
    }

    #[test]
    fn aa_downscale_by_two_uses_wide_triangle() -> Result<()> {
        let row = [0f32, 1., 2., 3., 4., 5.];
        let x = Tensor::from_vec([row, row].concat(), (1, 1, 2, 6), &Device::Cpu)?;
        let y = resize_bilinear_aa(&x, 0.5)?;
        assert_eq!(y.dims(), &[1, 1, 1, 3]);
        let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
        // Triangle of half-width 2 input pixels around centres 1, 3, 5; edge taps dropped.
        let want = [1.25 / 1.75, 2.5, 7.5 / 1.75];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        Ok(())
    }
}
