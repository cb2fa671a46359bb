//! The SUPIR backend of `supir restore`: weight and config resolution, the official options under
//! clear names (folded into `supir::pipelines::supir::restore::RestoreOptions`), progress, and the per-image loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};
use supir::color_fix::ColorFix;
use supir::image_io::file;
use supir::models::supir_config::SupirConfig;
use supir::models::tiled_vae::{TileDtype, VaeTiling};
use supir::pipelines::supir::restore::{
    Precision, Preset, Residency, RestoreOptions, Restorer, TileLayout, OFFICIAL_CONFIG,
};
use supir::schedulers::sampler::SamplerKind;

use crate::caption::{text_beside, write_caption, CaptionerArg, LlavaArgs};
use crate::restore::{pending_jobs, run_jobs, Job};
use crate::restore_seesr::TaggerArgs;

/// SDXL base and SUPIR file names of the official release (in a `--supir-models` folder).
pub const SDXL_FILE: &str = "sd_xl_base_1.0_0.9vae.safetensors";
pub const SUPIR_Q_FILE: &str = "SUPIR-v0Q.ckpt";
pub const SUPIR_F_FILE: &str = "SUPIR-v0F.ckpt";

#[derive(Args, Debug, Clone)]
pub struct SupirArgs {
    /// A model folder in the fixture layout: `config.yaml` + `weights.safetensors` or `weights.gguf` (one file with
    /// every key), e.g. `fixtures/supir-tiny`.
    #[arg(long, help_heading = "SUPIR weights")]
    model_dir: Option<PathBuf>,
    /// SDXL base checkpoint (`sd_xl_base_1.0_0.9vae.safetensors`; an SDXL-Lightning base for the
    /// lightning presets).
    #[arg(long, env = "SUPIR_SDXL", help_heading = "SUPIR weights")]
    sdxl: Option<PathBuf>,
    /// SUPIR checkpoint (`SUPIR-v0Q.ckpt` or `SUPIR-v0F.ckpt`).
    #[arg(long = "supir", env = "SUPIR_CKPT", help_heading = "SUPIR weights")]
    supir_ckpt: Option<PathBuf>,
    /// YAML file with `sdxl:`, `supir:` and optionally `model_config:` paths (relative to the file).
    #[arg(long, env = "SUPIR_CONFIG", help_heading = "SUPIR weights")]
    config: Option<PathBuf>,
    /// Model config in the official `SUPIR_v0.yaml` schema [default: the official one, built in].
    #[arg(long, help_heading = "SUPIR weights")]
    model_config: Option<PathBuf>,
    /// Which SUPIR file of a `--supir-models` folder: `q` (SUPIR-v0Q) or `f` (SUPIR-v0F).
    #[arg(long, value_enum, default_value_t = Variant::Q, help_heading = "SUPIR weights")]
    variant: Variant,

