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
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use supir::memory::peak_rss_gib;
use supir::models::glv_control::GLVControl;
use supir::models::supir_config::SupirConfig;
use supir::models::unet::LightGLVUNet;
use supir::models::vae::AutoencoderKL;
use supir::pipelines::supir::conditioner::Conditioner;
use supir::weights::{Checkpoint, RandomSource, WeightSource};

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
    /// Dtype the weights are held and run in.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
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

/// Times of one stage from one implementation.
#[derive(Clone, Debug)]
struct Timing {
    best: f64,
    median: f64,
    peak_gib: Option<f64>,
    /// For the reference: CPU seconds / wall seconds of its process over the stage (warm-up
    /// included), sampled from `/proc`.
    cores: Option<f64>,
}

/// One line of the table.
struct Row {
    stage: &'static str,
    /// Sorted seconds of the timed runs (empty for a derived row).
    times: Vec<f64>,
    ours: Timing,
    torch: Option<Timing>,
    /// The row is a sum of other rows.
    derived: bool,
    /// CPU cores our fastest run got (CPU seconds / wall seconds).
    cores: Option<f64>,
    /// CPU seconds of our fastest run (all threads): less sensitive to a busy machine than
    /// wall time, as long as no thread spins idle.
    cpu_s: Option<f64>,
    /// Load average when the stage ended.
    load: Option<f64>,
}

fn timing(times: &[f64], peak_gib: Option<f64>) -> Timing {
    Timing {
        best: times[0],
        // The upper median, as `bench_torch_cpu.py` takes it.
        median: times[times.len() / 2],
        peak_gib,
        cores: None,
    }
}

fn mem_available_gib() -> Option<f64> {
    supir::memory::proc_kib("/proc/meminfo", "MemAvailable").map(|k| k / (1024.0 * 1024.0))
}

/// Starts a new peak-memory window: returns freed heap to the system and resets `VmHWM` to the
/// current resident set (Linux `clear_refs` 5; silently nothing elsewhere).
fn reset_peak() {
    supir::memory::release_free_heap();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds used by this process so far (all threads), when known.
fn cpu_seconds() -> Option<f64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return Some(tv(ru.ru_utime) + tv(ru.ru_stime));
        }
    }
    None
}

/// The 1-minute load average: how busy the machine was (other processes included).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Timed runs of one stage.
struct Timed<T> {
    /// Sorted wall seconds.
    times: Vec<f64>,
    /// CPU seconds / wall seconds of the fastest run: the cores it got.
    cores: Option<f64>,
    /// Wall seconds of the first warm-up run (the one that fills the caches: the text
    /// context's cross-attention keys/values in GLVControl and the UNet).
    first: Option<f64>,
    last: T,
}

