//! `supir degrade <hq-image-or-folder> -o <dir>`: Real-ESRGAN second-order degradation, one LQ
//! PNG and one JSON sidecar of the drawn parameters per input.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use supir::eval::degrade::{self, DegradeConfig};

#[derive(clap::Args)]
pub struct Args {
    /// An HQ image, or a folder of them (png, jpg, jpeg, webp, tif, tiff; not recursive).
    input: PathBuf,
    /// Output folder (created if absent) for `<stem>.png` and `<stem>.json`.
    #[arg(short, long)]
    output: PathBuf,
    /// Run seed; each image's stream derives from it and the file name.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Degradation options (YAML or JSON, BasicSR option names); published defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HQ-to-LQ size factor (overrides the config's `scale`).
    #[arg(long)]
    scale: Option<u32>,
    /// Worker threads (default: all cores).
    #[arg(short, long)]
    jobs: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    // Everything that can be checked is checked before the first output is written.
    let mut cfg = match &args.config {
        Some(path) => DegradeConfig::from_file(path)?,
        None => DegradeConfig::default(),
    };
    if let Some(scale) = args.scale {
        cfg.scale = scale;
        let origin = args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("--scale"));
        cfg.validate(&origin)?;
    }
    let inputs = degrade::list_inputs(&args.input)?;
    let jobs = degrade::plan_jobs(&inputs, &args.output)?;
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating output folder {}", args.output.display()))?;
    tracing::info!(images = jobs.len(), seed = args.seed, "degrading");

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.jobs.unwrap_or(0))
        .build()
        .context("starting worker threads")?;
    let bar = ProgressBar::new(jobs.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let failures = Mutex::new(Vec::new());
    pool.install(|| {
        jobs.par_iter().for_each(|job| {
            if let Err(e) = degrade::degrade_file(job, &cfg, args.seed) {
                bar.suspend(|| eprintln!("error: {e}"));
                failures
                    .lock()
                    .expect("not poisoned")
                    .push(job.input.clone());
            }
            bar.inc(1);
        });
    });
    bar.finish_and_clear();
    let failures = failures.into_inner().expect("not poisoned");
    let done = jobs.len() - failures.len();
    println!("{done} degraded into {}", args.output.display());
    if !failures.is_empty() {
        bail!("{} of {} images failed", failures.len(), jobs.len());
    }
    Ok(())
}
