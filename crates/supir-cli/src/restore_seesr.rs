//! The SeeSR backend of `supir restore`: the release folders, `test_seesr.py`'s options under
//! clear names (folded into `supir::pipelines::seesr::SeesrOptions`), progress, the per-image loop.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};
use supir::color_fix::ColorFix;
use supir::image_io::{convert, file};
use supir::pipelines::seesr::{
    flow, SeesrModel, SeesrOptions, SeesrPaths, SeesrPreset, StartPoint,
};
use supir::schedulers::sampler::SeededNoise;

use crate::caption::{text_beside, write_caption};
use crate::restore::{pending_jobs, run_jobs};
use crate::restore_supir::{seed_arg, ColorFixArg, PresetArg, SupirArgs};

/// Where the DAPE tagger's weights are (SeeSR's release; also the `tags` captioner's).
#[derive(Args, Debug, Clone)]
pub struct TaggerArgs {
    /// Folder in the official `preset/models` layout: `stable-diffusion-2-base/`, `seesr/`,
    /// `DAPE.pth`, `ram_swin_large_14m.pth`, optional `sd-turbo/` (also `SEESR_MODELS`).
    #[arg(long, env = "SEESR_MODELS", help_heading = "SeeSR weights")]
    pub seesr_models: Option<PathBuf>,
    /// `ram_swin_large_14m.pth`.
    #[arg(long, help_heading = "SeeSR weights")]
    ram: Option<PathBuf>,
    /// `DAPE.pth`.
    #[arg(long, help_heading = "SeeSR weights")]
    dape: Option<PathBuf>,
}

