//! The UNet building blocks shared by every UNet of the crate, and the UNets built from them:
//! - [`sdxl`]: the SDXL UNet of SGM (`sgm/modules/diffusionmodules/openaimodel.py`,
//!   `sgm/modules/attention.py`) with SUPIR's LightGLVUNet changes (`SUPIR/modules/SUPIR_v0.py`);
//!   its encoder half is shared with [`crate::models::glv_control::GLVControl`];
//! - [`sd2`]: diffusers' `UNet2DConditionModel` (SD-2 layout) with SeeSR's representation
//!   cross-attention (`image_attentions`); its encoder half is shared with
//!   [`crate::models::controlnet::ControlNetModel`].
//!
//! The blocks ([`ResBlock`], [`Downsample`], [`Upsample`], [`CrossAttention`], [`FeedForward`],
//! [`BasicTransformerBlock`], [`SpatialTransformer`], [`TimestepMlp`], [`timestep_embedding`])
//! are one implementation of the maths, sized by their callers from the configs; the two
//! checkpoint conventions differ only in names, chosen at load by [`Naming`]. Layout is NCHW.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor, TensorId, D};
use candle_nn::VarBuilder;

use crate::layers::{self, Conv2d, GroupNorm, LayerNorm, Linear};

pub mod sd2;
pub mod sdxl;

pub use sdxl::LightGLVUNet;

/// Sinusoidal embedding of (fractional) timesteps `[N]` -> `[N, dim]`: `[cos, sin]` halves
/// (`sgm.modules.diffusionmodules.util.timestep_embedding`, max_period 10000); the same as
/// diffusers' `get_timestep_embedding` with `flip_sin_to_cos`, shift 0.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    sinusoidal_embedding(timesteps, dim, true, 0.0)
}

/// diffusers' `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift)`
/// (max_period 10000, scale 1): frequencies `exp(-ln(10000) i / (dim/2 - shift))` in f32,
/// halves `[sin, cos]`, swapped to `[cos, sin]` when `flip_sin_to_cos`; an odd `dim` gets a
/// zero column. `[N]` (any dtype, widened to f32) -> `[N, dim]` f32.
pub fn sinusoidal_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let dev = timesteps.device();
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32) * i as f32 / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?
    } else {
        Tensor::cat(&[args.sin()?, args.cos()?], D::Minus1)?
    };
    if dim % 2 == 1 {
        let zeros = Tensor::zeros((emb.dim(0)?, 1), DType::F32, dev)?;
        return Tensor::cat(&[emb, zeros], D::Minus1);
    }
    Ok(emb)
}

// ---------------------------------------------------------------------------- naming, norms

/// Checkpoint naming convention of the shared blocks.
///
/// | block | [`Naming::Sgm`] | [`Naming::Diffusers`] |
/// |---|---|---|
/// | ResBlock | `in_layers.0`, `in_layers.2`, `emb_layers.1`, `out_layers.0`, `out_layers.3`, `skip_connection` | `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut` |
/// | Downsample | `op` | `conv` |
/// | time MLP | `0`, `2` | `linear_1`, `linear_2` |
///
/// The transformer blocks (`attn1`, `attn2`, `ff.net.*`, `norm1..3`, `proj_in/out`, `norm`)
/// and the upsampler (`conv`) have the same names in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Sgm,
    Diffusers,
}

/// Group count and epsilon of a block's GroupNorms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormSpec {
    pub groups: usize,
    pub eps: f64,
}

impl NormSpec {
    /// openaimodel's `normalization(ch)` (GroupNorm32): 32 groups, eps 1e-5.
    pub const SGM: NormSpec = NormSpec {
        groups: 32,
        eps: 1e-5,
    };

    pub(crate) fn load(self, vb: VarBuilder, channels: usize) -> Result<GroupNorm> {
        GroupNorm::load(vb, self.groups, channels, self.eps)
    }
}

