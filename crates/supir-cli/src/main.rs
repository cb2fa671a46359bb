//! `supir`: the command-line front end. Each subcommand lives in its own module.

mod bench;
mod inspect;
mod parity;

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
    /// Replay the golden cases of a fixture folder and compare with the official outputs.
    Parity(parity::Args),
    /// Show what checkpoint files hold and which SUPIR/SDXL parts they provide.
    Inspect(inspect::Args),
    /// Time the networks on this machine, beside the official PyTorch code when installed.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    // Die quietly on a closed pipe (`supir inspect ... | head`) instead of panicking.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Parity(a) => parity::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
