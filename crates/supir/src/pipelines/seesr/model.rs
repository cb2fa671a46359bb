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

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::options::{SeesrOptions, SeesrPreset};
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

/// The loaded SeeSR networks.
pub struct SeesrModel {
    pub tokenizer: Tokenizer,
    pub text_encoder: ClipTextTransformer,
    pub vae: AutoencoderKL,
    /// `vae.config.scaling_factor`.
    pub vae_scale: f64,
    pub unet: UNet2DConditionModel,
    pub controlnet: ControlNetModel,
    pub ram: Ram,
    pub scheduler: DdpmConfig,
    device: Device,
}

impl SeesrModel {
    /// Loads the release for `opts.preset` in the dtypes of `opts`.
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
        let vae_dtype = opts.vae_dtype.dtype();
        let diff_dtype = opts.diffusion_dtype.dtype();

        let tokenizer = Tokenizer::from_folder(&paths.component(preset, "tokenizer")?)?;
        let te_dir = paths.component(preset, "text_encoder")?;
        let te_cfg = ClipTextConfig::from_hf_config(te_dir.join("config.json"))?;
        let te_vb = WeightSource::open(&[weights_file(&te_dir, TRANSFORMERS_WEIGHTS)?])?
            .into_var_builder(vae_dtype, dev);
        let text_encoder = ClipTextTransformer::from_text_model(te_vb, &te_cfg)?;

        let vae_dir = paths.component(preset, "vae")?;
        let vae_cfg = VaeConfig::from_diffusers_config(vae_dir.join("config.json"))?;
        let vae_vb = WeightSource::open(&[weights_file(&vae_dir, DIFFUSERS_WEIGHTS)?])?
            .into_var_builder(vae_dtype, dev);
        let vae = AutoencoderKL::from_diffusers(vae_vb, &vae_cfg)?;

        let unet_dir = paths.seesr.join("unet");
        let seesr_unet = weights_file(&unet_dir, DIFFUSERS_WEIGHTS)?;
        let unet = match preset {
            SeesrPreset::Default => {
                let cfg = UNet2DConditionConfig::from_file(unet_dir.join("config.json"))?;
                let vb = WeightSource::open(&[seesr_unet])?.into_var_builder(diff_dtype, dev);
                UNet2DConditionModel::new(vb, &cfg)?
            }
            SeesrPreset::Turbo => UNet2DConditionModel::from_pretrained_orig(
                paths.base(preset)?.join("unet"),
                &unet_dir,
                diff_dtype,
                dev,
            )?,
        };
        let cn_dir = paths.seesr.join("controlnet");
        let cn_cfg = ControlNetConfig::from_file(cn_dir.join("config.json"))?;
        let cn_vb = WeightSource::open(&[weights_file(&cn_dir, DIFFUSERS_WEIGHTS)?])?
            .into_var_builder(diff_dtype, dev);
        let controlnet = ControlNetModel::new(cn_vb, &cn_cfg)?;

        let ram = Ram::load(&paths.ram, Some(&paths.dape), ram_cfg, vae_dtype, dev)?;
        let scheduler =
            DdpmConfig::from_file(paths.base(preset)?.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            tokenizer,
            text_encoder,
            vae_scale: vae_cfg.scaling_factor,
            vae,
            unet,
            controlnet,
            ram,
            scheduler,
            device: dev.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `_encode_prompt` for one prompt: `last_hidden_state` `[1, 77, width]` (f32).
    pub fn encode_text(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.padded_ids(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?.to_dtype(DType::F32)?)
    }

    /// DAPE on an image: (tag string, image embeddings `[1, 145, 512]` f32).
    pub fn tag(&self, image: &RgbImage) -> Result<(String, Tensor)> {
        crate::pipelines::captions::tag_image(&self.ram, image, &self.device)
    }

    /// `quant_conv(encoder(x))` through the tiled hook (`_init_tiled_vae`; plain when the image
    /// fits one tile), with this run's encoder tile.
    pub fn vae_encode_moments(&self, x: &Tensor, opts: &SeesrOptions) -> Result<Tensor> {
        let h = tiled_vae::encode(&self.vae.encoder, x, opts.vae_encoder_tile)?;
        Ok(self.vae.quant_conv.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// `decoder(post_quant_conv(z))` through the tiled hook; `z` unscaled latents.
    pub fn vae_decode(&self, z: &Tensor, opts: &SeesrOptions) -> Result<Tensor> {
        let z = self.vae.post_quant_conv.forward(z)?;
        Ok(
            tiled_vae::decode(&self.vae.decoder, &z, opts.vae_decoder_tile)?
                .to_dtype(DType::F32)?,
        )
    }
}
