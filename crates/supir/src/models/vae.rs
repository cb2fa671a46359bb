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
//!
//! The same network serves diffusers' `AutoencoderKL` (SD-2 / SeeSR, diffusers 0.21
//! `models/autoencoder_kl.py` + `models/vae.py`), which is this architecture with other names:
//! [`VaeConfig::from_diffusers_config`] reads `vae/config.json` and
//! [`AutoencoderKL::from_diffusers`] loads `diffusion_pytorch_model.safetensors` through
//! [`diffusers_var_builder`], which maps every SGM name the network asks for to its diffusers
//! name (`down.{i}.block.{j}` -> `down_blocks.{i}.resnets.{j}`, `nin_shortcut` ->
//! `conv_shortcut`, `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`, `mid.attn_1.{norm,q,k,v,
//! proj_out}` -> `mid_block.attentions.0.{group_norm, to_q|query, to_k|key, to_v|value,
//! to_out.0|proj_attn}` (whichever naming the file has; Linear `[C, C]` read as the 1x1 conv
//! `[C, C, 1, 1]`), `norm_out` -> `conv_norm_out`, decoder `up.{i}` ->
//! `up_blocks.{levels - 1 - i}` (diffusers orders the decoder levels from low to high
//! resolution)).

use std::path::Path;

use candle_core::{bail, DType, Device, Module, Result, Shape, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::layers::{self, Conv2d, GroupNorm};

use crate::models::supir_config::{DdConfig, FirstStageParams};
use crate::models::tiled_vae::VaeTiling;

/// The autoencoder's shape, whichever config it comes from (SGM `ddconfig` or diffusers
/// `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeArch {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Encoder output / decoder input channels (`z_channels`; doubled at the encoder output).
    pub z_channels: usize,
    /// Latent channels (`embed_dim`, diffusers `latent_channels`).
    pub embed_dim: usize,
    /// Output channels of each resolution level (`ch * ch_mult[i]`, diffusers
    /// `block_out_channels`).
    pub channels: Vec<usize>,
    /// Resnet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// GroupNorm groups of every norm (eps 1e-6).
    pub groups: usize,
    /// Whether the mid block has its self-attention.
    pub mid_attention: bool,
    /// Encoder levels whose resnet blocks are each followed by self-attention (SGM
    /// `attn_resolutions`; none in diffusers' `DownEncoderBlock2D` / `UpDecoderBlock2D`).
    pub attn_levels: Vec<bool>,
    /// The same for the decoder levels (SGM counts the decoder's resolutions up from the
    /// smallest, which differs when `resolution` is not a multiple of `2^(levels - 1)`).
    pub decoder_attn_levels: Vec<bool>,
    /// Whether the encoder outputs mean and log-variance (`2 * z_channels`).
    pub double_z: bool,
}

impl VaeArch {
    /// From SGM's `ddconfig` and `embed_dim` (32 groups, `Normalize`).
    pub fn from_sgm(dd: &DdConfig, embed_dim: usize) -> Result<Self> {
        let attention = uses_attention(dd)?;
        let levels = dd.ch_mult.len();
        if levels == 0 {
            bail!("vae: empty ch_mult")
        }
        let lowest = dd.resolution >> (levels - 1);
        Ok(Self {
            in_channels: dd.in_channels,
            out_channels: dd.out_ch,
            z_channels: dd.z_channels,
            embed_dim,
            channels: dd.ch_mult.iter().map(|m| dd.ch * m).collect(),
            num_res_blocks: dd.num_res_blocks,
            groups: 32,
            mid_attention: attention,
            attn_levels: (0..levels)
                .map(|i| attention && dd.attn_resolutions.contains(&(dd.resolution >> i)))
                .collect(),
            decoder_attn_levels: (0..levels)
                .map(|i| attention && dd.attn_resolutions.contains(&(lowest << (levels - 1 - i))))
                .collect(),
            double_z: dd.double_z,
        })
    }

    fn levels(&self) -> usize {
        self.channels.len()
    }
}

