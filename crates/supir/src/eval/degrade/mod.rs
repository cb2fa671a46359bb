//! Real-ESRGAN's second-order degradation: HQ image → synthetic LQ image (SUPIR and SeeSR train
//! and test on such pairs).
//!
//! [`degrade`] follows `RealESRGANDataset.__getitem__` (draw kernel 1, kernel 2, final sinc) and
//! `RealESRNetModel.feed_data`:
//! 1. blur (kernel 1) → resize up/down/keep (area / bilinear / bicubic) → Gaussian or Poisson
//!    noise (colour or gray) → clamp → JPEG;
//! 2. blur (kernel 2, with `second_blur_prob`) → resize relative to the target size → noise;
//! 3. in random order, {resize to `(h / scale, w / scale)` + final sinc filter} and {JPEG};
//!    then round to 8 bits.
//!
//! Randomness: one ChaCha8 stream per image, seeded from the run seed and the file name
//! ([`image_seed`]), so a folder gives the same outputs in any order or thread count. Every draw
//! is recorded in [`DegradeParams`] (the JSON sidecar). The streams are not numpy's / torch's:
//! same distributions, not the same samples as the Python code for a given seed.

pub mod config;
pub mod kernels;
pub mod ops;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use config::DegradeConfig;
pub use kernels::{KernelKind, KernelSpec};
pub use ops::{NoiseKind, Planes, ResizeMode};

use crate::{Error, Result};

/// The random stream of one image.
pub type DegradeRng = ChaCha8Rng;

/// `U(lo, hi)` (`np.random.uniform`); `lo` when the range is empty.
pub(crate) fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Index drawn uniformly from `0..n` (`random.choice`).
pub(crate) fn choose_uniform(rng: &mut impl Rng, n: usize) -> usize {
    rng.random_range(0..n)
}

/// Index drawn with the given weights (`random.choices(…, weights)[0]`: the first cumulative
/// weight above `u · total`).
pub(crate) fn choose_weighted(rng: &mut impl Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Seed of an image's stream: SplitMix64 of the run seed mixed with FNV-1a of the file name.
/// Stable across platforms and releases (no std hasher).
pub fn image_seed(seed: u64, file_name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in file_name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Resize direction of a stage (`['up', 'down', 'keep']`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Updown {
    Up,
    Down,
    Keep,
}

/// A sampled random resize.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeParams {
    pub direction: Updown,
    /// Factor drawn: `U(1, hi)` up, `U(lo, 1)` down, 1 keep.
    pub scale: f64,
    pub mode: ResizeMode,
    /// Output `[height, width]`.
    pub size: [usize; 2],
}

/// A sampled noise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseParams {
    pub kind: NoiseKind,
    /// Gaussian: sigma on the 0..255 scale. Poisson: the noise scale.
    pub level: f64,
    /// One noise plane for the three channels.
    pub gray: bool,
}

/// A sampled JPEG compression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JpegParams {
    /// The draw from `jpeg_range` (continuous, as DiffJPEG takes it).
    pub quality_sampled: f64,
    /// The integer quality given to the encoder (the draw rounded).
    pub quality: u8,
}

impl JpegParams {
    fn sample(range: [f64; 2], rng: &mut impl Rng) -> Self {
        let q = uniform(rng, range[0], range[1]);
        Self {
            quality_sampled: q,
            quality: q.round().clamp(1.0, 100.0) as u8,
        }
    }
}

/// Order of the final step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalOrder {
    /// [resize back + sinc filter] then JPEG.
    ResizeSincThenJpeg,
    /// JPEG then [resize back + sinc filter].
    JpegThenResizeSinc,
}

/// The first stage's draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage1Params {
    pub blur: KernelSpec,
    pub resize: ResizeParams,
    pub noise: NoiseParams,
    pub jpeg: JpegParams,
}

/// The second stage's draws. `blur` is the drawn kernel 2, applied only when `blurred`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage2Params {
    pub blurred: bool,
    pub blur: KernelSpec,
    pub resize: ResizeParams,
    pub noise: NoiseParams,
}

/// The final step's draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinalParams {
    pub order: FinalOrder,
    pub resize_mode: ResizeMode,
    /// The sinc filter, or `pulse` (none).
    pub sinc: KernelSpec,
    pub jpeg: JpegParams,
}

