//! Tiled VAE encoder / decoder: the algorithm of `SUPIR/utils/tilevae.py` (`VAEHook`, installed
//! by `SUPIRModel.init_tile_vae`) and of SeeSR's `utils/vaehook.py` (`VAEHook`, installed by
//! `StableDiffusionControlNetPipeline._init_tiled_vae`), so large images fit in memory.
//!
//! The two official hooks are the same code (SeeSR's is the diffusers-names branch of SUPIR's):
//! the same context pads (32 encoder / 11 decoder), `split_tiles` / `get_best_tile_size` rules,
//! GroupNorm pooling, and both pipelines install them with `fast_encoder = fast_decoder = False`
//! and `color_fix = False` (the fast modes are not implemented here). They differ only in the
//! tile sizes the pipelines pass: [`VaeTiling::supir`] (512 px / 64 latent, `init_tile_vae`'s
//! defaults) and [`VaeTiling::seesr`] (1024 px / 224 latent, `test_seesr.py`'s
//! `--vae_encoder_tiled_size` / `--vae_decoder_tiled_size`). Both hooks hard-code 32 groups and
//! a factor 8 (four levels); here the groups and factor come from the network, the same for
//! SDXL's and SD-2's VAE.
//!
//! - The input is cut into a grid of tiles (`split_tiles`): `tile` pixels (encoder, image space)
//!   or latent pixels (decoder) each, shrunk to share the image evenly, each read with `pad`
//!   extra pixels of context (32 for the encoders, 11 for the decoder).
//! - Every layer runs tile by tile, except GroupNorm: its statistics are gathered over all tiles
//!   first (per tile mean and biased variance per group, averaged with weights proportional to the
//!   tile's pixel count, padding included) and every tile is normalised with them. This is what
//!   makes the seams invisible; it is not exactly the whole image's statistics (the variance
//!   average leaves out the spread of the tile means, and the padding is counted twice).
//! - The mid-block self-attention runs within each tile (global statistics for its norm).
//! - Each output tile is cropped to its share of the output and written in place.
//!
//! An input whose long side is at most `tile + 2 * pad` runs untiled, as in the official hook.
//! The official code runs tiles one after another up to each GroupNorm; here all tiles advance
//! together layer by layer: the same arithmetic, and peak memory bounded by the tile size for
//! everything but the tiles' activations themselves (which the official code keeps on the host).

use candle_core::{DType, Module, Result, Tensor};

use crate::layers::Conv2d;
use crate::models::vae::{AttnBlock, Decoder, Encoder, Norm, ResnetBlock};

/// Context around each encoder tile (image pixels) and decoder tile (latent pixels).
pub const ENCODER_PAD: usize = 32;
pub const DECODER_PAD: usize = 11;

/// Tile sizes of the tiled VAE (`init_tile_vae(encoder_tile_size, decoder_tile_size)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    /// Encoder tile side in image pixels (official default 512).
    pub encoder_tile: usize,
    /// Decoder tile side in latent pixels (official default 64).
    pub decoder_tile: usize,
    /// The dtype the tiles are held in between layers (fp32 in the official fp32 run).
    pub tile_dtype: TileDtype,
}

impl Default for VaeTiling {
    /// [`VaeTiling::supir`].
    fn default() -> Self {
        Self::supir()
    }
}

impl VaeTiling {
    /// SUPIR's `init_tile_vae` defaults: 512 px encoder tiles, 64 latent px decoder tiles.
    pub fn supir() -> Self {
        Self {
            encoder_tile: 512,
            decoder_tile: 64,
            tile_dtype: TileDtype::Fp32,
        }
    }

    /// SeeSR's `test_seesr.py` defaults: 1024 px encoder tiles, 224 latent px decoder tiles.
    pub fn seesr() -> Self {
        Self {
            encoder_tile: 1024,
            decoder_tile: 224,
            tile_dtype: TileDtype::Fp32,
        }
    }
}

/// One tile: the input rows/columns it reads (with context) and the output region it fills,
/// `[x0, x1, y0, y1]` as in the official bboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileBox {
    pub input: [usize; 4],
    pub output: [usize; 4],
}

/// `VAEHook.get_best_tile_size`: rounds `lower` up to a multiple of 32, 16, ... 2 that does not
/// exceed `upper` (Python's floor modulo on possibly negative sizes).
fn best_tile_size(lower: i64, upper: i64) -> i64 {
    let mut divider = 32;
    while divider >= 2 {
        let rem = lower.rem_euclid(divider);
        if rem == 0 {
            return lower;
        }
        let candidate = lower - rem + divider;
        if candidate <= upper {
            return candidate;
        }
        divider /= 2;
    }
    lower
}