/// diffusers `AutoencoderKL` config (`vae/config.json`), the keys that shape the network; the
/// defaults are `AutoencoderKL.__init__`'s.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latent scale (`vae.config.scaling_factor`; absent in SD-2's file, so diffusers' default
    /// 0.18215 applies).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn default_down_blocks() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_blocks() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_act() -> String {
    "silu".into()
}
fn default_scaling_factor() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Reads and checks a diffusers `vae/config.json`.
    pub fn from_diffusers_config(path: impl AsRef<Path>) -> crate::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| crate::Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.arch().map_err(|e| crate::Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// The network's shape; errors on what this implementation does not build (other block
    /// types or activations).
    pub fn arch(&self) -> Result<VaeArch> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            bail!("vae: empty block_out_channels")
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            bail!(
                "vae: {} down / {} up block types for {levels} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("vae: down block type `{t}` is not supported")
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("vae: up block type `{t}` is not supported")
        }
        if self.act_fn != "silu" {
            bail!("vae: act_fn `{}` is not supported", self.act_fn)
        }
        Ok(VaeArch {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            z_channels: self.latent_channels,
            embed_dim: self.latent_channels,
            channels: self.block_out_channels.clone(),
            num_res_blocks: self.layers_per_block,
            groups: self.norm_num_groups,
            mid_attention: true,
            attn_levels: vec![false; levels],
            decoder_attn_levels: vec![false; levels],
            double_z: true,
        })
    }
}

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

    /// `conv(silu?(norm(x)))` with statistics gathered elsewhere, the norm applied as the conv
    /// reads `x` where it can (`Conv2d::forward_normed`: same bits, no normalised copy).
    pub(crate) fn conv_with_stats(
        &self,
        conv: &Conv2d,
        x: &Tensor,
        mean: &Tensor,
        inv_std: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        conv.forward_normed(x, &self.gn, mean, inv_std, silu)
    }

    /// `silu(norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.gn.forward_silu(x)
    }
}

