//! Writes the full-size SUPIR-v0 model with random weights (`RandomSource::full_size`) straight
//! to one GGUF file, as `supir convert gguf --type T` would store it, without the 9.6 GB f16
//! safetensors file in between (memory and disk measurements on small disks).
//!
//! usage: cargo run --release -p supir --example random_gguf -- <out.gguf> [q8_0|q4_k|f16]
use std::io::Write;

use supir::gguf::{plan, write, GgufTarget, PlannedTensor, SUPIR_QUANT_PREFIXES};
use supir::weights::RandomSource;

fn main() {
    let mut args = std::env::args().skip(1);
    let out =
        std::path::PathBuf::from(args.next().expect("usage: random_gguf OUT [q8_0|q4_k|f16]"));
    let target = match args.next().as_deref().unwrap_or("q8_0") {
        "q8_0" => GgufTarget::Q8_0,
        "q4_k" => GgufTarget::Q4K,
        "f16" => GgufTarget::F16,
        t => panic!("unknown type {t}"),
    };
    let prefixes = SUPIR_QUANT_PREFIXES.map(String::from).to_vec();
    let planned: Vec<PlannedTensor> = supir::inspect::full_size_keys()
        .into_iter()
        .map(|(name, shape)| PlannedTensor {
            ty: plan(&name, &shape, target, &prefixes),
            name,
            shape,
        })
        .collect();
    let src = RandomSource::full_size(0);
    let mut w = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&out).unwrap());
    write(&mut w, "random-supir-v0", &planned, |t| {
        Ok(src.tensor(&t.name, &t.shape)?)
    })
    .unwrap();
    w.flush().unwrap();
    eprintln!(
        "wrote {} ({} tensors, {:.2} GiB)",
        out.display(),
        planned.len(),
        std::fs::metadata(&out).unwrap().len() as f64 / (1u64 << 30) as f64
    );
}