// ---------------------------------------------------------------------------- small helpers

/// `normalization(ch)` of openaimodel (GroupNorm32): 32 groups, eps 1e-5, affine.
pub(crate) fn group_norm32(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    NormSpec::SGM.load(vb, channels)
}

/// `k x k` convolution with "same" padding (`k / 2`) and the given stride, with bias.
pub(crate) fn conv2d(
    in_ch: usize,
    out_ch: usize,
    k: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Conv2d::load(vb, in_ch, out_ch, k, stride, k / 2)
}

/// `[B, C, H, W]` -> `[B, H*W, C]` (contiguous).
pub(crate) fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// `[B, H*W, C]` -> `[B, C, H, W]` (contiguous).
pub(crate) fn from_tokens(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
}

// ---------------------------------------------------------------------------- time MLP

/// The timestep MLP `linear_2(silu(linear_1(x)))` (SGM `time_embed` / `label_emb.0`,
/// diffusers `TimestepEmbedding` with SiLU and no post-activation): `[B, in]` -> `[B, out]`.
#[derive(Debug, Clone)]
pub struct TimestepMlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepMlp {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, naming: Naming) -> Result<Self> {
        let (n1, n2) = match naming {
            Naming::Sgm => ("0", "2"),
            Naming::Diffusers => ("linear_1", "linear_2"),
        };
        Ok(Self {
            linear_1: Linear::load(vb.pp(n1), in_dim, out_dim, true)?,
            linear_2: Linear::load(vb.pp(n2), out_dim, out_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

// ---------------------------------------------------------------------------- ResBlock

/// SGM `ResBlock` / diffusers `ResnetBlock2D` without up/down sampling, with the plain
/// ("default", not scale-shift) time embedding and SiLU:
/// `(skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(emb)))))) / output_scale`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb_proj: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    /// 1x1 conv when the channel count changes, identity otherwise.
    skip: Option<Conv2d>,
    /// diffusers' `output_scale_factor` (1: none).
    output_scale: f64,
}

impl ResBlock {
    /// `norm`: both GroupNorms (diffusers `groups` = `groups_out`, `eps`).
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        emb_ch: usize,
        out_ch: usize,
        norm: NormSpec,
        naming: Naming,
    ) -> Result<Self> {
        let [n1, c1, e, n2, c2, s] = match naming {
            Naming::Sgm => [
                "in_layers.0",
                "in_layers.2",
                "emb_layers.1",
                "out_layers.0",
                "out_layers.3",
                "skip_connection",
            ],
            Naming::Diffusers => [
                "norm1",
                "conv1",
                "time_emb_proj",
                "norm2",
                "conv2",
                "conv_shortcut",
            ],
        };
        let skip = if in_ch == out_ch {
            None
        } else {
            Some(conv2d(in_ch, out_ch, 1, 1, vb.pp(s))?)
        };
        Ok(Self {
            in_norm: norm.load(vb.pp(n1), in_ch)?,
            in_conv: conv2d(in_ch, out_ch, 3, 1, vb.pp(c1))?,
            emb_proj: Linear::load(vb.pp(e), emb_ch, out_ch, true)?,
            out_norm: norm.load(vb.pp(n2), out_ch)?,
            out_conv: conv2d(out_ch, out_ch, 3, 1, vb.pp(c2))?,
            skip,
            output_scale: 1.0,
        })
    }

    /// Divides the output by `s` (diffusers' `output_scale_factor`).
    pub fn with_output_scale(mut self, s: f64) -> Self {
        self.output_scale = s;
        self
    }

    /// `x`: `[B, in, H, W]`, `emb`: `[B, emb_ch]` -> `[B, out, H, W]`.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.in_conv.forward(&self.in_norm.forward_silu(x)?)?;
        let e = self
            .emb_proj
            .forward(&emb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&e)?;
        // out_layers: norm, SiLU, dropout (inference: identity), conv.
        let h = self.out_conv.forward(&self.out_norm.forward_silu(&h)?)?;
        let out = match &self.skip {
            Some(conv) => (conv.forward(x)? + h)?,
            None => (x + h)?,
        };
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

// ---------------------------------------------------------------------------- resampling

/// Strided 3x3 conv halving H and W (SGM `Downsample` with `use_conv`, key `op`; diffusers
/// `Downsample2D` with `use_conv`, key `conv`). Padding 1, or 0 after a zero row and column
/// at the bottom and right (diffusers' `padding=0`).
#[derive(Debug, Clone)]
pub struct Downsample {
    op: Conv2d,
    pad_after: bool,
}

impl Downsample {
    pub fn new(
        vb: VarBuilder,
        ch: usize,
        out_ch: usize,
        padding: usize,
        naming: Naming,
    ) -> Result<Self> {
        let name = match naming {
            Naming::Sgm => "op",
            Naming::Diffusers => "conv",
        };
        if padding > 1 {
            candle_core::bail!("downsample padding {padding} is not supported (0 or 1)");
        }
        Ok(Self {
            op: Conv2d::load(vb.pp(name), ch, out_ch, 3, 2, padding)?,
            pad_after: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_after {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            return self.op.forward(&x);
        }
        self.op.forward(x)
    }
}

/// Nearest-neighbour upsampling then a 3x3 conv (`Upsample` / `Upsample2D` with `use_conv`,
/// key `conv`): 2x, or to a given size (diffusers' `upsample_size`, for inputs that are not a
/// multiple of the total downsampling).
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(vb: VarBuilder, ch: usize, out_ch: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(ch, out_ch, 3, 1, vb.pp("conv"))?,
        })
    }

    /// `[B, C, H, W]` -> `[B, out, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.forward_to(x, (2 * h, 2 * w))
    }

    /// `[B, C, H, W]` -> `[B, out, size.0, size.1]`: `F.interpolate(size=size, mode="nearest")`
    /// (source index `floor(i * in / out)`), then the conv.
    pub fn forward_to(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if size == (2 * h, 2 * w) {
            return self.conv.forward_upsampled2x(x);
        }
        self.conv.forward(&x.upsample_nearest2d(size.0, size.1)?)
    }
}

// ---------------------------------------------------------------------------- attention

/// Multi-head attention (SGM `CrossAttention`, diffusers `Attention` with its default
/// processor): bias-free q/k/v projections, an output
/// projection with bias (`to_out.0`), `softmax(q k^T / sqrt(dim_head)) v` per head.
///
/// On a fixed context ([`Self::remembering_context_kv`]: the text, SeeSR's RAM embeddings) the
/// keys and values depend on the prompt / image only, the same at every sampling step: they are kept for the last context tensor seen
/// (by [`TensorId`]; the networks pass one canonical tensor per distinct context, see
/// [`ContextMemo`]) and reused while it comes again.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
    /// `Some` when the keys/values of the context are remembered.
    context_kv: Option<KvMemo>,
}

