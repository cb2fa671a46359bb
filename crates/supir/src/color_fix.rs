//! Colour correction of the restored image against the stage-1 image (`SUPIR/utils/colorfix.py`).
//!
//! Both functions take `content` (the decoded sample) and `style` (the stage-1 reference), candle tensors
//! `[B, C, H, W]` (C = 3 in the pipeline), and return a tensor shaped like `content` in its dtype.
//! - Wavelet: keep the high frequencies of `content` (5 levels of a dilated 3x3 "à trous" blur) and take the
//!   lowest band of `style`.
//! - AdaIN: give each channel of `content` the mean and std of the matching `style` channel
//!   (std from the unbiased variance plus 1e-5).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// Which colour fix `batchify_sample` applies (`color_fix_type`: "None", "Wavelet", "AdaIn").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorFix {
    #[default]
    None,
    Wavelet,
    AdaIn,
}

impl FromStr for ColorFix {
    type Err = Error;

    /// The official names, case-insensitively ("wavelet", "ADAIN", ...).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "wavelet" => Ok(Self::Wavelet),
            "adain" => Ok(Self::AdaIn),
            _ => Err(Error::Option(format!(
                "unknown colour fix `{s}` (expected None, Wavelet or AdaIn)"
            ))),
        }
    }
}

impl fmt::Display for ColorFix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Wavelet => "Wavelet",
            Self::AdaIn => "AdaIn",
        })
    }
}

/// Applies `fix` to `content` with `style` as reference; `None` returns `content` unchanged.
pub fn apply(fix: ColorFix, content: &Tensor, style: &Tensor) -> Result<Tensor> {
    match fix {
        ColorFix::None => Ok(content.clone()),
        ColorFix::Wavelet => wavelet_reconstruction(content, style),
        ColorFix::AdaIn => adaptive_instance_normalization(content, style),
    }
}

/// Number of blur levels of `wavelet_decomposition`.
const WAVELET_LEVELS: usize = 5;

/// The 3x3 blur kernel of `wavelet_blur` (binomial 1-2-1 outer product / 16).
const WAVELET_KERNEL: [[f64; 3]; 3] = [
    [0.0625, 0.125, 0.0625],
    [0.125, 0.25, 0.125],
    [0.0625, 0.125, 0.0625],
];

