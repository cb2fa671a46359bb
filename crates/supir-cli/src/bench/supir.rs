//! `supir bench supir`: each SUPIR network timed at one image size, one network in memory at a
//! time, optionally beside the official PyTorch code (`bench_torch_cpu.py`, run in a child
//! process after ours so the two never share the machine).
//!
//! Stages (latent side = size / 8; CFG batch 2 for the sampling-step networks, as the official
//! sampler runs them):
//! - `text_encoders`: `prepare_condition` of an empty caption with the config's default prompts
//!   (CLIP-L + OpenCLIP bigG, c and uc);
//! - `vae_denoise_encode_b1`, `vae_decode_b1`, `vae_encode_b1`: stage 1's three passes at the
//!   image size; `stage1_b1` is their sum (derived);
//! - `glvcontrol_b2`, `unet_b2`: one sampling step each; `step_b2` is their sum (derived).
//!
//! The PyTorch reference runs when `--torch` is given, or when both `SUPIR_OFFICIAL_SRC` (the
//! official SUPIR checkout) and `SUPIR_TORCH_BENCH` (the path of `bench_torch_cpu.py`) are set
//! and `--no-torch` is not; `SUPIR_TORCH_PYTHON` names its interpreter. It times GLVControl,
//! the UNet, VAE decode and VAE encode (f32, random weights); its stage 1 is derived as
//! 2 x encode + decode (the denoise encoder is a copy of the encoder).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use supir::layers::{with_linear_quant, Quant};
use supir::models::glv_control::GLVControl;
use supir::models::supir_config::SupirConfig;
use supir::models::unet::LightGLVUNet;
use supir::models::vae::AutoencoderKL;
use supir::pipelines::supir::conditioner::Conditioner;
use supir::pipelines::supir::restore::Precision;
use supir::weights::{Checkpoint, RandomSource, WeightSource};

use super::common::{
    build, cpu_description, json_rows, json_str, mem_available_gib, print_table, push, push_sum,
    python_path, reset_peak, run_reference, sum_timings, time, Row, Timing,
};

/// The official `options/SUPIR_v0.yaml`, used when no `--config` is given.
const OFFICIAL_CONFIG: &str = include_str!("../../../../fixtures/official/SUPIR_v0.yaml");

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Both text encoders (`prepare_condition`).
    Text,
    /// Stage 1: denoise encoder, decoder and encoder of the VAE.
    Vae,
    /// GLVControl, one step.
    Control,
    /// The UNet, one step (runs GLVControl once, untimed, for its hints).
    Unet,
}

#[derive(clap::Args)]
pub struct SupirBenchArgs {
    /// Image side in pixels (a multiple of 8; the latent side is size / 8).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Model config (`SUPIR_v0.yaml` schema); default: the official full-size config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Checkpoints, SDXL base first, then the SUPIR file; default: seeded random weights.
    #[arg(long, num_args = 1.., conflicts_with = "random_weights")]
    weights: Vec<PathBuf>,
    /// Seeded random weights (the default when no `--weights` are given).
    #[arg(long)]
    random_weights: bool,
    /// For random weights: read the sizes the text encoders take off their weights from this
    /// checkpoint's key list (default: the full-size SUPIR-v0 key list).
    #[arg(long)]
    shapes_from: Option<PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype the weights are held in (the CPU computes in f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
    /// Weight formats of GLVControl + UNet to time side by side, comma separated (`q8_0`:
    /// linear layers in Q8_0, the rest f16; `q4_k`: linear layers in Q4_K, those not 256
    /// wide in Q8_0) [default: --dtype].
    #[arg(long, value_delimiter = ',', value_parser = ["f32", "f16", "bf16", "q8_0", "q4_k"])]
    diffusion_dtypes: Vec<String>,
    /// Timed runs per stage (best and median are reported).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Stages to run (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "text,vae,control,unet")]
    stages: Vec<Stage>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the PyTorch reference after ours (needs `--official-src` and `--torch-script`).
    #[arg(long, conflicts_with = "no_torch")]
    torch: bool,
    /// Never run the PyTorch reference, even when its environment variables are set.
    #[arg(long)]
    no_torch: bool,
    /// Python interpreter with the official code's dependencies [env: SUPIR_TORCH_PYTHON;
    /// default: python3].
    #[arg(long)]
    torch_python: Option<String>,
    /// Checkout of the official SUPIR code, put on PYTHONPATH [env: SUPIR_OFFICIAL_SRC].
    #[arg(long)]
    official_src: Option<PathBuf>,
    /// `bench_torch_cpu.py`; its folder goes on PYTHONPATH too, for its `stubs` module
    /// [env: SUPIR_TORCH_BENCH].
    #[arg(long)]
    torch_script: Option<PathBuf>,
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("unsupported dtype `{s}`"),
    })
}