/// `VAEHook.split_tiles(h, w)` for an input of `h x w`; `scale` maps input to output pixels
/// (`up` for the decoder: times, else divided by).
pub fn split_tiles(
    h: usize,
    w: usize,
    tile: usize,
    pad: usize,
    scale: usize,
    up: bool,
) -> Vec<TileBox> {
    let (hi, wi, t, p) = (h as i64, w as i64, tile as i64, pad as i64);
    let count = |len: i64| (((len - 2 * p) as f64 / t as f64).ceil() as i64).max(1);
    let (nh, nw) = (count(hi), count(wi));
    let real =
        |len: i64, n: i64| best_tile_size(((len - 2 * p) as f64 / n as f64).ceil() as i64, t);
    let (th, tw) = (real(hi, nh), real(wi, nw));
    let sc = |v: i64| -> usize {
        let v = v.max(0) as usize;
        if up {
            v * scale
        } else {
            v / scale
        }
    };
    let mut out = Vec::new();
    for i in 0..nh {
        for j in 0..nw {
            let ib = [
                p + j * tw,
                (p + (j + 1) * tw).min(wi),
                p + i * th,
                (p + (i + 1) * th).min(hi),
            ];
            let ob = [
                if ib[0] > p { ib[0] } else { 0 },
                if ib[1] < wi - p { ib[1] } else { wi },
                if ib[2] > p { ib[2] } else { 0 },
                if ib[3] < hi - p { ib[3] } else { hi },
            ];
            let padded = [
                (ib[0] - p).max(0),
                (ib[1] + p).min(wi),
                (ib[2] - p).max(0),
                (ib[3] + p).min(hi),
            ];
            out.push(TileBox {
                input: padded.map(|v| v.max(0) as usize),
                output: ob.map(sc),
            });
        }
    }
    out
}

/// The dtype the tiled VAE keeps every tile's activations in between layers (`--vae-tile-dtype`).
/// Each layer computes in the caller's dtype (f32 on the CPU) and stores its output tiles in
/// this one, so the tiles held across a layer (two sets of them in a resnet block: the most
/// memory of the whole restore at x4) take half the bytes in `bf16` / `fp16`. `fp32` is the
/// official fp32 run (no rounding, the default); the official half-precision runs hold their
/// tiles in their half dtype too, and also compute in it. `fp16` overflows in SDXL's VAE (the
/// reason SUPIR's official default VAE dtype is bf16); SD-2's VAE (SeeSR) runs in fp16 officially.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TileDtype {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl TileDtype {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Fp32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::Fp16 => DType::F16,
        }
    }
}

impl std::fmt::Display for TileDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TileDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            "fp16" | "f16" => Ok(Self::Fp16),
            _ => Err(format!(
                "unknown tile dtype `{s}` (expected fp32, bf16 or fp16)"
            )),
        }
    }
}

/// The two dtypes of a tiled pass: tiles are computed in `compute` (the input's dtype) and held
/// in `hold` between layers. With `hold == compute` every conversion is a no-op (a shared
/// tensor), so the arithmetic is that of a pass without holding.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    compute: DType,
    hold: DType,
}

impl Tiles {
    fn load(&self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(self.compute)
    }

    fn store(&self, y: Tensor) -> Result<Tensor> {
        y.to_dtype(self.hold)
    }

