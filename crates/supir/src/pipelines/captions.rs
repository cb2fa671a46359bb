//! Automatic captions of an image, for either backend's prompt.
//!
//! - [`Captioner::Tags`]: DAPE (SeeSR's degradation-aware RAM tagger); the caption is the tag
//!   string exactly as the official `inference_ram` returns it (`", "`-joined, class order), as
//!   `test_seesr.py`'s `get_validation_prompt` tags its input.
//! - [`Captioner::Llava`]: LLaVA-1.5 as SUPIR's `llava_agent.py` runs it (not in this build).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::image_io::convert::rgb8_to_hwc;
use crate::models::ram::{self, Ram, RamConfig};
use crate::{Error, Result};

/// Which model writes automatic captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Captioner {
    /// DAPE tags (about 0.5 G parameters; the SeeSR release's `ram_swin_large_14m.pth` +
    /// `DAPE.pth`).
    #[default]
    Tags,
    /// LLaVA-1.5 (SUPIR's official captioner).
    Llava,
}

impl fmt::Display for Captioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tags => "tags",
            Self::Llava => "llava",
        })
    }
}

impl FromStr for Captioner {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tags" => Ok(Self::Tags),
            "llava" => Ok(Self::Llava),
            _ => Err(Error::Option(format!(
                "unknown captioner `{s}` (expected tags or llava)"
            ))),
        }
    }
}

/// DAPE on one image: `ram_transforms(tensor_transforms(img))`, then `inference_ram` and
/// `generate_image_embeds`: the tag string and the image embeddings `[1, 145, 512]` (f32).
pub fn tag_image(ram: &Ram, image: &RgbImage, dev: &Device) -> Result<(String, Tensor)> {
    let pixels = ram::preprocess(&rgb8_to_hwc(image, dev)?)?;
    let out = ram.forward(&pixels)?;
    let tags = out.tags.into_iter().next().unwrap_or_default();
    Ok((tags, out.image_embeds.to_dtype(DType::F32)?))
}

/// The DAPE captioner: RAM with the DAPE LoRA merged.
pub struct TagCaptioner {
    ram: Ram,
    device: Device,
}

impl TagCaptioner {
    /// Reads `ram_swin_large_14m.pth` and `DAPE.pth` (the official sizes; weights stored in
    /// `dtype`, computed in f32 on the CPU).
    pub fn load(ram_pth: &Path, dape_pth: &Path, dtype: DType, dev: &Device) -> Result<Self> {
        Self::load_with_config(ram_pth, dape_pth, &RamConfig::default(), dtype, dev)
    }

    /// [`Self::load`] with another RAM config (small test models).
    pub fn load_with_config(
        ram_pth: &Path,
        dape_pth: &Path,
        cfg: &RamConfig,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        for (p, what) in [(ram_pth, "RAM weights"), (dape_pth, "DAPE weights")] {
            if !p.is_file() {
                return Err(Error::NotFound {
                    path: p.to_path_buf(),
                    what: what.into(),
                });
            }
        }
        Ok(Self {
            ram: Ram::load(ram_pth, Some(dape_pth), cfg, dtype, dev)?,
            device: dev.clone(),
        })
    }

    /// The tags of `image` (empty when no class passes its threshold).
    pub fn caption(&self, image: &RgbImage) -> Result<String> {
        Ok(tag_image(&self.ram, image, &self.device)?.0)
    }
}

/// A tag caption as the text before SUPIR's positive prompt, which the official code joins with
/// no separator: `", "` appended unless the caption is empty or already ends in punctuation or
/// a space.
pub fn as_prompt_prefix(caption: &str) -> String {
    let c = caption.trim_end_matches(['\n', '\r']);
    match c.chars().last() {
        None => String::new(),
        Some(ch) if ch.is_whitespace() || ch.is_ascii_punctuation() => c.to_string(),
        Some(_) => format!("{c}, "),
    }
}
