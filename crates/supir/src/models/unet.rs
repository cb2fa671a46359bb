//! SDXL UNet (`sgm/modules/diffusionmodules/openaimodel.py`, `sgm/modules/attention.py`) with
//! SUPIR's LightGLVUNet changes (`SUPIR/modules/SUPIR_v0.py`).
//!
//! Layout is NCHW throughout; every size comes from [`UNetParams`]. The building blocks are
//! shared with [`crate::models::glv_control::GLVControl`], which is a trimmed copy of the encoder half
//! ([`UNetTrunk`]).

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor, TensorId, D};
use candle_nn::VarBuilder;

use crate::layers::{self, Conv2d, GroupNorm, LayerNorm, Linear};

use crate::models::supir_config::UNetParams;
use crate::models::zero_sft::{ZeroCrossAttn, ZeroSFT};

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

// ---------------------------------------------------------------------------- small helpers

/// `normalization(ch)` of openaimodel (GroupNorm32): 32 groups, eps 1e-5, affine.
pub(crate) fn group_norm32(channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::load(vb, 32, channels, 1e-5)
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

// ---------------------------------------------------------------------------- ResBlock

/// `ResBlock` without up/down sampling and without scale-shift norm (the SDXL settings):
/// `skip(x) + out_layers(in_layers(x) + emb_layers(emb))`.
#[derive(Debug, Clone)]
pub struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb_proj: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    /// 1x1 conv when the channel count changes, identity otherwise.
    skip: Option<Conv2d>,
}

impl ResBlock {
    pub fn new(vb: VarBuilder, in_ch: usize, emb_ch: usize, out_ch: usize) -> Result<Self> {
        let skip = if in_ch == out_ch {
            None
        } else {
            Some(conv2d(in_ch, out_ch, 1, 1, vb.pp("skip_connection"))?)
        };
        Ok(Self {
            in_norm: group_norm32(in_ch, vb.pp("in_layers.0"))?,
            in_conv: conv2d(in_ch, out_ch, 3, 1, vb.pp("in_layers.2"))?,
            emb_proj: Linear::load(vb.pp("emb_layers.1"), emb_ch, out_ch, true)?,
            out_norm: group_norm32(out_ch, vb.pp("out_layers.0"))?,
            out_conv: conv2d(out_ch, out_ch, 3, 1, vb.pp("out_layers.3"))?,
            skip,
        })
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
        match &self.skip {
            Some(conv) => conv.forward(x)? + h,
            None => x + h,
        }
    }
}

// ---------------------------------------------------------------------------- resampling

/// Strided 3x3 conv halving H and W (`Downsample` with `use_conv`, key `op`).
#[derive(Debug, Clone)]
pub struct Downsample {
    op: Conv2d,
}

impl Downsample {
    pub fn new(vb: VarBuilder, ch: usize, out_ch: usize) -> Result<Self> {
        Ok(Self {
            op: conv2d(ch, out_ch, 3, 2, vb.pp("op"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.op.forward(x)
    }
}

/// Nearest-neighbour 2x upsampling then a 3x3 conv (`Upsample` with `use_conv`, key `conv`).
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

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

// ---------------------------------------------------------------------------- attention

/// Multi-head attention `CrossAttention` (attention.py): bias-free q/k/v projections, an output
/// projection with bias (`to_out.0`), `softmax(q k^T / sqrt(dim_head)) v` per head.
///
/// On the text context ([`Self::remembering_context_kv`]) the keys and values depend on the
/// prompt only, the same at every sampling step: they are kept for the last context tensor seen
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

/// `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention on the text context,
/// GEGLU feed-forward, each residual.
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

/// `proj_in` / `proj_out` of a SpatialTransformer: linear on tokens (SDXL) or 1x1 conv.
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

/// `SpatialTransformer`: GroupNorm (32 groups, eps 1e-6), `proj_in`, `depth` transformer blocks
/// on the `H*W` tokens, `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        heads: usize,
        dim_head: usize,
        depth: usize,
        context_dim: usize,
        use_linear: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let blocks = (0..depth)
            .map(|d| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{d}")),
                    inner,
                    heads,
                    dim_head,
                    context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), 32, in_ch, 1e-6)?,
            proj_in: Proj::new(vb.pp("proj_in"), use_linear, in_ch, inner)?,
            blocks,
            proj_out: Proj::new(vb.pp("proj_out"), use_linear, inner, in_ch)?,
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

// ---------------------------------------------------------------------------- sequential blocks

/// One layer of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
pub(crate) enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Transformer(SpatialTransformer),
    Down(Downsample),
    Up(Upsample),
}

impl Layer {
    fn forward(&self, x: &Tensor, emb: &Tensor, context: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::Res(r) => r.forward(x, emb),
            Layer::Transformer(t) => t.forward(x, context),
            Layer::Down(d) => d.forward(x),
            Layer::Up(u) => u.forward(x),
        }
    }
}

/// `TimestepEmbedSequential`: layers applied in order, each given what it needs.
#[derive(Debug, Clone)]
pub(crate) struct EmbedSequential(pub(crate) Vec<Layer>);

impl EmbedSequential {
    pub(crate) fn forward(&self, x: &Tensor, emb: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_range(x, emb, context, 0..self.0.len())
    }

