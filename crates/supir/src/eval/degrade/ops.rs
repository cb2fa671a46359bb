//! Image operators of the degradation: filtering, resizing, noise, JPEG, quantisation.
//!
//! All work on [`Planes`] (planar float32 RGB in `[0, 1]`), following the tensor semantics of
//! BasicSR / Real-ESRGAN: `filter2D` (reflect padding, correlation), `F.interpolate`
//! (`area` / `bilinear` / `bicubic`, `align_corners=False`, no antialiasing), the `_pt` noise
//! functions, and a real JPEG round trip.

use std::collections::HashMap;

use image::{ImageFormat, Rgb32FImage, RgbImage};
use rand::Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};
use serde::{Deserialize, Serialize};

use super::kernels::Kernel;
use crate::{Error, Result};

/// A float image as planes: `data[(c * height + y) * width + x]`, nominally in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Planes {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Planes {
    /// All-zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    /// Every pixel of every channel set to `v`.
    pub fn filled(channels: usize, height: usize, width: usize, v: f32) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![v; channels * height * width],
        }
    }

    /// Build from a function of (channel, row, column).
    pub fn from_fn(
        channels: usize,
        height: usize,
        width: usize,
        f: impl Fn(usize, usize, usize) -> f32,
    ) -> Self {
        let mut data = Vec::with_capacity(channels * height * width);
        for c in 0..channels {
            for y in 0..height {
                for x in 0..width {
                    data.push(f(c, y, x));
                }
            }
        }
        Self {
            channels,
            height,
            width,
            data,
        }
    }

    /// Interleaved RGB float image to planes.
    pub fn from_rgb32f(img: &Rgb32FImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        Self::from_fn(3, h, w, |c, y, x| img.get_pixel(x as u32, y as u32)[c])
    }

    /// Planes to 8-bit RGB: `clamp(round(v * 255), 0, 255)`.
    pub fn to_rgb8(&self) -> RgbImage {
        assert_eq!(self.channels, 3, "to_rgb8 needs 3 channels");
        RgbImage::from_fn(self.width as u32, self.height as u32, |x, y| {
            let px = |c: usize| to_u8(self.at(c, y as usize, x as usize));
            image::Rgb([px(0), px(1), px(2)])
        })
    }

    /// 8-bit RGB to planes (`v / 255`).
    pub fn from_rgb8(img: &RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        Self::from_fn(3, h, w, |c, y, x| {
            f32::from(img.get_pixel(x as u32, y as u32)[c]) / 255.0
        })
    }

    /// Value at (channel, row, column).
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }

    /// One channel as a row-major slice.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }

    /// `torch.clamp(x, 0, 1)`.
    pub fn clamp01(&mut self) {
        self.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    }

    /// `clamp(round(x * 255), 0, 255) / 255`: the 8-bit grid the LQ image is saved on.
    pub fn quantize8(&mut self) {
        self.data
            .iter_mut()
            .for_each(|v| *v = f32::from(to_u8(*v)) / 255.0);
    }
}

