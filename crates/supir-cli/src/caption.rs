//! `supir caption`: automatic captions of an image or a folder (DAPE tags; LLaVA later), with
//! the weight-finding rules of `restore` (`--seesr-models DIR`, `--ram` / `--dape`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use supir::image_io::{convert, file};
use supir::pipelines::captions::TagCaptioner;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaptionerArg {
    /// DAPE's tags, as SeeSR's `get_validation_prompt` tags its input.
    Tags,
    /// LLaVA-1.5, SUPIR's captioner (not in this build).
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
    if args.captioner == CaptionerArg::Llava {
        bail!(
            "--captioner llava: LLaVA captions are not available in this build yet; use --captioner tags"
        );
    }
    let inputs = images(&args.input)?;
    if let Some(dir) = &args.output {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let (ram, dape) = args.tagger.paths()?;
    let tagger = TagCaptioner::load(&ram, &dape, DType::F32, &Device::Cpu)
        .context("loading the DAPE tagger")?;
    let single = inputs.len() == 1 && args.output.is_none() && !args.json;
    let mut failures = Vec::new();
    for path in &inputs {
        let result = (|| -> anyhow::Result<String> {
            let img = convert::pil_convert_rgb8(&file::load(path)?);
            let caption = tagger
                .caption(&img)
                .with_context(|| format!("{}: tagging failed", path.display()))?;
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
