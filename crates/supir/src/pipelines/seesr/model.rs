//! The SeeSR release as a user downloads it (`preset/models/` of `test_seesr.py`), and the
//! loaded networks:
//!
//! ```text
//! stable-diffusion-2-base/  scheduler/ text_encoder/ tokenizer/ vae/ (diffusers folder)
//! seesr/unet/, seesr/controlnet/   (config.json + diffusion_pytorch_model.{safetensors,bin})
//! DAPE.pth, ram_swin_large_14m.pth
//! sd-turbo/                 optional: the turbo preset's base (scheduler/, unet/, and its own
//!                           text_encoder/, tokenizer/, vae/ when present)
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use image::RgbImage;

use super::options::{Residency, SeesrOptions, SeesrPreset};
use crate::layers::{with_linear_quant, Quant};
use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::ram::{Ram, RamConfig};
use crate::models::tiled_vae;
use crate::models::unet::sd2::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::schedulers::ddpm::DdpmConfig;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// Where each part of the release is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeesrPaths {
    /// The diffusers base folder the text encoder, tokenizer, VAE and scheduler come from
    /// (`stable-diffusion-2-base/`).
    pub sd2_base: PathBuf,
    /// SeeSR's folder holding `unet/` and `controlnet/`.
    pub seesr: PathBuf,
    /// `ram_swin_large_14m.pth`.
    pub ram: PathBuf,
    /// `DAPE.pth` (the LoRA fine-tune; without it the tagger is plain RAM).
    pub dape: PathBuf,
    /// `sd-turbo/` (turbo preset only).
    pub turbo: Option<PathBuf>,
}

fn missing(path: &Path, what: &str) -> Error {
    Error::NotFound {
        path: path.to_path_buf(),
        what: format!("{what} of the SeeSR release"),
    }
}

/// The weight file of a diffusers component folder: the first of `names` present.
pub fn weights_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| missing(&dir.join(names[0]), "weights (safetensors or .bin)"))
}

const DIFFUSERS_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];
const TRANSFORMERS_WEIGHTS: &[&str] = &["model.safetensors", "pytorch_model.bin"];

impl SeesrPaths {
    /// The official `preset/models` layout under `dir`.
    pub fn from_models_dir(dir: &Path) -> Self {
        let turbo = dir.join("sd-turbo");
        Self {
            sd2_base: dir.join("stable-diffusion-2-base"),
            seesr: dir.join("seesr"),
            ram: dir.join("ram_swin_large_14m.pth"),
            dape: dir.join("DAPE.pth"),
            turbo: turbo.is_dir().then_some(turbo),
        }
    }

    /// The base folder the preset samples with: SD-2-base, or sd-turbo for `turbo`.
    fn base(&self, preset: SeesrPreset) -> Result<&Path> {
        match preset {
            SeesrPreset::Default => Ok(&self.sd2_base),
            SeesrPreset::Turbo => self.turbo.as_deref().ok_or_else(|| {
                missing(
                    &self.sd2_base.with_file_name("sd-turbo"),
                    "sd-turbo folder (needed by --preset turbo)",
                )
            }),
        }
    }

    /// A text encoder / tokenizer / VAE subfolder: the preset's base folder's own, else
    /// SD-2-base's (the same architecture; sd-turbo ships its own copies).
    fn component(&self, preset: SeesrPreset, sub: &str) -> Result<PathBuf> {
        let own = self.base(preset)?.join(sub);
        Ok(if own.is_dir() {
            own
        } else {
            self.sd2_base.join(sub)
        })
    }

    /// Checks that every file the preset reads is there; the error names the first missing one.
    pub fn check(&self, preset: SeesrPreset) -> Result<()> {
        for (sub, names) in [
            ("text_encoder", TRANSFORMERS_WEIGHTS),
            ("vae", DIFFUSERS_WEIGHTS),
        ] {
            let dir = self.component(preset, sub)?;
            require(&dir.join("config.json"), sub)?;
            weights_file(&dir, names)?;
        }
        let tok = self.component(preset, "tokenizer")?;
        require(&tok.join("vocab.json"), "tokenizer")?;
        require(&tok.join("merges.txt"), "tokenizer")?;
        require(
            &self.base(preset)?.join("scheduler/scheduler_config.json"),
            "scheduler",
        )?;
        for sub in ["unet", "controlnet"] {
            let dir = self.seesr.join(sub);
            require(&dir.join("config.json"), sub)?;
            weights_file(&dir, DIFFUSERS_WEIGHTS)?;
        }
        if preset == SeesrPreset::Turbo {
            let dir = self.base(preset)?.join("unet");
            require(&dir.join("config.json"), "sd-turbo unet")?;
            weights_file(&dir, DIFFUSERS_WEIGHTS)?;
        }
        require(&self.ram, "RAM weights")?;
        require(&self.dape, "DAPE weights")?;
        Ok(())
    }
}

