//! Resident memory of the full-size SeeSR networks, all held at once as `SeesrModel` holds them,
//! built from seeded random weights (no files: `RandomSource` over `assets/seesr-keys.tsv` and
//! the release configs in `fixtures/official/seesr/`).
//!
//! usage: cargo run --release -p supir --example seesr_full_size_load -- [diffusion dtype] [text/VAE/RAM dtype]
//!        (f32, bf16 or f16; default f32 f32, the release's own)
//!    or: ... --example seesr_full_size_load -- --from DIR [diffusion dtype] [text/VAE/RAM dtype] [resident|staged]
//!        (`SeesrModel::load` of a release folder, e.g. one written by `seesr_random_release`;
//!        default `resident`: all five networks read from the files)
//!
//! Prints the resident set after each network and the peak (VmHWM). Loading the release files
//! adds what the reader holds while a tensor is converted; a random tensor is drawn in f32 and
//! converted, so the peak here also includes one tensor's f32 copy. `--from` measures that
//! reading itself (memory-mapped files, each tensor's pages dropped once it is converted).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use supir::models::clip::{ClipTextConfig, ClipTextTransformer};
use supir::models::controlnet::{ControlNetConfig, ControlNetModel};
use supir::models::ram::{Ram, RamConfig};
use supir::models::unet::sd2::{UNet2DConditionConfig, UNet2DConditionModel};
use supir::models::vae::{AutoencoderKL, VaeConfig};
use supir::weights::RandomSource;

fn dtype(s: Option<&String>) -> anyhow::Result<DType> {
    Ok(match s.map(String::as_str).unwrap_or("f32") {
        "f32" | "fp32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" | "fp16" => DType::F16,
        d => anyhow::bail!("unknown dtype {d}"),
    })
}

/// `seesr-keys.tsv` grouped by file: key -> shape.
fn keys() -> HashMap<String, HashMap<String, Vec<usize>>> {
    let mut out: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
    for r in supir::inspect::seesr_release_keys() {
        out.entry(r.file).or_default().insert(r.key, r.shape);
    }
    out
}

fn gib(key: &str) -> f64 {
    supir::memory::proc_kib("/proc/self/status", key).unwrap_or(0.0) / (1024.0 * 1024.0)
}

fn report(what: &str, t: std::time::Instant) {
    println!(
        "{what:<14} built in {:5.1} s; RSS {:6.2} GiB, peak {:6.2} GiB",
        t.elapsed().as_secs_f64(),
        gib("VmRSS"),
        gib("VmHWM")
    );
}

/// `SeesrModel::load` of a release folder (the CLI's loader), as the CLI sets up the heap.
fn load_from(dir: &Path, args: &[String]) -> anyhow::Result<()> {
    use supir::pipelines::seesr::{Residency, SeesrModel, SeesrOptions, SeesrPaths};
    use supir::pipelines::supir::restore::Precision;
    supir::memory::keep_freed_heap();
    let precision = |s: Option<&String>| -> anyhow::Result<Precision> {
        Ok(match dtype(s)? {
            DType::BF16 => Precision::Bf16,
            DType::F16 => Precision::Fp16,
            _ => Precision::Fp32,
        })
    };
    let residency: Residency = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("resident")
        .parse()?;
    let opts = SeesrOptions {
        diffusion_dtype: precision(args.first())?,
        vae_dtype: precision(args.get(1))?,
        residency,
        ..Default::default()
    };
    println!(
        "SeeSR release {}, diffusion {:?}, text/VAE/RAM {:?}, {residency}",
        dir.display(),
        opts.diffusion_dtype,
        opts.vae_dtype
    );
    let t = std::time::Instant::now();
    let model = SeesrModel::load(&SeesrPaths::from_models_dir(dir), &opts, &Device::Cpu)?;
    report("SeesrModel", t);
    drop(model);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--from") {
        let dir = args
            .get(2)
            .ok_or_else(|| anyhow::anyhow!("--from needs a release folder"))?;
        return load_from(Path::new(dir), &args[3..]);
    }
    let (diff, vae_dt) = (dtype(args.get(1))?, dtype(args.get(2))?);
    let dev = Device::Cpu;
    let keys = keys();
    let vb =
        |file: &str, dt: DType| RandomSource::new(keys[file].clone(), 0).into_var_builder(dt, &dev);
    let cfg_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/official/seesr");
    println!("SeeSR full size, diffusion {diff:?}, text/VAE/RAM {vae_dt:?}, random weights");
    let t0 = std::time::Instant::now();

    let t = std::time::Instant::now();
    let te_cfg = ClipTextConfig::from_hf_config(cfg_dir.join("text_encoder_config.json"))?;
    let te = ClipTextTransformer::from_text_model(
        vb(
            "stable-diffusion-2-base/text_encoder/model.safetensors",
            vae_dt,
        ),
        &te_cfg,
    )?;
    report("text encoder", t);
    let t = std::time::Instant::now();
    let vae_cfg = VaeConfig::from_diffusers_config(cfg_dir.join("vae_config.json"))?;
    let vae = AutoencoderKL::from_diffusers(
        vb(
            "stable-diffusion-2-base/vae/diffusion_pytorch_model.safetensors",
            vae_dt,
        ),
        &vae_cfg,
    )?;
    report("VAE", t);
    let t = std::time::Instant::now();
    let unet = UNet2DConditionModel::new(
        vb("seesr/unet/diffusion_pytorch_model.safetensors", diff),
        &UNet2DConditionConfig::from_file(cfg_dir.join("unet_config.json"))?,
    )?;
    report("UNet", t);
    let t = std::time::Instant::now();
    let cn = ControlNetModel::new(
        vb("seesr/controlnet/diffusion_pytorch_model.safetensors", diff),
        &ControlNetConfig::from_file(cfg_dir.join("controlnet_config.json"))?,
    )?;
    report("ControlNet", t);
    let t = std::time::Instant::now();
    let ram = Ram::new(
        vb("ram_swin_large_14m.pth", vae_dt),
        None,
        &RamConfig::default(),
    )?;
    report("RAM (DAPE)", t);
    println!(
        "all networks in {:.1} s: RSS {:.2} GiB, peak {:.2} GiB",
        t0.elapsed().as_secs_f64(),
        gib("VmRSS"),
        gib("VmHWM")
    );
    drop((te, vae, unet, cn, ram));
    Ok(())
}
