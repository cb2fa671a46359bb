//! Peak memory of loading the full-size SUPIR-v0 model from one f16 safetensors file.
//!
//! usage: cargo run --release -p supir --example full_size_load -- <file.safetensors> [f16|bf16|f32]
//!
//! When the file does not exist it is first written with random f16 values for every key of
//! `assets/supir-v0-keys.tsv` (about 9.6 GB), streamed tensor by tensor. The load then runs in a
//! child process so its peak resident memory (VmHWM) is its own.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device};
use supir::inspect::FULL_SIZE_KEYS_TSV;
use supir::models::supir_config::SupirConfig;
use supir::pipelines::supir::model::SupirModel;

fn rows() -> Vec<(String, Vec<usize>)> {
    FULL_SIZE_KEYS_TSV
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (k, s) = l.split_once('\t')?;
            let shape: Vec<usize> = s
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            Some((k.to_string(), shape))
        })
        .collect()
}

fn write_random(path: &Path) -> std::io::Result<()> {
    let rows = rows();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (k, shape) in &rows {
        let n: usize = shape.iter().product();
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + 2 * n]}),
        );
        offset += 2 * n;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let tmp = path.with_extension("partial");
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = Vec::new();
    for (_, shape) in &rows {
        let n: usize = shape.iter().product();
        buf.clear();
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
            buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    drop(f);
    std::fs::rename(tmp, path)
}

fn vm_hwm_kib() -> u64 {
    supir::memory::proc_kib("/proc/self/status", "VmHWM").unwrap_or(0.0) as u64
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = Path::new(
        args.get(1)
            .map(String::as_str)
            .unwrap_or("supir-v0-random-f16.safetensors"),
    );
    let dtype = match args.get(2).map(String::as_str).unwrap_or("f16") {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        d => anyhow::bail!("unknown dtype {d}"),
    };
    if std::env::var_os("SUPIR_LOAD_CHILD").is_none() {
        if !path.exists() {
            eprintln!("writing random full-size weights to {}", path.display());
            write_random(path)?;
        }
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(&args[1..])
            .env("SUPIR_LOAD_CHILD", "1")
            .status()?;
        anyhow::ensure!(status.success(), "load failed");
        return Ok(());
    }
    let cfg_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/official/SUPIR_v0.yaml");
    let cfg = SupirConfig::load(cfg_path)?;
    let size = std::fs::metadata(path)?.len();
    let t = std::time::Instant::now();
    let model = SupirModel::load(&cfg, &[path], dtype, &Device::Cpu)?;
    let secs = t.elapsed().as_secs_f64();
    let hwm = vm_hwm_kib() as f64 * 1024.0;
    println!(
        "file {:.2} GiB, load as {dtype:?} in {secs:.1} s, peak RSS {:.2} GiB ({:+.2} GiB over the file)",
        size as f64 / (1u64 << 30) as f64,
        hwm / (1u64 << 30) as f64,
        (hwm - size as f64) / (1u64 << 30) as f64
    );
    drop(model);
    Ok(())
}