fn require(path: &Path, what: &str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(missing(path, what))
    }
}

/// ControlNet + UNet: the networks of the sampling loop.
pub struct DiffusionNets {
    pub unet: UNet2DConditionModel,
    pub controlnet: ControlNetModel,
}

/// A network that [`Residency::Staged`] frees between phases and reads again when next needed.
type Slot<T> = Mutex<Option<Arc<T>>>;

fn slot<T>(v: Option<T>) -> Slot<T> {
    Mutex::new(v.map(Arc::new))
}

/// The network in `slot`, read first by `load` when it was released.
fn get_or_load<T>(slot: &Slot<T>, what: &str, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    // A panic elsewhere while the lock was held leaves the slot itself valid.
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = guard.as_ref() {
        return Ok(v.clone());
    }
    let t = std::time::Instant::now();
    let v = Arc::new(load()?);
    tracing::info!("{what} read in {:.1?} (staged residency)", t.elapsed());
    crate::memory::trace_rss(&format!("{what} read"));
    *guard = Some(v.clone());
    Ok(v)
}

fn is_loaded<T>(slot: &Slot<T>) -> bool {
    slot.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Frees what `slot` holds (a network call still running keeps its own reference).
fn release<T>(slot: &Slot<T>) -> bool {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .is_some()
}

/// What a released network is read again from.
struct Source {
    paths: SeesrPaths,
    preset: SeesrPreset,
    vae_dtype: DType,
    diffusion_dtype: DType,
    /// ControlNet + UNet linear layers block-quantised at read (`--diffusion-dtype q8_0`).
    diffusion_quant: Option<Quant>,
    ram_cfg: RamConfig,
}

impl Source {
    fn text_encoder(&self, dev: &Device) -> Result<ClipTextTransformer> {
        let te_dir = self.paths.component(self.preset, "text_encoder")?;
        let te_cfg = ClipTextConfig::from_hf_config(te_dir.join("config.json"))?;
        let te_vb = WeightSource::open(&[weights_file(&te_dir, TRANSFORMERS_WEIGHTS)?])?
            .into_var_builder(self.vae_dtype, dev);
        Ok(ClipTextTransformer::from_text_model(te_vb, &te_cfg)?)
    }

    fn ram(&self, dev: &Device) -> Result<Ram> {
        Ram::load(
            &self.paths.ram,
            Some(&self.paths.dape),
            &self.ram_cfg,
            self.vae_dtype,
            dev,
        )
    }

    /// The UNet; with `check_only` its keys and shapes are checked against the files and
    /// nothing is read (the network built is a zero-size stand-in, dropped at once).
    fn unet(&self, dev: &Device, check_only: bool) -> Result<UNet2DConditionModel> {
        self.quantised("UNet", check_only, || self.unet_as_loaded(dev, check_only))
    }

    /// Builds a diffusion network under [`with_linear_quant`] (not when only checking).
    fn quantised<T>(
        &self,
        what: &str,
        check_only: bool,
        build: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let quant = self.diffusion_quant.filter(|_| !check_only);
        let (net, stats) = with_linear_quant(quant, build);
        if let Some(q) = quant {
            tracing::info!(
                "{what}: {} linear layers in {} ({} of them in q8_0: not 256 wide), {} kept (input width not a multiple of 32)",
                stats.quantised,
                q.name(),
                stats.fallback,
                stats.kept
            );
        }
        net
    }

    fn unet_as_loaded(&self, dev: &Device, check_only: bool) -> Result<UNet2DConditionModel> {
        let unet_dir = self.paths.seesr.join("unet");
        let seesr_unet = weights_file(&unet_dir, DIFFUSERS_WEIGHTS)?;
        let dt = self.diffusion_dtype;
        match self.preset {
            SeesrPreset::Default => {
                let cfg = UNet2DConditionConfig::from_file(unet_dir.join("config.json"))?;
                let src = WeightSource::open(&[seesr_unet])?;
                let vb = if check_only {
                    src.into_checking_var_builder(dt, dev)
                } else {
                    src.into_var_builder(dt, dev)
                };
                UNet2DConditionModel::new(vb, &cfg)
            }
            SeesrPreset::Turbo if check_only => {
                let base = self.paths.base(self.preset)?.join("unet");
                let mut cfg = UNet2DConditionConfig::from_file(base.join("config.json"))?;
                cfg.use_image_cross_attention = true;
                let check = |p: PathBuf| -> Result<VarBuilder<'static>> {
                    Ok(WeightSource::open(&[p])?.into_checking_var_builder(dt, dev))
                };
                let routed = CheckImageAttentionsFrom {
                    base: check(weights_file(&base, DIFFUSERS_WEIGHTS)?)?,
                    seesr: check(seesr_unet)?,
                };
                let vb = VarBuilder::from_backend(Box::new(routed), dt, dev.clone());
                UNet2DConditionModel::new(vb, &cfg)
            }
            SeesrPreset::Turbo => UNet2DConditionModel::from_pretrained_orig(
                self.paths.base(self.preset)?.join("unet"),
                &unet_dir,
                dt,
                dev,
            ),
        }
    }

    /// The ControlNet (`check_only` as for [`Self::unet`]).
    fn controlnet(&self, dev: &Device, check_only: bool) -> Result<ControlNetModel> {
        self.quantised("ControlNet", check_only, || {
            self.controlnet_as_loaded(dev, check_only)
        })
    }

    fn controlnet_as_loaded(&self, dev: &Device, check_only: bool) -> Result<ControlNetModel> {
        let cn_dir = self.paths.seesr.join("controlnet");
        let cn_cfg = ControlNetConfig::from_file(cn_dir.join("config.json"))?;
        let src = WeightSource::open(&[weights_file(&cn_dir, DIFFUSERS_WEIGHTS)?])?;
        let vb = if check_only {
            src.into_checking_var_builder(self.diffusion_dtype, dev)
        } else {
            src.into_var_builder(self.diffusion_dtype, dev)
        };
        ControlNetModel::new(vb, &cn_cfg)
    }

    fn diffusion(&self, dev: &Device) -> Result<DiffusionNets> {
        Ok(DiffusionNets {
            unet: self.unet(dev, false)?,
            controlnet: self.controlnet(dev, false)?,
        })
    }
}

