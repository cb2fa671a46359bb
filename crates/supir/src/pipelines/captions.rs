//! Automatic captions of an image, for either backend's prompt.
//!
//! - [`Captioner::Tags`]: DAPE (SeeSR's degradation-aware RAM tagger); the caption is the tag
//!   string exactly as the official `inference_ram` returns it (`", "`-joined, class order), as
//!   `test_seesr.py`'s `get_validation_prompt` tags its input.
//! - [`Captioner::Llava`]: LLaVA-1.5 as SUPIR's `llava_agent.py` runs it ([`LlavaCaptioner`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::image_io::convert::rgb8_to_hwc;
use crate::models::llava::sampling::{Sampler, SamplingParams};
use crate::models::llava::{Llava, LlavaPaths};
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

/// The question SUPIR's `llava_agent.py` asks.
pub const LLAVA_QUESTION: &str = "Describe this image and its style in a very detailed manner.";

/// `conv_templates['vicuna_v1']` with one user turn (`<image>\n` + `question`, as
/// `mm_use_im_start_end` is false) and the open assistant turn.
pub fn vicuna_v1_prompt(question: &str) -> String {
    format!(
        "A chat between a curious user and an artificial intelligence assistant. The assistant \
         gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n\
         {question} ASSISTANT:"
    )
}

/// The agent's post-processing of a decoded answer: strip, drop a trailing stop string
/// (`</s>`, vicuna_v1's `sep2`), strip, newlines to spaces.
pub fn llava_postprocess(decoded: &str) -> String {
    let s = decoded.trim();
    let s = s.strip_suffix("</s>").unwrap_or(s);
    s.trim().replace(['\n', '\r'], " ")
}

/// How LLaVA captions: the official `gen_image_caption` defaults, plus our sampling seed.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaOptions {
    pub question: String,
    /// 0: greedy (the parity path).
    pub temperature: f64,
    pub top_p: f64,
    /// transformers' default top-k (50), which the agent does not override.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Seed of our sampler (torch's generator cannot be replayed): same image, same caption.
    pub seed: u64,
}

impl Default for LlavaOptions {
    fn default() -> Self {
        Self {
            question: LLAVA_QUESTION.into(),
            temperature: 0.2,
            top_p: 0.7,
            top_k: 50,
            max_new_tokens: 512,
            seed: 0,
        }
    }
}

/// LLaVA-1.5 as SUPIR's `LLavaAgent.gen_image_caption` runs it (one image at a time).
pub struct LlavaCaptioner {
    model: Llava,
    options: LlavaOptions,
    input_ids: Vec<i64>,
}

impl LlavaCaptioner {
    /// Loads the model (see [`Llava::load`]) in `dtype`.
    pub fn load(
        paths: &LlavaPaths,
        options: LlavaOptions,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Self::new(Llava::load(paths, dtype, dev)?, options)
    }

    pub fn new(model: Llava, options: LlavaOptions) -> Result<Self> {
        if !(0.0..=1.0).contains(&options.top_p) || options.temperature < 0.0 {
            return Err(Error::Option(format!(
                "LLaVA sampling: temperature {} (>= 0), top_p {} (0..=1)",
                options.temperature, options.top_p
            )));
        }
        let input_ids = model
            .tokenizer
            .tokenizer_image_token(&vicuna_v1_prompt(&options.question))?;
        Ok(Self {
            model,
            options,
            input_ids,
        })
    }

    pub fn model(&self) -> &Llava {
        &self.model
    }

    /// The prompt's ids (with [`crate::models::llava::tokenizer::IMAGE_TOKEN_INDEX`]).
    pub fn input_ids(&self) -> &[i64] {
        &self.input_ids
    }

    /// The generated token ids for `image` (EOS included when it stopped).
    pub fn generate_ids(&self, image: &RgbImage) -> Result<Vec<u32>> {
        let pixels = self.model.preprocess(image)?;
        let feats = self.model.image_features(&pixels)?;
        let embeds = self.model.prompt_embeds(&self.input_ids, &feats)?;
        let mut sampler = Sampler::new(SamplingParams {
            temperature: self.options.temperature,
            top_p: self.options.top_p,
            top_k: self.options.top_k,
            seed: self.options.seed,
        });
        let start = std::time::Instant::now();
        let mut first = None;
        let gen = self.model.generate(
            &embeds,
            self.options.max_new_tokens,
            &mut sampler,
            self.model.tokenizer.eos_id(),
            |n| {
                if n == 1 {
                    first = Some(start.elapsed());
                }
            },
        )?;
        let total = start.elapsed();
        let n = gen.ids.len();
        if let Some(f) = first {
            let rest = (total - f).as_secs_f64();
            tracing::info!(
                "LLaVA: {} prompt positions in {:.2}s, {n} tokens, {:.2} tokens/s after the first",
                embeds.dim(1)?,
                f.as_secs_f64(),
                if rest > 0.0 {
                    (n - 1) as f64 / rest
                } else {
                    0.0
                }
            );
        }
        Ok(gen.ids)
    }

