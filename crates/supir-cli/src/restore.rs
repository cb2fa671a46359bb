//! `supir restore`: one image or a folder, with the backend chosen from the weights available.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use supir::image_io::file;
use supir::pipelines::realesrgan::{AlphaUpscale, RealEsrgan, Tiling, UpscaleOptions};

use crate::restore_seesr::{self, SeesrArgs};
use crate::restore_supir::{self, ModelSpec, SupirArgs};
use supir::pipelines::seesr::SeesrPaths;

#[derive(Args)]
pub struct RestoreArgs {
    /// Input image, or a folder whose images (png, jpg, webp, tif) are all processed.
    input: PathBuf,
    /// Output image (format from the extension), or the output folder for a folder input.
    #[arg(short, long, required_unless_present = "list_tiles")]
    output: Option<PathBuf>,
    #[command(flatten)]
    pub model: BackendArgs,
}

/// The backend, its weights and its options: shared by `supir restore` and `supir serve`.
#[derive(Args)]
pub struct BackendArgs {
    /// Backend; `auto` runs SUPIR when its weights are configured, else SeeSR when its weights
    /// are, else the embedded Real-ESRGAN.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Folder holding the published SUPIR weights: `sd_xl_base_1.0_0.9vae.safetensors` and
    /// `SUPIR-v0Q.ckpt` / `SUPIR-v0F.ckpt` (also `SUPIR_MODELS`).
    #[arg(long, env = "SUPIR_MODELS", help_heading = "SUPIR weights")]
    pub supir_models: Option<PathBuf>,
    /// Output size over input size (Real-ESRGAN: the x4 result is Lanczos-resampled to it).
    #[arg(long, default_value_t = 4.0)]
    pub outscale: f64,
    /// Real-ESRGAN tile side in input pixels (0: whole image at once; memory grows with it).
    #[arg(long, default_value_t = Tiling::default().tile)]
    pub tile: usize,
    /// Real-ESRGAN context around each tile, in input pixels.
    #[arg(long, default_value_t = Tiling::default().pad)]
    pub tile_pad: usize,
    /// How the alpha channel is upscaled.
    #[arg(long, value_enum, default_value_t = AlphaArg::Model)]
    alpha: AlphaArg,
    #[command(flatten)]
    pub supir: SupirArgs,
    #[command(flatten)]
    pub seesr: SeesrArgs,
}

impl BackendArgs {
    /// The backend that runs, by `--backend` (`auto`: SUPIR, else SeeSR, else Real-ESRGAN).
    pub(crate) fn choose(&self) -> anyhow::Result<Backend> {
        choose_backend(
            self.backend,
            self.supir_models.as_deref(),
            &self.supir,
            &self.seesr,
        )
    }

