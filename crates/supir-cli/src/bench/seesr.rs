//! `supir bench seesr`: each SeeSR network timed at one image size, one network in memory at a
//! time, optionally beside the official PyTorch code (`scripts/bench_seesr_torch.py`, run in a
//! child process after ours so the two never share the machine).
//!
//! Stages (latent side = size / 8), with the inputs `pipelines/seesr/flow.rs` gives them:
//! - `text_b2`: the SD-2 text encoder on `[2, 77]` ids (negative and positive prompt);
//! - `dape_b1`: RAM with DAPE (Swin-L, tagging head) on `[1, 3, 384, 384]`;
//! - `controlnet_b2`, `unet_b2`: one sampling step on the CFG batch 2 (latent, control image at
//!   the image size, text and RAM contexts); `step_b2` is their sum (derived);
//! - `vae_encode_b1`, `vae_decode_b1`: `quant_conv(encoder(x))` and
//!   `decoder(post_quant_conv(z))` through the tiled-VAE hook at the default tiles.
//!
//! The first call of a stage (the warm-up) is reported apart (`first s`): it fills what the
//! later calls reuse (the cross-attention keys/values of the text and RAM contexts in the
//! ControlNet and the UNet, RAM's label queries).
//!
//! Weights: seeded random ones with the keys and shapes of `assets/seesr-keys.tsv` and the
//! release configs (`fixtures/official/seesr/`), or a release folder (`--models`, the official
//! `preset/models` layout, e.g. the tiny fixture). The PyTorch reference runs when `--torch` is
//! given, or when `SEESR_OFFICIAL_SRC` (a copy of the official SeeSR code) is set and `--no-torch`
//! is not; `SEESR_TORCH_PYTHON` names its interpreter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use supir::models::clip::{ClipTextConfig, ClipTextTransformer};
use supir::models::controlnet::{ControlNetConfig, ControlNetModel};
use supir::models::ram::{Ram, RamConfig};
use supir::models::tiled_vae;
use supir::models::unet::sd2::{UNet2DConditionConfig, UNet2DConditionModel};
use supir::models::vae::{AutoencoderKL, VaeConfig};
use supir::pipelines::seesr::model::{weights_file, SeesrPaths};
use supir::pipelines::seesr::options::{
    SeesrOptions, SeesrPreset, DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT,
};
use supir::pipelines::supir::restore::Precision;
use supir::tokenizer::Tokenizer;
use supir::weights::{RandomSource, WeightSource};

use super::common::{
    build, cpu_description, json_num, json_rows, json_str, load_average, mem_available_gib,
    print_table, push, push_sum, python_path, reset_peak, run_reference, sum_timings, time, Row,
    Timing,
};
use super::TempDir;

/// `scripts/bench_seesr_torch.py`, run through `python -` unless `--torch-script` names a copy.
const TORCH_SCRIPT: &str = include_str!("../../../../scripts/bench_seesr_torch.py");

/// The release configs (SD-2-base's text encoder and VAE, SeeSR's UNet and ControlNet), under
/// the names the reference script reads from its `--config-dir`.
const CONFIGS: [(&str, &str); 4] = [
    (
        "text_encoder_config.json",
        include_str!("../../../../fixtures/official/seesr/text_encoder_config.json"),
    ),
    (
        "vae_config.json",
        include_str!("../../../../fixtures/official/seesr/vae_config.json"),
    ),
    (
        "unet_config.json",
        include_str!("../../../../fixtures/official/seesr/unet_config.json"),
    ),
    (
        "controlnet_config.json",
        include_str!("../../../../fixtures/official/seesr/controlnet_config.json"),
    ),
];

/// Keys and shapes of every file of the release.

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// The text encoder on the CFG batch of prompts.
    Text,
    /// RAM + DAPE on one 384 x 384 image.
    Dape,
    /// ControlNet + UNet, one sampling step.
    Step,
    /// The VAE encoder (tiled hook).
    #[value(name = "vae_encode", alias = "vae-encode")]
    VaeEncode,
    /// The VAE decoder (tiled hook).
    #[value(name = "vae_decode", alias = "vae-decode")]
    VaeDecode,
}

