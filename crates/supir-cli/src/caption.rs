//! `supir caption`: automatic captions of an image or a folder (DAPE tags, or LLaVA-1.5), with
//! the weight-finding rules of `restore` (`--seesr-models DIR`, `--ram` / `--dape` for the tags;
//! `--llava`, `--llava-clip` or `llava/` + `clip-vit-large-patch14-336/` under `--supir-models`
//! for LLaVA).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use supir::image_io::{convert, file};
use supir::models::llava::LlavaPaths;
pub use supir::pipelines::captions::AnyCaptioner;
use supir::pipelines::captions::CaptionerConfig;
use supir::pipelines::captions::{LlavaCaptioner, LlavaOptions, TagCaptioner};

use crate::restore_seesr::TaggerArgs;

#[derive(Args)]
pub struct CaptionArgs {
    /// An image, or a folder whose images (png, jpg, webp, tif) are all captioned.
    input: PathBuf,
    /// Which model captions.
    #[arg(long, value_enum, default_value_t = CaptionerArg::Tags)]
    captioner: CaptionerArg,
    /// Write `<name>.txt` per image into this folder (else captions go to standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// One JSON object per image on standard output: {"image": ..., "caption": ...}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tagger: TaggerArgs,
    #[command(flatten)]
    llava: LlavaArgs,
    /// The SUPIR weights folder; LLaVA is looked for in its `llava/` and
    /// `clip-vit-large-patch14-336/` (also `SUPIR_MODELS`).
    #[arg(long, env = "SUPIR_MODELS", help_heading = "LLaVA captioner")]
    supir_models: Option<PathBuf>,
}

/// Folder names LLaVA is looked for under a models folder (SUPIR's `CKPT_PTH.py` names).
pub const LLAVA_DIR: &str = "llava";
pub const LLAVA_CLIP_DIR: &str = "clip-vit-large-patch14-336";

/// Where LLaVA-1.5 is and how it samples.
#[derive(Args, Debug, Clone)]
pub struct LlavaArgs {
    /// LLaVA-1.5: a `liuhaotian/llava-v1.5-*` folder (with --llava-clip), a
    /// `llava-hf/llava-1.5-*-hf` folder, or llama.cpp's GGUF pair (the LLM `.gguf` with its
    /// `*mmproj*.gguf` beside it, or their folder) [default: `llava/` under --supir-models]
    /// (also `SUPIR_LLAVA`).
    #[arg(long, env = "SUPIR_LLAVA", help_heading = "LLaVA captioner")]
    pub llava: Option<PathBuf>,
    /// The `openai/clip-vit-large-patch14-336` folder, for the original layout [default:
    /// `clip-vit-large-patch14-336/` beside the LLaVA folder or under --supir-models] (also
    /// `SUPIR_LLAVA_CLIP`).
    #[arg(long, env = "SUPIR_LLAVA_CLIP", help_heading = "LLaVA captioner")]
    pub llava_clip: Option<PathBuf>,
    /// Compute type of the LLaVA decoder (f16 as the official release; the CLIP tower runs in f32,
    /// a GGUF LLM in f32 over its quantised weights).
    #[arg(long, value_enum, default_value_t = LlavaDtype::F16, help_heading = "LLaVA captioner")]
    pub llava_dtype: LlavaDtype,
    /// Sampling temperature (the official 0.2); 0 decodes greedily.
    #[arg(long, default_value_t = 0.2, help_heading = "LLaVA captioner")]
    pub llava_temperature: f64,
    /// Nucleus sampling mass (the official 0.7).
    #[arg(long, default_value_t = 0.7, help_heading = "LLaVA captioner")]
    pub llava_top_p: f64,
    /// Most tokens per caption (the official 512).
    #[arg(long, default_value_t = 512, help_heading = "LLaVA captioner")]
    pub llava_max_tokens: usize,
    /// Seed of the sampling: the same image gets the same caption.
    #[arg(long, default_value_t = 0, help_heading = "LLaVA captioner")]
    pub llava_seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LlavaDtype {
    F32,
    Bf16,
    F16,
}

impl LlavaArgs {
    /// The model and CLIP folders: each from its option, else from `models_dir`.
    pub fn paths(&self, models_dir: Option<&Path>) -> anyhow::Result<LlavaPaths> {
        let model = match (&self.llava, models_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(d)) => d.join(LLAVA_DIR),
            (None, None) => bail!(
                "the llava captioner needs LLaVA-1.5: give --llava DIR (or SUPIR_LLAVA=DIR; a \
                 liuhaotian/llava-v1.5-13b folder with --llava-clip DIR, a llava-hf folder, or a \
                 GGUF pair), or --supir-models DIR holding {LLAVA_DIR}/ and {LLAVA_CLIP_DIR}/"
            ),
        };
        if !model.exists() {
            bail!("{}: not found (LLaVA model)", model.display());
        }
        let clip = self.llava_clip.clone().or_else(|| {
            let beside = model
                .parent()
                .map(|p| p.join(LLAVA_CLIP_DIR))
                .filter(|p| p.is_dir());
            beside.or_else(|| {
                models_dir
                    .map(|d| d.join(LLAVA_CLIP_DIR))
                    .filter(|p| p.is_dir())
            })
        });
        Ok(LlavaPaths { model, clip })
    }