    fn forward_range(
        &self,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0[range] {
            h = layer.forward(&h, emb, context)?;
        }
        Ok(h)
    }

    /// Output blocks that end with an upsampler after res + attention (`len(module) == 3` in
    /// LightGLVUNet.forward): a ZeroCrossAttn connector runs before the upsampler.
    fn is_res_attn_up(&self) -> bool {
        matches!(
            self.0.as_slice(),
            [Layer::Res(_), Layer::Transformer(_), Layer::Up(_)]
        )
    }
}

/// Attention heads and head width at `ch` channels (openaimodel's `num_heads` /
/// `num_head_channels` / `legacy` rule).
fn heads_for(cfg: &UNetParams, ch: usize) -> Result<(usize, usize)> {
    let (heads, mut dim_head) = if cfg.num_head_channels == -1 {
        if cfg.num_heads <= 0 {
            candle_core::bail!("either num_heads or num_head_channels must be set");
        }
        let heads = cfg.num_heads as usize;
        (heads, ch / heads)
    } else {
        let nhc = cfg.num_head_channels as usize;
        (ch / nhc, nhc)
    };
    if cfg.legacy {
        dim_head = if cfg.use_spatial_transformer {
            ch / heads
        } else {
            cfg.num_head_channels as usize
        };
    }
    Ok((heads, dim_head))
}

fn spatial_transformer(
    vb: VarBuilder,
    cfg: &UNetParams,
    ch: usize,
    depth: usize,
) -> Result<SpatialTransformer> {
    if !cfg.use_spatial_transformer {
        candle_core::bail!("only use_spatial_transformer: true (SDXL) is supported");
    }
    let (heads, dim_head) = heads_for(cfg, ch)?;
    SpatialTransformer::new(
        vb,
        ch,
        heads,
        dim_head,
        depth,
        cfg.context_dim,
        cfg.use_linear_in_transformer,
    )
}

// ---------------------------------------------------------------------------- UNet trunk

/// The part shared by `UNetModel` and `GLVControl`: `time_embed`, `label_emb` ("sequential"
/// adm), `input_blocks`, `middle_block`. Built under the model's root prefix.
#[derive(Debug, Clone)]
pub(crate) struct UNetTrunk {
    model_channels: usize,
    time_embed: (Linear, Linear),
    label_emb: Option<(Linear, Linear)>,
    pub(crate) input_blocks: Vec<EmbedSequential>,
    pub(crate) middle_block: EmbedSequential,
    /// Channels of every input block's output (the skips), in order.
    pub(crate) input_block_chans: Vec<usize>,
    /// Channels and downsampling factor at the middle block.
    pub(crate) ch: usize,
    pub(crate) ds: usize,
    pub(crate) time_embed_dim: usize,
    /// The text context of the last call (see [`ContextMemo`]).
    pub(crate) context_memo: ContextMemo,
}

impl UNetTrunk {
    pub(crate) fn new(vb: VarBuilder, cfg: &UNetParams) -> Result<Self> {
        let mc = cfg.model_channels;
        let ted = 4 * mc;
        let nlev = cfg.channel_mult.len();
        if cfg.transformer_depth.len() != nlev {
            candle_core::bail!("transformer_depth needs one entry per channel_mult level");
        }
        let time_embed = (
            Linear::load(vb.pp("time_embed.0"), mc, ted, true)?,
            Linear::load(vb.pp("time_embed.2"), ted, ted, true)?,
        );
        let label_emb = match cfg.num_classes.as_deref() {
            None => None,
            Some("sequential") => {
                let adm = cfg.adm_in_channels.ok_or_else(|| {
                    candle_core::Error::Msg("num_classes sequential needs adm_in_channels".into())
                })?;
                Some((
                    Linear::load(vb.pp("label_emb.0.0"), adm, ted, true)?,
                    Linear::load(vb.pp("label_emb.0.2"), ted, ted, true)?,
                ))
            }
            Some(other) => candle_core::bail!("num_classes {other:?} is not supported"),
        };

        let vbi = vb.pp("input_blocks");
        let mut input_blocks = vec![EmbedSequential(vec![Layer::Conv(conv2d(
            cfg.in_channels,
            mc,
            3,
            1,
            vbi.pp("0.0"),
        )?)])];
        let mut input_block_chans = vec![mc];
        let mut ch = mc;
        let mut ds = 1;
        for (level, &mult) in cfg.channel_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vbb = vbi.pp(input_blocks.len());
                let mut layers = vec![Layer::Res(ResBlock::new(vbb.pp("0"), ch, ted, mult * mc)?)];
                ch = mult * mc;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(Layer::Transformer(spatial_transformer(
                        vbb.pp("1"),
                        cfg,
                        ch,
                        cfg.transformer_depth[level],
                    )?));
                }
                input_blocks.push(EmbedSequential(layers));
                input_block_chans.push(ch);
            }
            if level != nlev - 1 {
                let vbb = vbi.pp(input_blocks.len());
                input_blocks.push(EmbedSequential(vec![Layer::Down(Downsample::new(
                    vbb.pp("0"),
                    ch,
                    ch,
                )?)]));
                input_block_chans.push(ch);
                ds *= 2;
            }
        }

        let vbm = vb.pp("middle_block");
        let depth_middle = *cfg.transformer_depth.last().unwrap_or(&1);
        let middle_block = EmbedSequential(vec![
            Layer::Res(ResBlock::new(vbm.pp("0"), ch, ted, ch)?),
            Layer::Transformer(spatial_transformer(vbm.pp("1"), cfg, ch, depth_middle)?),
            Layer::Res(ResBlock::new(vbm.pp("2"), ch, ted, ch)?),
        ]);
        Ok(Self {
            model_channels: mc,
            time_embed,
            label_emb,
            input_blocks,
            middle_block,
            input_block_chans,
            ch,
            ds,
            time_embed_dim: ted,
            context_memo: ContextMemo::default(),
        })
    }

    /// `time_embed(timestep_embedding(t)) + label_emb(y)`: `[B]`, `[B, adm]` -> `[B, 4*mc]`,
    /// the sinusoidal part computed in f32 then cast to `dtype` (the activations' dtype).
    pub(crate) fn embed(
        &self,
        timesteps: &Tensor,
        y: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t_emb = timestep_embedding(timesteps, self.model_channels)?.to_dtype(dtype)?;
        let emb = self
            .time_embed
            .1
            .forward(&self.time_embed.0.forward(&t_emb)?.silu()?)?;
        match (&self.label_emb, y) {
            (Some((l0, l2)), Some(y)) => emb + l2.forward(&l0.forward(y)?.silu()?)?,
            (None, None) => Ok(emb),
            _ => {
                candle_core::bail!("y must be given if and only if the model is class-conditional")
            }
        }
    }
}