fn normalize(channels: usize, groups: usize, vb: VarBuilder) -> Result<Norm> {
    let eps = 1e-6;
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
    /// 32 groups (SGM `Normalize`).
    pub fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        Self::with_groups(vb, in_c, out_c, 32)
    }

    pub fn with_groups(vb: VarBuilder, in_c: usize, out_c: usize, groups: usize) -> Result<Self> {
        let nin_shortcut = if in_c != out_c {
            Some(conv1x1(in_c, out_c, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: normalize(in_c, groups, vb.pp("norm1"))?,
            conv1: conv3x3(in_c, out_c, vb.pp("conv1"))?,
            norm2: normalize(out_c, groups, vb.pp("norm2"))?,
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
    /// 32 groups (SGM `Normalize`).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Self::with_groups(vb, channels, 32)
    }

    pub fn with_groups(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let pointwise = |name: &str| conv1x1(channels, channels, vb.pp(name));
        Ok(Self {
            norm: normalize(channels, groups, vb.pp("norm"))?,
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
        self.conv.forward_upsampled2x(x)
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
    fn new(vb: VarBuilder, channels: usize, attention: bool, groups: usize) -> Result<Self> {
        let resnet = |name: &str| ResnetBlock::with_groups(vb.pp(name), channels, channels, groups);
        Ok(Self {
            block_1: resnet("block_1")?,
            attn_1: if attention {
                Some(AttnBlock::with_groups(vb.pp("attn_1"), channels, groups)?)
            } else {
                None
            },
            block_2: resnet("block_2")?,
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
        Self::from_arch(vb, &VaeArch::from_sgm(cfg, cfg.z_channels)?)
    }

    /// The encoder of `arch` under SGM names (`vb` at `encoder`).
    pub fn from_arch(vb: VarBuilder, arch: &VaeArch) -> Result<Self> {
        let g = arch.groups;
        let conv_in = conv3x3(arch.in_channels, arch.channels[0], vb.pp("conv_in"))?;
        let mut block_in = arch.channels[0];
        let mut down = Vec::with_capacity(arch.levels());
        for (i, &block_out) in arch.channels.iter().enumerate() {
            let vb_level = vb.pp("down").pp(i);
            let mut blocks = Vec::with_capacity(arch.num_res_blocks);
            let mut attns = Vec::new();
            for j in 0..arch.num_res_blocks {
                blocks.push(ResnetBlock::with_groups(
                    vb_level.pp("block").pp(j),
                    block_in,
                    block_out,
                    g,
                )?);
                block_in = block_out;
                if arch.attn_levels[i] {
                    attns.push(AttnBlock::with_groups(
                        vb_level.pp("attn").pp(j),
                        block_in,
                        g,
                    )?);
                }
            }
            let resample = if i + 1 != arch.levels() {
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
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(vb.pp("mid"), block_in, arch.mid_attention, g)?,
            norm_out: normalize(block_in, g, vb.pp("norm_out"))?,
            conv_out: conv3x3(
                block_in,
                (1 + arch.double_z as usize) * arch.z_channels,
                vb.pp("conv_out"),
            )?,
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
        Self::from_arch(vb, &VaeArch::from_sgm(cfg, cfg.z_channels)?)
    }

    /// The decoder of `arch` under SGM names (`vb` at `decoder`).
    pub fn from_arch(vb: VarBuilder, arch: &VaeArch) -> Result<Self> {
        let g = arch.groups;
        let levels = arch.levels();
        let mut block_in = arch.channels[levels - 1];
        let conv_in = conv3x3(arch.z_channels, block_in, vb.pp("conv_in"))?;
        let mid = Mid::new(vb.pp("mid"), block_in, arch.mid_attention, g)?;
        let mut up = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(i);
            let block_out = arch.channels[i];
            let mut blocks = Vec::with_capacity(arch.num_res_blocks + 1);
            let mut attns = Vec::new();
            for j in 0..=arch.num_res_blocks {
                blocks.push(ResnetBlock::with_groups(
                    vb_level.pp("block").pp(j),
                    block_in,
                    block_out,
                    g,
                )?);
                block_in = block_out;
                if arch.decoder_attn_levels[i] {
                    attns.push(AttnBlock::with_groups(
                        vb_level.pp("attn").pp(j),
                        block_in,
                        g,
                    )?);
                }
            }
            let resample = if i != 0 {
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
            norm_out: normalize(block_in, g, vb.pp("norm_out"))?,
            conv_out: conv3x3(block_in, arch.out_channels, vb.pp("conv_out"))?,
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
        let arch = VaeArch::from_sgm(&cfg.ddconfig, cfg.embed_dim)?;
        Self::from_arch(vb, &arch, with_denoise_encoder)
    }

    /// The network of `arch` under SGM names (`encoder.*`, `decoder.*`, `quant_conv`,
    /// `post_quant_conv`, optionally `denoise_encoder.*`).
    pub fn from_arch(vb: VarBuilder, arch: &VaeArch, with_denoise_encoder: bool) -> Result<Self> {
        if !arch.double_z {
            bail!("vae: AutoencoderKL needs ddconfig.double_z = true")
        }
        let denoise_encoder = if with_denoise_encoder {
            Some(Encoder::from_arch(vb.pp("denoise_encoder"), arch)?)
        } else {
            None
        };
        let (z, e) = (arch.z_channels, arch.embed_dim);
        Ok(Self {
            encoder: Encoder::from_arch(vb.pp("encoder"), arch)?,
            decoder: Decoder::from_arch(vb.pp("decoder"), arch)?,
            quant_conv: conv1x1(2 * z, 2 * e, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(e, z, vb.pp("post_quant_conv"))?,
            denoise_encoder,
            tiling: None,
        })
    }

    /// diffusers `AutoencoderKL.from_pretrained(vae_dir)`: `vb` over
    /// `diffusion_pytorch_model.safetensors` at its root (keys `encoder.down_blocks...`), either
    /// mid-block attention naming (see [`diffusers_var_builder`]). Latents are scaled by
    /// `cfg.scaling_factor` outside (`encode_scaled_*` / `decode_scaled`).
    pub fn from_diffusers(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let arch = cfg.arch()?;
        let vb = diffusers_var_builder(vb, arch.levels());
        Self::from_arch(vb, &arch, false)
    }

    /// Runs `enc` whole or tiled (`VAEHook` on the encoders).
    fn run_encoder(&self, enc: &Encoder, x: &Tensor) -> Result<Tensor> {
        match &self.tiling {
            Some(t) => crate::models::tiled_vae::encode(enc, x, t.encoder_tile, t.tile_dtype),
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
            Some(t) => {
                crate::models::tiled_vae::decode(&self.decoder, &z, t.decoder_tile, t.tile_dtype)
            }
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

// ------------------------------------------------------------------ diffusers names

/// A var builder that answers the SGM names [`AutoencoderKL::from_arch`] asks for with the
/// diffusers `AutoencoderKL` tensors under `vb` (a file root): see the module docs for the
/// mapping. `levels` is the number of resolution levels (`len(block_out_channels)`), needed to
/// reverse the decoder's level order. Errors (missing key, wrong shape) name the diffusers key.
pub fn diffusers_var_builder<'a>(vb: VarBuilder<'a>, levels: usize) -> VarBuilder<'a> {
    let (dtype, dev) = (vb.dtype(), vb.device().clone());
    VarBuilder::from_backend(Box::new(DiffusersNames { inner: vb, levels }), dtype, dev)
}

struct DiffusersNames<'a> {
    inner: VarBuilder<'a>,
    levels: usize,
}

/// The diffusers key of an SGM VAE key: candidates in order of preference (the first present
/// is used), and whether the tensor is a Linear `[C, C]` standing for a 1x1 conv.
fn diffusers_key(sgm: &str, levels: usize) -> (Vec<String>, bool) {
    let parts: Vec<&str> = sgm.split('.').collect();
    let resnet_leaf = |leaf: &[&str]| -> String {
        let mut leaf = leaf.to_vec();
        if leaf.first() == Some(&"nin_shortcut") {
            leaf[0] = "conv_shortcut";
        }
        leaf.join(".")
    };
    let one = |k: String| (vec![k], false);
    match parts.as_slice() {
        [net @ ("encoder" | "decoder"), "down", i, "block", j, leaf @ ..] => one(format!(
            "{net}.down_blocks.{i}.resnets.{j}.{}",
            resnet_leaf(leaf)
        )),
        [net, "down", i, "downsample", leaf @ ..] => one(format!(
            "{net}.down_blocks.{i}.downsamplers.0.{}",
            leaf.join(".")
        )),
        [net, "up", i, rest @ ..] if i.parse::<usize>().is_ok_and(|i| i < levels) => {
            let d = levels - 1 - i.parse::<usize>().expect("checked");
            match rest {
                ["block", j, leaf @ ..] => one(format!(
                    "{net}.up_blocks.{d}.resnets.{j}.{}",
                    resnet_leaf(leaf)
                )),
                ["upsample", leaf @ ..] => one(format!(
                    "{net}.up_blocks.{d}.upsamplers.0.{}",
                    leaf.join(".")
                )),
                _ => one(sgm.to_string()),
            }
        }
        [net, "mid", b @ ("block_1" | "block_2"), leaf @ ..] => {
            let r = if *b == "block_1" { 0 } else { 1 };
            one(format!("{net}.mid_block.resnets.{r}.{}", resnet_leaf(leaf)))
        }
        [net, "mid", "attn_1", "norm", leaf @ ..] => one(format!(
            "{net}.mid_block.attentions.0.group_norm.{}",
            leaf.join(".")
        )),
        [net, "mid", "attn_1", proj, leaf @ ..] => {
            let names: &[&str] = match *proj {
                "q" => &["to_q", "query"],
                "k" => &["to_k", "key"],
                "v" => &["to_v", "value"],
                "proj_out" => &["to_out.0", "proj_attn"],
                _ => return one(sgm.to_string()),
            };
            let leaf = leaf.join(".");
            let keys = names
                .iter()
                .map(|n| format!("{net}.mid_block.attentions.0.{n}.{leaf}"))
                .collect();
            (keys, leaf == "weight")
        }
        [net, "norm_out", leaf @ ..] => one(format!("{net}.conv_norm_out.{}", leaf.join("."))),
        _ => one(sgm.to_string()),
    }
}

impl DiffusersNames<'_> {
    /// The diffusers key present in the file (else the preferred one, for the error) and
    /// whether it is a Linear weight read as a 1x1 conv.
    fn resolve(&self, name: &str) -> (String, bool) {
        let (keys, linear) = diffusers_key(name, self.levels);
        let key = keys
            .iter()
            .find(|k| self.inner.contains_tensor(k))
            .unwrap_or(&keys[0])
            .clone();
        (key, linear)
    }
}

impl SimpleBackend for DiffusersNames<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let (key, linear) = self.resolve(name);
        match (linear, s.dims()) {
            (true, &[o, i, 1, 1]) => self
                .inner
                .get_with_hints_dtype((o, i), &key, h, dtype)?
                .reshape(s)?
                .to_device(dev),
            _ => self
                .inner
                .get_with_hints_dtype(s, &key, h, dtype)?
                .to_device(dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (key, linear) = self.resolve(name);
        let t = self.inner.get_unchecked_dtype(&key, dtype)?;
        let t = match (linear, t.dims()) {
            (true, &[o, i]) => t.reshape((o, i, 1, 1))?,
            _ => t,
        };
        t.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let (key, _) = self.resolve(name);
        self.inner.contains_tensor(&key)
    }
}
