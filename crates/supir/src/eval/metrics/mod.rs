//! Full-reference image quality metrics computed the way BasicSR's `calculate_psnr` / `calculate_ssim` do
//! (the usual numbers of restoration papers): 8-bit RGB images in `[0, 255]`, an optional border crop, and
//! optionally only the luma channel (MATLAB `rgb2ycbcr` Y in `[16, 235]`, float32 as in BasicSR). Everything
//! else is f64.
//!
//! - PSNR: `10 log10(255^2 / MSE)` over all pixels and channels; identical images give `+inf`.
//! - SSIM: per channel, 11x11 Gaussian window (sigma 1.5), "valid" filtering (no padding),
//!   `C1 = (0.01 * 255)^2`, `C2 = (0.03 * 255)^2`, population (biased) variances; the mean of the SSIM map,
//!   then the mean over channels.
//!
//! The no-reference NIQE lives in [`niqe`] and the learned LPIPS distance in [`lpips`].

use image::RgbImage;

use crate::{Error, Result};

pub mod lpips;
pub mod niqe;
pub mod torch_legacy;

pub use niqe::niqe;

/// Which pixels a metric looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricOptions {
    /// Pixels dropped on each side before measuring (BasicSR `crop_border`, usually the scale factor).
    pub crop_border: u32,
    /// Measure the Y channel only (BasicSR `test_y_channel`).
    pub y_channel: bool,
}

/// Planar f64 channels of one image after cropping / luma conversion: `planes[c][y * width + x]`.
struct Planes {
    width: usize,
    height: usize,
    planes: Vec<Vec<f64>>,
}

/// MATLAB `rgb2ycbcr` luma of one pixel, as BasicSR's `to_y_channel`: the value is scaled to `[0, 1]` in f32,
/// then `16 + 65.481 R + 128.553 G + 24.966 B` in f64 (summed in BasicSR's B, G, R order), which `bgr2ycbcr`
/// hands back as float32 in `[0, 1]` and `to_y_channel` scales by 255 in float32; in `[16, 235]`.
pub fn rgb_to_y(r: u8, g: u8, b: u8) -> f64 {
    let f = |v: u8| (v as f32 / 255.0) as f64;
    let y = f(b) * 24.966 + f(g) * 128.553 + f(r) * 65.481 + 16.0;
    (((y / 255.0) as f32) * 255.0f32) as f64
}

fn prepare(a: &RgbImage, b: &RgbImage, opts: MetricOptions) -> Result<(Planes, Planes)> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::Option(format!(
            "metrics: image sizes differ ({}x{} vs {}x{})",
            a.width(),
            a.height(),
            b.width(),
            b.height()
        )));
    }
    let (w, h) = (a.width() as usize, a.height() as usize);
    let c = opts.crop_border as usize;
    if 2 * c >= w || 2 * c >= h {
        return Err(Error::Option(format!(
            "metrics: crop_border {c} leaves nothing of a {w}x{h} image"
        )));
    }
    let (cw, ch) = (w - 2 * c, h - 2 * c);
    let planes = |img: &RgbImage| -> Planes {
        let raw = img.as_raw();
        let px = |x: usize, y: usize| {
            let i = ((y + c) * w + (x + c)) * 3;
            (raw[i], raw[i + 1], raw[i + 2])
        };
        let planes = if opts.y_channel {
            let mut p = Vec::with_capacity(cw * ch);
            for y in 0..ch {
                for x in 0..cw {
                    let (r, g, b) = px(x, y);
                    p.push(rgb_to_y(r, g, b));
                }
            }
            vec![p]
        } else {
            (0..3)
                .map(|k| {
                    let mut p = Vec::with_capacity(cw * ch);
                    for y in 0..ch {
                        for x in 0..cw {
                            let (r, g, b) = px(x, y);
                            p.push([r, g, b][k] as f64);
                        }
                    }
                    p
                })
                .collect()
        };
        Planes {
            width: cw,
            height: ch,
            planes,
        }
    };
    Ok((planes(a), planes(b)))
}

