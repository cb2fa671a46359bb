//! `supir serve`: flags -> [`supir_server::Config`]; the server crate does the rest. The
//! backend, its weights and the jobs' default options are `supir restore`'s own flags
//! ([`BackendArgs`]), and the backend is chosen by the same `auto` rule.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use supir::pipelines::supir::restore::Preset;
use supir_server::{Config, ModelConfig, RealEsrganResolved, SeesrSetup, SupirSetup};

use crate::restore::{Backend, BackendArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to bind; anything but loopback exposes the server (use --token).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0: any free one; the URL printed says which).
    #[arg(long, default_value_t = 8420)]
    port: u16,
    /// Require `Authorization: Bearer TOKEN` on the API (also `SUPIR_TOKEN`).
    #[arg(long, env = "SUPIR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Largest request body (upload), in MiB.
    #[arg(long, default_value_t = 64)]
    max_upload_mb: usize,
    /// Largest input image, in pixels.
    #[arg(long, default_value_t = 16 << 20)]
    max_pixels: u64,
    /// Jobs that may wait behind the running one; more get 429.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// How long results are kept after their job ends (e.g. 3600, 90s, 30m, 1h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    keep_results: Duration,
    /// At most this many finished jobs are kept (oldest deleted first).
    #[arg(long, default_value_t = 100)]
    keep_jobs: usize,
    /// Allow cross-origin requests from this one origin (e.g. http://localhost:3000).
    #[arg(long)]
    cors: Option<String>,
    /// The backend, its weights and the jobs' default options, as for `supir restore` (a job's
    /// `options` override the sampling ones). `--residency` as for `restore`: `staged` (the
    /// default) reads the diffusion networks for each job and keeps the peak low, `resident`
    /// keeps every network loaded between jobs.
    #[command(flatten)]
    model: BackendArgs,
}

/// The model to load and the jobs' defaults, from `supir restore`'s flags.
fn model_config(args: &BackendArgs) -> anyhow::Result<ModelConfig> {
    let supir = &args.supir;
    if supir.list_tiles {
        bail!("--list-tiles: a `supir restore` option (it prints the tiles of one image)");
    }
    if let Some(f) = &supir.tile_prompts {
        bail!(
            "--tile-prompts {}: per-tile prompts are for one image of `supir restore`, not a server",
            f.display()
        );
    }
    if supir.overwrite {
        bail!("--overwrite: a folder option of `supir restore`; the server keeps no outputs");
    }
    Ok(match args.choose()? {
        Backend::RealEsrgan => {
            let d = RealEsrganResolved::from_options(&args.upscale_options());
            d.validate().map_err(anyhow::Error::msg)?;
            ModelConfig::RealEsrgan(d)
        }
        Backend::Supir(spec) => {
            // `--seed -1`: a random seed per job, not one for the whole server.
            let mut flags = supir.clone();
            let random_seed = flags.seed == Some(-1);
            if random_seed {
                flags.seed = None;
            }
            let defaults = flags.options()?;
            let preset: Preset = supir
                .preset
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
                .parse()?;
            // The captioner behind jobs' `caption: "auto"`: required when it is the default
            // or `--captioner llava` was asked; the tags when their weights are found.
            let captioner = match crate::caption::captioner_config(
                supir.captioner,
                &args.seesr.tagger,
                &supir.llava,
                args.supir_models.as_deref(),
            ) {
                Ok(c) => Some(c),
                Err(e)
                    if defaults.caption == "auto"
                        || supir.captioner == crate::caption::CaptionerArg::Llava =>
                {
                    return Err(e.context("--caption auto / --captioner"))
                }
                Err(_) => None,
            };
            ModelConfig::Supir(Box::new(SupirSetup {
                config: spec.load_config()?,
                checkpoints: spec.checkpoints.clone(),
                description: spec.describe(),
                preset,
                defaults,
                random_seed,
                captioner,
            }))
        }
        Backend::Seesr(paths) => {
            let defaults = args.seesr.options(supir)?;
            paths.check(defaults.preset)?;
            ModelConfig::Seesr(Box::new(SeesrSetup { paths, defaults }))
        }
    })
}

/// `3600`, `90s`, `30m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected seconds or a number with s, m or h"))?;
    let k = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(n.saturating_mul(k)))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.queue == 0 {
        bail!("--queue 0: at least one job must be able to wait");
    }
    if args.max_upload_mb == 0 {
        bail!("--max-upload-mb 0: must be at least 1");
    }
    let model = model_config(&args.model)?;
    model.validate().map_err(anyhow::Error::msg)?;
    let cfg = Config {
        host: args.host,
        port: args.port,
        token: args.token.filter(|t| !t.is_empty()),
        max_upload_bytes: args
            .max_upload_mb
            .checked_mul(1 << 20)
            .context("--max-upload-mb: too large")?,
        max_pixels: args.max_pixels,
        queue: args.queue,
        keep_for: args.keep_results,
        keep_max: args.keep_jobs,
        cors: args.cors,
        model,
        temp_root: None,
    };
    supir_server::run(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("h").is_err());
    }
}