    /// Official parameter set; the options below override it.
    #[arg(long, value_enum, default_value_t = PresetArg::Default, help_heading = "SUPIR sampling")]
    pub(crate) preset: PresetArg,
    /// Sampling steps [default: 50; lightning 8].
    #[arg(long, help_heading = "SUPIR sampling")]
    pub(crate) steps: Option<usize>,
    /// Text guidance (CFG) scale at the end of sampling [quality 7.5, fidelity/default 4].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    pub(crate) cfg: Option<f64>,
    /// CFG scale at the start, when the CFG ramps linearly [quality 4, fidelity/default 1].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    cfg_start: Option<f64>,
    /// Ramp the CFG scale linearly with the noise level [default: true].
    #[arg(long, value_name = "BOOL", help_heading = "SUPIR sampling")]
    linear_cfg: Option<bool>,
    /// Adaptor (control) strength, 0..=2 [default: 1].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    control_scale: Option<f64>,
    /// Control strength at the start, when it ramps linearly [default: 0].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    control_start: Option<f64>,
    /// Ramp the control strength linearly with the noise level [default: false].
    #[arg(long, value_name = "BOOL", help_heading = "SUPIR sampling")]
    linear_control: Option<bool>,
    /// Restoration guidance tau_r (the paper uses 4); <= 0 turns it off [default: -1].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    restoration_scale: Option<f64>,
    /// EDM churn [default: 5].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    s_churn: Option<f64>,
    /// EDM churn noise scale [default: 1.01; presets 1.003].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    s_noise: Option<f64>,
    /// Colour fix against the stage-1 image [default: wavelet].
    #[arg(long, value_enum, help_heading = "SUPIR sampling")]
    pub(crate) color_fix: Option<ColorFixArg>,
    /// Seed of every random draw; -1 picks one at random [default: 1234].
    #[arg(long, allow_negative_numbers = true, help_heading = "SUPIR sampling")]
    pub(crate) seed: Option<i64>,
    /// Samples per image; with more than one, outputs are named `<name>_<i>.<ext>` [default: 1].
    #[arg(long, help_heading = "SUPIR sampling")]
    pub(crate) samples: Option<usize>,
    /// Description of the image, put before the positive prompt (the official code asks LLaVA);
    /// `auto`: caption each image with --captioner (SUPIR: test.py's pre-denoised image at short
    /// side 512), written to `<output stem>.txt` and reused from there on a rerun.
    #[arg(long, help_heading = "SUPIR sampling")]
    pub(crate) caption: Option<String>,
    /// The model behind `--caption auto`.
    #[arg(long, value_enum, default_value_t = CaptionerArg::Tags, help_heading = "SUPIR sampling")]
    pub(crate) captioner: CaptionerArg,
    #[command(flatten)]
    pub(crate) llava: LlavaArgs,
    /// Per-tile captions (the official local prompts), for the tiled samplers: tile j (in
    /// `--list-tiles` order) gets caption j + the positive prompt, instead of --caption. FILE holds
    /// one caption per line (blank lines skipped) or a JSON array of strings; one per tile. One
    /// image, one sample.
    #[arg(long, value_name = "FILE", help_heading = "SUPIR sampling")]
    pub tile_prompts: Option<PathBuf>,
    /// Print the tiled sampler's tiles of the input image (index and window in model-input
    /// pixels, i.e. after --upscale / --min-size) and exit; needs no weights.
    #[arg(long, help_heading = "SUPIR sampling")]
    pub list_tiles: bool,
    /// Positive prompt appended to the caption [default: the official one].
    #[arg(long, help_heading = "SUPIR sampling")]
    positive_prompt: Option<String>,
    /// Negative prompt [default: the official one].
    #[arg(long, help_heading = "SUPIR sampling")]
    pub(crate) negative_prompt: Option<String>,
    /// Sampler [default: the model config's; lightning presets: dpmpp2m].
    #[arg(long, value_enum, help_heading = "SUPIR sampling")]
    sampler: Option<SamplerArg>,
    /// Latent tile size of the tiled samplers [default: the config's, else 128].
    #[arg(long, help_heading = "SUPIR sampling")]
    sampler_tile: Option<usize>,
    /// Latent tile stride of the tiled samplers [default: the config's, else 64].
    #[arg(long, help_heading = "SUPIR sampling")]
    sampler_stride: Option<usize>,