/// Everything drawn for one image: the JSON sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DegradeParams {
    /// Input file name (empty when not from a file).
    pub input: String,
    /// Run seed.
    pub seed: u64,
    /// Seed of this image's stream ([`image_seed`]).
    pub image_seed: u64,
    pub scale: u32,
    /// The HQ was USM-sharpened before degrading.
    pub gt_usm: bool,
    /// HQ `[height, width]`.
    pub hq_size: [usize; 2],
    /// LQ `[height, width]` = HQ size floor-divided by `scale`.
    pub lq_size: [usize; 2],
    pub stage1: Stage1Params,
    pub stage2: Stage2Params,
    #[serde(rename = "final")]
    pub final_step: FinalParams,
}

/// Draw and apply a random resize: direction by `probs`, factor from `range`, mode uniform;
/// `size_of(factor)` gives the output size.
fn random_resize(
    img: &Planes,
    probs: &[f64; 3],
    range: [f64; 2],
    size_of: impl Fn(f64) -> [usize; 2],
    with_factor: bool,
    rng: &mut DegradeRng,
) -> (Planes, ResizeParams) {
    let direction = [Updown::Up, Updown::Down, Updown::Keep][choose_weighted(rng, probs)];
    let scale = match direction {
        Updown::Up => uniform(rng, 1.0, range[1]),
        Updown::Down => uniform(rng, range[0], 1.0),
        Updown::Keep => 1.0,
    };
    let mode = ResizeMode::ALL[choose_uniform(rng, 3)];
    let size = size_of(scale);
    let out = ops::resize(img, size[0], size[1], mode, with_factor.then_some(scale));
    let params = ResizeParams {
        direction,
        scale,
        mode,
        size,
    };
    (out, params)
}

/// Draw and add noise: Gaussian with `gaussian_prob` (sigma from `sigma_range`), else Poisson
/// (scale from `poisson_range`); gray with `gray_prob`. Clamps to `[0, 1]`.
fn random_noise(
    img: &mut Planes,
    gaussian_prob: f64,
    sigma_range: [f64; 2],
    poisson_range: [f64; 2],
    gray_prob: f64,
    rng: &mut DegradeRng,
) -> NoiseParams {
    let gaussian = rng.random::<f64>() < gaussian_prob;
    let range = if gaussian { sigma_range } else { poisson_range };
    let level = uniform(rng, range[0], range[1]);
    let gray = rng.random::<f64>() < gray_prob;
    if gaussian {
        ops::add_gaussian_noise(img, level, gray, rng);
    } else {
        ops::add_poisson_noise(img, level, gray, rng);
    }
    NoiseParams {
        kind: if gaussian {
            NoiseKind::Gaussian
        } else {
            NoiseKind::Poisson
        },
        level,
        gray,
    }
}

/// `int(x)` of a positive size, at least 1.
fn size_floor(x: f64) -> usize {
    (x.floor() as usize).max(1)
}