/// PSNR in dB between two same-size 8-bit RGB images (peak 255); `+inf` when they are equal.
pub fn psnr(a: &RgbImage, b: &RgbImage, opts: MetricOptions) -> Result<f64> {
    let (pa, pb) = prepare(a, b, opts)?;
    let mut sum = 0.0;
    let mut n = 0usize;
    for (x, y) in pa.planes.iter().zip(&pb.planes) {
        for (u, v) in x.iter().zip(y) {
            sum += (u - v) * (u - v);
        }
        n += x.len();
    }
    let mse = sum / n as f64;
    if mse == 0.0 {
        return Ok(f64::INFINITY);
    }
    Ok(10.0 * (255.0 * 255.0 / mse).log10())
}

/// SSIM window size and Gaussian sigma (Wang et al. 2004, as BasicSR).
const SSIM_WIN: usize = 11;
const SSIM_SIGMA: f64 = 1.5;

/// The normalised 1-D Gaussian of the SSIM window (`cv2.getGaussianKernel(11, 1.5)`).
fn gaussian_kernel() -> [f64; SSIM_WIN] {
    let mut k = [0.0; SSIM_WIN];
    let half = (SSIM_WIN / 2) as f64;
    for (i, v) in k.iter_mut().enumerate() {
        let d = i as f64 - half;
        *v = (-(d * d) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp();
    }
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

/// "Valid" 2-D correlation with the separable window `k x k`: `(h - 10) x (w - 10)` outputs.
fn filter_valid(src: &[f64], w: usize, h: usize, k: &[f64; SSIM_WIN]) -> Vec<f64> {
    let (ow, oh) = (w - SSIM_WIN + 1, h - SSIM_WIN + 1);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for x in 0..ow {
            rows[y * ow + x] = k
                .iter()
                .zip(&row[x..x + SSIM_WIN])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = k
                .iter()
                .enumerate()
                .map(|(i, kv)| kv * rows[(y + i) * ow + x])
                .sum();
        }
    }
    out
}

/// Mean SSIM of one channel.
fn ssim_plane(a: &[f64], b: &[f64], w: usize, h: usize) -> f64 {
    const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
    const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);
    let k = gaussian_kernel();
    let mu1 = filter_valid(a, w, h, &k);
    let mu2 = filter_valid(b, w, h, &k);
    let sq = |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().zip(y).map(|(u, v)| u * v).collect() };
    let e11 = filter_valid(&sq(a, a), w, h, &k);
    let e22 = filter_valid(&sq(b, b), w, h, &k);
    let e12 = filter_valid(&sq(a, b), w, h, &k);
    let n = mu1.len();
    let mut sum = 0.0;
    for i in 0..n {
        let (m1, m2) = (mu1[i], mu2[i]);
        let s1 = e11[i] - m1 * m1;
        let s2 = e22[i] - m2 * m2;
        let s12 = e12[i] - m1 * m2;
        sum +=
            ((2.0 * m1 * m2 + C1) * (2.0 * s12 + C2)) / ((m1 * m1 + m2 * m2 + C1) * (s1 + s2 + C2));
    }
    sum / n as f64
}

/// SSIM between two same-size 8-bit RGB images (mean over channels, or of Y alone). The measured area
/// (after the border crop) must be at least 11x11.
pub fn ssim(a: &RgbImage, b: &RgbImage, opts: MetricOptions) -> Result<f64> {
    let (pa, pb) = prepare(a, b, opts)?;
    if pa.width < SSIM_WIN || pa.height < SSIM_WIN {
        return Err(Error::Option(format!(
            "ssim: needs at least {SSIM_WIN}x{SSIM_WIN} pixels after cropping, got {}x{}",
            pa.width, pa.height
        )));
    }
    let n = pa.planes.len();
    let total: f64 = pa
        .planes
        .iter()
        .zip(&pb.planes)
        .map(|(x, y)| ssim_plane(x, y, pa.width, pa.height))
        .sum();
    Ok(total / n as f64)
}
