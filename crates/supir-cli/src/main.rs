//! `supir`: the command-line front end. Each subcommand lives in its own module.

mod bench;
mod caption;
mod convert;
mod degrade;
mod eval;
mod inspect;
mod parity;
mod restore;
mod restore_seesr;
mod restore_supir;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "supir",
    version,
    about = "Generative-prior image restoration (SUPIR, SeeSR) on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Restore / upscale an image or every image of a folder.
    Restore(Box<restore::RestoreArgs>),
    /// Caption images automatically (DAPE tags), for prompts or to edit and reuse.
    Caption(caption::CaptionArgs),
    /// Serve the restore engine over HTTP: an API and a web page (127.0.0.1:8420 by default).
    Serve(Box<serve::ServeArgs>),
    /// Convert weight files: ncnn to safetensors, checkpoints to GGUF (Q8_0, Q4_K).
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
    // Before any thread starts: keep freed activation buffers for reuse (`supir::memory`).
    supir::memory::keep_freed_heap();
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
        Command::Caption(args) => caption::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Parity(args) => parity::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Degrade(args) => degrade::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
