//! `supir`: the command-line front end. Each subcommand lives in its own module.

mod bench;
mod convert;
mod degrade;
mod eval;
mod inspect;
mod parity;
mod restore;
mod restore_supir;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "supir",
    version,
    about = "Generative-prior image restoration (SUPIR) on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Restore / upscale an image or every image of a folder.
    Restore(Box<restore::RestoreArgs>),
    /// Convert weight files to safetensors.
    Convert(convert::ConvertArgs),
    /// Time a backend on this machine.
    Bench(bench::BenchArgs),
    /// Replay the golden cases of a fixture folder and compare with the official outputs.
    Parity(parity::Args),
    /// Show what checkpoint files hold and which SUPIR/SDXL parts they provide.
    Inspect(inspect::Args),
    /// Make LQ images from HQ ones with the Real-ESRGAN second-order degradation.
    Degrade(degrade::Args),
    /// PSNR/SSIM (RGB and Y), NIQE and optionally LPIPS of restored images against references.
    Eval(eval::Args),
}

fn main() -> std::process::ExitCode {
    // Die quietly on a closed pipe (`supir inspect ... | head`) instead of panicking.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep freed activation buffers in the heap for reuse: by default glibc maps every block
    // over 32 MiB afresh and gives it back on free, so each layer's output costs a round of
    // page faults and zeroing (measured: 16% of a UNet step in the kernel). Nor does the heap
    // shrink by itself when its free top grows (a trim threshold of -1 is SIZE_MAX: the UNet
    // frees over 1 GiB at the end of each call, which a 1 GiB threshold handed back only to
    // fault it in again on the next step). The library hands free pages back between phases
    // (`supir::memory`). `SUPIR_MALLOC_DEFAULT=1` skips this.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("SUPIR_MALLOC_DEFAULT").is_none() {
        // SAFETY: malloc tuning before any allocation-heavy work or thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Restore(args) => restore::run(*args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Parity(args) => parity::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Degrade(args) => degrade::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
