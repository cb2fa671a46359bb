//! The first-stage autoencoder: SGM's `AutoencoderKL` (`sgm/models/autoencoder.py`) with the
//! encoder/decoder of `sgm/modules/diffusionmodules/model.py`, plus SUPIR's degradation-robust
//! `denoise_encoder` (a second `Encoder` under `first_stage_model.denoise_encoder.*`).
//!
//! Images are `[B, in_channels, H, W]` in [-1, 1]; latents are `[B, embed_dim, H/f, W/f]` with
//! `f = 2^(len(ch_mult) - 1)`. `encode_moments` / `decode` work on *unscaled* latents; the
//! `*_scaled` helpers apply the model's `scale_factor` the way `SUPIR_model.py` does.
//!
//! Weights are requested under their official names and shapes; build with
//! `AutoencoderKL::new(vb.pp("first_stage_model"), &cfg.model.params.first_stage_config.params, true)`.

use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::layers::{self, Conv2d, GroupNorm};

use crate::models::supir_config::{DdConfig, FirstStageParams};
use crate::models::tiled_vae::VaeTiling;

/// `Normalize`: GroupNorm with 32 groups, eps 1e-6, affine. The tiled VAE normalises with
/// statistics gathered over all tiles ([`Norm::forward_with_stats`]).
#[derive(Debug, Clone)]
pub struct Norm {
    gn: GroupNorm,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.gn.forward(x)
    }
}

impl Norm {
    /// The affine map (+ SiLU) with statistics gathered elsewhere (the tiled VAE).
    pub(crate) fn forward_with_stats(
        &self,
        x: &Tensor,
        mean: &Tensor,
        inv_std: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        self.gn.forward_with_stats(x, mean, inv_std, silu)
    }

    /// `silu(norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.gn.forward_silu(x)
    }
}

fn normalize(channels: usize, vb: VarBuilder) -> Result<Norm> {
    let (groups, eps) = (32, 1e-6);
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    let gn = GroupNorm::new(weight, bias, groups, eps)?;
    Ok(Norm { gn, groups, eps })
}

/// 3x3 convolution, stride 1, zero padding 1 (shape-preserving).
fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::load(vb, in_c, out_c, 3, 1, 1)
}

/// 1x1 convolution (a per-pixel linear map).
fn conv1x1(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::load(vb, in_c, out_c, 1, 1, 0)
}

/// Whether the config's `attn_type` builds the single-head spatial self-attention block.
/// `vanilla` and `vanilla-xformers` (`MemoryEfficientAttnBlock`) are the same maths and weights;
/// `none` is an identity with no weights.
fn uses_attention(cfg: &DdConfig) -> Result<bool> {
    match cfg.attn_type.as_deref() {
        None | Some("vanilla") | Some("vanilla-xformers") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => bail!("vae: attn_type `{other}` is not supported"),
    }
}

