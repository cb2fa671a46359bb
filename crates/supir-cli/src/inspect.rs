//! `supir inspect <checkpoint>...`: what each file holds and which SUPIR/SDXL parts it provides.

use std::path::PathBuf;

use anyhow::Result;
use supir::inspect::{merged, summarize, Origin, Summary};
use supir::weights::{Checkpoint, Format};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint files (.safetensors, .ckpt, .pth); later files override earlier ones.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn print_parts(s: &Summary) {
    println!("  parts (against the full-size SUPIR-v0 model):");
    for c in &s.coverage {
        let status = if c.complete() {
            "provides"
        } else if c.present == 0 && c.wrong_shape.is_empty() {
            "lacks"
        } else {
            "partial"
        };
        let origin = match c.part.origin {
            Origin::SdxlBase => "SDXL base",
            Origin::Supir => "SUPIR file",
        };
        println!(
            "    {:<34} {:<8} {:>5}/{:<5} (normally from the {origin})",
            c.part.name, status, c.present, c.expected
        );
        for (k, want, got) in c.wrong_shape.iter().take(5) {
            println!("      wrong shape: {k}: {got:?}, SUPIR-v0 expects {want:?}");
        }
        if c.wrong_shape.len() > 5 {
            println!("      ... {} more wrong shapes", c.wrong_shape.len() - 5);
        }
    }
    if s.unknown > 0 {
        println!("  {} tensors not used by SUPIR-v0", s.unknown);
    }
}

pub fn run(args: Args) -> Result<()> {
    let files = args
        .files
        .iter()
        .map(Checkpoint::open)
        .collect::<supir::Result<Vec<_>>>()?;
    for f in &files {
        let s = summarize(&f.tensors());
        let format = match f.format() {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "PyTorch zip",
            Format::Gguf => "GGUF",
        };
        let dtypes: Vec<String> = s.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
        println!(
            "{} ({format}): {} tensors, {} parameters; dtypes: {}",
            f.path().display(),
            s.tensors,
            human(s.parameters),
            dtypes.join(", ")
        );
        println!("  parameters per module:");
        for (m, n) in &s.modules {
            println!("    {m:<44} {:>10}", human(*n));
        }
        print_parts(&s);
    }
    if files.len() > 1 {
        println!("all files together (later override earlier):");
        print_parts(&summarize(&merged(&files)));
    }
    let all = summarize(&merged(&files));
    let missing: Vec<&str> = all
        .coverage
        .iter()
        .filter(|c| !c.complete())
        // The official model starts denoise_encoder as a copy of the encoder.
        .filter(|c| !(c.part.name == "VAE denoise_encoder" && c.wrong_shape.is_empty()))
        .map(|c| c.part.name)
        .collect();
    if missing.is_empty() {
        println!("complete SUPIR-v0 model: yes");
    } else {
        println!(
            "complete SUPIR-v0 model: no (missing: {})",
            missing.join(", ")
        );
    }
    Ok(())
}