/// Degrade `hq` (3 planes in `[0, 1]`) with the draws of `rng`. Returns the LQ image, of size
/// `(h / scale, w / scale)` (floor) on the 8-bit grid, and the draws (`input` and the seeds
/// left empty / 0 for the caller).
pub fn degrade(
    hq: &Planes,
    cfg: &DegradeConfig,
    rng: &mut DegradeRng,
) -> Result<(Planes, DegradeParams)> {
    let sf = cfg.scale as usize;
    let (ori_h, ori_w) = (hq.height, hq.width);
    if hq.channels != 3 {
        return Err(Error::Option(format!(
            "degrade needs 3 channels, got {}",
            hq.channels
        )));
    }
    if ori_h < sf || ori_w < sf {
        return Err(Error::Option(format!(
            "image of {ori_w}x{ori_h} is smaller than the scale {sf}"
        )));
    }
    let (lq_h, lq_w) = (ori_h / sf, ori_w / sf);

    // Kernels, drawn up front as the dataset does.
    let blur1 = kernels::sample_blur(&cfg.blur_draw(1), rng);
    let blur2 = kernels::sample_blur(&cfg.blur_draw(2), rng);
    let sinc = kernels::sample_final_sinc(&cfg.kernel_range, cfg.final_sinc_prob, rng);
    tracing::debug!(?blur1, ?blur2, ?sinc, "kernels");

    // ---- First stage.
    let sharpened;
    let hq = if cfg.gt_usm {
        sharpened = ops::usm_sharp(hq);
        &sharpened
    } else {
        hq
    };
    let out = ops::filter2d(hq, &blur1.kernel(cfg.blur_kernel_size));
    let (mut out, resize1) = random_resize(
        &out,
        &cfg.resize_prob,
        cfg.resize_range,
        |s| [size_floor(ori_h as f64 * s), size_floor(ori_w as f64 * s)],
        true,
        rng,
    );
    let noise1 = random_noise(
        &mut out,
        cfg.gaussian_noise_prob,
        cfg.noise_range,
        cfg.poisson_scale_range,
        cfg.gray_noise_prob,
        rng,
    );
    let jpeg1 = JpegParams::sample(cfg.jpeg_range, rng);
    out.clamp01();
    let out = ops::jpeg_roundtrip(&out, jpeg1.quality)?;

    // ---- Second stage.
    let blurred = rng.random::<f64>() < cfg.second_blur_prob;
    let out = if blurred {
        ops::filter2d(&out, &blur2.kernel(cfg.blur_kernel_size2))
    } else {
        out
    };
    let (mut out, resize2) = random_resize(
        &out,
        &cfg.resize_prob2,
        cfg.resize_range2,
        |s| {
            [
                size_floor(ori_h as f64 / sf as f64 * s),
                size_floor(ori_w as f64 / sf as f64 * s),
            ]
        },
        false,
        rng,
    );
    let noise2 = random_noise(
        &mut out,
        cfg.gaussian_noise_prob2,
        cfg.noise_range2,
        cfg.poisson_scale_range2,
        cfg.gray_noise_prob2,
        rng,
    );

    // ---- Final step: [resize back + sinc] and JPEG, in random order.
    let sinc_kernel = sinc.kernel(cfg.blur_kernel_size);
    let resize_sinc =
        |img: &Planes, mode| ops::filter2d(&ops::resize(img, lq_h, lq_w, mode, None), &sinc_kernel);
    let (order, resize_mode, jpeg2, mut out) = if rng.random::<f64>() < 0.5 {
        let mode = ResizeMode::ALL[choose_uniform(rng, 3)];
        let mut o = resize_sinc(&out, mode);
        let jpeg = JpegParams::sample(cfg.jpeg_range2, rng);
        o.clamp01();
        let o = ops::jpeg_roundtrip(&o, jpeg.quality)?;
        (FinalOrder::ResizeSincThenJpeg, mode, jpeg, o)
    } else {
        let jpeg = JpegParams::sample(cfg.jpeg_range2, rng);
        out.clamp01();
        let o = ops::jpeg_roundtrip(&out, jpeg.quality)?;
        let mode = ResizeMode::ALL[choose_uniform(rng, 3)];
        (
            FinalOrder::JpegThenResizeSinc,
            mode,
            jpeg,
            resize_sinc(&o, mode),
        )
    };
    out.quantize8();

    let params = DegradeParams {
        input: String::new(),
        seed: 0,
        image_seed: 0,
        scale: cfg.scale,
        gt_usm: cfg.gt_usm,
        hq_size: [ori_h, ori_w],
        lq_size: [lq_h, lq_w],
        stage1: Stage1Params {
            blur: blur1,
            resize: resize1,
            noise: noise1,
            jpeg: jpeg1,
        },
        stage2: Stage2Params {
            blurred,
            blur: blur2,
            resize: resize2,
            noise: noise2,
        },
        final_step: FinalParams {
            order,
            resize_mode,
            sinc,
            jpeg: jpeg2,
        },
    };
    Ok((out, params))
}

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "tif", "tiff"];

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The images to degrade: the file itself, or a folder's image files (by extension, not
/// recursive, sorted). An empty folder is an error.
pub fn list_inputs(input: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: input.to_path_buf(),
        source,
    };
    let meta = fs::metadata(input).map_err(io)?;
    if meta.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(input).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_file() && is_image(&path) {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::Image {
            path: input.to_path_buf(),
            msg: format!(
                "no image files ({}) in this folder",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    files.sort();
    Ok(files)
}

/// One input and where its LQ image and sidecar go.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub input: PathBuf,
    /// `<out_dir>/<stem>.png`.
    pub image: PathBuf,
    /// `<out_dir>/<stem>.json`.
    pub sidecar: PathBuf,
}

/// Output paths of every input; an error if two inputs share a stem or an output would
/// overwrite an input.
pub fn plan_jobs(inputs: &[PathBuf], out_dir: &Path) -> Result<Vec<Job>> {
    let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let canon_out = canon(out_dir);
    let inputs_canon: Vec<PathBuf> = inputs.iter().map(|p| canon(p)).collect();
    let mut jobs: Vec<Job> = Vec::with_capacity(inputs.len());
    for input in inputs {
        let stem = input
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| Error::Image {
                path: input.clone(),
                msg: "file name is not valid UTF-8".into(),
            })?;
        let image = out_dir.join(format!("{stem}.png"));
        let sidecar = out_dir.join(format!("{stem}.json"));
        for out in [&image, &sidecar] {
            let c = canon_out.join(out.file_name().expect("has a name"));
            if inputs_canon.contains(&c) {
                return Err(Error::Image {
                    path: out.clone(),
                    msg: "output would overwrite an input; choose another output folder".into(),
                });
            }
        }
        if let Some(prev) = jobs.iter().find(|j| j.image == image) {
            return Err(Error::Image {
                path: input.clone(),
                msg: format!(
                    "same output name as {} ({})",
                    prev.input.display(),
                    image.display()
                ),
            });
        }
        jobs.push(Job {
            input: input.clone(),
            image,
            sidecar,
        });
    }
    Ok(jobs)
}

