//! The assembled SUPIR model (`SUPIR/models/SUPIR_model.py::SUPIRModel`): conditioner, VAE with
//! denoise encoder, GLVControl, LightGLVUNet and the discrete denoiser, from one config and a
//! list of checkpoints (SDXL base first, then the SUPIR file).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{with_linear_quant, Quant, QuantStats};
use crate::models::glv_control::GLVControl;
use crate::models::supir_config::SupirConfig;
use crate::models::unet::LightGLVUNet;
use crate::models::vae::AutoencoderKL;
use crate::pipelines::supir::conditioner::Conditioner;
use crate::schedulers::denoiser::{DiscreteDenoiser, LegacyDdpm};
use crate::weights::WeightSource;
use crate::Result;

pub struct SupirModel {
    /// `conditioner`: both text encoders and the size embeddings; the encoders can be dropped
    /// once the prompts are encoded.
    pub conditioner: Conditioner,
    /// `model.control_model` + `model.diffusion_model`; `None` while released
    /// ([`SupirModel::release_diffusion`]) so the VAE phases run without them.
    pub diffusion: Option<DiffusionNets>,
    /// `first_stage_model`, with `denoise_encoder`.
    pub vae: AutoencoderKL,
    pub denoiser: DiscreteDenoiser,
    pub scale_factor: f64,
    dtypes: DTypes,
}

/// The two networks of a sampling step: GLVControl and the UNet it feeds (together most of the
/// model's weights: 3.9 of its 4.7 G parameters at full size).
pub struct DiffusionNets {
    /// `model.control_model`.
    pub control: GLVControl,
    /// `model.diffusion_model`.
    pub unet: LightGLVUNet,
    /// Linear layers quantised at load (all zero without quantisation).
    pub quant_stats: QuantStats,
}

impl DiffusionNets {
    /// Builds both from `vb` at the root of the official state dict, their linear layers in
    /// `quant` when given.
    pub fn new(vb: VarBuilder, cfg: &SupirConfig, quant: Option<Quant>) -> Result<Self> {
        let p = &cfg.model.params;
        let (nets, quant_stats) = with_linear_quant(quant, || -> Result<_> {
            Ok((
                GLVControl::new(vb.pp("model.control_model"), &p.control_stage_config.params)?,
                LightGLVUNet::new(vb.pp("model.diffusion_model"), &p.network_config.params)?,
            ))
        });
        let (control, unet) = nets?;
        if let Some(q) = quant {
            tracing::info!(
                "GLVControl + UNet: {} linear layers in {} ({} of them in q8_0: not 256 wide), {} kept (input width not a multiple of 32)",
                quant_stats.quantised,
                q.name(),
                quant_stats.fallback,
                quant_stats.kept
            );
        }
        Ok(Self {
            control,
            unet,
            quant_stats,
        })
    }

    /// Reads both from `checkpoints` (later files override earlier ones) in `dtype`.
    pub fn load<P: AsRef<Path>>(
        cfg: &SupirConfig,
        checkpoints: &[P],
        dtype: DType,
        quant: Option<Quant>,
        dev: &Device,
    ) -> Result<Self> {
        let vb = WeightSource::open(checkpoints)?.into_var_builder(dtype, dev);
        let nets = Self::new(vb, cfg, quant);
        crate::memory::trace_rss("GLVControl + UNet loaded");
        nets
    }
}

impl SupirModel {
    /// Builds every network from `vb` (the root of the official state dict) in `vb`'s dtype.
    pub fn new(vb: VarBuilder, cfg: &SupirConfig) -> Result<Self> {
        let dtypes = DTypes::uniform(vb.dtype());
        Self::new_with(vb, cfg, dtypes)
    }