#[derive(clap::Args)]
pub struct SeesrBenchArgs {
    /// Image side in pixels (a multiple of 8; the latent side is size / 8).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// A SeeSR release folder (`preset/models` layout) to bench instead of full-size random
    /// weights.
    #[arg(long)]
    models: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype the ControlNet and UNet weights are held in (the CPU computes in f32).
    #[arg(long, default_value = "fp32")]
    diffusion_dtype: Precision,
    /// Dtype of the text encoder, VAE and RAM weights.
    #[arg(long, default_value = "fp32")]
    vae_dtype: Precision,
    /// Dtype the tiled VAE holds its tiles in between layers (fp32, bf16, fp16).
    #[arg(long, default_value = "fp32")]
    vae_tile_dtype: supir::models::tiled_vae::TileDtype,
    /// Timed runs per stage (best and median are reported).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Untimed runs before the timed ones (the first is reported as the cold call).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Stages to run (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "text,dape,step,vae_encode,vae_decode"
    )]
    stages: Vec<Stage>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the PyTorch reference after ours (needs `--official-src`).
    #[arg(long, conflicts_with = "no_torch")]
    torch: bool,
    /// Never run the PyTorch reference, even when its environment variables are set.
    #[arg(long)]
    no_torch: bool,
    /// Python interpreter with the official code's dependencies (torch, diffusers 0.21,
    /// transformers, timm, fairscale, loralib) [env: SEESR_TORCH_PYTHON; default: python3].
    #[arg(long)]
    torch_python: Option<String>,
    /// Copy of the official SeeSR code (holding `models/` and `ram/`), put on PYTHONPATH
    /// [env: SEESR_OFFICIAL_SRC].
    #[arg(long)]
    official_src: Option<PathBuf>,
    /// The reference script to run instead of the built-in copy of
    /// `scripts/bench_seesr_torch.py` [env: SEESR_TORCH_BENCH].
    #[arg(long)]
    torch_script: Option<PathBuf>,
}

/// Where the PyTorch reference lives, when it is to be run.
struct TorchEnv {
    python: String,
    script: Option<PathBuf>,
    official_src: PathBuf,
}

fn torch_env(a: &SeesrBenchArgs) -> Result<Option<TorchEnv>> {
    if a.no_torch {
        return Ok(None);
    }
    let from_env = |flag: &Option<PathBuf>, var: &str| {
        flag.clone()
            .or_else(|| std::env::var_os(var).map(PathBuf::from))
    };
    let src = match from_env(&a.official_src, "SEESR_OFFICIAL_SRC") {
        Some(s) => s,
        None if a.torch => {
            bail!("--torch needs the official SeeSR code: set --official-src (SEESR_OFFICIAL_SRC)")
        }
        None => return Ok(None),
    };
    if a.models.is_some() {
        if a.torch {
            bail!("--torch compares the full-size release networks only; drop --models");
        }
        return Ok(None);
    }
    let script = from_env(&a.torch_script, "SEESR_TORCH_BENCH");
    if let Some(s) = &script {
        if !s.is_file() {
            bail!("reference script {} not found", s.display());
        }
    }
    if !src.join("models/controlnet.py").is_file() || !src.join("ram").is_dir() {
        bail!(
            "{} is not a copy of the SeeSR code (no models/controlnet.py or ram/)",
            src.display()
        );
    }
    let python = a
        .torch_python
        .clone()
        .or_else(|| std::env::var("SEESR_TORCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    Ok(Some(TorchEnv {
        python,
        script,
        official_src: src,
    }))
}

/// `seesr-keys.tsv` grouped by file: file -> key -> shape.
fn release_keys() -> HashMap<String, HashMap<String, Vec<usize>>> {
    let mut out: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
    for r in supir::inspect::seesr_release_keys() {
        out.entry(r.file).or_default().insert(r.key, r.shape);
    }
    out
}