/// Read an image file as 3 float planes (alpha dropped, 16-bit kept).
pub fn read_image(path: &Path) -> Result<Planes> {
    let img = image::ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .decode()
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: format!("cannot decode image: {e}"),
        })?;
    Ok(Planes::from_rgb32f(&img.to_rgb32f()))
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so `path`
/// is either absent or complete. Returns the temporary path for the caller to rename.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let io = |source| Error::Io {
        path: tmp.clone(),
        source,
    };
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(e)
    })?;
    Ok(tmp)
}

/// Degrade one file with its own stream and write the LQ PNG and the JSON sidecar atomically
/// (both temporaries first, then both renames; on failure nothing is left behind).
pub fn degrade_file(job: &Job, cfg: &DegradeConfig, seed: u64) -> Result<DegradeParams> {
    let name = job
        .input
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let hq = read_image(&job.input)?;
    let stream = image_seed(seed, &name);
    let mut rng = DegradeRng::seed_from_u64(stream);
    let (lq, mut params) = degrade(&hq, cfg, &mut rng).map_err(|e| match e {
        Error::Option(msg) => Error::Image {
            path: job.input.clone(),
            msg,
        },
        e => e,
    })?;
    params.input = name;
    params.seed = seed;
    params.image_seed = stream;
    tracing::debug!(input = %job.input.display(), ?params, "degraded");

    let mut png = Vec::new();
    lq.to_rgb8()
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Image {
            path: job.image.clone(),
            msg: format!("cannot encode PNG: {e}"),
        })?;
    let json = serde_json::to_vec_pretty(&params).expect("params serialise");
    let tmp_png = write_temp(&job.image, &png)?;
    let tmp_json = write_temp(&job.sidecar, &json).inspect_err(|_| {
        let _ = fs::remove_file(&tmp_png);
    })?;
    let rename = |from: &Path, to: &Path| {
        fs::rename(from, to).map_err(|source| Error::Io {
            path: to.to_path_buf(),
            source,
        })
    };
    rename(&tmp_png, &job.image).inspect_err(|_| {
        let _ = fs::remove_file(&tmp_png);
        let _ = fs::remove_file(&tmp_json);
    })?;
    // An image without its sidecar would be a half-written pair: take it back.
    rename(&tmp_json, &job.sidecar).inspect_err(|_| {
        let _ = fs::remove_file(&tmp_json);
        let _ = fs::remove_file(&job.image);
    })?;
    Ok(params)
}

#[cfg(test)]
mod tests;