    pub fn options(&self) -> LlavaOptions {
        LlavaOptions {
            temperature: self.llava_temperature,
            top_p: self.llava_top_p,
            max_new_tokens: self.llava_max_tokens,
            seed: self.llava_seed,
            ..LlavaOptions::default()
        }
    }

    pub fn dtype(&self) -> DType {
        match self.llava_dtype {
            LlavaDtype::F32 => DType::F32,
            LlavaDtype::Bf16 => DType::BF16,
            LlavaDtype::F16 => DType::F16,
        }
    }

    /// Loads the captioner on `dev`.
    pub fn load(&self, models_dir: Option<&Path>, dev: &Device) -> anyhow::Result<LlavaCaptioner> {
        let paths = self.paths(models_dir)?;
        let t = std::time::Instant::now();
        let c = LlavaCaptioner::load(&paths, self.options(), self.dtype(), dev)
            .with_context(|| format!("loading LLaVA from {}", paths.model.display()))?;
        tracing::info!("LLaVA loaded in {:.1?}", t.elapsed());
        Ok(c)
    }
}

/// Which captioner the flags name, and its weights.
pub fn captioner_config(
    kind: CaptionerArg,
    tagger: &TaggerArgs,
    llava: &LlavaArgs,
    models_dir: Option<&Path>,
) -> anyhow::Result<CaptionerConfig> {
    Ok(match kind {
        CaptionerArg::Tags => {
            let (ram, dape) = tagger.paths()?;
            CaptionerConfig::Tags { ram, dape }
        }
        CaptionerArg::Llava => CaptionerConfig::Llava {
            paths: llava.paths(models_dir)?,
            options: llava.options(),
            dtype: llava.dtype(),
        },
    })
}

/// What loading `config` is, for an error's context.
pub fn loading_what(config: &CaptionerConfig) -> String {
    match config {
        CaptionerConfig::Tags { .. } => "loading the DAPE tagger".into(),
        CaptionerConfig::Llava { paths, .. } => {
            format!("loading LLaVA from {}", paths.model.display())
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaptionerArg {
    /// DAPE's tags, as SeeSR's `get_validation_prompt` tags its input.
    Tags,
    /// LLaVA-1.5, SUPIR's captioner (`llava_agent.py`).
    Llava,
}

fn images(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(input).with_context(|| input.display().to_string())?;
    if !meta.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| input.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && file::is_image_path(p))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!(
            "{}: no images (png, jpg, webp, tif) in this folder",
            input.display()
        );
    }
    Ok(v)
}

/// `DIR/<stem>.txt`.
pub fn caption_path(dir: &Path, image: &Path) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default();
    dir.join(stem).with_extension("txt")
}

/// `<output stem>.txt` beside an output: where `restore --caption auto` keeps an image's caption
/// and `--save-prompts` its prompt.
pub fn text_beside(output: &Path) -> PathBuf {
    output.with_extension("txt")
}

/// Writes a caption (or prompt) file atomically.
pub fn write_caption(path: &Path, caption: &str) -> anyhow::Result<()> {
    file::write_atomic(path, |w| {
        use std::io::Write;
        w.write_all(caption.as_bytes())
            .map_err(|source| supir::Error::Io {
                path: path.to_path_buf(),
                source,
            })
    })?;
    Ok(())
}

pub fn run(args: CaptionArgs) -> anyhow::Result<()> {
    let inputs = images(&args.input)?;
    if let Some(dir) = &args.output {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let tagger = match args.captioner {
        CaptionerArg::Tags => {
            let (ram, dape) = args.tagger.paths()?;
            AnyCaptioner::Tags(Box::new(
                TagCaptioner::load(&ram, &dape, DType::F32, &Device::Cpu)
                    .context("loading the DAPE tagger")?,
            ))
        }
        CaptionerArg::Llava => AnyCaptioner::Llava(Box::new(
            args.llava
                .load(args.supir_models.as_deref(), &Device::Cpu)?,
        )),
    };
    let single = inputs.len() == 1 && args.output.is_none() && !args.json;
    let mut failures = Vec::new();
    for path in &inputs {
        let result = (|| -> anyhow::Result<String> {
            let img = convert::pil_convert_rgb8(&file::load(path)?);
            let caption = tagger.caption(&img).with_context(|| {
                format!("{}: {} captioning failed", path.display(), tagger.name())
            })?;
            if caption.is_empty() {
                eprintln!(
                    "warning: {}: DAPE found no tag above its thresholds",
                    path.display()
                );
            }
            if let Some(dir) = &args.output {
                write_caption(&caption_path(dir, path), &caption)?;
            }
            Ok(caption)
        })();
        match result {
            Ok(caption) if args.json => println!(
                "{}",
                serde_json::json!({"image": path.display().to_string(), "caption": caption})
            ),
            Ok(caption) if single => println!("{caption}"),
            Ok(caption) if args.output.is_none() => println!("{}: {caption}", path.display()),
            Ok(_) => {}
            Err(e) if inputs.len() > 1 => {
                eprintln!("error: {e:#}");
                failures.push(path.clone());
            }
            Err(e) => return Err(e),
        }
    }
    crate::restore::folder_result(&failures, inputs.len())
}