/// `ResnetBlock` without timestep embedding (`temb_channels = 0` in the VAE):
/// `x' + conv2(silu(norm2(conv1(silu(norm1(x))))))`, where `x'` is `nin_shortcut(x)` (1x1 conv)
/// when the channel count changes. Dropout is inference-time identity.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    pub(crate) norm1: Norm,
    pub(crate) conv1: Conv2d,
    pub(crate) norm2: Norm,
    pub(crate) conv2: Conv2d,
    pub(crate) nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        let nin_shortcut = if in_c != out_c {
            Some(conv1x1(in_c, out_c, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: normalize(in_c, vb.pp("norm1"))?,
            conv1: conv3x3(in_c, out_c, vb.pp("conv1"))?,
            norm2: normalize(out_c, vb.pp("norm2"))?,
            conv2: conv3x3(out_c, out_c, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.nin_shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// `AttnBlock`: single-head self-attention over all `H*W` positions, channels as features.
/// `q`, `k`, `v`, `proj_out` are 1x1 convs; the attention runs on the channel-first
/// `[B, C, H*W]` views so no transposed copies are made:
/// `out[:, :, i] = Σ_j softmax_j(q_i · k_j / sqrt(C)) v_j`, then `x + proj_out(out)`.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    pub(crate) norm: Norm,
    pub(crate) q: Conv2d,
    pub(crate) k: Conv2d,
    pub(crate) v: Conv2d,
    pub(crate) proj_out: Conv2d,
    pub(crate) channels: usize,
}

impl AttnBlock {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let pointwise = |name: &str| conv1x1(channels, channels, vb.pp(name));
        Ok(Self {
            norm: normalize(channels, vb.pp("norm"))?,
            q: pointwise("q")?,
            k: pointwise("k")?,
            v: pointwise("v")?,
            proj_out: pointwise("proj_out")?,
            channels,
        })
    }

    /// The attention on the normalised input `hn` (without the residual).
    pub(crate) fn attend(&self, hn: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = hn.dims4()?;
        let flat = |t: Tensor| t.reshape((b, c, h * w));
        let q = flat(self.q.forward(hn)?)?;
        let k = flat(self.k.forward(hn)?)?;
        let v = flat(self.v.forward(hn)?)?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        let out = layers::attention_channels(&q, &k, &v, scale)?;
        self.proj_out.forward(&out.reshape((b, c, h, w))?)
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x + self.attend(&self.norm.forward(x)?)?
    }
}

/// `Downsample` (with conv): zero-pad one row/column at the bottom/right only, then a 3x3
/// stride-2 conv without padding: `[B, C, H, W] -> [B, C, H/2, W/2]`.
#[derive(Debug, Clone)]
pub struct Downsample {
    pub(crate) conv: Conv2d,
}

impl Downsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 2, 0)?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x
            .pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// `Upsample` (with conv): nearest-neighbour x2, then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    pub(crate) conv: Conv2d,
}

impl Upsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// One resolution level: `num_res_blocks` (encoder) or `num_res_blocks + 1` (decoder) resnet
/// blocks, each followed by attention when the level's resolution is in `attn_resolutions`,
/// then an optional resampler.
#[derive(Debug, Clone)]
pub(crate) struct Level<R> {
    pub(crate) blocks: Vec<ResnetBlock>,
    pub(crate) attns: Vec<AttnBlock>,
    pub(crate) resample: Option<R>,
}

impl<R: Module> Level<R> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(i) {
                h = attn.forward(&h)?;
            }
        }
        match &self.resample {
            Some(r) => r.forward(&h),
            None => Ok(h),
        }
    }
}

/// `mid`: resnet block, attention (if enabled), resnet block, at constant width.
#[derive(Debug, Clone)]
pub(crate) struct Mid {
    pub(crate) block_1: ResnetBlock,
    pub(crate) attn_1: Option<AttnBlock>,
    pub(crate) block_2: ResnetBlock,
}

impl Mid {
    fn new(vb: VarBuilder, channels: usize, attention: bool) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), channels, channels)?,
            attn_1: if attention {
                Some(AttnBlock::new(vb.pp("attn_1"), channels)?)
            } else {
                None
            },
            block_2: ResnetBlock::new(vb.pp("block_2"), channels, channels)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.block_1.forward(x)?;
        if let Some(attn) = &self.attn_1 {
            h = attn.forward(&h)?;
        }
        self.block_2.forward(&h)
    }
}