/// Where the networks come from.
enum Weights {
    /// Seeded random weights; configs written from the embedded release configs.
    Random {
        seed: u64,
        /// file -> key -> shape (`seesr-keys.tsv`).
        keys: HashMap<String, HashMap<String, Vec<usize>>>,
        configs: TempDir,
    },
    Release(SeesrPaths),
}

const TEXT_FILE: &str = "stable-diffusion-2-base/text_encoder/model.safetensors";
const VAE_FILE: &str = "stable-diffusion-2-base/vae/diffusion_pytorch_model.safetensors";
const UNET_FILE: &str = "seesr/unet/diffusion_pytorch_model.safetensors";
const CONTROLNET_FILE: &str = "seesr/controlnet/diffusion_pytorch_model.safetensors";
const RAM_FILE: &str = "ram_swin_large_14m.pth";
const DIFFUSERS_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];

impl Weights {
    fn new(a: &SeesrBenchArgs) -> Result<Self> {
        Ok(match &a.models {
            Some(dir) => {
                let paths = SeesrPaths::from_models_dir(dir);
                paths.check(SeesrPreset::Default)?;
                Self::Release(paths)
            }
            None => {
                let configs = TempDir::new()?;
                for (name, text) in CONFIGS {
                    std::fs::write(configs.0.join(name), text)?;
                }
                Self::Random {
                    seed: a.seed,
                    keys: release_keys(),
                    configs,
                }
            }
        })
    }

    /// The var builder of one release file (`file`: its path in `seesr-keys.tsv`).
    fn vb(&self, file: &str, dtype: DType) -> Result<VarBuilder<'static>> {
        let dev = Device::Cpu;
        Ok(match self {
            Self::Random { seed, keys, .. } => {
                let known = keys
                    .get(file)
                    .with_context(|| format!("seesr-keys.tsv lists no file {file}"))?;
                RandomSource::new(known.clone(), *seed).into_var_builder(dtype, &dev)
            }
            Self::Release(p) => {
                let (dir, names): (PathBuf, &[&str]) = match file {
                    TEXT_FILE => (
                        p.sd2_base.join("text_encoder"),
                        &["model.safetensors", "pytorch_model.bin"],
                    ),
                    VAE_FILE => (p.sd2_base.join("vae"), DIFFUSERS_WEIGHTS),
                    UNET_FILE => (p.seesr.join("unet"), DIFFUSERS_WEIGHTS),
                    CONTROLNET_FILE => (p.seesr.join("controlnet"), DIFFUSERS_WEIGHTS),
                    _ => bail!("no release path for {file}"),
                };
                WeightSource::open(&[weights_file(&dir, names)?])?.into_var_builder(dtype, &dev)
            }
        })
    }

    /// The config file of a component (`text_encoder`, `vae`, `unet`, `controlnet`).
    fn config(&self, component: &str) -> PathBuf {
        match self {
            Self::Random { configs, .. } => configs.0.join(format!("{component}_config.json")),
            Self::Release(p) => match component {
                "text_encoder" | "vae" => p.sd2_base.join(component),
                _ => p.seesr.join(component),
            }
            .join("config.json"),
        }
    }

    fn ram(&self, dtype: DType) -> Result<Ram> {
        let cfg = RamConfig::default();
        Ok(match self {
            // DAPE's LoRA is merged into the weights at load: without it the network is the same.
            Self::Random { .. } => Ram::new(self.vb(RAM_FILE, dtype)?, None, &cfg)?,
            Self::Release(p) => Ram::load(&p.ram, Some(&p.dape), &cfg, dtype, &Device::Cpu)?,
        })
    }

    fn config_dir(&self) -> Option<&Path> {
        match self {
            Self::Random { configs, .. } => Some(&configs.0),
            Self::Release(_) => None,
        }
    }
}