    /// Output size over input size [default: 1].
    #[arg(
        long,
        allow_negative_numbers = true,
        help_heading = "SUPIR size and memory"
    )]
    pub(crate) upscale: Option<f64>,
    /// The short side is processed at no less than this many pixels [default: 1024].
    #[arg(long, help_heading = "SUPIR size and memory")]
    min_size: Option<u32>,
    /// Tiled VAE: encode and decode in tiles so large images fit in memory.
    #[arg(long, help_heading = "SUPIR size and memory")]
    vae_tiles: bool,
    /// Tiled VAE encoder tile, image pixels (implies --vae-tiles) [default: 512].
    #[arg(long, help_heading = "SUPIR size and memory")]
    pub(crate) encoder_tile: Option<usize>,
    /// Tiled VAE decoder tile, latent pixels (implies --vae-tiles) [default: 64].
    #[arg(long, help_heading = "SUPIR size and memory")]
    pub(crate) decoder_tile: Option<usize>,
    /// The dtype the tiled VAE holds every tile's activations in between layers: fp32
    /// (exact), bf16 or fp16 (about half the tiled VAE's memory, the peak of large outputs;
    /// each layer still computes in f32 on the CPU; fp16 overflows in SDXL's VAE, so SUPIR
    /// wants bf16). Implies --vae-tiles for SUPIR [default: fp32].
    #[arg(long, value_enum, help_heading = "SUPIR size and memory")]
    pub(crate) vae_tile_dtype: Option<TileDtypeArg>,
    /// Precision of control + UNet weights: fp32, fp16, bf16 (on the CPU half-precision
    /// weights halve the memory and every layer computes in f32), q8_0 (linear layers in
    /// GGUF Q8_0 on 8-bit integer dot products, the rest f16) or q4_k (linear layers in GGUF
    /// Q4_K, those not 256-wide in Q8_0, the rest f16) [default: fp32].
    #[arg(long, value_enum, help_heading = "SUPIR size and memory")]
    pub(crate) diffusion_dtype: Option<PrecisionArg>,
    /// Precision of the VAE and text encoder weights: fp32 or bf16 [default: fp32].
    #[arg(long, value_enum, help_heading = "SUPIR size and memory")]
    pub(crate) vae_dtype: Option<PrecisionArg>,
    /// `staged`: GLVControl + UNet (SeeSR: ControlNet + UNet) are read for sampling only and
    /// freed while the VAE runs, SeeSR's DAPE + text encoder once the prompts are encoded
    /// (lowest peak; a folder reads them again for each image). `resident`: everything stays
    /// loaded (no re-reading, higher peak).
    #[arg(long, value_enum, default_value_t = ResidencyArg::Staged, help_heading = "SUPIR size and memory")]
    pub(crate) residency: ResidencyArg,

    /// Folder mode: redo images whose outputs exist (by default they are skipped).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Variant {
    Q,
    F,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PresetArg {
    /// test.py: 50 steps, cfg 4 from 1, s_noise 1.01.
    Default,
    /// Gradio "Quality": cfg 7.5 from 4.
    Quality,
    /// Gradio "Fidelity": cfg 4 from 1.
    Fidelity,
    /// Lightning config "Quality": DPM++2M, 8 steps, cfg 2.
    Lightning,
    /// Lightning config "Fidelity": DPM++2M, 8 steps, cfg 1.5.
    LightningFidelity,
    /// SeeSR's test_seesr_turbo.py: the sd-turbo base, 2 steps, guidance 1.
    Turbo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorFixArg {
    None,
    Wavelet,
    Adain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SamplerArg {
    /// RestoreEDMSampler.
    Edm,
    /// TiledRestoreEDMSampler.
    TiledEdm,
    /// RestoreDPMPP2MSampler.
    Dpmpp2m,
    /// TiledRestoreDPMPP2MSampler.
    TiledDpmpp2m,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PrecisionArg {
    Fp32,
    Fp16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TileDtypeArg {
    Fp32,
    Bf16,
    Fp16,
}

impl From<TileDtypeArg> for TileDtype {
    fn from(t: TileDtypeArg) -> Self {
        match t {
            TileDtypeArg::Fp32 => TileDtype::Fp32,
            TileDtypeArg::Bf16 => TileDtype::Bf16,
            TileDtypeArg::Fp16 => TileDtype::Fp16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ResidencyArg {
    Staged,
    Resident,
}

impl From<ResidencyArg> for Residency {
    fn from(r: ResidencyArg) -> Self {
        match r {
            ResidencyArg::Staged => Residency::Staged,
            ResidencyArg::Resident => Residency::Resident,
        }
    }
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Fp32 => Precision::Fp32,
            PrecisionArg::Fp16 => Precision::Fp16,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::Q8_0 => Precision::Q8_0,
            PrecisionArg::Q4K => Precision::Q4K,
        }
    }
}

impl SupirArgs {
    /// The preset with the given flags on top, validated.
    pub fn options(&self) -> anyhow::Result<RestoreOptions> {
        let preset = match self.preset {
            PresetArg::Default => Preset::Default,
            PresetArg::Quality => Preset::Quality,
            PresetArg::Fidelity => Preset::Fidelity,
            PresetArg::Lightning => Preset::Lightning,
            PresetArg::LightningFidelity => Preset::LightningFidelity,
            PresetArg::Turbo => bail!("--preset turbo is a SeeSR preset (use --backend seesr)"),
        };
        let mut o = RestoreOptions::preset(preset);
        macro_rules! set {
            ($($field:ident = $arg:expr),* $(,)?) => {
                $(if let Some(v) = $arg.clone() { o.$field = v.into(); })*
            };
        }
        set!(
            steps = self.steps,
            cfg_scale = self.cfg,
            cfg_scale_start = self.cfg_start,
            linear_cfg = self.linear_cfg,
            control_scale = self.control_scale,
            control_scale_start = self.control_start,
            linear_control_scale = self.linear_control,
            restoration_scale = self.restoration_scale,
            s_churn = self.s_churn,
            s_noise = self.s_noise,
            num_samples = self.samples,
            caption = self.caption,
            positive_prompt = self.positive_prompt,
            negative_prompt = self.negative_prompt,
            upscale = self.upscale,
            min_size = self.min_size,
        );
        if let Some(c) = self.color_fix {
            o.color_fix = match c {
                ColorFixArg::None => ColorFix::None,
                ColorFixArg::Wavelet => ColorFix::Wavelet,
                ColorFixArg::Adain => ColorFix::AdaIn,
            };
        }
        if let Some(s) = self.seed {
            o.seed = seed_arg(s)?;
        }
        if let Some(s) = self.sampler {
            o.sampler = Some(match s {
                SamplerArg::Edm => SamplerKind::RestoreEdm,
                SamplerArg::TiledEdm => SamplerKind::TiledRestoreEdm,
                SamplerArg::Dpmpp2m => SamplerKind::RestoreDpmpp2m,
                SamplerArg::TiledDpmpp2m => SamplerKind::TiledRestoreDpmpp2m,
            });
        }
        o.sampler_tile_size = self.sampler_tile;
        o.sampler_tile_stride = self.sampler_stride;
        if self.vae_tiles
            || self.encoder_tile.is_some()
            || self.decoder_tile.is_some()
            || self.vae_tile_dtype.is_some()
        {
            let d = VaeTiling::default();
            o.vae_tiling = Some(VaeTiling {
                encoder_tile: self.encoder_tile.unwrap_or(d.encoder_tile),
                decoder_tile: self.decoder_tile.unwrap_or(d.decoder_tile),
                tile_dtype: self.vae_tile_dtype.map_or(d.tile_dtype, Into::into),
            });
        }
        if let Some(p) = self.diffusion_dtype {
            o.diffusion_precision = p.into();
        }
        if let Some(p) = self.vae_dtype {
            o.vae_precision = p.into();
        }
        o.residency = self.residency.into();
        if let Some(path) = &self.tile_prompts {
            o.tile_prompts = read_tile_prompts(path)?;
        }
        o.validate()?;
        Ok(o)
    }
}

/// A `--seed` value: itself when >= 0, a random one (printed) for -1.
pub(crate) fn seed_arg(s: i64) -> anyhow::Result<u64> {
    match s {
        -1 => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let seed = t % 65536;
            eprintln!("seed: {seed}");
            Ok(seed)
        }
        s if s >= 0 => Ok(s as u64),
        s => bail!("--seed {s}: must be >= 0, or -1 for a random seed"),
    }
}

use supir::pipelines::captions::AutoCaptions as Captions;

/// `--caption auto`: each job's captions, read from its caption file when one exists (so a user
/// can edit captions and rerun; a JSON array of strings, one per tile, for a tiled sampler),
/// else made by the DAPE tagger and written there: on `test.py`'s pre-denoised image, or per
/// tile of the denoised model input for a tiled sampler (`gradio_demo_tiled.py`).
fn auto_captions(
    restorer: &Restorer,
    todo: &[Job],
    opts: &RestoreOptions,
    which: (&CaptionerArg, &TaggerArgs, &LlavaArgs, Option<&Path>),
    first: Option<&image::DynamicImage>,
) -> anyhow::Result<HashMap<PathBuf, Captions>> {
    let (kind, tagger, llava, models_dir) = which;
    let tiled = opts.sample_options(&restorer.cfg)?.sampler.is_tiled();
    let mut captions = HashMap::new();
    let mut missing = Vec::new();
    for job in todo {
        let path = text_beside(&job.output);
        if !path.is_file() {
            missing.push(job);
            continue;
        }
        let c = if tiled {
            Captions::PerTile(read_tile_prompts(&path)?)
        } else {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: unreadable caption file", path.display()))?;
            Captions::Global(text.trim_end().to_string())
        };
        eprintln!(
            "caption of {}: from {}",
            job.input.display(),
            path.display()
        );
        captions.insert(job.input.clone(), c);
    }
    if missing.is_empty() {
        return Ok(captions);
    }
    let t = Instant::now();
    let dev = restorer.model.device();
    let config = crate::caption::captioner_config(*kind, tagger, llava, models_dir)?;
    let captioner = config
        .load(&dev)
        .with_context(|| crate::caption::loading_what(&config))?;
    for job in missing {
        let result = (|| -> anyhow::Result<Captions> {
            let loaded;
            let img = match first {
                Some(img) => img,
                None => {
                    loaded = file::load(&job.input)?;
                    &loaded
                }
            };
            let path = text_beside(&job.output);
            let c = Captions::make(restorer, &captioner, img, opts)?;
            match &c {
                Captions::PerTile(v) => write_caption(&path, &serde_json::to_string_pretty(v)?)?,
                Captions::Global(t) => write_caption(&path, t)?,
            }
            Ok(c)
        })();
        match result {
            Ok(c) => {
                let list = c.texts();
                for (i, text) in list.iter().enumerate() {
                    let which = if tiled {
                        format!(" tile {i}")
                    } else {
                        String::new()
                    };
                    if text.is_empty() {
                        eprintln!(
                            "warning: {}{which}: {} gave an empty caption; no caption used",
                            job.input.display(),
                            captioner.name()
                        );
                    } else {
                        eprintln!("caption of {}{which}: {text}", job.input.display());
                    }
                }
                captions.insert(job.input.clone(), c);
            }
            // The image fails again (and is reported) when it is restored.
            Err(e) if todo.len() > 1 => {
                eprintln!("error: {}: captioning: {e:#}", job.input.display())
            }
            Err(e) => return Err(e),
        }
    }
    drop(captioner);
    supir::memory::release_free_heap();
    tracing::info!("captions in {:.1?}", t.elapsed());
    Ok(captions)
}

/// The captions of a `--tile-prompts` file: a JSON array of strings when the text starts with
/// `[`, else one caption per line (line ends and blank lines dropped).
pub fn read_tile_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--tile-prompts {}", path.display()))?;
    let prompts: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--tile-prompts {}: not a JSON array of strings: {e}",
                path.display()
            )
        })?
    } else {
        text.lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    if prompts.is_empty() {
        bail!("--tile-prompts {}: no prompts in the file", path.display());
    }
    Ok(prompts)
}