/// `clamp(round(v * 255), 0, 255)` as a byte (round half away from zero, as `torch.round` on
/// non-ties; ties are measure-zero for float inputs).
fn to_u8(v: f32) -> u8 {
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

/// BORDER_REFLECT_101 index (`dcb|abcd|cba`, edge not repeated), as `F.pad(mode='reflect')` and
/// cv2.filter2D's default. Folds repeatedly, so any offset is valid for `n >= 1`.
pub fn reflect101(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    if m >= n as isize {
        (period - m) as usize
    } else {
        m as usize
    }
}

/// `filter2D(img, kernel)`: 2-D correlation (not convolution, as `F.conv2d`) of every channel
/// with an odd square kernel, reflect-101 padding: `out(y, x) = Σ k[i][j] in(y+i-r, x+j-r)`.
/// The kernel's all-zero border (the padding to 21) is trimmed first: same result, fewer MACs.
pub fn filter2d(img: &Planes, kernel: &Kernel) -> Planes {
    let k = kernel.trimmed();
    let (size, r) = (k.size, (k.size / 2) as isize);
    let (h, w) = (img.height, img.width);
    let weights: Vec<f32> = k.data.iter().map(|&v| v as f32).collect();
    // Column and row source indices of the padded plane.
    let cols: Vec<usize> = (-r..w as isize + r).map(|i| reflect101(i, w)).collect();
    let rows: Vec<usize> = (-r..h as isize + r).map(|i| reflect101(i, h)).collect();
    let pw = w + size - 1;
    let mut out = Planes::zeros(img.channels, h, w);
    let mut padded = vec![0f32; (h + size - 1) * pw];
    for c in 0..img.channels {
        let src = img.plane(c);
        for (py, &sy) in rows.iter().enumerate() {
            let row = &src[sy * w..(sy + 1) * w];
            for (px, &sx) in cols.iter().enumerate() {
                padded[py * pw + px] = row[sx];
            }
        }
        let dst = &mut out.data[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let acc = &mut dst[y * w..(y + 1) * w];
            for i in 0..size {
                let prow = &padded[(y + i) * pw..(y + i + 1) * pw];
                for j in 0..size {
                    let kv = weights[i * size + j];
                    if kv == 0.0 {
                        continue;
                    }
                    for (a, &p) in acc.iter_mut().zip(&prow[j..j + w]) {
                        *a += kv * p;
                    }
                }
            }
        }
    }
    out
}

/// Separable filter: correlate rows then columns with the same odd 1-D kernel (reflect-101);
/// equals [`filter2d`] with the outer product `k kᵀ`.
pub fn filter_separable(img: &Planes, k: &[f64]) -> Planes {
    assert!(k.len() % 2 == 1, "1-D kernel size must be odd");
    let r = (k.len() / 2) as isize;
    let k: Vec<f32> = k.iter().map(|&v| v as f32).collect();
    let (h, w) = (img.height, img.width);
    let taps = |n: usize, i: usize| -> Vec<usize> {
        (-r..=r).map(|d| reflect101(i as isize + d, n)).collect()
    };
    let col_taps: Vec<Vec<usize>> = (0..w).map(|x| taps(w, x)).collect();
    let row_taps: Vec<Vec<usize>> = (0..h).map(|y| taps(h, y)).collect();
    let mut out = Planes::zeros(img.channels, h, w);
    let mut tmp = vec![0f32; h * w];
    for c in 0..img.channels {
        let src = img.plane(c);
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            for (x, t) in col_taps.iter().enumerate() {
                tmp[y * w + x] = t.iter().zip(&k).map(|(&i, &kv)| kv * row[i]).sum();
            }
        }
        let dst = &mut out.data[c * h * w..(c + 1) * h * w];
        for (y, t) in row_taps.iter().enumerate() {
            let drow = &mut dst[y * w..(y + 1) * w];
            for (&i, &kv) in t.iter().zip(&k) {
                for (d, &v) in drow.iter_mut().zip(&tmp[i * w..(i + 1) * w]) {
                    *d += kv * v;
                }
            }
        }
    }
    out
}

/// `cv2.getGaussianKernel(ksize, 0)`: σ = 0.3·((ksize − 1)/2 − 1) + 0.8, normalised.
pub fn cv2_gaussian_kernel(ksize: usize) -> Vec<f64> {
    let sigma = 0.3 * ((ksize as f64 - 1.0) * 0.5 - 1.0) + 0.8;
    let c = (ksize / 2) as f64;
    let g: Vec<f64> = (0..ksize)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|v| v / s).collect()
}

/// BasicSR's `USMSharp` (radius 50 → a 51-tap Gaussian, σ = 8; weight 0.5; threshold 10):
/// `B = blur(I)`, `M = blur(|I − B|·255 > threshold)`, `K = clamp(I + weight·(I − B), 0, 1)`,
/// `out = M·K + (1 − M)·I`. Real-ESRGAN degrades (and trains against) the sharpened GT when
/// `gt_usm` is set.
pub fn usm_sharp(img: &Planes) -> Planes {
    const WEIGHT: f32 = 0.5;
    const THRESHOLD: f32 = 10.0;
    let k = cv2_gaussian_kernel(51);
    let blur = filter_separable(img, &k);
    let mut mask = img.clone();
    for (m, (i, b)) in mask.data.iter_mut().zip(img.data.iter().zip(&blur.data)) {
        *m = if (i - b).abs() * 255.0 > THRESHOLD {
            1.0
        } else {
            0.0
        };
    }
    let soft = filter_separable(&mask, &k);
    let mut out = img.clone();
    for (o, ((i, b), m)) in out
        .data
        .iter_mut()
        .zip(img.data.iter().zip(&blur.data).zip(&soft.data))
    {
        let sharp = (i + WEIGHT * (i - b)).clamp(0.0, 1.0);
        *o = m * sharp + (1.0 - m) * i;
    }
    out
}

