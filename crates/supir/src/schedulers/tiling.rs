//! Latent tiling for the tiled samplers (`sgm/modules/diffusionmodules/sampling.py`:
//! `_sliding_windows`, `gaussian_weights`).

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// One tile of a `[B, C, H, W]` tensor: rows `h0..h1`, columns `w0..w1` (end exclusive).
/// `index` is the tile's position in [`sliding_windows`] order (the `j` of the official loop,
/// which picks the tile's local prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileWindow {
    pub index: usize,
    pub h0: usize,
    pub h1: usize,
    pub w0: usize,
    pub w1: usize,
}

impl TileWindow {
    pub fn height(&self) -> usize {
        self.h1 - self.h0
    }

    pub fn width(&self) -> usize {
        self.w1 - self.w0
    }

    /// The same window scaled by `factor` (latent to image pixels: 8).
    pub fn scaled(&self, factor: usize) -> TileWindow {
        TileWindow {
            index: self.index,
            h0: self.h0 * factor,
            h1: self.h1 * factor,
            w0: self.w0 * factor,
            w1: self.w1 * factor,
        }
    }

    /// `t[:, :, h0:h1, w0:w1]` of a 4-D tensor.
    pub fn slice(&self, t: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = t.dims4()?;
        if self.h1 > h || self.w1 > w {
            return Err(Error::Option(format!(
                "tile {self:?} does not fit a {h}x{w} tensor"
            )));
        }
        Ok(t.narrow(2, self.h0, self.height())?
            .narrow(3, self.w0, self.width())?)
    }
}

/// Tile origins along one axis: every `stride` from 0 while the tile fits, then one tile flush
/// with the far edge unless the last regular tile already ends there.
fn axis_origins(len: usize, tile: usize, stride: usize) -> Vec<usize> {
    let last = len - tile;
    let mut v: Vec<usize> = (0..=last).step_by(stride).collect();
    if !last.is_multiple_of(stride) {
        v.push(last);
    }
    v
}

/// `_sliding_windows(h, w, tile_size, tile_stride)`: the tiles covering an `h x w` latent, row
/// major (all column origins for the first row origin, then the next row...).
///
/// The official code misbehaves when the latent is smaller than a tile (negative origins); here
/// that, a zero tile or a zero stride is an error.
pub fn sliding_windows(h: usize, w: usize, tile: usize, stride: usize) -> Result<Vec<TileWindow>> {
    if tile == 0 || stride == 0 {
        return Err(Error::Option(format!(
            "tile size ({tile}) and stride ({stride}) must be positive"
        )));
    }
    if h < tile || w < tile {
        return Err(Error::Option(format!(
            "latent {h}x{w} is smaller than the tile size {tile}: use a smaller tile or the untiled sampler"
        )));
    }
    let rows = axis_origins(h, tile, stride);
    let cols = axis_origins(w, tile, stride);
    Ok(rows
        .iter()
        .flat_map(|&h0| cols.iter().map(move |&w0| (h0, w0)))
        .enumerate()
        .map(|(index, (h0, w0))| TileWindow {
            index,
            h0,
            h1: h0 + tile,
            w0,
            w1: w0 + tile,
        })
        .collect())
}

/// The 1-D profile of `gaussian_weights`:
/// `p(i) = exp(-(i - mid)^2 / len^2 / (2 var)) / sqrt(2 pi var)` with `var = 0.01`, in f64.
pub fn gaussian_profile(len: usize, mid: f64) -> Vec<f64> {
    let var = 0.01;
    let n = len as f64;
    (0..len)
        .map(|i| {
            let d = i as f64 - mid;
            (-d * d / (n * n) / (2.0 * var)).exp() / (2.0 * std::f64::consts::PI * var).sqrt()
        })
        .collect()
}

/// `gaussian_weights(tile_width, tile_height, 1)`: a `[tile_height, tile_width]` F32 mask, the
/// outer product of a y and an x profile (computed in f64 as numpy does). As in the official
/// code, the x midpoint is `(w - 1) / 2` but the y midpoint is `h / 2` (not centred: row 0
/// weighs less than the last row).
pub fn gaussian_weights(tile_width: usize, tile_height: usize, dev: &Device) -> Result<Tensor> {
    let xs = gaussian_profile(tile_width, (tile_width as f64 - 1.0) / 2.0);
    let ys = gaussian_profile(tile_height, tile_height as f64 / 2.0);
    let w: Vec<f64> = ys
        .iter()
        .flat_map(|y| xs.iter().map(move |x| y * x))
        .collect();
    Ok(
        Tensor::from_vec(w, (tile_height, tile_width), &Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(dev)?,
    )
}