/// The model config `--list-tiles` and the tile-prompt check use: the resolved weights' config,
/// else `--model-config`, else the official one.
fn config_for_tiles(args: &SupirArgs, supir_models: Option<&Path>) -> anyhow::Result<SupirConfig> {
    match resolve(args, supir_models)? {
        Some(spec) => spec.load_config(),
        None => ModelSpec {
            config: match &args.model_config {
                Some(p) => ConfigSource::File(existing_file("--model-config", p)?),
                None => ConfigSource::Official,
            },
            checkpoints: Vec::new(),
        }
        .load_config(),
    }
}

/// The tiled sampler's layout over a `width x height` image; `what` (the flag and file) leads
/// the error, which names the CLI's tiled samplers when the one chosen is not.
fn tile_layout(
    what: &str,
    opts: &RestoreOptions,
    cfg: &SupirConfig,
    width: u32,
    height: u32,
) -> anyhow::Result<TileLayout> {
    let sampler = opts.sample_options(cfg)?.sampler;
    if !sampler.is_tiled() {
        bail!(
            "{what}: the sampler is {}, which does not tile the image; add --sampler tiled-edm or --sampler tiled-dpmpp2m",
            sampler.official_name()
        );
    }
    opts.tile_layout(cfg, width, height)
        .with_context(|| what.to_string())
}