/// SGM `Encoder`: `[B, in_channels, H, W] -> [B, (1 + double_z) * z_channels, H/f, W/f]`.
/// `conv_in` to `ch`, then per level `i` resnet blocks to `ch * ch_mult[i]` and a downsample
/// (except the last level), `mid`, `norm_out`, SiLU, `conv_out`.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub(crate) conv_in: Conv2d,
    pub(crate) down: Vec<Level<Downsample>>,
    pub(crate) mid: Mid,
    pub(crate) norm_out: Norm,
    pub(crate) conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &DdConfig) -> Result<Self> {
        let attention = uses_attention(cfg)?;
        let levels = cfg.ch_mult.len();
        let conv_in = conv3x3(cfg.in_channels, cfg.ch, vb.pp("conv_in"))?;
        let mut curr_res = cfg.resolution;
        let mut block_in = cfg.ch;
        let mut down = Vec::with_capacity(levels);
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let vb_level = vb.pp("down").pp(i);
            let block_out = cfg.ch * mult;
            let with_attn = attention && cfg.attn_resolutions.contains(&curr_res);
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks);
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    vb_level.pp("block").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if with_attn {
                    attns.push(AttnBlock::new(vb_level.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i + 1 != levels {
                curr_res /= 2;
                Some(Downsample::new(vb_level.pp("downsample"), block_in)?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        let z_out = if cfg.double_z {
            2 * cfg.z_channels
        } else {
            cfg.z_channels
        };
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(vb.pp("mid"), block_in, attention)?,
            norm_out: normalize(block_in, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, z_out, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            h = level.forward(&h)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// SGM `Decoder`: `[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]`.
/// `conv_in` to `ch * ch_mult[last]`, `mid`, then levels from the last to the first (weights
/// `up.{i}` keep the level index `i`), each `num_res_blocks + 1` resnet blocks to
/// `ch * ch_mult[i]` and an upsample (except level 0), `norm_out`, SiLU, `conv_out`.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub(crate) conv_in: Conv2d,
    pub(crate) mid: Mid,
    /// Indexed by level `i` (`up.{i}`), run in reverse.
    pub(crate) up: Vec<Level<Upsample>>,
    pub(crate) norm_out: Norm,
    pub(crate) conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &DdConfig) -> Result<Self> {
        let attention = uses_attention(cfg)?;
        let levels = cfg.ch_mult.len();
        let Some(&last_mult) = cfg.ch_mult.last() else {
            bail!("vae: empty ch_mult")
        };
        let mut block_in = cfg.ch * last_mult;
        let mut curr_res = cfg.resolution >> (levels - 1);
        let conv_in = conv3x3(cfg.z_channels, block_in, vb.pp("conv_in"))?;
        let mid = Mid::new(vb.pp("mid"), block_in, attention)?;
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(i);
            let block_out = cfg.ch * cfg.ch_mult[i];
            let with_attn = attention && cfg.attn_resolutions.contains(&curr_res);
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks + 1);
            let mut attns = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    vb_level.pp("block").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if with_attn {
                    attns.push(AttnBlock::new(vb_level.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i != 0 {
                curr_res *= 2;
                Some(Upsample::new(vb_level.pp("upsample"), block_in)?)
            } else {
                None
            };
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: normalize(block_in, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, cfg.out_ch, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            h = level.forward(&h)?;
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// `DiagonalGaussianDistribution` over latents, from `moments = [B, 2*E, h, w]`: the first `E`
/// channels are the mean, the rest the log-variance, clamped to [-30, 20].
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let chunks = moments.chunk(2, 1)?;
        let [mean, logvar] = <[Tensor; 2]>::try_from(chunks)
            .map_err(|_| candle_core::Error::Msg("vae: moments need 2 chunks".into()))?;
        Ok(Self {
            mean,
            logvar: logvar.clamp(-30f32, 20f32)?,
        })
    }

    /// The mean (the posterior's mode).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise`, `noise` a standard normal draw of the mean's shape (passed in so
    /// recorded draws can be replayed).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.std()? * noise)?
    }
}

/// `AutoencoderKL` (inference) with SUPIR's optional `denoise_encoder`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    /// `[2*z, 2*E]` 1x1 conv from encoder output to moments.
    pub quant_conv: Conv2d,
    /// `[E, z]` 1x1 conv from latent to decoder input.
    pub post_quant_conv: Conv2d,
    /// SUPIR's degradation-robust encoder, same structure as `encoder`.
    pub denoise_encoder: Option<Encoder>,
    /// Tiled encoders and decoder (`init_tile_vae`); `None` runs them on the whole image.
    pub tiling: Option<VaeTiling>,
}

impl AutoencoderKL {
    /// `vb` at `first_stage_model`; `with_denoise_encoder` also loads `denoise_encoder.*`
    /// (always present in SUPIR checkpoints, absent in a plain SDXL VAE).
    pub fn new(vb: VarBuilder, cfg: &FirstStageParams, with_denoise_encoder: bool) -> Result<Self> {
        let dd = &cfg.ddconfig;
        if !dd.double_z {
            bail!("vae: AutoencoderKL needs ddconfig.double_z = true")
        }
        let denoise_encoder = if with_denoise_encoder {
            Some(Encoder::new(vb.pp("denoise_encoder"), dd)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), dd)?,
            decoder: Decoder::new(vb.pp("decoder"), dd)?,
            quant_conv: conv1x1(2 * dd.z_channels, 2 * cfg.embed_dim, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(cfg.embed_dim, dd.z_channels, vb.pp("post_quant_conv"))?,
            denoise_encoder,
            tiling: None,
        })
    }

    /// Runs `enc` whole or tiled (`VAEHook` on the encoders).
    fn run_encoder(&self, enc: &Encoder, x: &Tensor) -> Result<Tensor> {
        match &self.tiling {
            Some(t) => crate::models::tiled_vae::encode(enc, x, t.encoder_tile),
            None => enc.forward(x),
        }
    }

    /// `quant_conv(encoder(x))`: `[B, C, H, W] -> [B, 2*E, H/f, W/f]`.
    pub fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        self.quant_conv
            .forward(&self.run_encoder(&self.encoder, x)?)
    }

    /// `quant_conv(denoise_encoder(x))`; errors if the denoise encoder was not loaded.
    pub fn denoise_encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let Some(enc) = &self.denoise_encoder else {
            bail!("vae: built without denoise_encoder")
        };
        self.quant_conv.forward(&self.run_encoder(enc, x)?)
    }

    /// `decoder(post_quant_conv(z))` on an unscaled latent `[B, E, h, w] -> [B, out_ch, h*f, w*f]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.post_quant_conv.forward(z)?;
        match &self.tiling {
            Some(t) => crate::models::tiled_vae::decode(&self.decoder, &z, t.decoder_tile),
            None => self.decoder.forward(&z),
        }
    }

    /// `scale_factor * mode(encode(x))` (`encode_first_stage_with_denoise` path, plain encoder).
    pub fn encode_scaled_mode(&self, x: &Tensor, scale_factor: f64) -> Result<Tensor> {
        let moments = self.encode_moments(x)?;
        DiagonalGaussian::from_moments(&moments)?.mode() * scale_factor
    }

    /// `scale_factor * mode(denoise_encode(x))`: SUPIR's `encode_first_stage_with_denoise(use_sample=False)`.
    pub fn denoise_encode_scaled_mode(&self, x: &Tensor, scale_factor: f64) -> Result<Tensor> {
        let moments = self.denoise_encode_moments(x)?;
        DiagonalGaussian::from_moments(&moments)?.mode() * scale_factor
    }

    /// `scale_factor * sample(encode(x))` with the standard normal draw `noise`: SUPIR's
    /// `encode_first_stage` (the `AutoencoderKLInferenceWrapper` samples the posterior).
    pub fn encode_scaled_sample(
        &self,
        x: &Tensor,
        noise: &Tensor,
        scale_factor: f64,
    ) -> Result<Tensor> {
        let moments = self.encode_moments(x)?;
        DiagonalGaussian::from_moments(&moments)?.sample(noise)? * scale_factor
    }

    /// `decode(z / scale_factor)`: SUPIR's `decode_first_stage`.
    pub fn decode_scaled(&self, z_scaled: &Tensor, scale_factor: f64) -> Result<Tensor> {
        self.decode(&(z_scaled * (1.0 / scale_factor))?)
    }
}