/// `warmup` untimed runs, then `reps` timed ones.
fn time<T>(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<Timed<T>> {
    let mut first = None;
    for _ in 0..warmup {
        let t0 = Instant::now();
        f()?;
        first.get_or_insert(t0.elapsed().as_secs_f64());
    }
    let mut runs = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let out = f()?;
        let wall = t0.elapsed().as_secs_f64();
        let cores = c0.zip(cpu_seconds()).map(|(a, b)| (b - a) / wall);
        runs.push((wall, cores));
        last = Some(out);
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Timed {
        times: runs.iter().map(|r| r.0).collect(),
        cores: runs[0].1,
        first,
        last: last.expect("reps >= 1"),
    })
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("unsupported dtype `{s}`"),
    })
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
    let dev = Device::Cpu;
    let cfg = match &a.config {
        Some(p) => SupirConfig::load(p)?,
        None => SupirConfig::from_yaml_str(OFFICIAL_CONFIG, Path::new("SUPIR_v0.yaml"))?,
    };
    let vb = if a.weights.is_empty() {
        let known: HashMap<String, Vec<usize>> = match &a.shapes_from {
            Some(p) => Checkpoint::open(p)?
                .tensors()
                .into_iter()
                .map(|(k, m)| (k, m.shape))
                .collect(),
            None => supir::inspect::full_size_keys().into_iter().collect(),
        };
        RandomSource::new(known, a.seed).into_var_builder(dtype, &dev)
    } else {
        WeightSource::open(&a.weights)?.into_var_builder(dtype, &dev)
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

    let mut rows = ours(&a, &cfg, &vb, dtype)?;
    drop(vb);

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

    print_table(&rows, torch.is_some());
    if let Some(path) = &a.json {
        std::fs::write(path, to_json(&a, threads, torch_header.as_deref(), &rows))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn note(msg: impl AsRef<str>) {
    eprintln!("  {}", msg.as_ref());
    let _ = std::io::stderr().flush();
}

/// Builds a network, timing the build.
fn build<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    reset_peak();
    let t0 = Instant::now();
    let net = f().with_context(|| format!("building {what}"))?;
    note(format!(
        "{what}: built in {:.1} s, peak {}",
        t0.elapsed().as_secs_f64(),
        gib(peak_rss_gib())
    ));
    Ok(net)
}

fn gib(g: Option<f64>) -> String {
    g.map_or("?".into(), |g| format!("{g:.1} GiB"))
}

fn push<T>(rows: &mut Vec<Row>, stage: &'static str, timed: &Timed<T>) {
    let t = timing(&timed.times, peak_rss_gib());
    let load = load_average();
    note(format!(
        "{stage}: best {:.3} s, median {:.3} s{}, peak {}, {} cores used, load {}",
        t.best,
        t.median,
        timed
            .first
            .map_or(String::new(), |f| format!(" (first warm-up run {f:.3} s)")),
        gib(t.peak_gib),
        timed.cores.map_or("?".into(), |c| format!("{c:.2}")),
        load.map_or("?".into(), |l| format!("{l:.1}")),
    ));
    rows.push(Row {
        stage,
        times: timed.times.clone(),
        ours: t,
        torch: None,
        derived: false,
        cores: timed.cores,
        cpu_s: timed.cores.map(|c| c * timed.times[0]),
        load,
    });
}

/// A row summing other rows (best with best, median with median).
fn push_sum(rows: &mut Vec<Row>, stage: &'static str, parts: &[&str]) {
    let found: Vec<&Row> = rows.iter().filter(|r| parts.contains(&r.stage)).collect();
    if found.len() != parts.len() {
        return;
    }
    let ours = Timing {
        best: found.iter().map(|r| r.ours.best).sum(),
        median: found.iter().map(|r| r.ours.median).sum(),
        peak_gib: found
            .iter()
            .filter_map(|r| r.ours.peak_gib)
            .reduce(f64::max),
        cores: None,
    };
    rows.push(Row {
        stage,
        times: vec![],
        ours,
        torch: None,
        derived: true,
        cores: None,
        cpu_s: found.iter().map(|r| r.cpu_s).sum(),
        load: None,
    });
}

fn ours(a: &SupirBenchArgs, cfg: &SupirConfig, vb: &VarBuilder, dtype: DType) -> Result<Vec<Row>> {
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

        let control = build("GLVControl", || {
            Ok(GLVControl::new(
                vb.pp("model.control_model"),
                &p.control_stage_config.params,
            )?)
        })?;
        let hints = if want_control {
            // A new context tensor per call, as the sampler builds one each step (its values
            // are the same, so the text keys/values computed on the first call are reused).
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
            let unet = build("UNet", || {
                Ok(LightGLVUNet::new(vb.pp("model.diffusion_model"), np)?)
            })?;
            let timed = time(wu, reps, || {
                Ok(unet.forward(&x, &t, &ctx.copy()?, &y, &hints, 1.0)?)
            })?;
            push(&mut rows, "unet_b2", &timed);
            push_sum(&mut rows, "step_b2", &["glvcontrol_b2", "unet_b2"]);
        }
    }
    Ok(rows)
}

/// One parsed line of `bench_torch_cpu.py`: `label\tmedian_s=..\tmin_s=..\tpeak_rss_gib=..`.
fn parse_torch_line(line: &str) -> Option<(String, Timing)> {
    let mut parts = line.split('\t');
    let label = parts.next()?.to_string();
    let mut kv = HashMap::new();
    for p in parts {
        let (k, v) = p.split_once('=')?;
        kv.insert(k, v.parse::<f64>().ok()?);
    }
    Some((
        label,
        Timing {
            best: *kv.get("min_s")?,
            median: *kv.get("median_s")?,
            peak_gib: kv.get("peak_rss_gib").copied(),
            cores: None,
        },
    ))
}

/// CPU seconds (user + system) of a running process, from `/proc/<pid>/stat`.
fn child_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    #[cfg(unix)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    #[cfg(not(unix))]
    let hz = 100.0;
    Some(ticks / hz)
}

/// Runs the reference script, echoing its output; returns its first line and its stages.
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
    let mut pythonpath = std::ffi::OsString::from(script_dir.as_os_str());
    pythonpath.push(":");
    pythonpath.push(env.official_src.as_os_str());
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        pythonpath.push(":");
        pythonpath.push(old);
    }
    eprintln!(
        "PyTorch reference: {} {} --latent {latent} --reps {reps}",
        env.python,
        env.script.display()
    );
    let mut child = Command::new(&env.python)
        .arg(&env.script)
        .args(["--latent", &latent.to_string(), "--reps", &reps.to_string()])
        .env("PYTHONPATH", pythonpath)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", env.python))?;
    let stdout = child.stdout.take().expect("piped");
    let mut header = String::new();
    let mut stages = HashMap::new();
    let mut last = (Instant::now(), child_cpu_seconds(child.id()));
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let now = (Instant::now(), child_cpu_seconds(child.id()));
        let cores = last
            .1
            .zip(now.1)
            .map(|(a, b)| (b - a) / (now.0 - last.0).as_secs_f64());
        last = now;
        note(format!("torch: {line}"));
        if header.is_empty() {
            header = line.clone();
        }
        if let Some((label, mut t)) = parse_torch_line(&line) {
            t.cores = cores;
            stages.insert(label, t);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the PyTorch reference failed ({status})");
    }
    Ok((header, stages))
}