/// The turbo UNet's checking backend: `image_attentions` keys from SeeSR's UNet file, the rest
/// from sd-turbo's (the routing of [`UNet2DConditionModel::from_pretrained_orig`]).
struct CheckImageAttentionsFrom {
    base: VarBuilder<'static>,
    seesr: VarBuilder<'static>,
}

impl CheckImageAttentionsFrom {
    fn source(&self, name: &str) -> &VarBuilder<'static> {
        if name.contains("image_attentions") {
            &self.seesr
        } else {
            &self.base
        }
    }
}

impl SimpleBackend for CheckImageAttentionsFrom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.source(name).get_with_hints_dtype(s, name, h, dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.source(name).get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source(name).contains_tensor(name)
    }
}

/// The loaded SeeSR networks.
///
/// Under [`Residency::Staged`] (`opts.residency` at load) DAPE + the text encoder are freed once
/// an image's tags and prompts are encoded ([`Self::release_after_prepare`]), ControlNet + UNet
/// are read when sampling needs them and freed before the VAE decode
/// ([`Self::release_after_sampling`]), so the VAE's large activations at the output size never
/// meet the other networks' weights; whatever was freed is read again when the next image needs
/// it. Under [`Residency::Resident`] every network stays loaded.
pub struct SeesrModel {
    pub tokenizer: Tokenizer,
    text_encoder: Slot<ClipTextTransformer>,
    pub vae: AutoencoderKL,
    /// `vae.config.scaling_factor`.
    pub vae_scale: f64,
    diffusion: Slot<DiffusionNets>,
    ram: Slot<Ram>,
    pub scheduler: DdpmConfig,
    residency: Residency,
    source: Source,
    device: Device,
}

impl SeesrModel {
    /// Loads the release for `opts.preset` in the dtypes of `opts`, with `opts.residency`:
    /// under [`Residency::Staged`] ControlNet + UNet are only checked (files, configs, keys and
    /// shapes: a bad release fails here either way) and read when the first image is sampled.
    pub fn load(paths: &SeesrPaths, opts: &SeesrOptions, dev: &Device) -> Result<Self> {
        Self::load_with_ram_config(paths, opts, &RamConfig::default(), dev)
    }

    /// [`Self::load`] with a RAM config other than the release's (small test models).
    pub fn load_with_ram_config(
        paths: &SeesrPaths,
        opts: &SeesrOptions,
        ram_cfg: &RamConfig,
        dev: &Device,
    ) -> Result<Self> {
        paths.check(opts.preset)?;
        let preset = opts.preset;
        let source = Source {
            paths: paths.clone(),
            preset,
            vae_dtype: opts.vae_dtype.dtype(),
            diffusion_dtype: opts.diffusion_dtype.dtype(),
            diffusion_quant: opts.diffusion_dtype.quant(),
            ram_cfg: ram_cfg.clone(),
        };
        let staged = opts.residency == Residency::Staged;

        let tokenizer = Tokenizer::from_folder(&paths.component(preset, "tokenizer")?)?;
        let text_encoder = source.text_encoder(dev)?;

        let vae_dir = paths.component(preset, "vae")?;
        let vae_cfg = VaeConfig::from_diffusers_config(vae_dir.join("config.json"))?;
        let vae_vb = WeightSource::open(&[weights_file(&vae_dir, DIFFUSERS_WEIGHTS)?])?
            .into_var_builder(source.vae_dtype, dev);
        let vae = AutoencoderKL::from_diffusers(vae_vb, &vae_cfg)?;

        // The same order as reading them, so the same error comes first.
        let unet = source.unet(dev, staged)?;
        let controlnet = source.controlnet(dev, staged)?;
        let diffusion = (!staged).then_some(DiffusionNets { unet, controlnet });

        let ram = source.ram(dev)?;
        let scheduler =
            DdpmConfig::from_file(paths.base(preset)?.join("scheduler/scheduler_config.json"))?;
        crate::memory::trace_rss("SeeSR loaded");
        Ok(Self {
            tokenizer,
            text_encoder: slot(Some(text_encoder)),
            vae_scale: vae_cfg.scaling_factor,
            vae,
            diffusion: slot(diffusion),
            ram: slot(Some(ram)),
            scheduler,
            residency: opts.residency,
            source,
            device: dev.clone(),
        })
    }

