//! `supir eval <restored> <reference>`: the usual restoration metrics for one image pair, or for two folders
//! whose images are matched by file name stem. PSNR/SSIM on RGB and on the Y channel (BasicSR's
//! `calculate_psnr` / `calculate_ssim`), NIQE of the restored image (BasicSR's `calculate_niqe`) and, when both
//! weight files are given, LPIPS (AlexNet).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use image::RgbImage;
use serde_json::{json, Value};
use supir::eval::metrics::{self, lpips::Lpips, MetricOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Restored image, or a folder of them.
    restored: PathBuf,
    /// Reference (ground-truth) image, or a folder whose images are matched to the restored ones by file stem.
    reference: PathBuf,
    /// One JSON object per line for each pair, then one with the means, instead of a table.
    #[arg(long)]
    json: bool,
    /// Pixels dropped on each side before measuring (usually the upscale factor).
    #[arg(long, default_value_t = 0)]
    crop_border: u32,
    /// LPIPS linear layers (the `weights/v0.1/alex.pth` of the `lpips` package; .pth or .safetensors).
    #[arg(long, requires = "lpips_backbone")]
    lpips_weights: Option<PathBuf>,
    /// LPIPS backbone: torchvision's AlexNet weights (`features.N.*` keys; .pth or .safetensors).
    #[arg(long, requires = "lpips_weights")]
    lpips_backbone: Option<PathBuf>,
}

/// Image extensions looked at in folders.
const EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"];

/// The columns, in output order.
const KEYS: [&str; 6] = ["psnr", "ssim", "psnr_y", "ssim_y", "niqe", "lpips"];

struct Pair {
    name: String,
    restored: PathBuf,
    reference: PathBuf,
}

fn images_in(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read folder {}", dir.display()))?
            .path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if !path.is_file() || !ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
            continue;
        }
        let stem = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some(prev) = out.insert(stem.clone(), path.clone()) {
            bail!(
                "{} and {} have the same name stem `{stem}`; cannot match them",
                prev.display(),
                path.display()
            );
        }
    }
    if out.is_empty() {
        bail!(
            "no images ({}) in folder {}",
            EXTENSIONS.join(", "),
            dir.display()
        );
    }
    Ok(out)
}

fn pairs(restored: &Path, reference: &Path) -> Result<Vec<Pair>> {
    for p in [restored, reference] {
        if !p.exists() {
            bail!("{} does not exist", p.display());
        }
    }
    match (restored.is_dir(), reference.is_dir()) {
        (false, false) => Ok(vec![Pair {
            name: restored
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            restored: restored.to_path_buf(),
            reference: reference.to_path_buf(),
        }]),
        (true, true) => {
            let res = images_in(restored)?;
            let refs = images_in(reference)?;
            for (stem, p) in &res {
                if !refs.contains_key(stem) {
                    eprintln!(
                        "note: no reference for {} in {}",
                        p.display(),
                        reference.display()
                    );
                }
            }
            for (stem, p) in &refs {
                if !res.contains_key(stem) {
                    eprintln!(
                        "note: no restored image for {} in {}",
                        p.display(),
                        restored.display()
                    );
                }
            }
            let pairs: Vec<Pair> = res
                .into_iter()
                .filter_map(|(stem, r)| {
                    refs.get(&stem).map(|g| Pair {
                        name: stem,
                        restored: r,
                        reference: g.clone(),
                    })
                })
                .collect();
            if pairs.is_empty() {
                bail!(
                    "no file name stem of {} matches one of {}",
                    restored.display(),
                    reference.display()
                );
            }
            Ok(pairs)
        }
        _ => bail!(
            "{} and {} must both be image files or both be folders",
            restored.display(),
            reference.display()
        ),
    }
}

/// Reads an image as 8-bit RGB; alpha is dropped, as `cv2.imread` does in BasicSR's scripts.
fn read(path: &Path) -> Result<RgbImage> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    Ok(img.to_rgb8())
}