/// `(context id, k, v)` of a cross-attention's last context.
#[derive(Debug, Default)]
struct KvMemo(Mutex<Option<(TensorId, Tensor, Tensor)>>);

impl Clone for KvMemo {
    /// A copy starts empty (the memo is a cache, not state).
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// The context tensor a network last saw, handed out again while the values stay the same, so
/// that the cross-attentions' [`TensorId`]-keyed K/V memos hit across sampling steps (the
/// sampler builds a new, equal context tensor at each step).
#[derive(Debug, Default)]
pub(crate) struct ContextMemo(Mutex<Option<Tensor>>);

impl Clone for ContextMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl ContextMemo {
    /// The remembered tensor if `context` has its shape, dtype, device and bit-identical values;
    /// else `context`, remembered from now on.
    pub(crate) fn canonical(&self, context: &Tensor) -> Result<Tensor> {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = memo.as_ref() {
            if prev.id() == context.id() || same_bits(prev, context)? {
                return Ok(prev.clone());
            }
        }
        *memo = Some(context.clone());
        Ok(context.clone())
    }
}

/// Whether two tensors have the same shape, dtype, device and bit patterns.
fn same_bits(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() || !a.device().same_device(b.device()) {
        return Ok(false);
    }
    // Widening to f32 is exact, so equal f32 bits mean equal source bits.
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    Ok(bits(a)? == bits(b)?)
}

impl CrossAttention {
    /// `context_dim`: `None` for self-attention (keys/values from `x`).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(vb.pp("to_k"), ctx, inner, false)?,
            to_v: Linear::load(vb.pp("to_v"), ctx, inner, false)?,
            to_out: Linear::load(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            dim_head,
            context_kv: None,
        })
    }

    /// Remembers the keys/values of the last context (for a context that is fixed over the
    /// sampling steps: the text).
    pub fn remembering_context_kv(mut self) -> Self {
        self.context_kv = Some(KvMemo::default());
        self
    }

    /// `x`: `[B, N, query_dim]`, `context`: `[B, M, context_dim]` (or `None`: `x`) ->
    /// `[B, N, query_dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let q = self.to_q.forward(x)?;
        let (k, v) = match (context, &self.context_kv) {
            (None, _) => (self.to_k.forward(x)?, self.to_v.forward(x)?),
            (Some(ctx), None) => (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?),
            (Some(ctx), Some(memo)) => {
                let mut memo = memo.0.lock().unwrap_or_else(|e| e.into_inner());
                match memo.as_ref() {
                    Some((id, k, v)) if *id == ctx.id() => (k.clone(), v.clone()),
                    _ => {
                        let (k, v) = (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?);
                        *memo = Some((ctx.id(), k.clone(), v.clone()));
                        (k, v)
                    }
                }
            }
        };
        let out = layers::attention(&q, &k, &v, self.heads, scale)?;
        debug_assert_eq!(out.dims(), [b, n, self.heads * self.dim_head]);
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward (`FeedForward(dim, glu=True)`, mult 4): `net.0.proj` gives `[a, gate]`,
/// output `net.2(a * gelu(gate))` (exact erf GELU).
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::load(vb.pp("net.2"), inner, dim, true)?,
            inner,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.proj.forward(x)?;
        debug_assert_eq!(p.dim(D::Minus1)?, 2 * self.inner);
        self.out.forward(&layers::geglu(&p)?)
    }
}

