//! `supir parity <fixture-dir>`: every golden case of the folder, one line each.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A fixture folder: SUPIR (config.yaml, weights.safetensors, cases.json, cases.safetensors),
    /// SeeSR, or LLaVA (case.json, golden.safetensors, llava/, clip/, llava-hf/, gguf/).
    dir: PathBuf,
    /// Only cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let report = supir::parity::run(&args.dir, args.filter.as_deref(), |r| {
        match (&r.error, r.worst()) {
            (Some(e), _) => println!("{:<28} {:<12} error: {e}  FAIL", r.name, r.kind),
            (None, Some(w)) => println!(
                "{:<28} {:<12} max abs err {:.3e}  atol {:.3e}  {}",
                r.name,
                r.kind,
                w.max_err,
                w.atol,
                if r.passed() { "pass" } else { "FAIL" }
            ),
            (None, None) => println!("{:<28} {:<12} no outputs  FAIL", r.name, r.kind),
        }
    })
    .with_context(|| format!("parity on {}", args.dir.display()))?;
    let kinds = report.skipped_kinds();
    if !kinds.is_empty() {
        let kinds: Vec<&str> = kinds.into_iter().collect();
        println!(
            "skipped {} cases of kinds not implemented: {}",
            report.skipped.len(),
            kinds.join(", ")
        );
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    if report.failed() > 0 {
        bail!("{} parity cases failed", report.failed());
    }
    Ok(())
}