/// Puts the reference's figures beside ours; derives its stage 1 and step sums.
fn attach_torch(rows: &mut [Row], stages: &HashMap<String, Timing>) {
    let sum = |parts: &[(&str, f64)]| -> Option<Timing> {
        let ts: Vec<(&Timing, f64)> = parts
            .iter()
            .map(|(k, w)| stages.get(*k).map(|t| (t, *w)))
            .collect::<Option<_>>()?;
        Some(Timing {
            best: ts.iter().map(|(t, w)| t.best * w).sum(),
            median: ts.iter().map(|(t, w)| t.median * w).sum(),
            peak_gib: ts.iter().filter_map(|(t, _)| t.peak_gib).reduce(f64::max),
            cores: None,
        })
    };
    for r in rows {
        r.torch = match r.stage {
            // The denoise encoder has the encoder's structure.
            "vae_denoise_encode_b1" => stages.get("vae_encode_b1").cloned(),
            "stage1_b1" => sum(&[("vae_encode_b1", 2.0), ("vae_decode_b1", 1.0)]),
            "step_b2" => sum(&[("glvcontrol_b2", 1.0), ("unet_b2", 1.0)]),
            other => stages.get(other).cloned(),
        };
    }
}

fn print_table(rows: &[Row], with_torch: bool) {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<24} {:>9} {:>9} {:>9} {:>6} {:>9}",
        "stage", "best s", "median s", "peak GiB", "cores", "cpu s"
    ));
    if with_torch {
        out.push_str(&format!(
            " | {:>9} {:>9} {:>9} {:>6} | {:>9}",
            "torch s", "median s", "peak GiB", "cores", "ours/torch"
        ));
    }
    out.push('\n');
    let peak = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:.1}"));
    for r in rows {
        let name = if r.derived {
            format!("{} (sum)", r.stage)
        } else {
            r.stage.to_string()
        };
        out.push_str(&format!(
            "{name:<24} {:>9.3} {:>9.3} {:>9} {:>6} {:>9}",
            r.ours.best,
            r.ours.median,
            peak(r.ours.peak_gib),
            r.cores.map_or("-".into(), |c| format!("{c:.2}")),
            r.cpu_s.map_or("-".into(), |c| format!("{c:.3}"))
        ));
        if with_torch {
            match &r.torch {
                Some(t) => out.push_str(&format!(
                    " | {:>9.3} {:>9.3} {:>9} {:>6} | {:>9.2}",
                    t.best,
                    t.median,
                    peak(t.peak_gib),
                    t.cores.map_or("-".into(), |c| format!("{c:.2}")),
                    r.ours.best / t.best
                )),
                None => out.push_str(&format!(
                    " | {:>9} {:>9} {:>9} {:>6} | {:>9}",
                    "-", "-", "-", "-", "-"
                )),
            }
        }
        out.push('\n');
    }
    print!("{out}");
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(x: Option<f64>) -> String {
    x.filter(|x| x.is_finite())
        .map_or("null".into(), |x| format!("{x:.4}"))
}

fn json_timing(t: &Timing) -> String {
    format!(
        "{{\"best_s\": {}, \"median_s\": {}, \"peak_rss_gib\": {}, \"cores\": {}}}",
        json_num(Some(t.best)),
        json_num(Some(t.median)),
        json_num(t.peak_gib),
        json_num(t.cores)
    )
}

fn to_json(a: &SupirBenchArgs, threads: usize, torch: Option<&str>, rows: &[Row]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            let times: Vec<String> = r.times.iter().map(|t| format!("{t:.4}")).collect();
            format!(
                "    {{\"stage\": {}, \"derived\": {}, \"times_s\": [{}], \"cores\": {}, \"cpu_s\": {}, \"load\": {}, \"ours\": {}, \"torch\": {}}}",
                json_str(r.stage),
                r.derived,
                times.join(", "),
                json_num(r.cores),
                json_num(r.cpu_s),
                json_num(r.load),
                json_timing(&r.ours),
                r.torch.as_ref().map_or("null".into(), json_timing)
            )
        })
        .collect();
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
        rows.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_lines() {
        let (label, t) =
            parse_torch_line("unet_b2\tmedian_s=31.02\tmin_s=30.50\tpeak_rss_gib=15.8").unwrap();
        assert_eq!(label, "unet_b2");
        assert_eq!((t.best, t.median, t.peak_gib), (30.5, 31.02, Some(15.8)));
        assert!(parse_torch_line("torch 2.5.1 threads 2 latent 64").is_none());
        assert!(parse_torch_line("built\tpeak_rss_gib=1.0").is_none());
    }

    #[test]
    fn torch_stage1_is_two_encodes_and_a_decode() {
        let t = |s: f64| Timing {
            best: s,
            median: s,
            peak_gib: None,
            cores: None,
        };
        let stages: HashMap<String, Timing> = [
            ("vae_encode_b1".to_string(), t(2.0)),
            ("vae_decode_b1".to_string(), t(5.0)),
        ]
        .into_iter()
        .collect();
        let mut rows = vec![Row {
            stage: "stage1_b1",
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