    /// The Real-ESRGAN options of the flags.
    pub(crate) fn upscale_options(&self) -> UpscaleOptions {
        UpscaleOptions {
            tiling: Tiling {
                tile: self.tile,
                pad: self.tile_pad,
            },
            outscale: self.outscale,
            alpha: match self.alpha {
                AlphaArg::Model => AlphaUpscale::Model,
                AlphaArg::Lanczos => AlphaUpscale::Lanczos,
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    Auto,
    Supir,
    Seesr,
    Realesrgan,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AlphaArg {
    /// Through the network, as Real-ESRGAN does.
    Model,
    /// Lanczos resampling (faster).
    Lanczos,
}

/// The backend that runs.
pub(crate) enum Backend {
    /// SUPIR with these weights.
    Supir(ModelSpec),
    /// SeeSR with this release.
    Seesr(SeesrPaths),
    /// The embedded Real-ESRGAN x4plus.
    RealEsrgan,
}

const SUPIR_HINT: &str = "to use SUPIR, give its weights with --sdxl FILE --supir FILE, \
    --supir-models DIR (or SUPIR_MODELS=DIR), --config FILE or --model-dir DIR (README, section SUPIR)";

const SEESR_HINT: &str = "to use SeeSR, give its release with --seesr-models DIR (or \
    SEESR_MODELS=DIR), or each part with --sd2-base, --seesr-dir, --ram and --dape (README, section SeeSR)";

fn choose_backend(
    choice: BackendChoice,
    models: Option<&Path>,
    supir: &SupirArgs,
    seesr: &SeesrArgs,
) -> anyhow::Result<Backend> {
    match choice {
        BackendChoice::Realesrgan => Ok(Backend::RealEsrgan),
        BackendChoice::Supir => match restore_supir::resolve(supir, models)? {
            Some(spec) => Ok(Backend::Supir(spec)),
            None => bail!("--backend supir: no SUPIR weights configured; {SUPIR_HINT}"),
        },
        BackendChoice::Seesr => match seesr.resolve()? {
            Some(paths) => Ok(Backend::Seesr(paths)),
            None => bail!("--backend seesr: no SeeSR weights configured; {SEESR_HINT}"),
        },
        BackendChoice::Auto => {
            if let Some(spec) = restore_supir::resolve(supir, models)? {
                return Ok(Backend::Supir(spec));
            }
            Ok(match seesr.resolve()? {
                Some(paths) => Backend::Seesr(paths),
                None => Backend::RealEsrgan,
            })
        }
    }
}

/// `(input, output)` pairs; refuses any output that is an input.
fn plan(input: &Path, output: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let meta = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
    if !meta.is_dir() {
        let out = if output.is_dir() {
            output.join(input.file_name().context("input has no file name")?)
        } else {
            output.to_path_buf()
        };
        if same_file(input, &out) {
            bail!("{}: output would overwrite the input", out.display());
        }
        return Ok(vec![(input.to_path_buf(), out)]);
    }
    if output.exists() && !output.is_dir() {
        bail!(
            "{}: the input is a folder, so the output must be a folder",
            output.display()
        );
    }
    if same_file(input, output) {
        bail!(
            "{}: output folder is the input folder; choose another",
            output.display()
        );
    }
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| format!("{}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && file::is_image_path(p))
        .collect();
    inputs.sort();
    if inputs.is_empty() {
        bail!(
            "{}: no images (png, jpg, webp, tif) in this folder",
            input.display()
        );
    }
    std::fs::create_dir_all(output).with_context(|| format!("{}", output.display()))?;
    Ok(inputs
        .into_iter()
        .map(|p| {
            let out = output.join(p.file_name().expect("listed file"));
            (p, out)
        })
        .collect())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Fails before any compute when the output's folder does not exist or its format is unknown.
fn check_output(out: &Path) -> anyhow::Result<()> {
    if !file::is_image_path(out) {
        bail!(
            "{}: unknown output format; use one of {}",
            out.display(),
            file::EXTENSIONS.join(", ")
        );
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{}: cannot write: folder {} does not exist",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let RestoreArgs {
        input,
        output,
        model: args,
    } = args;
    if args.supir.list_tiles {
        return restore_supir::list_tiles(&input, &args.supir, args.supir_models.as_deref());
    }
    let output = output.as_deref().context("--output is required")?;
    let backend = args.choose()?;
    if !(args.outscale.is_finite() && args.outscale > 0.0) {
        bail!("--outscale {}: must be a positive number", args.outscale);
    }
    if let Some(f) = &args.supir.tile_prompts {
        if input.is_dir() {
            bail!(
                "--tile-prompts {}: the prompts describe the tiles of one image; give one input image, not a folder",
                f.display()
            );
        }
    }
    let jobs = plan(&input, output)?;
    for (_, out) in &jobs {
        check_output(out)?;
    }
    match backend {
        Backend::Supir(spec) => {
            let folder = std::fs::metadata(&input).is_ok_and(|m| m.is_dir());
            restore_supir::run(
                &jobs,
                &args.supir,
                &spec,
                folder,
                &args.seesr.tagger,
                args.supir_models.as_deref(),
            )
        }
        Backend::Seesr(paths) => {
            if let Some(f) = &args.supir.tile_prompts {
                bail!(
                    "--tile-prompts {}: per-tile prompts are a SUPIR option",
                    f.display()
                );
            }
            let folder = std::fs::metadata(&input).is_ok_and(|m| m.is_dir());
            restore_seesr::run(&jobs, &args.supir, &args.seesr, &paths, folder)
        }
        Backend::RealEsrgan => {
            if let Some(f) = &args.supir.tile_prompts {
                bail!(
                    "--tile-prompts {}: per-tile prompts need the SUPIR backend; {SUPIR_HINT}",
                    f.display()
                );
            }
            eprintln!(
                "backend: Real-ESRGAN x4plus (embedded weights, CPU); {SUPIR_HINT}; {SEESR_HINT}"
            );
            run_realesrgan(&jobs, &args.upscale_options())
        }
    }
}

fn run_realesrgan(jobs: &[(PathBuf, PathBuf)], opts: &UpscaleOptions) -> anyhow::Result<()> {
    let model = RealEsrgan::embedded(&Device::Cpu).context("loading the embedded Real-ESRGAN")?;
    // Progress in tiles, sized from the image headers.
    let total: usize = jobs
        .iter()
        .map(|(p, _)| {
            let (w, h, alpha) = image::ImageReader::open(p)
                .ok()
                .and_then(|r| r.with_guessed_format().ok())
                .and_then(|r| r.into_decoder().ok())
                .map(|d| {
                    use image::ImageDecoder;
                    let (w, h) = d.dimensions();
                    (w as usize, h as usize, d.color_type().has_alpha())
                })
                .unwrap_or((1, 1, false));
            model.work_units(w, h, alpha, opts)
        })
        .sum();
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tiles {msg}",
        )
        .expect("valid template"),
    );
    let mut failures = Vec::new();
    for (input, output) in jobs {
        bar.set_message(input.display().to_string());
        let t = Instant::now();
        let result = (|| -> anyhow::Result<()> {
            let img = file::load(input)?;
            let out = model
                .upscale_image(&img, opts, &mut || bar.inc(1))
                .with_context(|| format!("{}: upscaling failed", input.display()))?;
            file::save(&out, output)?;
            tracing::info!(
                "{} -> {} ({}x{} -> {}x{}) in {:.2?}",
                input.display(),
                output.display(),
                img.width(),
                img.height(),
                out.width(),
                out.height(),
                t.elapsed()
            );
            Ok(())
        })();
        match result {
            Ok(()) => bar.suspend(|| eprintln!("wrote {}", output.display())),
            Err(e) if jobs.len() > 1 => {
                bar.suspend(|| eprintln!("error: {e:#}"));
                failures.push(input.clone());
            }
            Err(e) => {
                bar.finish_and_clear();
                return Err(e);
            }
        }
    }
    bar.finish_and_clear();
    folder_result(&failures, jobs.len())
}

/// One image of a diffusion backend's run: input, output, and the files its samples go to.
pub(crate) struct Job {
    pub input: PathBuf,
    pub output: PathBuf,
    pub outs: Vec<PathBuf>,
}

/// The jobs still to do: every sample's file checked never to be an input (nor any `extra`
/// file a job writes), and in folder mode the inputs whose outputs all exist skipped (unless
/// `overwrite`). Empty when nothing is left (and says so).
pub(crate) fn pending_jobs(
    jobs: &[(PathBuf, PathBuf)],
    samples: usize,
    folder: bool,
    overwrite: bool,
    extra: impl Fn(&Path) -> Vec<PathBuf>,
) -> anyhow::Result<Vec<Job>> {
    let mut todo = Vec::new();
    for (input, output) in jobs {
        let outs = crate::restore_supir::sample_outputs(output, samples);
        for out in outs.iter().chain(&extra(output)) {
            if same_file(input, out) {
                bail!("{}: output would overwrite the input", out.display());
            }
        }
        if folder && !overwrite && outs.iter().all(|p| p.exists()) {
            eprintln!(
                "skipping {}: {} exists (--overwrite to redo)",
                input.display(),
                output.display()
            );
            continue;
        }
        todo.push(Job {
            input: input.clone(),
            output: output.clone(),
            outs,
        });
    }
    if todo.is_empty() {
        eprintln!("nothing to do: every output exists");
    }
    Ok(todo)
}

/// Runs `one(job, steps)` for each job under an image bar (several jobs) and a bar of `unit`s
/// (sampler steps, network calls); prints each written file; in a folder a failing image is
/// reported and the others go on, then the run fails listing them.
pub(crate) fn run_jobs(
    todo: &[Job],
    unit: &str,
    mut one: impl FnMut(&Job, &ProgressBar) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let images = (todo.len() > 1).then(|| {
        multi.add(
            ProgressBar::new(todo.len() as u64).with_style(
                ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} images")
                    .expect("valid template"),
            ),
        )
    });
    let steps = multi.add(
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {{bar:30}} {{pos}}/{{len}} {unit} {{msg}}"
            ))
            .expect("valid template"),
        ),
    );
    let mut failures = Vec::new();
    for job in todo {
        steps.set_message(job.input.display().to_string());
        steps.set_position(0);
        match one(job, &steps) {
            Ok(()) => {
                for out in &job.outs {
                    multi.println(format!("wrote {}", out.display())).ok();
                }
            }
            Err(e) if todo.len() > 1 => {
                multi.println(format!("error: {e:#}")).ok();
                failures.push(job.input.clone());
            }
            Err(e) => {
                steps.finish_and_clear();
                return Err(e);
            }
        }
        if let Some(b) = &images {
            b.inc(1);
        }
    }
    steps.finish_and_clear();
    if let Some(b) = images {
        b.finish_and_clear();
    }
    folder_result(&failures, todo.len())
}

/// The end of a folder run: an error listing the images that failed, if any.
pub(crate) fn folder_result(failures: &[PathBuf], total: usize) -> anyhow::Result<()> {
    if !failures.is_empty() {
        bail!(
            "{} of {total} images failed: {}",
            failures.len(),
            failures
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
