//! `supir bench`: placeholder until the benchmark lands.

use clap::Args;

#[derive(Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    Ok(())
}
