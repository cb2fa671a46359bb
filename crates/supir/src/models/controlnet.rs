//! SeeSR's ControlNet (`models/controlnet.py` `ControlNetModel`, diffusers 0.21's with the
//! representation cross-attention): the UNet's down half ([`Encoder`], with `image_attentions`
//! when `use_image_cross_attention`) on `conv_in(sample) + cond_embedding(image)`, whose skips
//! and mid output go through zero-initialised 1x1 convs and are scaled by the conditioning
//! scale: the residuals [`UNet2DConditionModel::forward`](crate::models::unet::sd2::UNet2DConditionModel::forward)
//! adds.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::layers::Conv2d;
use crate::models::unet::sd2::{
    check_common, read_config, unsupported, CommonOptions, Contexts, Encoder, EncoderSpec,
    PerBlock, Timestep, WEIGHTS_NAME,
};
use crate::models::unet::NormSpec;
use crate::weights::WeightSource;
use crate::{Error, Result};

type CResult<T> = candle_core::Result<T>;

/// `ControlNetModel`'s `config.json` (diffusers 0.21 keys and defaults, unknown keys ignored;
/// SeeSR adds `use_image_cross_attention`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    pub in_channels: usize,
    pub conditioning_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads per block (unless `num_attention_heads` is set).
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub controlnet_conditioning_channel_order: String,
    pub conditioning_embedding_out_channels: Vec<usize>,
    pub global_pool_conditions: bool,
    pub use_image_cross_attention: bool,
    /// Not a config key of the release: the block default (512), as for the UNet.
    pub image_cross_attention_dim: usize,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            in_channels: 4,
            conditioning_channels: 3,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(s)
            .to_vec(),
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::All(1),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: s("default"),
            controlnet_conditioning_channel_order: s("rgb"),
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
            use_image_cross_attention: false,
            image_cross_attention_dim: 512,
        }
    }
}

impl ControlNetConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_config(path.as_ref())
    }

    fn check(&self) -> Result<()> {
        let n = self.down_block_types.len();
        unsupported(
            "controlnet_conditioning_channel_order",
            matches!(
                self.controlnet_conditioning_channel_order.as_str(),
                "rgb" | "bgr"
            ),
            &self.controlnet_conditioning_channel_order,
        )?;
        unsupported(
            "conditioning_embedding_out_channels",
            !self.conditioning_embedding_out_channels.is_empty(),
            &self.conditioning_embedding_out_channels,
        )?;
        check_common(&CommonOptions {
            down_blocks: n,
            block_out_channels: &self.block_out_channels,
            only_cross_attention: &self.only_cross_attention,
            class_embed_type: &self.class_embed_type,
            num_class_embeds: self.num_class_embeds,
            addition_embed_type: &self.addition_embed_type,
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: &self.encoder_hid_dim_type,
            norm_num_groups: self.norm_num_groups,
            act_fn: &self.act_fn,
            resnet_time_scale_shift: &self.resnet_time_scale_shift,
            attention_type: "default",
            cross_attention_norm: &None,
            resnet_skip_time_act: false,
        })
    }

    fn encoder_spec(&self) -> Result<EncoderSpec> {
        let n = self.down_block_types.len();
        // `num_attention_heads or attention_head_dim`.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .resolve(n, "attention_head_dim")?;
        Ok(EncoderSpec {
            in_channels: self.in_channels,
            conv_in_kernel: 3,
            block_out_channels: self.block_out_channels.clone(),
            down_block_types: self.down_block_types.clone(),
            layers_per_block: vec![self.layers_per_block; n],
            transformer_layers: self
                .transformer_layers_per_block
                .resolve(n, "transformer_layers_per_block")?,
            heads,
            cross_attention_dim: vec![self.cross_attention_dim; n],
            norm: NormSpec {
                groups: self.norm_num_groups.unwrap_or(32),
                eps: self.norm_eps,
            },
            downsample_padding: self.downsample_padding,
            use_linear_projection: self.use_linear_projection,
            image_cross_attention_dim: self
                .use_image_cross_attention
                .then_some(self.image_cross_attention_dim),
            mid_block: true,
            mid_block_scale_factor: self.mid_block_scale_factor,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            time_embed_dim: 4 * self.block_out_channels[0],
        })
    }
}

/// The residuals of a ControlNet call: one per UNet skip (`down_block_res_samples`, in order)
/// and the mid-block one (`mid_block_res_sample`), already scaled.
#[derive(Debug, Clone)]
pub struct ControlNetOutput {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// `ControlNetConditioningEmbedding`: `conv_in`, SiLU, pairs of 3x3 convs (the second of each
/// with stride 2) each followed by SiLU, `conv_out` to the UNet's first width.
/// `[B, 3, 8h, 8w]` -> `[B, block_out_channels[0], h, w]`.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, cond_ch: usize, chans: &[usize], out_ch: usize) -> CResult<Self> {
        let conv = |vb: VarBuilder, i: usize, o: usize, stride: usize| {
            Conv2d::load(vb, i, o, 3, stride, 1)
        };
        let mut blocks = Vec::new();
        for (i, w) in chans.windows(2).enumerate() {
            let vbb = vb.pp("blocks");
            blocks.push(conv(vbb.pp(2 * i), w[0], w[0], 1)?);
            blocks.push(conv(vbb.pp(2 * i + 1), w[0], w[1], 2)?);
        }
        let last = *chans.last().expect("checked non-empty");
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cond_ch, chans[0], 1)?,
            blocks,
            conv_out: conv(vb.pp("conv_out"), last, out_ch, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut h = self.conv_in.forward(x)?.silu()?;
        for b in &self.blocks {
            h = b.forward(&h)?.silu()?;
        }
        self.conv_out.forward(&h)
    }
}