pub fn run(a: SeesrBenchArgs) -> Result<()> {
    if a.size == 0 || !a.size.is_multiple_of(8) {
        bail!("--size must be a positive multiple of 8");
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let torch = torch_env(&a)?;
    let weights = Weights::new(&a)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpu_description();
    eprintln!(
        "SeeSR networks at {s}x{s} (latent {l}x{l}), diffusion {dd}, text/VAE/RAM {vd} (VAE tiles held in {vt}), {w}, \
         best of {r} after {wu} warm-up, {threads} CPU threads, {avail} GiB available, load {load}",
        s = a.size,
        l = a.size / 8,
        dd = a.diffusion_dtype,
        vd = a.vae_dtype,
        vt = a.vae_tile_dtype,
        w = match &a.models {
            Some(d) => format!("weights of {}", d.display()),
            None => "full-size random weights".into(),
        },
        r = a.reps,
        wu = a.warmup,
        avail = mem_available_gib().map_or("?".into(), |g| format!("{g:.1}")),
        load = load_average().map_or("?".into(), |l| format!("{l:.2}")),
    );
    println!("CPU: {cpu}, {threads} threads");

    let mut rows = ours(&a, &weights)?;

    let mut torch_header = None;
    if let Some(env) = &torch {
        reset_peak();
        let dir = weights
            .config_dir()
            .context("the reference needs the release configs")?;
        let (header, stages) = run_torch(env, &a, dir)?;
        torch_header = Some(header);
        attach_torch(&mut rows, &stages);
    } else if !a.no_torch && a.models.is_none() {
        eprintln!("(PyTorch reference not run: set SEESR_OFFICIAL_SRC, or pass --torch)");
    }

    print_table(&rows, torch.is_some(), true);
    // Each stage's window starts when its network is built: the largest is the run's peak.
    let peak = rows.iter().filter_map(|r| r.ours.peak_gib).reduce(f64::max);
    println!(
        "peak RSS (largest stage, build included): {}; load average at the end: {}",
        peak.map_or("?".into(), |g| format!("{g:.2} GiB")),
        load_average().map_or("?".into(), |l| format!("{l:.2}"))
    );
    if let Some(path) = &a.json {
        std::fs::write(
            path,
            to_json(&a, threads, &cpu, torch_header.as_deref(), &rows),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn ours(a: &SeesrBenchArgs, w: &Weights) -> Result<Vec<Row>> {
    let dev = Device::Cpu;
    let (wu, reps) = (a.warmup, a.reps);
    let (s, l) = (a.size, a.size / 8);
    let vae_dt = a.vae_dtype.dtype();
    let diff_dt = a.diffusion_dtype.dtype();
    // Weights stay in their dtype; inputs are in the compute dtype (f32 on the CPU), as the
    // flow gives them.
    let cdt = supir::layers::compute_dtype(diff_dt, &dev);
    let opts = SeesrOptions {
        vae_tile_dtype: a.vae_tile_dtype,
        ..SeesrOptions::default()
    };
    let cn_cfg = ControlNetConfig::from_file(w.config("controlnet"))?;
    let mut rows = Vec::new();

    // The text context [negative, positive] and the RAM embeddings [1, M, 512]: the stages'
    // outputs when they run, else random tensors of their shapes.
    let mut text_ctx = None;
    let mut ram_embeds = None;

    if a.stages.contains(&Stage::Text) {
        let cfg = ClipTextConfig::from_hf_config(w.config("text_encoder"))?;
        let te = build("text encoder", || {
            Ok(ClipTextTransformer::from_text_model(
                w.vb(TEXT_FILE, vae_dt)?,
                &cfg,
            )?)
        })?;
        let tok = Tokenizer::new()?;
        let mut ids = tok.padded_ids(DEFAULT_NEGATIVE_PROMPT)?;
        ids.extend(tok.padded_ids(&format!("a photo, ,{DEFAULT_ADDED_PROMPT}"))?);
        let n = ids.len() / 2;
        let ids = Tensor::from_vec(ids, (2, n), &dev)?;
        let timed = time(wu, reps, || Ok(te.forward(&ids)?))?;
        push(&mut rows, "text_b2", &timed);
        text_ctx = Some(timed.last.to_dtype(DType::F32)?);
    }

    if a.stages.contains(&Stage::Dape) {
        let ram = build("RAM + DAPE", || w.ram(vae_dt))?;
        let side = ram.image_size();
        let px = Tensor::randn(0f32, 1f32, (1, 3, side, side), &dev)?;
        let timed = time(wu, reps, || Ok(ram.forward(&px)?))?;
        push(&mut rows, "dape_b1", &timed);
        ram_embeds = Some(timed.last.image_embeds.to_dtype(DType::F32)?);
    }

    if a.stages.contains(&Stage::Step) {
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1f32, shape, &dev)?.to_dtype(cdt)?)
        };
        let text = match text_ctx {
            Some(t) => t.to_dtype(cdt)?,
            None => randn(&[2, 77, cn_cfg.cross_attention_dim])?,
        };
        let ram = match ram_embeds {
            Some(r) => Tensor::cat(&[&r, &r], 0)?.to_dtype(cdt)?,
            // Swin with patch 4 and three merges: (side / 32)^2 tokens and the pooled one.
            None => {
                let side = RamConfig::default().image_size / 32;
                randn(&[2, side * side + 1, cn_cfg.image_cross_attention_dim])?
            }
        };
        let x = randn(&[2, cn_cfg.in_channels, l, l])?;
        let control = Tensor::rand(0f32, 1f32, (2, cn_cfg.conditioning_channels, s, s), &dev)?
            .to_dtype(cdt)?;
        let t = 500.0;
        let scale = opts.conditioning_scale;

        let cn = build("ControlNet", || {
            Ok(ControlNetModel::new(
                w.vb(CONTROLNET_FILE, diff_dt)?,
                &cn_cfg,
            )?)
        })?;
        let timed = time(wu, reps, || {
            Ok(cn.forward(&x, t, &text, Some(&ram), &control, scale)?)
        })?;
        push(&mut rows, "controlnet_b2", &timed);
        let res = timed.last;
        drop(cn);

        let cfg = UNet2DConditionConfig::from_file(w.config("unet"))?;
        let unet = build("UNet", || {
            Ok(UNet2DConditionModel::new(w.vb(UNET_FILE, diff_dt)?, &cfg)?)
        })?;
        let timed = time(wu, reps, || {
            Ok(unet.forward(&x, t, &text, Some(&ram), Some(&res))?)
        })?;
        push(&mut rows, "unet_b2", &timed);
        push_sum(&mut rows, "step_b2", &["controlnet_b2", "unet_b2"]);
    }

    let want_enc = a.stages.contains(&Stage::VaeEncode);
    let want_dec = a.stages.contains(&Stage::VaeDecode);
    if want_enc || want_dec {
        let cfg = VaeConfig::from_diffusers_config(w.config("vae"))?;
        let vae = build("VAE", || {
            Ok(AutoencoderKL::from_diffusers(
                w.vb(VAE_FILE, vae_dt)?,
                &cfg,
            )?)
        })?;
        let vcdt = supir::layers::compute_dtype(vae_dt, &dev);
        if want_enc {
            let img =
                Tensor::rand(-1f32, 1f32, (1, cfg.in_channels, s, s), &dev)?.to_dtype(vcdt)?;
            let timed = time(wu, reps, || {
                let h = tiled_vae::encode(
                    &vae.encoder,
                    &img,
                    opts.vae_encoder_tile,
                    opts.vae_tile_dtype,
                )?;
                Ok(vae.quant_conv.forward(&h)?)
            })?;
            push(&mut rows, "vae_encode_b1", &timed);
        }
        if want_dec {
            let z =
                Tensor::randn(0f32, 1f32, (1, cfg.latent_channels, l, l), &dev)?.to_dtype(vcdt)?;
            let timed = time(wu, reps, || {
                let z = vae.post_quant_conv.forward(&z)?;
                Ok(tiled_vae::decode(
                    &vae.decoder,
                    &z,
                    opts.vae_decoder_tile,
                    opts.vae_tile_dtype,
                )?)
            })?;
            push(&mut rows, "vae_decode_b1", &timed);
        }
    }
    Ok(rows)
}

fn stage_names(stages: &[Stage]) -> String {
    stages
        .iter()
        .map(|s| match s {
            Stage::Text => "text",
            Stage::Dape => "dape",
            Stage::Step => "step",
            Stage::VaeEncode => "vae_encode",
            Stage::VaeDecode => "vae_decode",
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the reference script, echoing its output; returns its first line and its stages.
fn run_torch(
    env: &TorchEnv,
    a: &SeesrBenchArgs,
    config_dir: &Path,
) -> Result<(String, HashMap<String, Timing>)> {
    let pythonpath = python_path(&[&env.official_src]);
    let script = env
        .script
        .as_ref()
        .map_or("- (built-in scripts/bench_seesr_torch.py)".into(), |p| {
            p.display().to_string()
        });
    let args = [
        "--size".to_string(),
        a.size.to_string(),
        "--reps".into(),
        a.reps.to_string(),
        "--stages".into(),
        stage_names(&a.stages),
        "--config-dir".into(),
        config_dir.display().to_string(),
    ];
    eprintln!(
        "PyTorch reference: {} {script} {}",
        env.python,
        args.join(" ")
    );
    let mut cmd = Command::new(&env.python);
    match &env.script {
        Some(p) => cmd.arg(p),
        None => cmd.arg("-"),
    };
    cmd.args(&args).env("PYTHONPATH", pythonpath);
    run_reference(cmd, env.script.is_none().then_some(TORCH_SCRIPT))
}

/// Puts the reference's figures beside ours; derives its step sum.
fn attach_torch(rows: &mut [Row], stages: &HashMap<String, Timing>) {
    for r in rows {
        r.torch = match r.stage {
            "step_b2" => match (stages.get("controlnet_b2"), stages.get("unet_b2")) {
                (Some(c), Some(u)) => Some(sum_timings(&[(c, 1.0), (u, 1.0)])),
                _ => None,
            },
            other => stages.get(other).cloned(),
        };
    }
}

fn to_json(
    a: &SeesrBenchArgs,
    threads: usize,
    cpu: &str,
    torch: Option<&str>,
    rows: &[Row],
) -> String {
    format!(
        "{{\n  \"backend\": \"seesr\",\n  \"size\": {},\n  \"latent\": {},\n  \"diffusion_dtype\": {},\n  \
         \"vae_dtype\": {},\n  \"vae_tile_dtype\": {},\n  \"weights\": {},\n  \"reps\": {},\n  \"warmup\": {},\n  \"threads\": {},\n  \
         \"cpu\": {},\n  \"load_end\": {},\n  \"torch\": {},\n  \"rows\": [\n{}\n  ]\n}}\n",
        a.size,
        a.size / 8,
        json_str(&a.diffusion_dtype.to_string()),
        json_str(&a.vae_dtype.to_string()),
        json_str(a.vae_tile_dtype.name()),
        a.models.as_ref().map_or("\"random\"".into(), |p| json_str(
            &p.display().to_string()
        )),
        a.reps,
        a.warmup,
        threads,
        json_str(cpu),
        json_num(load_average()),
        torch.map_or("null".into(), json_str),
        json_rows(rows, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_list_has_every_file_the_bench_builds() {
        let keys = release_keys();
        for f in [TEXT_FILE, VAE_FILE, UNET_FILE, CONTROLNET_FILE, RAM_FILE] {
            assert!(keys.get(f).is_some_and(|k| !k.is_empty()), "{f}");
        }
    }

    #[test]
    fn torch_step_is_controlnet_plus_unet() {
        let t = |s: f64| Timing {
            best: s,
            median: s,
            peak_gib: None,
            cores: None,
            first: Some(2.0 * s),
        };
        let stages: HashMap<String, Timing> = [
            ("controlnet_b2".to_string(), t(2.0)),
            ("unet_b2".to_string(), t(5.0)),
        ]
        .into_iter()
        .collect();
        let mut rows = vec![Row {
            stage: "step_b2",
            variant: None,
            times: vec![],
            ours: t(1.0),
            torch: None,
            derived: true,
            cores: None,
            cpu_s: None,
            load: None,
        }];
        attach_torch(&mut rows, &stages);
        let tt = rows[0].torch.as_ref().unwrap();
        assert_eq!((tt.best, tt.first), (7.0, Some(14.0)));
    }
}