/// `--list-tiles`: the tiles of `input` under the options, as a table on stdout.
pub fn list_tiles(
    input: &Path,
    args: &SupirArgs,
    supir_models: Option<&Path>,
) -> anyhow::Result<()> {
    if input.is_dir() {
        bail!(
            "--list-tiles: {} is a folder; give one image",
            input.display()
        );
    }
    let opts = args.options()?;
    let cfg = config_for_tiles(args, supir_models)?;
    let img = file::load(input)?;
    let what = format!("--list-tiles {}", input.display());
    let layout = tile_layout(&what, &opts, &cfg, img.width(), img.height())?;
    eprintln!(
        "{}: {}x{} px, model input {}x{} px, latent {}x{}, {}: tile {} stride {} (latent px): {} tiles",
        input.display(),
        img.width(),
        img.height(),
        layout.width,
        layout.height,
        layout.latent_width,
        layout.latent_height,
        layout.sampler.official_name(),
        layout.tile_size,
        layout.tile_stride,
        layout.tiles.len()
    );
    println!("tile\tx0\ty0\tx1\ty1");
    for t in layout.pixel_windows() {
        println!("{}\t{}\t{}\t{}\t{}", t.index, t.w0, t.h0, t.w1, t.h1);
    }
    Ok(())
}

