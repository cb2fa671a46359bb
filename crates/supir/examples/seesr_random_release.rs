//! Writes a full-size SeeSR release folder (the official `preset/models` layout) with seeded random
//! weights, for memory and speed measurements of `supir restore --backend seesr` on real sizes
//! without the real files: every float tensor of `assets/seesr-keys.tsv` (integer buffers, which
//! the loaders drop, are left out), the release configs, SD-2-base's scheduler config and the CLIP
//! tokenizer files (from `fixtures/seesr-tiny`, whose vocabulary is the real one).
//!
//! usage: cargo run --release -p supir --example seesr_random_release -- OUT_DIR [f32|bf16|f16]
//!
//! All files are safetensors; `ram_swin_large_14m.pth` and `DAPE.pth` keep their release names
//! (the reader tells formats by content, not by name), so the folder loads with
//! `--seesr-models OUT_DIR`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use supir::weights::RandomSource;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = Path::new(
        args.get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: OUT_DIR [dtype]"))?,
    );
    let dtype = match args.get(2).map(String::as_str).unwrap_or("f32") {
        "f32" | "fp32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" | "fp16" => DType::F16,
        d => anyhow::bail!("unknown dtype {d}"),
    };
    let mut files: HashMap<String, Vec<(String, Vec<usize>)>> = HashMap::new();
    for r in supir::inspect::seesr_release_keys() {
        if r.dtype.starts_with("float") {
            files.entry(r.file).or_default().push((r.key, r.shape));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tiny = root.join("fixtures/seesr-tiny/stable-diffusion-2-base");
    let configs = root.join("fixtures/official/seesr");
    let copy = |from: &Path, to: &str| -> anyhow::Result<()> {
        let to = out.join(to);
        std::fs::create_dir_all(to.parent().expect("file in a folder"))?;
        std::fs::copy(from, &to)?;
        Ok(())
    };
    copy(
        &configs.join("text_encoder_config.json"),
        "stable-diffusion-2-base/text_encoder/config.json",
    )?;
    copy(
        &configs.join("vae_config.json"),
        "stable-diffusion-2-base/vae/config.json",
    )?;
    copy(
        &tiny.join("scheduler/scheduler_config.json"),
        "stable-diffusion-2-base/scheduler/scheduler_config.json",
    )?;
    for f in [
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        copy(
            &tiny.join("tokenizer").join(f),
            &format!("stable-diffusion-2-base/tokenizer/{f}"),
        )?;
    }
    for net in ["unet", "controlnet"] {
        copy(
            &configs.join(format!("{net}_config.json")),
            &format!("seesr/{net}/config.json"),
        )?;
    }
    let random = RandomSource::new(HashMap::new(), 0);
    let mut names: Vec<&String> = files.keys().collect();
    names.sort();
    for name in names {
        let path = out.join(name);
        std::fs::create_dir_all(path.parent().expect("file in a folder"))?;
        let tensors = files[name]
            .iter()
            .map(|(k, shape)| Ok((k.clone(), random.tensor(k, shape)?.to_dtype(dtype)?)))
            .collect::<anyhow::Result<HashMap<String, Tensor>>>()?;
        let params: usize = tensors.values().map(|t| t.elem_count()).sum();
        candle_core::safetensors::save(&tensors, &path)?;
        println!(
            "{}: {} tensors, {:.1} M parameters",
            path.display(),
            tensors.len(),
            params as f64 / 1e6
        );
    }
    Ok(())
}