/// `BasicTransformerBlock`: pre-LayerNorm (eps 1e-5) self-attention, cross-attention on the
/// context (text, or SeeSR's RAM embeddings; its K/V remembered, see [`ContextMemo`]), GEGLU
/// feed-forward, each residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    attn1: CrossAttention,
    attn2: CrossAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
    ) -> Result<Self> {
        let ln = |name: &str| LayerNorm::load(vb.pp(name), dim, 1e-5);
        Ok(Self {
            attn1: CrossAttention::new(vb.pp("attn1"), dim, None, heads, dim_head)?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, Some(context_dim), heads, dim_head)?
                .remembering_context_kv(),
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            norm1: ln("norm1")?,
            norm2: ln("norm2")?,
            norm3: ln("norm3")?,
        })
    }

    /// `x`: `[B, N, dim]`, `context`: `[B, M, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `proj_in` / `proj_out` of a SpatialTransformer: linear on tokens (SDXL, SD-2) or 1x1 conv.
#[derive(Debug, Clone)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

impl Proj {
    fn new(vb: VarBuilder, linear: bool, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(if linear {
            Proj::Linear(Linear::load(vb, in_dim, out_dim, true)?)
        } else {
            Proj::Conv(conv2d(in_dim, out_dim, 1, 1, vb)?)
        })
    }
}