/// With `--tile-prompts`: one image, and as many prompts as it has tiles (checked before the
/// weights load).
fn check_tile_prompt_count(
    args: &SupirArgs,
    opts: &RestoreOptions,
    cfg: &SupirConfig,
    input: &Path,
    width: u32,
    height: u32,
) -> anyhow::Result<()> {
    let Some(file) = &args.tile_prompts else {
        return Ok(());
    };
    let what = format!("--tile-prompts {}", file.display());
    let layout = tile_layout(&what, opts, cfg, width, height)?;
    if layout.tiles.len() != opts.tile_prompts.len() {
        bail!(
            "--tile-prompts {}: {} prompts, but {} has {} tiles (model input {}x{} px = latent {}x{}, tile {} stride {} in latent px); list them with --list-tiles",
            file.display(),
            opts.tile_prompts.len(),
            input.display(),
            layout.tiles.len(),
            layout.width,
            layout.height,
            layout.latent_width,
            layout.latent_height,
            layout.tile_size,
            layout.tile_stride
        );
    }
    Ok(())
}

/// What the SUPIR backend loads: a model config and the checkpoints (merged in order).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub config: ConfigSource,
    pub checkpoints: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// The official `SUPIR_v0.yaml`, built in.
    Official,
    File(PathBuf),
}

