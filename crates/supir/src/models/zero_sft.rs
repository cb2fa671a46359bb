//! SUPIR's connectors between the GLVControl hints and the UNet decoder
//! (`ZeroSFT`, `ZeroCrossAttn` in `SUPIR/modules/SUPIR_v0.py`), keys under `project_modules.N`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Conv2d, GroupNorm};

use crate::models::unet::{conv2d, from_tokens, group_norm32, to_tokens, CrossAttention};

/// Hidden width of ZeroSFT's shared 3x3 conv (fixed in the official code).
const SFT_HIDDEN: usize = 128;
/// Head width of ZeroCrossAttn (fixed in the official code: `heads = query_dim // 64`).
const XATTN_HEAD_DIM: usize = 64;

/// Spatial feature transform of a UNet feature by a hint `c`:
/// `h' = GroupNorm([h_ori,] h + zero_conv(c)) * (1 + zero_mul(a)) + zero_add(a)` with
/// `a = SiLU(mlp_shared(c))`, returned as `h' * s + h_raw * (1 - s)` where `h_raw` is the
/// untouched input (`[h_ori, h]` when concatenating) and `s` the control scale.
#[derive(Debug, Clone)]
pub struct ZeroSFT {
    param_free_norm: GroupNorm,
    mlp_shared: Conv2d,
    zero_mul: Conv2d,
    zero_add: Conv2d,
    zero_conv: Conv2d,
    /// `concat_channels != 0`: the decoder state `h_ori` is concatenated in front of the skip.
    pre_concat: bool,
}

impl ZeroSFT {
    /// `label_nc`: hint channels; `norm_nc`: channels of `h` (the skip);
    /// `concat_channels`: channels of `h_ori` concatenated in front (0: none).
    pub fn new(
        vb: VarBuilder,
        label_nc: usize,
        norm_nc: usize,
        concat_channels: usize,
    ) -> Result<Self> {
        let total = norm_nc + concat_channels;
        Ok(Self {
            param_free_norm: group_norm32(total, vb.pp("param_free_norm"))?,
            mlp_shared: conv2d(label_nc, SFT_HIDDEN, 3, 1, vb.pp("mlp_shared.0"))?,
            zero_mul: conv2d(SFT_HIDDEN, total, 3, 1, vb.pp("zero_mul"))?,
            zero_add: conv2d(SFT_HIDDEN, total, 3, 1, vb.pp("zero_add"))?,
            zero_conv: conv2d(label_nc, norm_nc, 1, 1, vb.pp("zero_conv"))?,
            pre_concat: concat_channels != 0,
        })
    }

    /// `c`: hint `[B, label_nc, H, W]`; `h`: `[B, norm_nc, H, W]`; `h_ori`:
    /// `[B, concat_channels, H, W]` or `None` -> `[B, concat_channels + norm_nc, H, W]`.
    pub fn forward(
        &self,
        c: &Tensor,
        h: &Tensor,
        h_ori: Option<&Tensor>,
        control_scale: f64,
    ) -> Result<Tensor> {
        let h_ori = match h_ori {
            Some(o) if self.pre_concat => Some(o),
            // The official post-norm concatenation would not blend (shape mismatch); unused.
            Some(_) => candle_core::bail!("ZeroSFT without concat channels got a skip input"),
            None => None,
        };
        // The same operations as the official forward, ordered so that each full-size
        // temporary is freed as soon as it is used (at SDXL's 128x128 level each is 84 MB).
        let normed = {
            let hc = (h + self.zero_conv.forward(c)?)?;
            let hc = match h_ori {
                Some(o) => Tensor::cat(&[o, &hc], 1)?,
                None => hc,
            };
            self.param_free_norm.forward(&hc)?
        };
        let actv = self.mlp_shared.forward(c)?.silu()?;
        let scaled = (normed * (self.zero_mul.forward(&actv)? + 1.0)?)?;
        let out = (scaled + self.zero_add.forward(&actv)?)?;
        if control_scale == 1.0 {
            // `out * 1 + h_raw * 0` is `out` exactly for finite values.
            return Ok(out);
        }
        let h_raw = match h_ori {
            Some(o) => Tensor::cat(&[o, h], 1)?,
            None => h.clone(),
        };
        (out * control_scale)? + (h_raw * (1.0 - control_scale))?
    }
}

/// Cross-attention from a UNet feature `x` (queries) to a hint (keys/values), both
/// GroupNorm-ed first, added back as `x + attn * control_scale`.
#[derive(Debug, Clone)]
pub struct ZeroCrossAttn {
    attn: CrossAttention,
    norm1: GroupNorm,
    norm2: GroupNorm,
}

impl ZeroCrossAttn {
    /// `context_dim`: hint channels; `query_dim`: channels of `x`.
    pub fn new(vb: VarBuilder, context_dim: usize, query_dim: usize) -> Result<Self> {
        let heads = query_dim / XATTN_HEAD_DIM;
        Ok(Self {
            attn: CrossAttention::new(
                vb.pp("attn"),
                query_dim,
                Some(context_dim),
                heads,
                XATTN_HEAD_DIM,
            )?,
            norm1: group_norm32(query_dim, vb.pp("norm1"))?,
            norm2: group_norm32(context_dim, vb.pp("norm2"))?,
        })
    }

    /// `context`: hint `[B, context_dim, H', W']`; `x`: `[B, query_dim, H, W]` -> like `x`.
    pub fn forward(&self, context: &Tensor, x: &Tensor, control_scale: f64) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let q = to_tokens(&self.norm1.forward(x)?)?;
        let kv = to_tokens(&self.norm2.forward(context)?)?;
        let a = from_tokens(&self.attn.forward(&q, Some(&kv))?, h, w)?;
        x + (a * control_scale)?
    }
}