    /// `ControlWrapper` under `DiscreteDenoiserWithControl`: the denoised latent for `x` [B,4,h,w]
    /// at one sigma per row, with `crossattn` [B,77,ctx], `vector` [B,adm] and the control
    /// latent `control` [B,4,h,w].
    pub fn denoise(
        &self,
        x: &Tensor,
        sigmas: &[f32],
        crossattn: &Tensor,
        vector: &Tensor,
        control: &Tensor,
        control_scale: f64,
    ) -> Result<Tensor> {
        let nets = self.diffusion()?;
        self.denoiser.denoise(x, sigmas, |xin, t| {
            crate::memory::trace_rss("before GLVControl");
            let hints = nets.control.forward(control, t, xin, crossattn, vector)?;
            crate::memory::trace_rss("GLVControl done, hints held");
            // GLVControl's freed activations (and pooled kernel scratch) otherwise stay in the
            // heap beside the UNet's, in holes the UNet's shapes do not all fit.
            crate::memory::release_free_heap();
            crate::memory::trace_rss("GLVControl's free heap handed back");
            let out = nets
                .unet
                .forward(xin, t, crossattn, vector, &hints, control_scale)?;
            crate::memory::trace_rss("UNet done");
            Ok(out)
        })
    }

    /// GLVControl + UNet, or an error saying they are released.
    pub fn diffusion(&self) -> Result<&DiffusionNets> {
        self.diffusion.as_ref().ok_or_else(|| {
            crate::Error::Option(
                "GLVControl and the UNet are not loaded (released for the VAE phases)".into(),
            )
        })
    }

    /// Loads the checkpoints (later files override earlier ones) in `dtype` on `dev`.
    pub fn load<P: AsRef<Path>>(
        cfg: &SupirConfig,
        checkpoints: &[P],
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Self::load_with(cfg, checkpoints, DTypes::uniform(dtype), dev)
    }

    /// Loads the checkpoints with one dtype per part (the official `diffusion_dtype` for
    /// control + UNet, `ae_dtype` for the VAE and, as its autocast does, the text encoders).
    pub fn load_with<P: AsRef<Path>>(
        cfg: &SupirConfig,
        checkpoints: &[P],
        dtypes: DTypes,
        dev: &Device,
    ) -> Result<Self> {
        let vb = WeightSource::open(checkpoints)?.into_var_builder(dtypes.vae, dev);
        Self::new_with(vb, cfg, dtypes)
    }

    /// [`SupirModel::load_with`] without GLVControl and the UNet: their keys and shapes are
    /// checked in the files, but they are read only by [`SupirModel::load_diffusion`].
    pub fn load_without_diffusion<P: AsRef<Path>>(
        cfg: &SupirConfig,
        checkpoints: &[P],
        dtypes: DTypes,
        dev: &Device,
    ) -> Result<Self> {
        let src = WeightSource::open(checkpoints)?;
        DiffusionNets::new(
            src.clone().into_checking_var_builder(dtypes.diffusion, dev),
            cfg,
            None,
        )?;
        Self::new_parts(src.into_var_builder(dtypes.vae, dev), cfg, dtypes, false)
    }

    /// [`SupirModel::new`] with one dtype per part.
    pub fn new_with(vb: VarBuilder, cfg: &SupirConfig, dtypes: DTypes) -> Result<Self> {
        Self::new_parts(vb, cfg, dtypes, true)
    }

    fn new_parts(
        vb: VarBuilder,
        cfg: &SupirConfig,
        dtypes: DTypes,
        with_diffusion: bool,
    ) -> Result<Self> {
        let p = &cfg.model.params;
        let conditioner = Conditioner::new(
            &p.conditioner_config.params,
            vb.clone().set_dtype(dtypes.text).pp("conditioner"),
        )?;
        let vae = AutoencoderKL::new(
            vb.clone().set_dtype(dtypes.vae).pp("first_stage_model"),
            &p.first_stage_config.params,
            true,
        )?;
        let diffusion = if with_diffusion {
            Some(DiffusionNets::new(
                vb.set_dtype(dtypes.diffusion),
                cfg,
                dtypes.diffusion_quant,
            )?)
        } else {
            None
        };
        Ok(Self {
            conditioner,
            diffusion,
            vae,
            denoiser: DiscreteDenoiser::new(&LegacyDdpm::default()),
            scale_factor: p.scale_factor,
            dtypes,
        })
    }