fn check_rank4(t: &Tensor, what: &str) -> Result<()> {
    if t.rank() != 4 || t.elem_count() == 0 {
        return Err(Error::Option(format!(
            "colour fix: {what} must be a non-empty [B, C, H, W] tensor, got {:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// `wavelet_blur`: replicate-pad by `radius` on each side of H and W, then the 3x3 kernel with dilation
/// `radius`, per channel. `[B, C, H, W]` -> same shape.
pub fn wavelet_blur(image: &Tensor, radius: usize) -> Result<Tensor> {
    check_rank4(image, "image")?;
    let (_, _, h, w) = image.dims4()?;
    let padded = image
        .pad_with_same(2, radius, radius)?
        .pad_with_same(3, radius, radius)?;
    let mut out: Option<Tensor> = None;
    for (ky, row) in WAVELET_KERNEL.iter().enumerate() {
        for (kx, &k) in row.iter().enumerate() {
            let tap = padded
                .narrow(2, ky * radius, h)?
                .narrow(3, kx * radius, w)?
                .affine(k, 0.0)?;
            out = Some(match out {
                None => tap,
                Some(acc) => (acc + tap)?,
            });
        }
    }
    // The kernel has 9 taps, so `out` is always set.
    out.ok_or_else(|| Error::Option("wavelet blur: empty kernel".into()))
}

/// `wavelet_decomposition` with 5 levels (dilations 1, 2, 4, 8, 16): returns (high, low) where high is the
/// sum of the band-pass residuals and low the last blur, `image == high + low` up to rounding.
pub fn wavelet_decomposition(image: &Tensor) -> Result<(Tensor, Tensor)> {
    check_rank4(image, "image")?;
    let mut image = image.clone();
    let mut high: Option<Tensor> = None;
    for level in 0..WAVELET_LEVELS {
        let low = wavelet_blur(&image, 1 << level)?;
        let band = (&image - &low)?;
        high = Some(match high {
            None => band,
            Some(acc) => (acc + band)?,
        });
        image = low;
    }
    let high = high.ok_or_else(|| Error::Option("wavelet decomposition: no level".into()))?;
    Ok((high, image))
}

/// `wavelet_reconstruction`: high frequencies of `content` plus the low band of `style`.
/// Both `[B, C, H, W]` of the same shape.
pub fn wavelet_reconstruction(content: &Tensor, style: &Tensor) -> Result<Tensor> {
    check_rank4(content, "content")?;
    check_rank4(style, "style")?;
    if content.dims() != style.dims() {
        return Err(Error::Option(format!(
            "wavelet colour fix: content {:?} and style {:?} differ in shape",
            content.dims(),
            style.dims()
        )));
    }
    let style = style.to_dtype(content.dtype())?;
    let (content_high, _) = wavelet_decomposition(content)?;
    let (_, style_low) = wavelet_decomposition(&style)?;
    Ok((content_high + style_low)?)
}

/// `calc_mean_std`: per (batch, channel) mean and `sqrt(unbiased var + 1e-5)`, each `[B, C, 1, 1]` in the
/// input's dtype. The statistics are accumulated in f64 (torch's CPU variance accumulates in double too).
pub fn calc_mean_std(feat: &Tensor) -> Result<(Tensor, Tensor)> {
    const EPS: f64 = 1e-5;
    check_rank4(feat, "feature")?;
    let (b, c, h, w) = feat.dims4()?;
    let n = h * w;
    if n < 2 {
        return Err(Error::Option(format!(
            "AdaIN colour fix: needs at least 2 pixels per channel, got {h}x{w}"
        )));
    }
    let x = feat.reshape((b, c, n))?.to_dtype(DType::F64)?;
    let mean = (x.sum_keepdim(D::Minus1)? / n as f64)?;
    let var = (x.broadcast_sub(&mean)?.sqr()?.sum_keepdim(D::Minus1)? / (n - 1) as f64)?;
    let std = (var + EPS)?.sqrt()?;
    let dtype = feat.dtype();
    Ok((
        mean.to_dtype(dtype)?.reshape((b, c, 1, 1))?,
        std.to_dtype(dtype)?.reshape((b, c, 1, 1))?,
    ))
}

/// `adaptive_instance_normalization`: `(content - mean_c) / std_c * std_s + mean_s` per channel.
/// `content` `[B, C, H, W]`, `style` `[B, C, H', W']`.
pub fn adaptive_instance_normalization(content: &Tensor, style: &Tensor) -> Result<Tensor> {
    check_rank4(content, "content")?;
    check_rank4(style, "style")?;
    if content.dims()[..2] != style.dims()[..2] {
        return Err(Error::Option(format!(
            "AdaIN colour fix: content {:?} and style {:?} differ in batch or channels",
            content.dims(),
            style.dims()
        )));
    }
    let style = style.to_dtype(content.dtype())?;
    let (style_mean, style_std) = calc_mean_std(&style)?;
    let (content_mean, content_std) = calc_mean_std(content)?;
    let normalized = content
        .broadcast_sub(&content_mean)?
        .broadcast_div(&content_std)?;
    Ok(normalized
        .broadcast_mul(&style_std)?
        .broadcast_add(&style_mean)?)
}

/// SeeSR's `wavelet_color_fix` / `adain_color_fix` (`utils/wavelet_color_fix.py`) on 8-bit images:
/// `ToTensor` (u8 / 255), the fix, clamp to [0, 1], `ToPILImage` (x 255, truncated, not rounded).
/// `target` (the restored image) and `source` (the reference) are `[H, W, 3]` u8; returns the
/// clamped float image `[1, 3, H, W]` and the u8 image `[H, W, 3]`.
pub fn apply_u8_truncating(
    fix: ColorFix,
    target: &Tensor,
    source: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let to_float = |t: &Tensor, what: &str| -> Result<Tensor> {
        if t.rank() != 3 || t.dim(2)? != 3 || t.dtype() != DType::U8 {
            return Err(Error::Option(format!(
                "colour fix: {what} must be an [H, W, 3] u8 image, got {:?} {:?}",
                t.dims(),
                t.dtype()
            )));
        }
        let x = t.permute((2, 0, 1))?.unsqueeze(0)?.to_dtype(DType::F32)?;
        // True division, as ToTensor's `div(255)`.
        let d = Tensor::new(255f32, t.device())?;
        Ok(x.broadcast_div(&d)?)
    };
    let content = to_float(target, "target")?;
    let style = to_float(source, "source")?;
    let out = apply(fix, &content, &style)?.clamp(0f32, 1f32)?;
    let u8 = (&out * 255.0)?
        .floor()?
        .to_dtype(DType::U8)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .contiguous()?;
    Ok((out, u8))
}