/// All metrics of one pair; `None` where a metric does not apply (NIQE of a small image, no LPIPS weights).
fn measure(
    pair: &Pair,
    crop_border: u32,
    lpips: Option<&Lpips>,
) -> Result<BTreeMap<&'static str, Option<f64>>> {
    let a = read(&pair.restored)?;
    let b = read(&pair.reference)?;
    if a.dimensions() != b.dimensions() {
        bail!(
            "size mismatch: {} is {}x{} but {} is {}x{}",
            pair.restored.display(),
            a.width(),
            a.height(),
            pair.reference.display(),
            b.width(),
            b.height()
        );
    }
    let ctx = || {
        format!(
            "{} vs {}",
            pair.restored.display(),
            pair.reference.display()
        )
    };
    let rgb = MetricOptions {
        crop_border,
        y_channel: false,
    };
    let y = MetricOptions {
        y_channel: true,
        ..rgb
    };
    let mut m = BTreeMap::new();
    m.insert("psnr", Some(metrics::psnr(&a, &b, rgb).with_context(ctx)?));
    m.insert("ssim", Some(metrics::ssim(&a, &b, rgb).with_context(ctx)?));
    m.insert("psnr_y", Some(metrics::psnr(&a, &b, y).with_context(ctx)?));
    m.insert("ssim_y", Some(metrics::ssim(&a, &b, y).with_context(ctx)?));
    let niqe = match metrics::niqe(&a, crop_border) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("note: no NIQE for {}: {e}", pair.restored.display());
            None
        }
    };
    m.insert("niqe", niqe);
    if let Some(l) = lpips {
        m.insert("lpips", Some(l.distance(&a, &b).with_context(ctx)?));
    }
    Ok(m)
}

/// One JSON object on one line, `name` first and the metrics in column order.
fn object<'a>(name: Value, fields: impl Iterator<Item = (&'a str, Value)>) -> String {
    let mut parts = vec![format!("\"name\":{name}")];
    parts.extend(fields.map(|(k, v)| format!("{}:{v}", json!(k))));
    format!("{{{}}}", parts.join(","))
}

/// JSON number, or null for infinite/NaN (e.g. the PSNR of identical images).
fn num(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.is_finite() => json!(x),
        _ => Value::Null,
    }
}

pub fn run(args: Args) -> Result<()> {
    let pairs = pairs(&args.restored, &args.reference)?;
    let lpips = match (&args.lpips_weights, &args.lpips_backbone) {
        (Some(w), Some(b)) => {
            Some(Lpips::load(w, b, &Device::Cpu).context("cannot load the LPIPS weights")?)
        }
        _ => {
            eprintln!(
                "note: LPIPS skipped (give --lpips-weights and --lpips-backbone to compute it)"
            );
            None
        }
    };
    let keys: Vec<&str> = KEYS
        .iter()
        .copied()
        .filter(|k| *k != "lpips" || lpips.is_some())
        .collect();
    let mean_label = format!("mean ({})", pairs.len());
    let name_w = pairs
        .iter()
        .map(|p| p.name.len())
        .chain([mean_label.len()])
        .max()
        .unwrap_or(4);
    let header = || {
        print!("{:<name_w$}", "name");
        for k in &keys {
            print!(" {k:>9}");
        }
        println!();
    };
    // Rows stream out as they are measured (the header with the first), so a bad pair stops the run there.
    let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (i, pair) in pairs.iter().enumerate() {
        let m = measure(pair, args.crop_border, lpips.as_ref())?;
        if i == 0 && !args.json {
            header();
        }
        for (k, v) in &m {
            if let Some(v) = v {
                let e = sums.entry(k).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
        if args.json {
            let fields = keys.iter().map(|k| (*k, num(m.get(k).copied().flatten())));
            println!("{}", object(json!(pair.name), fields));
        } else {
            print!("{:<name_w$}", pair.name);
            for k in &keys {
                print!(" {}", cell(m.get(k).copied().flatten()));
            }
            println!();
        }
    }
    let mean = |k: &str| sums.get(k).map(|(s, n)| s / *n as f64);
    if args.json {
        let fields = [("count", json!(pairs.len()))]
            .into_iter()
            .chain(keys.iter().map(|k| (*k, num(mean(k)))));
        println!("{}", object(json!("mean"), fields));
    } else {
        print!("{mean_label:<name_w$}");
        for k in &keys {
            print!(" {}", cell(mean(k)));
        }
        println!();
    }
    Ok(())
}

/// A table cell, 4 decimals; `-` where the metric does not apply.
fn cell(v: Option<f64>) -> String {
    match v {
        None => format!("{:>9}", "-"),
        Some(x) => format!("{x:>9.4}"),
    }
}
