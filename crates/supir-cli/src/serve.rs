//! `supir serve`: flags -> [`supir_server::Config`]; the server crate does the rest.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use supir::pipelines::realesrgan::Tiling;
use supir_server::{AlphaChoice, Backend, Config, ResolvedOptions};

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
    /// Backend; this version serves the embedded Real-ESRGAN.
    #[arg(long, value_enum, default_value_t = ServeBackend::Realesrgan)]
    backend: ServeBackend,
    /// Default output size over input size (jobs may override: `outscale`).
    #[arg(long, default_value_t = 4.0)]
    outscale: f64,
    /// Default Real-ESRGAN tile side in input pixels (0: whole image; `tile`).
    #[arg(long, default_value_t = Tiling::default().tile)]
    tile: usize,
    /// Default Real-ESRGAN context around each tile (`tile_pad`).
    #[arg(long, default_value_t = Tiling::default().pad)]
    tile_pad: usize,
    /// Default alpha upscaling (`alpha`).
    #[arg(long, value_enum, default_value_t = AlphaArg::Model)]
    alpha: AlphaArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServeBackend {
    Realesrgan,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AlphaArg {
    Model,
    Lanczos,
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
    for var in ["SUPIR_MODELS", "SEESR_MODELS"] {
        if std::env::var_os(var).is_some() {
            eprintln!(
                "note: {var} is set, but this version of `supir serve` runs the embedded Real-ESRGAN only"
            );
        }
    }
    let backend = match args.backend {
        ServeBackend::Realesrgan => Backend::RealEsrgan,
    };
    let defaults = ResolvedOptions {
        outscale: args.outscale,
        tile: args.tile,
        tile_pad: args.tile_pad,
        alpha: match args.alpha {
            AlphaArg::Model => AlphaChoice::Model,
            AlphaArg::Lanczos => AlphaChoice::Lanczos,
        },
        ..ResolvedOptions::realesrgan_defaults()
    };
    defaults.validate().map_err(anyhow::Error::msg)?;
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
        backend,
        defaults,
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
