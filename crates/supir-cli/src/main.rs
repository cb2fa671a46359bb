//! `supir`: the command-line front end. Each subcommand lives in its own module.

mod bench;
mod convert;
mod restore;

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
    Restore(restore::RestoreArgs),
    /// Convert weight files to safetensors.
    Convert(convert::ConvertArgs),
    /// Time a backend on this machine.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
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
        Command::Restore(args) => restore::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