/// SeeSR's `ControlNetModel`. Keys under the model root, diffusers names (`conv_in`,
/// `time_embedding`, `controlnet_cond_embedding`, `down_blocks.N`, `mid_block`,
/// `controlnet_down_blocks.N`, `controlnet_mid_block`).
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    down_zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
    bgr: bool,
    global_pool: bool,
}

impl ControlNetModel {
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        cfg.check()?;
        let s = cfg.encoder_spec()?;
        let encoder = Encoder::new(&vb, &s)?;
        let c0 = s.block_out_channels[0];
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            cfg.conditioning_channels,
            &cfg.conditioning_embedding_out_channels,
            c0,
        )?;
        let zero = |vb: VarBuilder, ch: usize| Conv2d::load(vb, ch, ch, 1, 1, 0);
        let down_zero_convs = encoder
            .skip_channels(&s)
            .into_iter()
            .enumerate()
            .map(|(i, ch)| zero(vb.pp("controlnet_down_blocks").pp(i), ch))
            .collect::<CResult<Vec<_>>>()?;
        let mid_ch = *s.block_out_channels.last().expect("checked non-empty");
        Ok(Self {
            encoder,
            cond_embedding,
            down_zero_convs,
            mid_zero_conv: zero(vb.pp("controlnet_mid_block"), mid_ch)?,
            bgr: cfg.controlnet_conditioning_channel_order == "bgr",
            global_pool: cfg.global_pool_conditions,
        })
    }

    /// Builds the model of a diffusers folder (`config.json`, [`WEIGHTS_NAME`]), e.g.
    /// `preset/models/seesr/controlnet`.
    pub fn from_pretrained(dir: impl AsRef<Path>, dtype: DType, dev: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ControlNetConfig::from_file(dir.join("config.json"))?;
        let vb = WeightSource::open(&[dir.join(WEIGHTS_NAME)])?.into_var_builder(dtype, dev);
        Self::new(vb, &cfg)
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.mid_zero_conv.weight().dtype()
    }

    /// Number of down residuals the forward returns (the UNet's skips).
    pub fn num_down_residuals(&self) -> usize {
        self.down_zero_convs.len()
    }

    /// `ControlNetModel.forward(..., guess_mode=False)`.
    /// - `sample`: `[B, in_channels, h, w]`, `timestep`: a number or a tensor;
    /// - `encoder_hidden_states`: text `[B, 77, C]`; `image_encoder_hidden_states`: the RAM
    ///   embeddings `[B, 145, 512]` (required iff the model has image attentions);
    /// - `controlnet_cond`: the control image `[B, 3, 8h, 8w]` in [0, 1];
    /// - `conditioning_scale`: multiplies every residual.
    ///
    /// Computes in the sample's dtype.
    pub fn forward<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        image_encoder_hidden_states: Option<&Tensor>,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
    ) -> Result<ControlNetOutput> {
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let mut cond = controlnet_cond.to_dtype(dtype)?;
        if self.bgr {
            let c = cond.dim(1)?;
            let idx = Tensor::from_vec((0..c as u32).rev().collect::<Vec<_>>(), c, cond.device())?;
            cond = cond.index_select(&idx, 1)?;
        }
        let timesteps = timestep.into().to_batch(b, sample.device())?;
        let emb = self.encoder.embed(&timesteps, dtype)?;
        let (text, image) =
            self.encoder
                .contexts(encoder_hidden_states, image_encoder_hidden_states, dtype)?;
        let ctx = Contexts {
            text: &text,
            image: image.as_ref(),
        };

        let h = self.encoder.conv_in.forward(sample)?;
        let hint = self.cond_embedding.forward(&cond)?;
        if h.dims() != hint.dims() {
            return Err(Error::Option(format!(
                "ControlNet: the control image gives {:?} features, the latent {:?} (the \
                 image must be 8x the latent)",
                hint.dims(),
                h.dims()
            )));
        }
        let (h, skips) = self.encoder.down((h + hint)?, &emb, &ctx)?;
        let h = self.encoder.mid(&h, &emb, &ctx)?;

        let finish = |t: Tensor| -> CResult<Tensor> {
            let t = (t * conditioning_scale)?;
            if self.global_pool {
                let (b, c, h, w) = t.dims4()?;
                t.reshape((b, c, h * w))?
                    .mean_keepdim(2)?
                    .reshape((b, c, 1, 1))
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_zero_convs)
            .map(|(s, conv)| finish(conv.forward(s)?))
            .collect::<CResult<Vec<_>>>()?;
        let mid = finish(self.mid_zero_conv.forward(&h)?)?;
        Ok(ControlNetOutput { down, mid })
    }
}