/// Sizes of a [`SpatialTransformer`] (SGM `SpatialTransformer`, diffusers
/// `Transformer2DModel` on continuous input).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformerSpec {
    pub heads: usize,
    pub dim_head: usize,
    /// Number of [`BasicTransformerBlock`]s.
    pub depth: usize,
    /// Width of the cross-attention context.
    pub context_dim: usize,
    /// `proj_in` / `proj_out` are linear layers on the tokens (else 1x1 convs).
    pub use_linear: bool,
    /// Groups of the input GroupNorm (eps 1e-6 in both codes).
    pub groups: usize,
}

/// `SpatialTransformer` / `Transformer2DModel`: GroupNorm (eps 1e-6), `proj_in`, `depth`
/// transformer blocks on the `H*W` tokens, `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    pub fn new(vb: VarBuilder, in_ch: usize, spec: &TransformerSpec) -> Result<Self> {
        let inner = spec.heads * spec.dim_head;
        let blocks = (0..spec.depth)
            .map(|d| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{d}")),
                    inner,
                    spec.heads,
                    spec.dim_head,
                    spec.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), spec.groups, in_ch, 1e-6)?,
            proj_in: Proj::new(vb.pp("proj_in"), spec.use_linear, in_ch, inner)?,
            blocks,
            proj_out: Proj::new(vb.pp("proj_out"), spec.use_linear, inner, in_ch)?,
        })
    }

    /// `x`: `[B, C, H, W]`, `context`: `[B, M, context_dim]` -> `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Linear(l) => l.forward(&to_tokens(&hn)?)?,
            Proj::Conv(c) => to_tokens(&c.forward(&hn)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let out = match &self.proj_out {
            Proj::Linear(l) => from_tokens(&l.forward(&t)?, h, w)?,
            Proj::Conv(c) => c.forward(&from_tokens(&t, h, w)?)?,
        };
        out + x
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v = crate::kernels::test_noise(n, seed);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn cross_attention(remember: bool) -> CrossAttention {
        let (q, c, inner) = (16, 24, 32);
        let ts: HashMap<String, Tensor> = [
            ("to_q.weight", randn(&[inner, q], 1)),
            ("to_k.weight", randn(&[inner, c], 2)),
            ("to_v.weight", randn(&[inner, c], 3)),
            ("to_out.0.weight", randn(&[q, inner], 4)),
            ("to_out.0.bias", randn(&[q], 5)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu);
        let a = CrossAttention::new(vb, q, Some(c), 4, 8).unwrap();
        if remember {
            a.remembering_context_kv()
        } else {
            a
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    #[test]
    fn remembered_context_kv_gives_the_same_bits_and_follows_a_new_context() {
        let (plain, memo) = (cross_attention(false), cross_attention(true));
        let contexts = ContextMemo::default();
        let x = randn(&[2, 5, 16], 6);
        let ctx_a = randn(&[2, 7, 24], 7);
        let ctx_b = randn(&[2, 7, 24], 8);
        // A new tensor with ctx_a's values (as the sampler makes each step) maps to the first.
        let ctx_a2 = Tensor::from_vec(
            ctx_a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (2, 7, 24),
            &Device::Cpu,
        )
        .unwrap();
        // Expected canonical tensor per call: equal values map to the remembered tensor.
        for (ctx, canonical) in [
            (&ctx_a, &ctx_a),
            (&ctx_a2, &ctx_a),
            (&ctx_b, &ctx_b),
            (&ctx_a, &ctx_a),
        ] {
            let canon = contexts.canonical(ctx).unwrap();
            assert_eq!(canon.id(), canonical.id());
            let want = plain.forward(&x, Some(ctx)).unwrap();
            let got = memo.forward(&x, Some(&canon)).unwrap();
            assert_eq!(bits(&got), bits(&want));
            let kept = memo.context_kv.as_ref().unwrap().0.lock().unwrap();
            assert_eq!(kept.as_ref().map(|m| m.0), Some(canon.id()));
        }
    }
}