/// A diffusion weight format (`Precision`'s names): the builder's dtype and the linear layers'
/// quantisation.
fn parse_diffusion_dtype(s: &str) -> Result<(DType, Option<Quant>)> {
    let p: Precision = s.parse()?;
    Ok((p.dtype(), p.quant()))
}

/// Where the PyTorch reference lives, when it is to be run.
struct TorchEnv {
    python: String,
    script: PathBuf,
    official_src: PathBuf,
}

fn torch_env(a: &SupirBenchArgs) -> Result<Option<TorchEnv>> {
    if a.no_torch {
        return Ok(None);
    }
    let from_env = |flag: &Option<PathBuf>, var: &str| {
        flag.clone()
            .or_else(|| std::env::var_os(var).map(PathBuf::from))
    };
    let script = from_env(&a.torch_script, "SUPIR_TORCH_BENCH");
    let src = from_env(&a.official_src, "SUPIR_OFFICIAL_SRC");
    let python = a
        .torch_python
        .clone()
        .or_else(|| std::env::var("SUPIR_TORCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let (script, src) = match (script, src) {
        (Some(s), Some(o)) => (s, o),
        _ if a.torch => bail!(
            "--torch needs the reference script and the official code: set --torch-script \
             (SUPIR_TORCH_BENCH) and --official-src (SUPIR_OFFICIAL_SRC)"
        ),
        _ => return Ok(None),
    };
    if a.config.is_some() {
        if a.torch {
            bail!("--torch compares the official full-size config only; drop --config");
        }
        return Ok(None);
    }
    if !script.is_file() {
        bail!("reference script {} not found", script.display());
    }
    if !src.join("SUPIR").is_dir() {
        bail!(
            "{} is not a SUPIR checkout (no SUPIR/ folder)",
            src.display()
        );
    }
    Ok(Some(TorchEnv {
        python,
        script,
        official_src: src,
    }))
}

pub fn run(a: SupirBenchArgs) -> Result<()> {
    if a.size == 0 || !a.size.is_multiple_of(8) {
        bail!("--size must be a positive multiple of 8");
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let torch = torch_env(&a)?;
    let dtype = parse_dtype(&a.dtype)?;
    let cfg = match &a.config {
        Some(p) => SupirConfig::load(p)?,
        None => SupirConfig::from_yaml_str(OFFICIAL_CONFIG, Path::new("SUPIR_v0.yaml"))?,
    };
    let known: HashMap<String, Vec<usize>> = match (&a.shapes_from, a.weights.is_empty()) {
        (_, false) => HashMap::new(),
        (Some(p), true) => Checkpoint::open(p)?
            .tensors()
            .into_iter()
            .map(|(k, m)| (k, m.shape))
            .collect(),
        (None, true) => supir::inspect::full_size_keys().into_iter().collect(),
    };
    let source = if a.weights.is_empty() {
        None
    } else {
        Some(WeightSource::open(&a.weights)?)
    };
    let make_vb = |dt: DType| -> VarBuilder<'static> {
        match &source {
            None => RandomSource::new(known.clone(), a.seed).into_var_builder(dt, &Device::Cpu),
            Some(src) => src.clone().into_var_builder(dt, &Device::Cpu),
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "SUPIR networks at {s}x{s} (latent {l}x{l}), {dt}, {w}, best of {r} after {wu} warm-up, \
         {threads} CPU threads, {avail} GiB available",
        s = a.size,
        l = a.size / 8,
        dt = a.dtype,
        w = if a.weights.is_empty() {
            "random weights"
        } else {
            "checkpoint weights"
        },
        r = a.reps,
        wu = a.warmup,
        avail = mem_available_gib().map_or("?".into(), |g| format!("{g:.1}")),
    );

    eprintln!(
        "kernels: f32 linear {}, q8_0 / q4_k linear {}; {}",
        if supir::kernels::packed::available() {
            "packed AVX-512"
        } else {
            "BLAS"
        },
        supir::kernels::q8::best_path().name(),
        cpu_description()
    );
    let mut rows = ours(&a, &cfg, &make_vb, dtype)?;

    let mut torch_header = None;
    if let Some(env) = &torch {
        reset_peak();
        let (header, stages) = run_torch(env, a.size / 8, a.reps)?;
        torch_header = Some(header);
        attach_torch(&mut rows, &stages);
    } else if !a.no_torch && a.config.is_none() {
        eprintln!(
            "(PyTorch reference not run: set SUPIR_OFFICIAL_SRC and SUPIR_TORCH_BENCH, or pass --torch)"
        );
    }

    print_table(&rows, torch.is_some(), true);
    if let Some(path) = &a.json {
        std::fs::write(path, to_json(&a, threads, torch_header.as_deref(), &rows))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn ours(
    a: &SupirBenchArgs,
    cfg: &SupirConfig,
    make_vb: &dyn Fn(DType) -> VarBuilder<'static>,
    dtype: DType,
) -> Result<Vec<Row>> {
    let vb = &make_vb(dtype);
    let p = &cfg.model.params;
    let dev = Device::Cpu;
    let (wu, reps) = (a.warmup, a.reps);
    let (s, l) = (a.size, a.size / 8);
    // Weights stay in `dtype`; the CPU computes in f32.
    let dtype = supir::layers::compute_dtype(dtype, &dev);
    let mut rows = Vec::new();

    if a.stages.contains(&Stage::Text) {
        let cond = build("text encoders", || {
            Ok(Conditioner::new(
                &p.conditioner_config.params,
                vb.pp("conditioner"),
            )?)
        })?;
        let timed = time(wu, reps, || {
            Ok(cond.prepare_condition(&[""], &p.p_p, &p.n_p)?)
        })?;
        push(&mut rows, "text_encoders", &timed);
    }

    if a.stages.contains(&Stage::Vae) {
        let vae = build("VAE with denoise encoder", || {
            Ok(AutoencoderKL::new(
                vb.pp("first_stage_model"),
                &p.first_stage_config.params,
                true,
            )?)
        })?;
        let img = Tensor::rand(-1f32, 1f32, (1, 3, s, s), &dev)?.to_dtype(dtype)?;
        let timed = time(wu, reps, || Ok(vae.denoise_encode_moments(&img)?))?;
        push(&mut rows, "vae_denoise_encode_b1", &timed);
        let z = timed
            .last
            .narrow(1, 0, p.first_stage_config.params.embed_dim)?;
        let timed = time(wu, reps, || Ok(vae.decode(&z)?))?;
        push(&mut rows, "vae_decode_b1", &timed);
        let timed = time(wu, reps, || Ok(vae.encode_moments(&img)?))?;
        push(&mut rows, "vae_encode_b1", &timed);
        push_sum(
            &mut rows,
            "stage1_b1",
            &["vae_denoise_encode_b1", "vae_decode_b1", "vae_encode_b1"],
        );
    }

    let want_control = a.stages.contains(&Stage::Control);
    let want_unet = a.stages.contains(&Stage::Unet);
    if want_control || want_unet {
        let np = &p.network_config.params;
        let c_in = p.control_stage_config.params.in_channels;
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1f32, shape, &dev)?.to_dtype(dtype)?)
        };
        let x = randn(&[2, np.in_channels, l, l])?;
        let zc = randn(&[2, c_in, l, l])?;
        let t = Tensor::new(&[500f32, 500.0], &dev)?;
        let ctx = randn(&[2, 77, np.context_dim])?;
        let y = randn(&[2, np.adm_in_channels.unwrap_or(0)])?;

        let formats = if a.diffusion_dtypes.is_empty() {
            vec![a.dtype.clone()]
        } else {
            a.diffusion_dtypes.clone()
        };
        let tagged = formats.len() > 1 || formats[0] != a.dtype;
        // The first format's outputs: the others are compared with them, each network on the
        // same inputs (the UNet gets the first format's control hints).
        let mut reference: Option<(Vec<Tensor>, Tensor)> = None;
        let mut errors = Vec::new();
        for format in &formats {
            let (storage, quant) = parse_diffusion_dtype(format)?;
            let vb = make_vb(storage);
            let from = rows.len();
            let control = build(&format!("GLVControl ({format})"), || {
                let (net, stats) = with_linear_quant(quant, || {
                    GLVControl::new(vb.pp("model.control_model"), &p.control_stage_config.params)
                });
                print_quant_stats("GLVControl", quant, stats);
                Ok(net?)
            })?;
            let hints = if want_control {
                // A new context tensor per call, as the sampler builds one each step (its
                // values are the same, so the text keys/values computed on the first call
                // are reused: the first warm-up run is the first sampling step).
                let timed = time(wu, reps, || {
                    Ok(control.forward(&zc, &t, &x, &ctx.copy()?, &y)?)
                })?;
                push(&mut rows, "glvcontrol_b2", &timed);
                timed.last
            } else {
                control.forward(&zc, &t, &x, &ctx, &y)?
            };
            drop(control);

            if want_unet {
                let unet = build(&format!("UNet ({format})"), || {
                    let (net, stats) = with_linear_quant(quant, || {
                        LightGLVUNet::new(vb.pp("model.diffusion_model"), np)
                    });
                    print_quant_stats("UNet", quant, stats);
                    Ok(net?)
                })?;
                let h = reference.as_ref().map_or(&hints, |r| &r.0);
                let timed = time(wu, reps, || {
                    Ok(unet.forward(&x, &t, &ctx.copy()?, &y, h, 1.0)?)
                })?;
                push(&mut rows, "unet_b2", &timed);
                match &reference {
                    None => reference = Some((hints, timed.last)),
                    Some((h0, u0)) => errors.push((
                        format.clone(),
                        relative_error(&hints, h0)?,
                        relative_error(
                            std::slice::from_ref(&timed.last),
                            std::slice::from_ref(u0),
                        )?,
                    )),
                }
            }
            if tagged {
                for r in &mut rows[from..] {
                    r.variant = Some(format.clone());
                }
            }
            push_sum(&mut rows, "step_b2", &["glvcontrol_b2", "unet_b2"]);
        }
        for (format, control, unet) in errors {
            println!(
                "relative error (L2) of {format} against {}: GLVControl hints {control:.2e}, UNet {unet:.2e}",
                formats[0]
            );
        }
    }
    Ok(rows)
}

/// How many linear layers a quantised build stored in which format.
fn print_quant_stats(net: &str, quant: Option<Quant>, s: supir::layers::QuantStats) {
    match quant {
        Some(Quant::Q4K) => println!(
            "{net} q4_k: {} linear layers quantised ({} of them in q8_0, not 256 wide), {} kept",
            s.quantised, s.fallback, s.kept
        ),
        Some(q) => println!(
            "{net} {}: {} linear layers quantised, {} kept",
            q.name(),
            s.quantised,
            s.kept
        ),
        None => {}
    }
}

/// `‖a - b‖ / ‖b‖` over all elements of the tensor lists.
fn relative_error(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in a.iter().zip(b) {
        let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
        num += (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        den += b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Runs `bench_torch_cpu.py`, echoing its output; returns its first line and its stages.
fn run_torch(
    env: &TorchEnv,
    latent: usize,
    reps: usize,
) -> Result<(String, HashMap<String, Timing>)> {
    let script_dir = env
        .script
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let pythonpath = python_path(&[&script_dir, &env.official_src]);
    eprintln!(
        "PyTorch reference: {} {} --latent {latent} --reps {reps}",
        env.python,
        env.script.display()
    );
    let mut cmd = Command::new(&env.python);
    cmd.arg(&env.script)
        .args(["--latent", &latent.to_string(), "--reps", &reps.to_string()])
        .env("PYTHONPATH", pythonpath);
    run_reference(cmd, None)
}

/// Puts the reference's figures beside ours; derives its stage 1 and step sums.
fn attach_torch(rows: &mut [Row], stages: &HashMap<String, Timing>) {
    let sum = |parts: &[(&str, f64)]| -> Option<Timing> {
        let ts: Vec<(&Timing, f64)> = parts
            .iter()
            .map(|(k, w)| stages.get(*k).map(|t| (t, *w)))
            .collect::<Option<_>>()?;
        Some(sum_timings(&ts))
    };
    for r in rows {
        // The reference runs f32 weights.
        if r.variant.as_deref().is_some_and(|v| v != "f32") {
            continue;
        }
        r.torch = match r.stage {
            // The denoise encoder has the encoder's structure.
            "vae_denoise_encode_b1" => stages.get("vae_encode_b1").cloned(),
            "stage1_b1" => sum(&[("vae_encode_b1", 2.0), ("vae_decode_b1", 1.0)]),
            "step_b2" => sum(&[("glvcontrol_b2", 1.0), ("unet_b2", 1.0)]),
            other => stages.get(other).cloned(),
        };
    }
}

fn to_json(a: &SupirBenchArgs, threads: usize, torch: Option<&str>, rows: &[Row]) -> String {
    format!(
        "{{\n  \"size\": {},\n  \"latent\": {},\n  \"dtype\": {},\n  \"weights\": {},\n  \"config\": {},\n  \
         \"reps\": {},\n  \"warmup\": {},\n  \"threads\": {},\n  \"torch\": {},\n  \"rows\": [\n{}\n  ]\n}}\n",
        a.size,
        a.size / 8,
        json_str(&a.dtype),
        json_str(if a.weights.is_empty() { "random" } else { "checkpoint" }),
        a.config
            .as_ref()
            .map_or("null".into(), |p| json_str(&p.display().to_string())),
        a.reps,
        a.warmup,
        threads,
        torch.map_or("null".into(), json_str),
        json_rows(rows, false)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_stage1_is_two_encodes_and_a_decode() {
        let t = |s: f64| Timing {
            best: s,
            median: s,
            peak_gib: None,
            cores: None,
            first: None,
        };
        let stages: HashMap<String, Timing> = [
            ("vae_encode_b1".to_string(), t(2.0)),
            ("vae_decode_b1".to_string(), t(5.0)),
        ]
        .into_iter()
        .collect();
        let mut rows = vec![Row {
            stage: "stage1_b1",
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
        assert_eq!(rows[0].torch.as_ref().unwrap().best, 9.0);
    }
}