// ---------------------------------------------------------------------------- LightGLVUNet

/// One connector of `project_modules`.
#[derive(Debug, Clone)]
enum Connector {
    Sft(ZeroSFT),
    CrossAttn(ZeroCrossAttn),
}

/// Connector layout of a LightGLVUNet `mode`, derived from `model_channels` the way the
/// reference scales the official 320-channel ("XL-base") or 384-channel ("XL-refine") lists.
struct ConnectorLists {
    cond_output_channels: Vec<usize>,
    project_channels: Vec<usize>,
    concat_channels: Vec<usize>,
    cross_attn_insert_idx: Vec<usize>,
}

impl ConnectorLists {
    fn new(cfg: &UNetParams) -> Result<Self> {
        let rep = |n: usize, v: usize| std::iter::repeat_n(v, n);
        let (base, cond, proj, concat, insert): (f64, Vec<usize>, Vec<usize>, Vec<usize>, _) =
            match cfg.mode.as_deref() {
                Some("XL-base") => (
                    320.0,
                    rep(4, 320).chain(rep(3, 640)).chain(rep(3, 1280)).collect(),
                    rep(4, 160).chain(rep(3, 320)).chain(rep(3, 640)).collect(),
                    rep(2, 320).chain(rep(3, 640)).chain(rep(4, 1280)).collect(),
                    vec![6, 3],
                ),
                Some("XL-refine") => (
                    384.0,
                    rep(4, 384).chain(rep(3, 768)).chain(rep(6, 1536)).collect(),
                    rep(4, 192).chain(rep(3, 384)).chain(rep(6, 768)).collect(),
                    rep(2, 384).chain(rep(3, 768)).chain(rep(7, 1536)).collect(),
                    vec![9, 6, 3],
                ),
                other => candle_core::bail!("LightGLVUNet mode {other:?} is not supported"),
            };
        // Python `int(c * f)`: float product, truncated.
        let f = cfg.model_channels as f64 / base;
        let scale = |l: Vec<usize>, f: f64| -> Vec<usize> {
            l.into_iter().map(|c| (c as f64 * f) as usize).collect()
        };
        let pcs = cfg.project_channel_scale.unwrap_or(1.0);
        let mut concat_channels = scale(concat, f);
        concat_channels.push(0);
        Ok(Self {
            cond_output_channels: scale(cond, f),
            project_channels: scale(scale(proj, f), pcs),
            concat_channels,
            cross_attn_insert_idx: insert,
        })
    }
}

