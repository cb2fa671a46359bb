//! SDXL UNet (`sgm/modules/diffusionmodules/openaimodel.py`) with SUPIR's LightGLVUNet changes
//! (`SUPIR/modules/SUPIR_v0.py`), on the shared blocks of [`super`] with [`Naming::Sgm`].
//!
//! Every size comes from [`UNetParams`]. The encoder half ([`UNetTrunk`]) is shared with
//! [`crate::models::glv_control::GLVControl`].

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    conv2d, group_norm32, timestep_embedding, ContextMemo, Downsample, Naming, NormSpec, ResBlock,
    SpatialTransformer, TimestepMlp, TransformerSpec, Upsample,
};
use crate::layers::{Conv2d, GroupNorm};
use crate::models::supir_config::UNetParams;
use crate::models::zero_sft::{ZeroCrossAttn, ZeroSFT};

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
    let spec = TransformerSpec {
        heads,
        dim_head,
        depth,
        context_dim: cfg.context_dim,
        use_linear: cfg.use_linear_in_transformer,
        groups: NormSpec::SGM.groups,
    };
    SpatialTransformer::new(vb, ch, &spec)
}

// ---------------------------------------------------------------------------- UNet trunk

/// The part shared by `UNetModel` and `GLVControl`: `time_embed`, `label_emb` ("sequential"
/// adm), `input_blocks`, `middle_block`. Built under the model's root prefix.
#[derive(Debug, Clone)]
pub(crate) struct UNetTrunk {
    model_channels: usize,
    time_embed: TimestepMlp,
    label_emb: Option<TimestepMlp>,
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
        let time_embed = TimestepMlp::new(vb.pp("time_embed"), mc, ted, Naming::Sgm)?;
        let label_emb = match cfg.num_classes.as_deref() {
            None => None,
            Some("sequential") => {
                let adm = cfg.adm_in_channels.ok_or_else(|| {
                    candle_core::Error::Msg("num_classes sequential needs adm_in_channels".into())
                })?;
                Some(TimestepMlp::new(
                    vb.pp("label_emb.0"),
                    adm,
                    ted,
                    Naming::Sgm,
                )?)
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
                let mut layers = vec![Layer::Res(ResBlock::new(
                    vbb.pp("0"),
                    ch,
                    ted,
                    mult * mc,
                    NormSpec::SGM,
                    Naming::Sgm,
                )?)];
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
                    1,
                    Naming::Sgm,
                )?)]));
                input_block_chans.push(ch);
                ds *= 2;
            }
        }

        let vbm = vb.pp("middle_block");
        let depth_middle = *cfg.transformer_depth.last().unwrap_or(&1);
        let middle_block = EmbedSequential(vec![
            Layer::Res(ResBlock::new(
                vbm.pp("0"),
                ch,
                ted,
                ch,
                NormSpec::SGM,
                Naming::Sgm,
            )?),
            Layer::Transformer(spatial_transformer(vbm.pp("1"), cfg, ch, depth_middle)?),
            Layer::Res(ResBlock::new(
                vbm.pp("2"),
                ch,
                ted,
                ch,
                NormSpec::SGM,
                Naming::Sgm,
            )?),
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
        let emb = self.time_embed.forward(&t_emb)?;
        match (&self.label_emb, y) {
            (Some(label), Some(y)) => emb + label.forward(y)?,
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
                    NormSpec::SGM,
                    Naming::Sgm,
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