    /// Reads GLVControl + UNet from `checkpoints` in the model's diffusion weight dtype
    /// (no-op when they are loaded).
    pub fn load_diffusion<P: AsRef<Path>>(
        &mut self,
        cfg: &SupirConfig,
        checkpoints: &[P],
    ) -> Result<()> {
        if self.diffusion.is_none() {
            let dev = self.device();
            self.diffusion = Some(DiffusionNets::load(
                cfg,
                checkpoints,
                self.dtypes.diffusion,
                self.dtypes.diffusion_quant,
                &dev,
            )?);
        }
        Ok(())
    }

    /// Reads the text encoders again from `checkpoints` in the model's text dtype after
    /// [`Conditioner::drop_text_encoders`] (no-op when they are loaded): staged residency encodes
    /// each image's own prompt (automatic captions) without keeping them beside GLVControl + UNet.
    pub fn load_text_encoders<P: AsRef<Path>>(
        &mut self,
        cfg: &SupirConfig,
        checkpoints: &[P],
    ) -> Result<()> {
        if !self.conditioner.has_text_encoders() {
            let dev = self.device();
            let vb = WeightSource::open(checkpoints)?.into_var_builder(self.dtypes.text, &dev);
            self.conditioner = Conditioner::new(
                &cfg.model.params.conditioner_config.params,
                vb.pp("conditioner"),
            )?;
            crate::memory::trace_rss("text encoders read");
        }
        Ok(())
    }

    /// Frees GLVControl + UNet and hands the free heap back to the system.
    pub fn release_diffusion(&mut self) {
        if self.diffusion.take().is_some() {
            crate::memory::release_free_heap();
            crate::memory::trace_rss("GLVControl + UNet released");
        }
    }

    /// The dtype the VAE computes in (stage 1, decoding): its weights' dtype, or f32 on the CPU
    /// ([`crate::layers::compute_dtype`]).
    pub fn vae_dtype(&self) -> DType {
        crate::layers::compute_dtype(self.vae.quant_conv.weight().dtype(), &self.device())
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vae.quant_conv.weight().device().clone()
    }

    /// The dtype control + UNet compute in (the sampler's network calls): their weights'
    /// dtype, or f32 on the CPU ([`crate::layers::compute_dtype`]).
    pub fn diffusion_dtype(&self) -> DType {
        crate::layers::compute_dtype(self.dtypes.diffusion, &self.device())
    }

    /// The dtypes the weights are meant to be held in (also while GLVControl + UNet are
    /// released).
    pub fn dtypes(&self) -> DTypes {
        self.dtypes
    }

    /// The dtypes the loaded weights are held in: `(UNet, VAE)`, the diffusion entry `None`
    /// while released.
    pub fn weight_dtypes(&self) -> (Option<DType>, DType) {
        (
            self.diffusion.as_ref().map(|d| d.unet.dtype()),
            self.vae.quant_conv.weight().dtype(),
        )
    }
}

/// Weight dtypes of the model's parts. The official code offers f32 / f16 / bf16 for the
/// diffusion part and f32 / bf16 for the VAE (f16 gives NaNs there). On a GPU the part computes
/// in that dtype; on the CPU the weights stay in it and every layer computes in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DTypes {
    /// Control + UNet.
    pub diffusion: DType,
    /// The autoencoder (both encoders and the decoder).
    pub vae: DType,
    /// Both text encoders (dropped once the prompts are encoded).
    pub text: DType,
    /// Control + UNet linear layers block-quantised (their other weights in `diffusion`).
    pub diffusion_quant: Option<Quant>,
}

impl DTypes {
    /// Everything in one dtype.
    pub fn uniform(dtype: DType) -> Self {
        Self {
            diffusion: dtype,
            vae: dtype,
            text: dtype,
            diffusion_quant: None,
        }
    }

    /// With the diffusion networks' linear layers in `quant`.
    pub fn with_diffusion_quant(self, quant: Option<Quant>) -> Self {
        Self {
            diffusion_quant: quant,
            ..self
        }
    }

    /// `diffusion` for control + UNet, `vae` for the VAE and the text encoders (the official
    /// code encodes prompts under `autocast(ae_dtype)`).
    pub fn new(diffusion: DType, vae: DType) -> Self {
        Self {
            diffusion,
            vae,
            text: vae,
            diffusion_quant: None,
        }
    }
}