/// SUPIR's LightGLVUNet: the SDXL UNet whose decoder receives the GLVControl hints through
/// ZeroSFT connectors (at every skip and at the middle block) and ZeroCrossAttn connectors
/// (before each upsampler that follows an attention layer). Keys under `model.diffusion_model`.
#[derive(Debug, Clone)]
pub struct LightGLVUNet {
    trunk: UNetTrunk,
    output_blocks: Vec<EmbedSequential>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    project_modules: Vec<Connector>,
}

impl LightGLVUNet {
    /// `vb` at `model.diffusion_model`.
    pub fn new(vb: VarBuilder, cfg: &UNetParams) -> Result<Self> {
        let trunk = UNetTrunk::new(vb.clone(), cfg)?;
        let mc = cfg.model_channels;
        let ted = trunk.time_embed_dim;

        // Decoder: mirrors the encoder, each block's ResBlock eats the concatenated skip.
        let mut chans = trunk.input_block_chans.clone();
        let (mut ch, mut ds) = (trunk.ch, trunk.ds);
        let vbo = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, &mult) in cfg.channel_mult.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let ich = chans
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("skip channel list exhausted".into()))?;
                let vbb = vbo.pp(output_blocks.len());
                let mut layers = vec![Layer::Res(ResBlock::new(
                    vbb.pp("0"),
                    ch + ich,
                    ted,
                    mc * mult,
                )?)];
                ch = mc * mult;
                if cfg.attention_resolutions.contains(&ds) {
                    layers.push(Layer::Transformer(spatial_transformer(
                        vbb.pp("1"),
                        cfg,
                        ch,
                        cfg.transformer_depth[level],
                    )?));
                }
                if level > 0 && i == cfg.num_res_blocks {
                    layers.push(Layer::Up(Upsample::new(vbb.pp(layers.len()), ch, ch)?));
                    ds /= 2;
                }
                output_blocks.push(EmbedSequential(layers));
            }
        }
        let out_norm = group_norm32(ch, vb.pp("out.0"))?;
        let out_conv = conv2d(mc, cfg.out_channels, 3, 1, vb.pp("out.2"))?;

        // Connectors: one ZeroSFT per hint, ZeroCrossAttn inserted at the mode's indices.
        let lists = ConnectorLists::new(cfg)?;
        let vbp = vb.pp("project_modules");
        let n = lists.cond_output_channels.len();
        let mut kinds: Vec<(bool, usize)> = (0..n).map(|i| (false, i)).collect();
        for &i in &lists.cross_attn_insert_idx {
            kinds.insert(i, (true, i));
        }
        let project_modules = kinds
            .into_iter()
            .enumerate()
            .map(|(idx, (is_attn, i))| {
                let vb = vbp.pp(idx);
                Ok(if is_attn {
                    Connector::CrossAttn(ZeroCrossAttn::new(
                        vb,
                        lists.cond_output_channels[i],
                        lists.concat_channels[i],
                    )?)
                } else {
                    Connector::Sft(ZeroSFT::new(
                        vb,
                        lists.project_channels[i],
                        lists.cond_output_channels[i],
                        lists.concat_channels[i],
                    )?)
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let unet = Self {
            trunk,
            output_blocks,
            out_norm,
            out_conv,
            project_modules,
        };
        unet.check_connector_order()?;
        Ok(unet)
    }

    /// The forward pass walks `project_modules` backwards: one ZeroSFT after the middle block,
    /// one ZeroSFT per output block, one ZeroCrossAttn per res+attn+upsample block. Checks that
    /// the mode's list has exactly that shape for this UNet.
    fn check_connector_order(&self) -> Result<()> {
        let mut expected = vec![false]; // middle: ZeroSFT
        for block in &self.output_blocks {
            expected.push(false);
            if block.is_res_attn_up() {
                expected.push(true);
            }
        }
        expected.reverse();
        let got: Vec<bool> = self
            .project_modules
            .iter()
            .map(|c| matches!(c, Connector::CrossAttn(_)))
            .collect();
        if got != expected {
            candle_core::bail!(
                "LightGLVUNet connector layout {got:?} does not fit this UNet ({expected:?})"
            );
        }
        Ok(())
    }

    /// Number of hints the forward expects (GLVControl's output count).
    pub fn num_hints(&self) -> usize {
        self.output_blocks.len() + 1
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> candle_core::DType {
        self.out_conv.weight().dtype()
    }

    /// The noise prediction.
    /// - `x`: `[B, in_channels, H, W]` noisy latent, `timesteps`: `[B]`,
    ///   `context`: `[B, M, context_dim]`, `y`: `[B, adm_in_channels]`;
    /// - `hints`: GLVControl's outputs in its order (input blocks, then middle);
    /// - `control_scale`: blend of the connectors' output with their plain input.
    ///
    /// Returns `[B, out_channels, H, W]`.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: &Tensor,
        hints: &[Tensor],
        control_scale: f64,
    ) -> Result<Tensor> {
        if hints.len() != self.num_hints() {
            candle_core::bail!("expected {} hints, got {}", self.num_hints(), hints.len());
        }
        let dtype = hints[0].dtype();
        let (x, context, y) = (
            x.to_dtype(dtype)?,
            self.trunk
                .context_memo
                .canonical(&context.to_dtype(dtype)?)?,
            y.to_dtype(dtype)?,
        );
        let emb = self.trunk.embed(timesteps, Some(&y), dtype)?;

        let mut hs = Vec::with_capacity(self.trunk.input_blocks.len());
        let mut h = x;
        for block in &self.trunk.input_blocks {
            h = block.forward(&h, &emb, &context)?;
            hs.push(h.clone());
        }
        h = self.trunk.middle_block.forward(&h, &emb, &context)?;

        let mut adapters = self.project_modules.iter().rev();
        let mut next_adapter = || {
            adapters
                .next()
                .ok_or_else(|| candle_core::Error::Msg("connector list exhausted".into()))
        };
        let mut control = hints.iter().rev();
        let c = control.next().expect("hint count checked");
        h = apply_sft(next_adapter()?, c, &h, None, control_scale)?;

        for block in &self.output_blocks {
            let skip = hs
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("skip list exhausted".into()))?;
            let c = control.next().expect("hint count checked");
            // The ZeroSFT connector also concatenates `[h, skip]` for the ResBlock.
            h = apply_sft(next_adapter()?, c, &skip, Some(&h), control_scale)?;
            if block.is_res_attn_up() {
                h = block.forward_range(&h, &emb, &context, 0..2)?;
                h = match next_adapter()? {
                    Connector::CrossAttn(a) => a.forward(c, &h, control_scale)?,
                    Connector::Sft(_) => candle_core::bail!("expected a ZeroCrossAttn connector"),
                };
                h = block.forward_range(&h, &emb, &context, 2..3)?;
            } else {
                h = block.forward(&h, &emb, &context)?;
            }
        }
        self.out_conv.forward(&self.out_norm.forward_silu(&h)?)
    }
}

fn apply_sft(
    connector: &Connector,
    c: &Tensor,
    h: &Tensor,
    h_ori: Option<&Tensor>,
    control_scale: f64,
) -> Result<Tensor> {
    match connector {
        Connector::Sft(s) => s.forward(c, h, h_ori, control_scale),
        Connector::CrossAttn(_) => candle_core::bail!("expected a ZeroSFT connector"),
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
