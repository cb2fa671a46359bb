//! transformers' `CLIPImageProcessor.preprocess` as the LLaVA agent calls it (no square pad):
//! shortest side resized with Pillow's BICUBIC, centre crop, `x * rescale_factor` (in f64, then
//! f32), then `(x - mean) / std` in f32.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Deserialize;

use crate::image_io::convert::pil_bicubic_resize_rgb8;
use crate::{Error, Result};

/// `preprocessor_config.json` (the fields the CLIP processor uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipProcessorConfig {
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    #[serde(default = "default_size")]
    pub crop_size: SizeSpec,
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "default_std")]
    pub image_std: [f32; 3],
    #[serde(default = "default_resample")]
    pub resample: u32,
}

/// `size` / `crop_size`: an int (older configs) or `{"shortest_edge": n}` /
/// `{"height": h, "width": w}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Int(u32),
    Shortest { shortest_edge: u32 },
    HeightWidth { height: u32, width: u32 },
}

fn default_size() -> SizeSpec {
    SizeSpec::Int(224)
}
fn default_true() -> bool {
    true
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
/// OpenAI CLIP's mean and std.
fn default_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn default_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}
fn default_resample() -> u32 {
    3
}

impl Default for ClipProcessorConfig {
    /// `openai/clip-vit-large-patch14-336`'s.
    fn default() -> Self {
        Self {
            size: SizeSpec::Shortest { shortest_edge: 336 },
            crop_size: SizeSpec::HeightWidth {
                height: 336,
                width: 336,
            },
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            rescale_factor: default_rescale(),
            image_mean: default_mean(),
            image_std: default_std(),
            resample: 3,
        }
    }
}

impl ClipProcessorConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if cfg.do_resize && cfg.resample != 3 {
            return Err(Error::Config {
                path: path.to_path_buf(),
                msg: format!("resample {} (only BICUBIC, 3, is supported)", cfg.resample),
            });
        }
        Ok(cfg)
    }

    /// The resized `(width, height)`: shortest side to `size`, the long side
    /// `int(size * long / short)` (transformers' `get_resize_output_image_size`).
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        match self.size {
            SizeSpec::HeightWidth { height, width } => (width, height),
            SizeSpec::Int(s) | SizeSpec::Shortest { shortest_edge: s } => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as u32;
                if w <= h {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    fn crop(&self) -> (u32, u32) {
        match self.crop_size {
            SizeSpec::Int(s) | SizeSpec::Shortest { shortest_edge: s } => (s, s),
            SizeSpec::HeightWidth { height, width } => (width, height),
        }
    }

    /// `pixel_values` `[1, 3, H, W]` f32 for an RGB image.
    pub fn preprocess(&self, image: &RgbImage, dev: &Device) -> Result<Tensor> {
        let img = if self.do_resize {
            let (w, h) = self.resized_size(image.width(), image.height());
            pil_bicubic_resize_rgb8(image, w, h)?
        } else {
            image.clone()
        };
        let (w, h) = (img.width() as i64, img.height() as i64);
        let (cw, ch) = if self.do_center_crop {
            let (cw, ch) = self.crop();
            (cw as i64, ch as i64)
        } else {
            (w, h)
        };
        // Centre crop; zero padding where the crop is larger (transformers' `center_crop`).
        let (top, left) = ((h - ch) / 2, (w - cw) / 2);
        let (top, left) = (
            if h >= ch { top } else { -((ch - h) / 2) },
            if w >= cw { left } else { -((cw - w) / 2) },
        );
        let plane = (ch * cw) as usize;
        let mut out = vec![0f32; 3 * plane];
        for y in 0..ch {
            for x in 0..cw {
                let (sy, sx) = (y + top, x + left);
                let px = if sy >= 0 && sy < h && sx >= 0 && sx < w {
                    img.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0; 3]
                };
                for c in 0..3 {
                    let mut v = px[c] as f32;
                    if self.do_rescale {
                        v = (px[c] as f64 * self.rescale_factor) as f32;
                    }
                    if self.do_normalize {
                        v = (v - self.image_mean[c]) / self.image_std[c];
                    }
                    out[c * plane + (y * cw + x) as usize] = v;
                }
            }
        }
        Ok(Tensor::from_vec(
            out,
            (1, 3, ch as usize, cw as usize),
            dev,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_side_resize_truncates_the_long_side() {
        let c = ClipProcessorConfig::default();
        // int(336 * 83 / 61) = 457; portrait keeps the orientation.
        assert_eq!(c.resized_size(83, 61), (457, 336));
        assert_eq!(c.resized_size(61, 83), (336, 457));
        assert_eq!(c.resized_size(500, 500), (336, 336));
        let px = c.preprocess(&RgbImage::new(83, 61), &Device::Cpu).unwrap();
        assert_eq!(px.dims(), &[1, 3, 336, 336]);
        // Black: (0 - mean) / std per channel.
        let v = px.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] + 0.481_454_66 / 0.268_629_54).abs() < 1e-6);
    }
}