impl TaggerArgs {
    /// `(ram_swin_large_14m.pth, DAPE.pth)`: each from its option, else from `--seesr-models`.
    pub fn paths(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let from_dir = |name: &str| self.seesr_models.as_ref().map(|d| d.join(name));
        let ram = self
            .ram
            .clone()
            .or_else(|| from_dir("ram_swin_large_14m.pth"));
        let dape = self.dape.clone().or_else(|| from_dir("DAPE.pth"));
        match (ram, dape) {
            (Some(r), Some(d)) => Ok((r, d)),
            _ => bail!(
                "the tags captioner needs DAPE: give --seesr-models DIR (or SEESR_MODELS=DIR), or \
                 --ram ram_swin_large_14m.pth --dape DAPE.pth"
            ),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SeesrArgs {
    #[command(flatten)]
    pub tagger: TaggerArgs,
    /// The SD-2-base diffusers folder (text encoder, tokenizer, VAE, scheduler).
    #[arg(long, help_heading = "SeeSR weights")]
    sd2_base: Option<PathBuf>,
    /// SeeSR's folder with `unet/` and `controlnet/`.
    #[arg(long, help_heading = "SeeSR weights")]
    seesr_dir: Option<PathBuf>,
    /// The sd-turbo diffusers folder (for --preset turbo).
    #[arg(long, help_heading = "SeeSR weights")]
    sd_turbo: Option<PathBuf>,

    /// Inputs whose short side is under process-size / upscale are first enlarged to it
    /// [default: 512].
    #[arg(long, help_heading = "SeeSR sampling")]
    process_size: Option<u32>,
    /// ControlNet strength [default: 1].
    #[arg(long, allow_negative_numbers = true, help_heading = "SeeSR sampling")]
    conditioning_scale: Option<f64>,
    /// Start from the LR latent noised to t = 999 (`lr`) or from pure noise [default: lr].
    #[arg(long, value_enum, help_heading = "SeeSR sampling")]
    start_point: Option<StartPointArg>,
    /// Latent tile side; larger latents are sampled in Gaussian-blended tiles [default: 96].
    #[arg(long, help_heading = "SeeSR sampling")]
    latent_tile: Option<usize>,
    /// Latent tile overlap [default: 4; turbo 32].
    #[arg(long, help_heading = "SeeSR sampling")]
    latent_overlap: Option<usize>,
    /// Your words after DAPE's tags (the official --prompt; --caption does the same).
    #[arg(long, help_heading = "SeeSR sampling")]
    prompt: Option<String>,
    /// Appended to the prompt [default: "clean, high-resolution, 8k"].
    #[arg(long, help_heading = "SeeSR sampling")]
    added_prompt: Option<String>,
    /// Write each image's full prompt to `<output stem>.txt`.
    #[arg(long, help_heading = "SeeSR sampling")]
    save_prompts: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StartPointArg {
    Lr,
    Noise,
}

impl SeesrArgs {
    /// Whether any SeeSR weight option is given.
    pub fn any_weights(&self) -> bool {
        self.tagger.seesr_models.is_some()
            || self.sd2_base.is_some()
            || self.seesr_dir.is_some()
            || self.tagger.ram.is_some()
            || self.tagger.dape.is_some()
    }

    /// The release paths: a `--seesr-models` folder with each part overridable by its own
    /// option, or every part given by its option; `None` when nothing is configured.
    pub fn resolve(&self) -> anyhow::Result<Option<SeesrPaths>> {
        let mut paths = match &self.tagger.seesr_models {
            Some(dir) => {
                if !dir.is_dir() {
                    bail!("--seesr-models {}: not a folder", dir.display());
                }
                SeesrPaths::from_models_dir(dir)
            }
            None => {
                if !self.any_weights() {
                    return Ok(None);
                }
                let need = |p: &Option<PathBuf>, flag: &str| {
                    p.clone().with_context(|| {
                        format!("SeeSR weights: {flag} is needed (or give --seesr-models DIR)")
                    })
                };
                SeesrPaths {
                    sd2_base: need(&self.sd2_base, "--sd2-base DIR")?,
                    seesr: need(&self.seesr_dir, "--seesr-dir DIR")?,
                    ram: need(&self.tagger.ram, "--ram FILE")?,
                    dape: need(&self.tagger.dape, "--dape FILE")?,
                    turbo: None,
                }
            }
        };
        macro_rules! over {
            ($($field:ident = $arg:expr),*) => { $(if let Some(p) = &$arg { paths.$field = p.clone(); })* };
        }
        over!(
            sd2_base = self.sd2_base,
            seesr = self.seesr_dir,
            ram = self.tagger.ram,
            dape = self.tagger.dape
        );
        if let Some(t) = &self.sd_turbo {
            paths.turbo = Some(t.clone());
        }
        Ok(Some(paths))
    }

    /// The preset with the shared and SeeSR flags on top, validated.
    pub fn options(&self, shared: &SupirArgs) -> anyhow::Result<SeesrOptions> {
        let preset = match shared.preset {
            PresetArg::Default => SeesrPreset::Default,
            PresetArg::Turbo => SeesrPreset::Turbo,
            other => bail!(
                "--preset {}: SeeSR's presets are default and turbo",
                other
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            ),
        };
        let mut o = SeesrOptions::preset(preset);
        macro_rules! set {
            ($($field:ident = $arg:expr),* $(,)?) => {
                $(if let Some(v) = $arg.clone() { o.$field = v.into(); })*
            };
        }
        set!(
            steps = shared.steps,
            guidance = shared.cfg,
            samples = shared.samples,
            negative_prompt = shared.negative_prompt,
            vae_encoder_tile = shared.encoder_tile,
            vae_decoder_tile = shared.decoder_tile,
            vae_tile_dtype = shared.vae_tile_dtype,
            process_size = self.process_size,
            conditioning_scale = self.conditioning_scale,
            latent_tile = self.latent_tile,
            latent_overlap = self.latent_overlap,
            added_prompt = self.added_prompt,
        );
        if let Some(u) = shared.upscale {
            if !(u.fract() == 0.0 && (1.0..=16.0).contains(&u)) {
                bail!("--upscale {u}: SeeSR upscales by a whole factor, 1 to 16");
            }
            o.upscale = u as u32;
        }
        // `--caption auto`: SeeSR's prompt already starts with DAPE's tags of the image.
        if shared.captioner == crate::caption::CaptionerArg::Llava {
            bail!(
                "--captioner llava is a SUPIR option: SeeSR's flow prompts with its own DAPE tags \
                 (add your words with --caption or --prompt)"
            );
        }
        let caption = shared.caption.clone().filter(|c| c != "auto");
        if let Some(p) = self.prompt.clone().or(caption) {
            o.prompt = p;
        }
        if let Some(c) = shared.color_fix {
            o.color_fix = match c {
                ColorFixArg::None => ColorFix::None,
                ColorFixArg::Wavelet => ColorFix::Wavelet,
                ColorFixArg::Adain => ColorFix::AdaIn,
            };
        }
        if let Some(s) = self.start_point {
            o.start_point = match s {
                StartPointArg::Lr => StartPoint::Lr,
                StartPointArg::Noise => StartPoint::Noise,
            };
        }
        // No --seed: a random one, picked (and printed) when the run starts.
        o.seed = match shared.seed {
            None | Some(-1) => None,
            Some(s) => Some(seed_arg(s)?),
        };
        o.save_prompts = self.save_prompts;
        if let Some(p) = shared.diffusion_dtype {
            o.diffusion_dtype = p.into();
        }
        if let Some(p) = shared.vae_dtype {
            o.vae_dtype = p.into();
        }
        o.residency = shared.residency.into();
        o.validate()?;
        Ok(o)
    }
}

/// Runs SeeSR over `jobs` (`(input, output)` pairs, already checked).
pub fn run(
    jobs: &[(PathBuf, PathBuf)],
    shared: &SupirArgs,
    args: &SeesrArgs,
    paths: &SeesrPaths,
    folder: bool,
) -> anyhow::Result<()> {
    let opts = args.options(shared)?;
    let save_prompts = opts.save_prompts;
    let todo = pending_jobs(jobs, opts.samples, folder, shared.overwrite, |out| {
        if save_prompts {
            vec![text_beside(out)]
        } else {
            vec![]
        }
    })?;
    if todo.is_empty() {
        return Ok(());
    }
    paths.check(opts.preset)?;
    // One image: read and size-check it before loading the weights.
    let first = if todo.len() == 1 && !folder {
        let input = &todo[0].input;
        let img = convert::pil_convert_rgb8(&file::load(input)?);
        flow::control_size(img.width(), img.height(), opts.upscale, opts.process_size)
            .with_context(|| input.display().to_string())?;
        Some(img)
    } else {
        None
    };
    let dev = Device::Cpu;
    eprintln!(
        "backend: SeeSR ({}, preset {}), CPU",
        paths.seesr.display(),
        opts.preset
    );
    let t = Instant::now();
    let model = SeesrModel::load(paths, &opts, &dev).context("loading the SeeSR model")?;
    tracing::info!("SeeSR loaded in {:.1?}", t.elapsed());

    let seed = match opts.seed {
        Some(s) => s,
        None => seed_arg(-1)?,
    };
    let mut first = first;
    run_jobs(&todo, "steps", |job, steps| {
        let t = Instant::now();
        let img = match first.take() {
            Some(img) => img,
            None => convert::pil_convert_rgb8(&file::load(&job.input)?),
        };
        // One stream per image (the same seed gives the same image whatever the folder holds);
        // the samples continue it, as the official generator does.
        let mut noise = SeededNoise::new(seed);
        let prepared = flow::prepare(&model, &img, &opts, None)
            .with_context(|| format!("{}: tagging / prompts failed", job.input.display()))?;
        for out in &job.outs {
            steps.set_position(0);
            let res =
                flow::sample_image(&model, &prepared, &opts, &mut noise, None, &mut |i, n| {
                    steps.set_length(n as u64);
                    steps.set_position(i as u64);
                    Ok(())
                })
                .with_context(|| format!("{}: restoring failed", job.input.display()))?;
            file::save(&image::DynamicImage::ImageRgb8(res.image), out)?;
        }
        if opts.save_prompts {
            write_caption(&text_beside(&job.output), &prepared.prompt)?;
        }
        tracing::info!(
            "{} -> {} ({}x{}, prompt `{}`) in {:.2?}",
            job.input.display(),
            job.output.display(),
            img.width(),
            img.height(),
            prepared.prompt,
            t.elapsed()
        );
        Ok(())
    })
}