    /// The residency the model was loaded with.
    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// The text encoder (read again if it was freed).
    pub fn text_encoder(&self) -> Result<Arc<ClipTextTransformer>> {
        get_or_load(&self.text_encoder, "text encoder", || {
            self.source.text_encoder(&self.device)
        })
    }

    /// DAPE (RAM with the DAPE LoRA; read again if it was freed).
    pub fn ram(&self) -> Result<Arc<Ram>> {
        get_or_load(&self.ram, "DAPE", || self.source.ram(&self.device))
    }

    /// ControlNet + UNet (read if not loaded).
    pub fn diffusion(&self) -> Result<Arc<DiffusionNets>> {
        get_or_load(&self.diffusion, "ControlNet + UNet", || {
            self.source.diffusion(&self.device)
        })
    }

    /// Whether ControlNet + UNet are in memory now.
    pub fn diffusion_loaded(&self) -> bool {
        is_loaded(&self.diffusion)
    }

    /// Whether DAPE and the text encoder are in memory now.
    pub fn prompt_nets_loaded(&self) -> bool {
        is_loaded(&self.ram) && is_loaded(&self.text_encoder)
    }

    /// Frees DAPE + the text encoder and hands the free heap back (they are read again when
    /// next needed).
    pub fn release_prompt_nets(&self) {
        let a = release(&self.ram);
        let b = release(&self.text_encoder);
        if a || b {
            crate::memory::release_free_heap();
            crate::memory::trace_rss("DAPE + text encoder released");
        }
    }

    /// Frees ControlNet + UNet and hands the free heap back (read again when next needed).
    pub fn release_diffusion(&self) {
        if release(&self.diffusion) {
            crate::memory::release_free_heap();
            crate::memory::trace_rss("ControlNet + UNet released");
        }
    }

    /// End of an image's prepare stage: under [`Residency::Staged`] frees DAPE + the text
    /// encoder; nothing under [`Residency::Resident`].
    pub fn release_after_prepare(&self) {
        if self.residency == Residency::Staged {
            self.release_prompt_nets();
        }
    }

    /// End of sampling, before the VAE decode: under [`Residency::Staged`] frees ControlNet +
    /// UNet; nothing under [`Residency::Resident`].
    pub fn release_after_sampling(&self) {
        if self.residency == Residency::Staged {
            self.release_diffusion();
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `_encode_prompt` for one prompt: `last_hidden_state` `[1, 77, width]` (f32).
    pub fn encode_text(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.padded_ids(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder()?.forward(&ids)?.to_dtype(DType::F32)?)
    }

    /// DAPE on an image: (tag string, image embeddings `[1, 145, 512]` f32).
    pub fn tag(&self, image: &RgbImage) -> Result<(String, Tensor)> {
        crate::pipelines::captions::tag_image(&*self.ram()?, image, &self.device)
    }

    /// `quant_conv(encoder(x))` through the tiled hook (`_init_tiled_vae`; plain when the image
    /// fits one tile), with this run's encoder tile.
    pub fn vae_encode_moments(&self, x: &Tensor, opts: &SeesrOptions) -> Result<Tensor> {
        let h = tiled_vae::encode(
            &self.vae.encoder,
            x,
            opts.vae_encoder_tile,
            opts.vae_tile_dtype,
        )?;
        Ok(self.vae.quant_conv.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// `decoder(post_quant_conv(z))` through the tiled hook; `z` unscaled latents.
    pub fn vae_decode(&self, z: &Tensor, opts: &SeesrOptions) -> Result<Tensor> {
        let z = self.vae.post_quant_conv.forward(z)?;
        Ok(tiled_vae::decode(
            &self.vae.decoder,
            &z,
            opts.vae_decoder_tile,
            opts.vae_tile_dtype,
        )?
        .to_dtype(DType::F32)?)
    }
}
