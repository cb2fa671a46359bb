//! `supir bench`: speed and peak memory of the networks on this machine, beside the official
//! PyTorch code when it is installed. One subcommand per model; each lives in its own module.

mod supir;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Every SUPIR network at one image size: text encoders, stage 1 (VAE), GLVControl and UNet
    /// per sampling step; with `--torch`, the official PyTorch code beside.
    Supir(Box<supir::SupirBenchArgs>),
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        What::Supir(a) => supir::run(*a),
    }
}