    /// The caption of `image`; an empty one is an [`Error::EmptyCaption`].
    pub fn caption(&self, image: &RgbImage) -> Result<String> {
        let ids = self.generate_ids(image)?;
        let caption = llava_postprocess(&self.model.tokenizer.decode(&ids)?);
        if caption.is_empty() {
            return Err(Error::EmptyCaption {
                captioner: "llava".into(),
                detail: format!("{} tokens generated", ids.len()),
            });
        }
        Ok(caption)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_answer_post_processing() {
        assert_eq!(
            llava_postprocess("  A cat.\nOn a mat.</s> "),
            "A cat. On a mat."
        );
        assert_eq!(llava_postprocess("x\r\ny"), "x  y");
        assert_eq!(llava_postprocess(" </s>"), "");
        assert!(vicuna_v1_prompt(LLAVA_QUESTION).ends_with(
            "USER: <image>\nDescribe this image and its style in a very detailed manner. ASSISTANT:"
        ));
    }
}

/// Which captioner `caption: auto` loads, and from where: shared by `supir restore --caption
/// auto` and `supir serve` jobs.
#[derive(Debug, Clone)]
pub enum CaptionerConfig {
    /// DAPE tags: `ram_swin_large_14m.pth` and `DAPE.pth`.
    Tags { ram: PathBuf, dape: PathBuf },
    /// LLaVA-1.5 ([`Llava::load`]'s layouts), its sampling and the decoder's dtype.
    Llava {
        paths: LlavaPaths,
        options: LlavaOptions,
        dtype: DType,
    },
}

impl CaptionerConfig {
    /// Loads the captioner on `dev` (DAPE in f32).
    pub fn load(&self, dev: &Device) -> Result<AnyCaptioner> {
        Ok(match self {
            Self::Tags { ram, dape } => {
                AnyCaptioner::Tags(Box::new(TagCaptioner::load(ram, dape, DType::F32, dev)?))
            }
            Self::Llava {
                paths,
                options,
                dtype,
            } => AnyCaptioner::Llava(Box::new(LlavaCaptioner::load(
                paths,
                options.clone(),
                *dtype,
                dev,
            )?)),
        })
    }

    pub fn kind(&self) -> Captioner {
        match self {
            Self::Tags { .. } => Captioner::Tags,
            Self::Llava { .. } => Captioner::Llava,
        }
    }
}

/// Either captioner, loaded.
pub enum AnyCaptioner {
    Tags(Box<TagCaptioner>),
    Llava(Box<LlavaCaptioner>),
}

impl AnyCaptioner {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tags(_) => "DAPE",
            Self::Llava(_) => "LLaVA",
        }
    }

    /// The caption of `img`: for LLaVA an empty caption is an error.
    pub fn caption(&self, img: &RgbImage) -> Result<String> {
        match self {
            Self::Tags(t) => t.caption(img),
            Self::Llava(l) => l.caption(img),
        }
    }

    /// [`Self::caption`], an empty LLaVA caption as `""` (a restore warns and uses none, as
    /// for DAPE finding no tag).
    pub fn caption_or_empty(&self, img: &RgbImage) -> Result<String> {
        match self.caption(img) {
            Err(Error::EmptyCaption { .. }) => Ok(String::new()),
            r => r,
        }
    }
}

/// SUPIR's automatic captions of one image (`caption: auto`): one caption of `test.py`'s
/// pre-denoised image, or one per tile of the denoised model input for a tiled sampler
/// (`gradio_demo_tiled.py`'s local prompts).
#[derive(Debug, Clone, PartialEq)]
pub enum AutoCaptions {
    Global(String),
    PerTile(Vec<String>),
}

impl AutoCaptions {
    /// Makes them with `captioner` (an empty caption is `""`: the restore uses none).
    pub fn make(
        restorer: &crate::pipelines::supir::restore::Restorer,
        captioner: &AnyCaptioner,
        img: &image::DynamicImage,
        opts: &crate::pipelines::supir::restore::RestoreOptions,
    ) -> Result<Self> {
        if opts.sample_options(&restorer.cfg)?.sampler.is_tiled() {
            let tiles = restorer.denoised_tiles_for_caption(img, opts)?;
            let v = tiles
                .iter()
                .map(|t| captioner.caption_or_empty(t))
                .collect::<Result<Vec<_>>>()?;
            Ok(Self::PerTile(v))
        } else {
            let clean = restorer.denoised_for_caption(img, opts)?;
            Ok(Self::Global(captioner.caption_or_empty(&clean)?))
        }
    }

    /// Puts them into `opts`: the caption, or the per-tile prompts, as prompt prefixes.
    pub fn apply(&self, opts: &mut crate::pipelines::supir::restore::RestoreOptions) {
        match self {
            Self::Global(c) => opts.caption = as_prompt_prefix(c),
            Self::PerTile(v) => opts.tile_prompts = v.iter().map(|c| as_prompt_prefix(c)).collect(),
        }
    }

    /// Each caption (one for [`Self::Global`]).
    pub fn texts(&self) -> Vec<&str> {
        match self {
            Self::Global(c) => vec![c.as_str()],
            Self::PerTile(v) => v.iter().map(String::as_str).collect(),
        }
    }
}