impl ModelSpec {
    pub fn load_config(&self) -> anyhow::Result<SupirConfig> {
        Ok(match &self.config {
            ConfigSource::Official => {
                SupirConfig::from_yaml_str(OFFICIAL_CONFIG, Path::new("SUPIR_v0.yaml (built in)"))?
            }
            ConfigSource::File(p) => SupirConfig::load(p)?,
        })
    }

    pub fn describe(&self) -> String {
        let cfg = match &self.config {
            ConfigSource::Official => "official SUPIR_v0.yaml".to_string(),
            ConfigSource::File(p) => p.display().to_string(),
        };
        let files: Vec<String> = self
            .checkpoints
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!("{} with {cfg}", files.join(" + "))
    }
}

/// `sdxl:` / `supir:` / `model_config:` of a `--config` YAML file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsFile {
    sdxl: Option<PathBuf>,
    supir: Option<PathBuf>,
    model_config: Option<PathBuf>,
}

fn read_weights_file(path: &Path) -> anyhow::Result<WeightsFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    let mut w: WeightsFile = serde_yaml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--config {}: {e} (expected the keys sdxl, supir, model_config)",
            path.display()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut w.sdxl, &mut w.supir, &mut w.model_config]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(w)
}

fn existing_file(what: &str, p: &Path) -> anyhow::Result<PathBuf> {
    if !p.is_file() {
        bail!("{what} {}: no such file", p.display());
    }
    Ok(p.to_path_buf())
}

/// Where the SUPIR weights come from, or `None` when nothing names any. In order: `--model-dir`;
/// else each of SDXL / SUPIR from its flag or variable (`SUPIR_SDXL`, `SUPIR_CKPT`), the
/// `--config` file, then the `--supir-models` folder (published file names).
pub fn resolve(args: &SupirArgs, supir_models: Option<&Path>) -> anyhow::Result<Option<ModelSpec>> {
    if let Some(dir) = &args.model_dir {
        if !dir.is_dir() {
            bail!("--model-dir {}: no such folder", dir.display());
        }
        let config = existing_file("--model-dir: model config", &dir.join("config.yaml"))?;
        let gguf = dir.join("weights.gguf");
        let weights = if gguf.is_file() && !dir.join("weights.safetensors").exists() {
            gguf
        } else {
            existing_file("--model-dir: weights", &dir.join("weights.safetensors"))?
        };
        return Ok(Some(ModelSpec {
            config: ConfigSource::File(config),
            checkpoints: vec![weights],
        }));
    }
    let file = match &args.config {
        Some(p) => read_weights_file(p)?,
        None => WeightsFile::default(),
    };
    let (q_or_f, dir_sdxl) = match supir_models {
        Some(d) => (
            Some(d.join(match args.variant {
                Variant::Q => SUPIR_Q_FILE,
                Variant::F => SUPIR_F_FILE,
            })),
            Some(d.join(SDXL_FILE)),
        ),
        None => (None, None),
    };
    let sdxl = args.sdxl.clone().or(file.sdxl).or(dir_sdxl);
    let supir = args.supir_ckpt.clone().or(file.supir).or(q_or_f);
    let model_config = args.model_config.clone().or(file.model_config);
    match (sdxl, supir) {
        (None, None) => Ok(None),
        (Some(_), None) => bail!(
            "SDXL weights given but no SUPIR checkpoint: pass --supir FILE (or SUPIR_CKPT, --config, --supir-models)"
        ),
        (None, Some(_)) => bail!(
            "SUPIR checkpoint given but no SDXL base: pass --sdxl FILE (or SUPIR_SDXL, --config, --supir-models)"
        ),
        (Some(sdxl), Some(supir)) => Ok(Some(ModelSpec {
            config: match model_config {
                Some(p) => ConfigSource::File(existing_file("--model-config", &p)?),
                None => ConfigSource::Official,
            },
            checkpoints: vec![
                existing_file("SDXL weights", &sdxl)?,
                existing_file("SUPIR checkpoint", &supir)?,
            ],
        })),
    }
}