/// Interpolation of `F.interpolate` used by Real-ESRGAN, chosen uniformly at each resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// `adaptive_avg_pool2d`: box average over `[floor(i·in/out), ceil((i+1)·in/out))`.
    Area,
    /// Linear, half-pixel centres, source clamped at 0 (`align_corners=False`).
    Bilinear,
    /// Keys cubic convolution, `a = -0.75`, border indices clamped (`align_corners=False`).
    Bicubic,
}

impl ResizeMode {
    /// The order of Real-ESRGAN's `random.choice(['area', 'bilinear', 'bicubic'])`.
    pub const ALL: [ResizeMode; 3] = [ResizeMode::Area, ResizeMode::Bilinear, ResizeMode::Bicubic];
}

/// Cubic convolution weight (Keys, `a = -0.75`, torch's `upsample_bicubic2d`).
fn cubic_weight(x: f64) -> f64 {
    const A: f64 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Per output index, the (source index, weight) pairs of one axis.
fn axis_weights(
    n_in: usize,
    n_out: usize,
    mode: ResizeMode,
    scale: Option<f64>,
) -> Vec<Vec<(usize, f32)>> {
    // torch: a given scale_factor sets the source step to 1/scale, else in/out.
    let ratio = match scale {
        Some(s) if s > 0.0 => 1.0 / s,
        _ => n_in as f64 / n_out as f64,
    };
    let last = n_in - 1;
    (0..n_out)
        .map(|o| match mode {
            ResizeMode::Area => {
                let start = (o * n_in) / n_out;
                let end = ((o + 1) * n_in).div_ceil(n_out);
                let wgt = 1.0 / (end - start) as f32;
                (start..end).map(|i| (i, wgt)).collect()
            }
            ResizeMode::Bilinear => {
                let src = (ratio * (o as f64 + 0.5) - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(last);
                let i1 = (i0 + 1).min(last);
                let l1 = (src - i0 as f64) as f32;
                vec![(i0, 1.0 - l1), (i1, l1)]
            }
            ResizeMode::Bicubic => {
                let src = ratio * (o as f64 + 0.5) - 0.5;
                let i = src.floor();
                let t = src - i;
                (-1..=2)
                    .map(|d| {
                        let idx = (i as isize + d).clamp(0, last as isize) as usize;
                        (idx, cubic_weight(t - d as f64) as f32)
                    })
                    .collect()
            }
        })
        .collect()
}

/// `F.interpolate(img, size=(out_h, out_w), mode)`; `scale` is the `scale_factor` when the
/// caller gave one (then torch maps coordinates with `1/scale` instead of `in/out`).
/// Separable: rows then columns (exact for all three modes up to float rounding).
pub fn resize(
    img: &Planes,
    out_h: usize,
    out_w: usize,
    mode: ResizeMode,
    scale: Option<f64>,
) -> Planes {
    assert!(out_h > 0 && out_w > 0, "resize to an empty image");
    if out_h == img.height && out_w == img.width && scale.is_none_or(|s| s == 1.0) {
        return img.clone();
    }
    let (h, w) = (img.height, img.width);
    let wx = axis_weights(w, out_w, mode, scale);
    let wy = axis_weights(h, out_h, mode, scale);
    let mut out = Planes::zeros(img.channels, out_h, out_w);
    let mut tmp = vec![0f32; h * out_w];
    for c in 0..img.channels {
        let src = img.plane(c);
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            for (x, taps) in wx.iter().enumerate() {
                tmp[y * out_w + x] = taps.iter().map(|&(i, k)| k * row[i]).sum();
            }
        }
        let dst = &mut out.data[c * out_h * out_w..(c + 1) * out_h * out_w];
        for (y, taps) in wy.iter().enumerate() {
            let drow = &mut dst[y * out_w..(y + 1) * out_w];
            for &(i, k) in taps {
                let srow = &tmp[i * out_w..(i + 1) * out_w];
                for (d, &s) in drow.iter_mut().zip(srow) {
                    *d += k * s;
                }
            }
        }
    }
    out
}

/// Noise model of one degradation stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseKind {
    /// Additive `N(0, (sigma/255)²)`.
    Gaussian,
    /// Shot noise `Poisson(x·vals)/vals - x`, times a scale.
    Poisson,
}