    /// `f` on bands of rows of the held tile `x` (widened band by band), the results held and
    /// joined: a per-pixel layer (1x1 conv, sum) without a widened copy of the whole tile.
    /// Runs `f` on the whole widened tile when nothing is held in half precision.
    fn banded(
        &self,
        x: &Tensor,
        f: impl Fn(&Tensor, usize, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if self.hold == self.compute {
            return f(x, 0, h);
        }
        let rows = (BAND_ELEMS / (c * w).max(1)).clamp(1, h);
        let bands = (0..h)
            .step_by(rows)
            .map(|r0| {
                let n = rows.min(h - r0);
                self.store(f(&self.load(&x.narrow(2, r0, n)?)?, r0, n)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&bands, 2)
    }

    /// Applies `f` to every tile, consuming them: each input tile is freed as soon as its
    /// result exists, so a layer holds one set of tiles plus one tile (not two sets).
    fn each(&self, xs: Vec<Tensor>, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
        xs.into_iter()
            .map(|x| self.store(f(&self.load(&x)?)?))
            .collect()
    }
}

/// Elements per band of [`Tiles::banded`] (32 MiB in f32).
const BAND_ELEMS: usize = 1 << 23;

/// Groups per step of [`tile_stats`]'s variance: bounds its two temporaries (`x - mean`, its
/// square) to this many groups of one tile instead of the whole tile.
const STAT_GROUPS: usize = 4;

/// One tile's per-group mean and biased variance `[b, groups, 1]` (F32) and its pixel count.
/// Each group's row is reduced on its own, so computing the variance a few groups at a time
/// gives the same values, bit for bit, as over the whole tile at once.
fn tile_stats(x: &Tensor, g: usize) -> Result<(Tensor, Tensor, f64)> {
    let (b, c, h, w) = x.dims4()?;
    let v = x.reshape((b, g, (c / g) * h * w))?;
    let mut means = Vec::with_capacity(g.div_ceil(STAT_GROUPS));
    let mut vars = Vec::with_capacity(g.div_ceil(STAT_GROUPS));
    for g0 in (0..g).step_by(STAT_GROUPS) {
        let n = STAT_GROUPS.min(g - g0);
        // Widened a few groups at a time (a tile held in half precision is never widened whole).
        let chunk = v.narrow(1, g0, n)?.to_dtype(DType::F32)?.contiguous()?;
        let mean = chunk.mean_keepdim(2)?;
        vars.push(chunk.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?);
        means.push(mean);
    }
    Ok((
        Tensor::cat(&means, 1)?,
        Tensor::cat(&vars, 1)?,
        (h * w) as f64,
    ))
}

/// `GroupNormParam`'s statistics over all tiles: the pixel-weighted average of the tiles'
/// per-group means and biased variances (`get_var_mean`, `summary`), computed in F32, as
/// `(mean, 1 / sqrt(var + eps))`.
fn group_stats(norm: &Norm, xs: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let stats = xs
        .iter()
        .map(|x| tile_stats(x, norm.groups))
        .collect::<Result<Vec<_>>>()?;
    let total: f64 = stats.iter().map(|s| s.2).sum();
    let mut mean = (&stats[0].0 * (stats[0].2 / total))?;
    let mut var = (&stats[0].1 * (stats[0].2 / total))?;
    for (m, v, p) in &stats[1..] {
        mean = (mean + (m * (p / total))?)?;
        var = (var + (v * (p / total))?)?;
    }
    let inv_std = (var + norm.eps)?.sqrt()?.recip()?;
    Ok((mean, inv_std))
}

/// GroupNorm of every tile with [`group_stats`] (`custom_group_norm`). `silu` applies the SiLU
/// that follows every such norm in the VAE. Consumes the tiles (see [`Tiles::each`]).
fn group_norm_tiles(t: Tiles, norm: &Norm, xs: Vec<Tensor>, silu: bool) -> Result<Vec<Tensor>> {
    let (mean, inv_std) = group_stats(norm, &xs)?;
    t.each(xs, |x| norm.forward_with_stats(x, &mean, &inv_std, silu))
}

/// The networks' last two layers, `conv_out(silu(norm_out(x)))` with the norm's statistics over
/// all tiles, tile by tile with the norm applied as the conv reads (`Norm::conv_with_stats`):
/// no set of normalised tiles. The outputs stay in the compute dtype (they are the result).
fn norm_conv_out_tiles(norm: &Norm, conv: &Conv2d, xs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let (mean, inv_std) = group_stats(norm, &xs)?;
    xs.into_iter()
        .map(|x| norm.conv_with_stats(conv, &x, &mean, &inv_std, true))
        .collect()
}

/// `resblock2task`: shortcut, norm1 (all tiles), SiLU, conv1, norm2 (all tiles), SiLU, conv2, add.
/// Tile by tile between the two norms' statistics, each tile's input freed once its shortcut
/// and conv1 output exist, each conv1 output once its sum exists: at most one set of tiles
/// plus one tile's temporaries is held, as in [`Tiles::each`] (the same operations on the same
/// tiles as layer by layer, so the same values).
fn resblock_tiles(t: Tiles, block: &ResnetBlock, xs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let (mean, inv_std) = group_stats(&block.norm1, &xs)?;
    let mut res = Vec::with_capacity(xs.len());
    let mut hs = Vec::with_capacity(xs.len());
    // The norm + conv layers read a held tile in place (`Conv2d::forward_normed`); the 1x1
    // shortcut and the sum run band by band ([`Tiles::banded`]).
    for x in xs {
        res.push(match &block.nin_shortcut {
            Some(s) => t.banded(&x, |band, _, _| s.forward(band))?,
            None => x.clone(),
        });
        let h = block
            .norm1
            .conv_with_stats(&block.conv1, &x, &mean, &inv_std, true)?;
        drop(x);
        hs.push(t.store(h)?);
    }
    // The freed tiles leave holes of other sizes in the heap (the CLI keeps freed blocks,
    // `memory::keep_freed_heap`); hand them back between the phases so that they do not add up.
    crate::memory::release_free_heap();
    let (mean, inv_std) = group_stats(&block.norm2, &hs)?;
    let out = res
        .into_iter()
        .zip(hs)
        .map(|(r, h)| {
            let y = block
                .norm2
                .conv_with_stats(&block.conv2, &h, &mean, &inv_std, true)?;
            drop(h);
            t.banded(&r, |r, r0, n| r + y.narrow(2, r0, n)?)
        })
        .collect();
    crate::memory::release_free_heap();
    out
}

/// `attn2task`: norm (all tiles), attention within each tile, add.
fn attn_tiles(t: Tiles, attn: &AttnBlock, xs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let h = group_norm_tiles(t, &attn.norm, xs.clone(), false)?;
    xs.into_iter()
        .zip(h)
        .map(|(x, h)| t.store((t.load(&x)? + attn.attend(&t.load(&h)?)?)?))
        .collect()
}

fn mid_tiles(t: Tiles, mid: &crate::models::vae::Mid, xs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let mut xs = resblock_tiles(t, &mid.block_1, xs)?;
    if let Some(a) = &mid.attn_1 {
        xs = attn_tiles(t, a, xs)?;
    }
    resblock_tiles(t, &mid.block_2, xs)
}

fn level_tiles<R: Module>(
    t: Tiles,
    level: &crate::models::vae::Level<R>,
    mut xs: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    for (i, block) in level.blocks.iter().enumerate() {
        xs = resblock_tiles(t, block, xs)?;
        if let Some(a) = level.attns.get(i) {
            xs = attn_tiles(t, a, xs)?;
        }
    }
    match &level.resample {
        Some(r) => t.each(xs, |x| r.forward(x)),
        None => Ok(xs),
    }
}

/// Cuts `x` into tiles, runs `net` over them, and assembles the output.
fn run_tiled(
    x: &Tensor,
    tile: usize,
    pad: usize,
    scale: usize,
    up: bool,
    net: impl FnOnce(Vec<Tensor>) -> Result<Vec<Tensor>>,
) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let boxes = split_tiles(h, w, tile, pad, scale, up);
    tracing::debug!(
        "tiled VAE: {}x{} input, {} tiles of {} (+{} context)",
        w,
        h,
        boxes.len(),
        tile,
        pad
    );
    let tiles = boxes
        .iter()
        .map(|bx| {
            let [x0, x1, y0, y1] = bx.input;
            x.narrow(2, y0, y1 - y0)?.narrow(3, x0, x1 - x0)
        })
        .collect::<Result<Vec<_>>>()?;
    let outs = net(tiles)?;
    let (oh, ow) = if up {
        (h * scale, w * scale)
    } else {
        (h / scale, w / scale)
    };
    let c = outs[0].dim(1)?;
    let mut result = Tensor::zeros((b, c, oh, ow), outs[0].dtype(), x.device())?;
    for (bx, t) in boxes.iter().zip(&outs) {
        // `crop_valid_region`: the output region relative to the padded input's image.
        let padded = bx.input.map(|v| if up { v * scale } else { v / scale });
        let [ox0, ox1, oy0, oy1] = bx.output;
        if ox1 <= ox0 || oy1 <= oy0 {
            continue;
        }
        let crop =
            t.narrow(2, oy0 - padded[2], oy1 - oy0)?
                .narrow(3, ox0 - padded[0], ox1 - ox0)?;
        result = result.slice_assign(&[0..b, 0..c, oy0..oy1, ox0..ox1], &crop)?;
    }
    Ok(result)
}

/// The encoder's factor (`2^(levels - 1)`).
fn factor(levels: usize) -> usize {
    1 << levels.saturating_sub(1)
}

/// `VAEHook` on an encoder: `[B, C, H, W] -> [B, 2z, H/f, W/f]`, tiled when the long side
/// exceeds `tile + 2 * 32`.
pub fn encode(enc: &Encoder, x: &Tensor, tile: usize, hold: TileDtype) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if tile == 0 || h.max(w) <= tile + 2 * ENCODER_PAD {
        return enc.forward(x);
    }
    let f = factor(enc.down.len());
    let t = Tiles {
        compute: x.dtype(),
        hold: hold.dtype(),
    };
    run_tiled(x, tile, ENCODER_PAD, f, false, |xs| {
        let mut xs = t.each(xs, |x| enc.conv_in.forward(x))?;
        for level in &enc.down {
            xs = level_tiles(t, level, xs)?;
        }
        let xs = mid_tiles(t, &enc.mid, xs)?;
        norm_conv_out_tiles(&enc.norm_out, &enc.conv_out, xs)
    })
}

/// `VAEHook` on the decoder: `[B, z, h, w] -> [B, C, h*f, w*f]`, tiled when the long side
/// exceeds `tile + 2 * 11` latent pixels.
pub fn decode(dec: &Decoder, z: &Tensor, tile: usize, hold: TileDtype) -> Result<Tensor> {
    let (_, _, h, w) = z.dims4()?;
    if tile == 0 || h.max(w) <= tile + 2 * DECODER_PAD {
        return dec.forward(z);
    }
    let f = factor(dec.up.len());
    let t = Tiles {
        compute: z.dtype(),
        hold: hold.dtype(),
    };
    run_tiled(z, tile, DECODER_PAD, f, true, |xs| {
        let xs = t.each(xs, |x| dec.conv_in.forward(x))?;
        let mut xs = mid_tiles(t, &dec.mid, xs)?;
        for level in dec.up.iter().rev() {
            xs = level_tiles(t, level, xs)?;
        }
        norm_conv_out_tiles(&dec.norm_out, &dec.conv_out, xs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_a_few_groups_at_a_time_are_those_of_the_whole_tile() {
        use candle_core::Device;
        // 2 images, 6 groups (not a multiple of STAT_GROUPS), non-contiguous input.
        let x = Tensor::randn(0.3f32, 2.0, (2, 12, 9, 14), &Device::Cpu)
            .unwrap()
            .narrow(3, 1, 11)
            .unwrap();
        let (mean, var, pixels) = tile_stats(&x, 6).unwrap();
        let v = x.reshape((2, 6, 2 * 9 * 11)).unwrap();
        let m = v.mean_keepdim(2).unwrap();
        let want = v
            .broadcast_sub(&m)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_keepdim(2)
            .unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f32::to_bits)
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&mean), bits(&m));
        assert_eq!(var.dims(), &[2, 6, 1]);
        assert_eq!(bits(&var), bits(&want));
        assert_eq!(pixels, 99.0);
        // A tile held in bf16 has the statistics of its f32 widening, bit for bit.
        let held = x.to_dtype(DType::BF16).unwrap();
        let (hm, hv, _) = tile_stats(&held, 6).unwrap();
        let (wm, wv, _) = tile_stats(&held.to_dtype(DType::F32).unwrap(), 6).unwrap();
        assert_eq!((bits(&hm), bits(&hv)), (bits(&wm), bits(&wv)));
    }

    #[test]
    fn split_covers_the_output_once() {
        for &(h, w, tile, pad, scale, up) in &[
            (1024usize, 1536usize, 512usize, 32usize, 8usize, false),
            (200, 72, 64, 11, 8, true),
            (40, 300, 64, 11, 8, true),
            (128, 128, 32, 32, 8, false),
        ] {
            let boxes = split_tiles(h, w, tile, pad, scale, up);
            let (oh, ow) = if up {
                (h * scale, w * scale)
            } else {
                (h / scale, w / scale)
            };
            let mut cover = vec![0u8; oh * ow];
            for b in &boxes {
                let [x0, x1, y0, y1] = b.output;
                for y in y0..y1 {
                    for x in x0..x1 {
                        cover[y * ow + x] += 1;
                    }
                }
                assert!(b.input[1] <= w && b.input[3] <= h, "{b:?}");
            }
            assert!(
                cover.iter().all(|&c| c == 1),
                "{h}x{w} tile {tile}: {boxes:?}"
            );
        }
    }

    #[test]
    fn best_tile_size_rounds_like_the_official_helper() {
        assert_eq!(best_tile_size(480, 512), 480);
        assert_eq!(best_tile_size(481, 512), 512);
        assert_eq!(best_tile_size(500, 500), 500);
        assert_eq!(best_tile_size(-24, 64), 0);
    }
}