/// The output files of one input: the output itself, or `<stem>_<i>.<ext>` per sample.
pub fn sample_outputs(output: &Path, samples: usize) -> Vec<PathBuf> {
    if samples <= 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = output
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (0..samples)
        .map(|i| output.with_file_name(format!("{stem}_{i}{ext}")))
        .collect()
}

/// Runs SUPIR over `jobs` (`(input, output)` pairs, already checked).
pub fn run(
    jobs: &[(PathBuf, PathBuf)],
    args: &SupirArgs,
    spec: &ModelSpec,
    folder: bool,
    tagger: &TaggerArgs,
    models_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let mut opts = args.options()?;
    let auto_caption = opts.caption == "auto";
    if auto_caption {
        opts.caption.clear();
        if args.captioner == CaptionerArg::Llava {
            // Fail on missing LLaVA paths before any weights are read.
            args.llava.paths(models_dir)?;
        }
        if !opts.tile_prompts.is_empty() {
            bail!("--caption auto and --tile-prompts both set the captions; give one");
        }
    }
    let todo = pending_jobs(jobs, opts.num_samples, folder, args.overwrite, |_| vec![])?;
    if todo.is_empty() {
        return Ok(());
    }
    let cfg = spec.load_config()?;
    // One image: read and size-check it before loading gigabytes of weights.
    let first = if todo.len() == 1 && !folder {
        let input = &todo[0].input;
        let img = file::load(input)?;
        opts.model_size(img.width(), img.height())
            .with_context(|| input.display().to_string())?;
        check_tile_prompt_count(args, &opts, &cfg, input, img.width(), img.height())?;
        Some(img)
    } else {
        None
    };
    let dev = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
    let where_ = if dev.is_cpu() { "CPU" } else { "GPU" };
    eprintln!("backend: SUPIR ({}), {where_}", spec.describe());
    let t = Instant::now();
    let mut restorer =
        Restorer::load(cfg, &spec.checkpoints, &opts, &dev).context("loading the SUPIR model")?;
    // Captions first, with the tagger loaded alone beside the VAE; it is freed before the
    // diffusion networks are read. Each image then has its own prompt: under staged residency
    // the restorer drops the text encoders before sampling and reads them again for the next
    // image's prompt.
    let captions = if auto_caption {
        Some(auto_captions(
            &restorer,
            &todo,
            &opts,
            (&args.captioner, tagger, &args.llava, models_dir),
            first.as_ref(),
        )?)
    } else {
        restorer.prepare_prompts(&opts)?;
        restorer.drop_text_encoders();
        None
    };
    tracing::info!("model loaded and prompts encoded in {:.1?}", t.elapsed());

    let mut first = first;
    run_jobs(&todo, "network calls", |job, steps| {
        let t = Instant::now();
        let img = match first.take() {
            Some(img) => img,
            None => file::load(&job.input)?,
        };
        let calls = restorer
            .network_calls(&opts, img.width(), img.height())
            .with_context(|| job.input.display().to_string())?;
        steps.set_length(calls as u64);
        let mut opts = opts.clone();
        if let Some(c) = captions.as_ref().and_then(|c| c.get(&job.input)) {
            c.apply(&mut opts);
        }
        let results = restorer
            .restore_image(
                &img,
                &opts,
                Some(&mut || {
                    steps.inc(1);
                    Ok(())
                }),
            )
            .with_context(|| format!("{}: restoring failed", job.input.display()))?;
        for (res, out) in results.into_iter().zip(&job.outs) {
            file::save(&image::DynamicImage::ImageRgb8(res), out)?;
        }
        tracing::info!(
            "{} -> {} ({}x{}) in {:.2?}",
            job.input.display(),
            job.output.display(),
            img.width(),
            img.height(),
            t.elapsed()
        );
        Ok(())
    })
}