/// `add_gaussian_noise_pt(..., clip=True)`: `x + N(0,1)·sigma/255`, then clamp to `[0, 1]`.
/// `gray`: one noise plane shared by the three channels. `sigma` is on the 0..255 scale.
pub fn add_gaussian_noise(img: &mut Planes, sigma: f64, gray: bool, rng: &mut impl Rng) {
    let n = img.height * img.width;
    let s = (sigma / 255.0) as f32;
    let mut normal = || -> f32 { rng.sample::<f32, _>(StandardNormal) * s };
    if gray {
        let plane: Vec<f32> = (0..n).map(|_| normal()).collect();
        for ch in img.data.chunks_mut(n) {
            ch.iter_mut().zip(&plane).for_each(|(v, e)| *v += e);
        }
    } else {
        img.data.iter_mut().for_each(|v| *v += normal());
    }
    img.clamp01();
}

/// `vals` of `generate_poisson_noise_pt`: `2^ceil(log2(#distinct 8-bit levels))`.
pub fn poisson_vals(levels: impl Iterator<Item = u8>) -> f64 {
    let mut seen = [false; 256];
    levels.for_each(|l| seen[l as usize] = true);
    let distinct = seen.iter().filter(|&&s| s).count().max(1);
    2f64.powi((distinct as f64).log2().ceil() as i32)
}

/// Shot noise of 8-bit levels: `Poisson(l/255·vals)/vals - l/255`. The Poisson laws are cached
/// per level (at most 256 distinct rates).
fn poisson_noise(levels: &[u8], vals: f64, rng: &mut impl Rng) -> Vec<f32> {
    let mut laws: HashMap<u8, Option<Poisson<f64>>> = HashMap::new();
    levels
        .iter()
        .map(|&l| {
            let x = f64::from(l) / 255.0;
            let law = laws.entry(l).or_insert_with(|| Poisson::new(x * vals).ok());
            let k = match law {
                Some(p) => p.sample(rng),
                None => 0.0, // rate 0: always 0
            };
            (k / vals - x) as f32
        })
        .collect()
}

/// `add_poisson_noise_pt(..., clip=True)`: `x + scale·(Poisson(x̂·vals)/vals - x̂)` with `x̂` the
/// image rounded to 8 bits, then clamp. `gray`: the noise of the luma
/// (`0.2989 R + 0.587 G + 0.114 B`, torchvision's `rgb_to_grayscale`) on every channel.
pub fn add_poisson_noise(img: &mut Planes, scale: f64, gray: bool, rng: &mut impl Rng) {
    let n = img.height * img.width;
    let s = scale as f32;
    if gray && img.channels == 3 {
        let luma: Vec<u8> = (0..n)
            .map(|i| {
                let (r, g, b) = (img.data[i], img.data[n + i], img.data[2 * n + i]);
                to_u8(0.2989 * r + 0.587 * g + 0.114 * b)
            })
            .collect();
        let vals = poisson_vals(luma.iter().copied());
        let noise = poisson_noise(&luma, vals, rng);
        for ch in img.data.chunks_mut(n) {
            ch.iter_mut().zip(&noise).for_each(|(v, e)| *v += s * e);
        }
    } else {
        let levels: Vec<u8> = img.data.iter().map(|&v| to_u8(v)).collect();
        let vals = poisson_vals(levels.iter().copied());
        let noise = poisson_noise(&levels, vals, rng);
        img.data
            .iter_mut()
            .zip(&noise)
            .for_each(|(v, e)| *v += s * e);
    }
    img.clamp01();
}

/// JPEG round trip at `quality` (1..=100, libjpeg quality scaling) with the `image` crate's
/// encoder and decoder. The input is clamped and rounded to 8 bits first (as `cv2.imencode`).
pub fn jpeg_roundtrip(img: &Planes, quality: u8) -> Result<Planes> {
    let rgb = img.to_rgb8();
    let mut buf = Vec::new();
    let err = |msg: String| Error::Jpeg { quality, msg };
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(&rgb)
        .map_err(|e| err(format!("encode: {e}")))?;
    let decoded = image::load_from_memory_with_format(&buf, ImageFormat::Jpeg)
        .map_err(|e| err(format!("decode: {e}")))?
        .to_rgb8();
    if decoded.dimensions() != rgb.dimensions() {
        return Err(err(format!(
            "decoded size {:?} differs from {:?}",
            decoded.dimensions(),
            rgb.dimensions()
        )));
    }
    Ok(Planes::from_rgb8(&decoded))
}
