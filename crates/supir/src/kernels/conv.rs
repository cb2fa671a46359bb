//! 2-D convolution (PyTorch `conv2d`, groups 1, zero padding) on NCHW f32 maps, as GEMMs.
//!
//! For image `n`, with `out[n]` viewed as `[cout][oh·ow]` and the weight as `[cout][cin·kh·kw]`:
//! - `1x1`, stride 1, no padding: `out[n] = W · x[n]` (`x[n]` is already `[cin][h·w]`);
//! - `3x3`, stride 1, padding 1, large maps: Winograd F(4x4, 3x3) ([`super::winograd_nchw`]);
//! - otherwise im2col: the columns `[cin·kh·kw][rows·ow]` of a band of output rows, then
//!   `out[n][:, band] = W · cols` (bands bound the column buffer).
//!
//! Every GEMM goes through [`super::blas::sgemm`]. The bias initialises the output (`beta = 1`).

use rayon::prelude::*;

use super::blas::sgemm_slices;

/// Shapes and hyper-parameters of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    /// A 3x3, stride 1, padding 1 (shape-preserving) convolution.
    pub fn same3x3(n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Self {
        Self {
            n,
            cin,
            h,
            w,
            cout,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        }
    }

    pub fn out_hw(&self) -> (usize, usize) {
        let oh = (self.h + 2 * self.pad - self.kh) / self.stride + 1;
        let ow = (self.w + 2 * self.pad - self.kw) / self.stride + 1;
        (oh, ow)
    }

    /// Multiply-adds times two.
    pub fn flops(&self) -> f64 {
        let (oh, ow) = self.out_hw();
        2.0 * (self.n * self.cout * oh * ow * self.cin * self.kh * self.kw) as f64
    }
}

/// Column-buffer budget of the im2col path (floats).
const COL_BUDGET: usize = 4 << 20;

/// Which algorithm [`conv2d`] uses for a shape (chosen by measurement, `supir bench kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgo {
    Gemm1x1,
    Winograd,
    Im2col,
}

/// Most bytes of Winograd filter transforms a layer keeps (36/9 of its weight): up to it a
/// layer with f32 weights transforms once and keeps `U` (SDXL's 640-channel level: up to
/// 177 MB); above it (the 1280 x 1280 convolutions, 236 MB each, 22 of them in GLVControl +
/// UNet) `U` is recomputed per call, keeping memory at the weights' size.
pub const KEPT_FILTER_MAX_BYTES: usize = 192 << 20;

/// Whether a layer `s` keeps its Winograd filter transforms ([`KEPT_FILTER_MAX_BYTES`]).
pub fn keeps_filter(s: &ConvShape) -> bool {
    36 * s.cin * s.cout * 4 <= KEPT_FILTER_MAX_BYTES
}

/// The algorithm for `s`: direct GEMM for pointwise convolutions; Winograd for 3x3/s1/p1 once
/// the map has enough 4x4 tiles (all images) to pay for the transforms; im2col otherwise.
/// `kept_filter`: the filter transforms are already computed (measured in
/// `examples/conv_bench.rs`: with them Winograd wins from 16 tiles; computing them per call
/// pays from 64 tiles, or from 32 with at least 512 input channels, e.g. SDXL's 1280-channel
/// convolutions at 16x16, CFG batch 2: 68 ms against 83 ms for im2col).
pub fn choose(s: &ConvShape, kept_filter: bool) -> ConvAlgo {
    let tiles = s.h.div_ceil(4) * s.w.div_ceil(4) * s.n;
    if s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == 0 {
        ConvAlgo::Gemm1x1
    } else if s.kh == 3
        && s.kw == 3
        && s.stride == 1
        && s.pad == 1
        && s.cin >= 16
        && (tiles >= 64 || (tiles >= 32 && s.cin >= 512) || (kept_filter && tiles >= 16))
    {
        ConvAlgo::Winograd
    } else {
        ConvAlgo::Im2col
    }
}

/// `out = conv2d(x, weight, bias)`; `x` `[n][cin][h][w]`, `weight` `[cout][cin][kh][kw]`,
/// `out` `[n][cout][oh][ow]`.
pub fn conv2d(s: &ConvShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    conv2d_with(choose(s, false), s, x, weight, bias, out)
}

/// [`conv2d`] with a forced algorithm (benchmarks and tests; Winograd needs 3x3/s1/p1).
pub fn conv2d_with(
    algo: ConvAlgo,
    s: &ConvShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (oh, ow) = s.out_hw();
    assert_eq!(x.len(), s.n * s.cin * s.h * s.w, "conv2d: input size");
    assert_eq!(
        weight.len(),
        s.cout * s.cin * s.kh * s.kw,
        "conv2d: weight size"
    );
    assert_eq!(out.len(), s.n * s.cout * oh * ow, "conv2d: output size");
    match algo {
        ConvAlgo::Winograd => return super::winograd_nchw::conv3x3(s, x, weight, bias, out),
        ConvAlgo::Gemm1x1 => assert!(s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == 0),
        ConvAlgo::Im2col => {}
    }
    let opix = oh * ow;
    let kdim = s.cin * s.kh * s.kw;
    fill_bias(out, bias, s.cout, opix);
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    for (xn, on) in x
        .chunks_exact(s.cin * s.h * s.w)
        .zip(out.chunks_exact_mut(s.cout * opix))
    {
        if algo == ConvAlgo::Gemm1x1 {
            sgemm_slices(
                false, false, s.cout, opix, s.cin, 1.0, weight, s.cin, xn, opix, beta, on, opix,
            );
            continue;
        }
        let rows = (COL_BUDGET / (kdim * ow).max(1)).clamp(1, oh);
        // im2col writes every column entry it uses (padding included).
        let mut cols = super::scratch::take(kdim * rows * ow);
        let mut r0 = 0;
        while r0 < oh {
            let nr = rows.min(oh - r0);
            let np = nr * ow;
            im2col(s, xn, r0, nr, ow, &mut cols[..kdim * np]);
            sgemm_slices(
                false,
                false,
                s.cout,
                np,
                kdim,
                1.0,
                weight,
                kdim,
                &cols[..kdim * np],
                np,
                beta,
                &mut on[r0 * ow..],
                opix,
            );
            r0 += nr;
        }
    }
}

/// Writes `bias[c]` over every pixel of channel `c` (or zeros).
fn fill_bias(out: &mut [f32], bias: Option<&[f32]>, cout: usize, pix: usize) {
    if let Some(b) = bias {
        out.par_chunks_mut(pix)
            .enumerate()
            .for_each(|(i, plane)| plane.fill(b[i % cout]));
    }
}

/// Columns of output rows `r0..r0+nr` for one image: row `(c·kh + i)·kw + j` holds
/// `x[c][oy·s + i - p][ox·s + j - p]` (0 outside) for every output pixel of the band.
fn im2col(s: &ConvShape, xn: &[f32], r0: usize, nr: usize, ow: usize, cols: &mut [f32]) {
    let np = nr * ow;
    cols.par_chunks_mut(np).enumerate().for_each(|(row, dst)| {
        let c = row / (s.kh * s.kw);
        let i = (row / s.kw) % s.kh;
        let j = row % s.kw;
        let plane = &xn[c * s.h * s.w..(c + 1) * s.h * s.w];
        for r in 0..nr {
            let iy = ((r0 + r) * s.stride + i) as isize - s.pad as isize;
            let d = &mut dst[r * ow..(r + 1) * ow];
            if iy < 0 || iy >= s.h as isize {
                d.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
            for (ox, v) in d.iter_mut().enumerate() {
                let ix = (ox * s.stride + j) as isize - s.pad as isize;
                *v = if ix < 0 || ix >= s.w as isize {
                    0.0
                } else {
                    src[ix as usize]
                };
            }
        }
    });
}

/// The direct sum, in f64 (tests).
pub fn conv2d_reference(
    s: &ConvShape,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (oh, ow) = s.out_hw();
    let mut out = vec![0.0f32; s.n * s.cout * oh * ow];
    for n in 0..s.n {
        for k in 0..s.cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.map_or(0.0, |b| b[k] as f64);
                    for c in 0..s.cin {
                        for i in 0..s.kh {
                            for j in 0..s.kw {
                                let iy = (oy * s.stride + i) as isize - s.pad as isize;
                                let ix = (ox * s.stride + j) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                let xv =
                                    x[((n * s.cin + c) * s.h + iy as usize) * s.w + ix as usize];
                                let wv = weight[((k * s.cin + c) * s.kh + i) * s.kw + j];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out[((n * s.cout + k) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise as noise;

    fn check(algo: ConvAlgo, s: ConvShape, tol: f32) {
        let x = noise(s.n * s.cin * s.h * s.w, 1);
        let w = noise(s.cout * s.cin * s.kh * s.kw, 2);
        let b = noise(s.cout, 3);
        let (oh, ow) = s.out_hw();
        for bias in [None, Some(&b[..])] {
            let mut out = vec![f32::NAN; s.n * s.cout * oh * ow];
            conv2d_with(algo, &s, &x, &w, bias, &mut out);
            let r = conv2d_reference(&s, &x, &w, bias);
            let scale = (s.cin * s.kh * s.kw) as f32;
            for (i, (a, e)) in out.iter().zip(&r).enumerate() {
                assert!(
                    (a - e).abs() <= tol * scale.sqrt(),
                    "{algo:?} {s:?} at {i}: {a} vs {e}"
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(
        n: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        st: usize,
        p: usize,
    ) -> ConvShape {
        ConvShape {
            n,
            cin,
            h,
            w,
            cout,
            kh: k,
            kw: k,
            stride: st,
            pad: p,
        }
    }

    #[test]
    fn im2col_matches_direct_sum() {
        check(ConvAlgo::Im2col, shape(2, 5, 9, 11, 7, 3, 1, 1), 1e-6);
        check(ConvAlgo::Im2col, shape(1, 4, 10, 7, 3, 3, 2, 1), 1e-6);
        check(ConvAlgo::Im2col, shape(2, 3, 8, 8, 6, 3, 2, 0), 1e-6);
        check(ConvAlgo::Im2col, shape(1, 6, 5, 6, 4, 1, 1, 0), 1e-6);
    }

    #[test]
    fn pointwise_matches_direct_sum() {
        check(ConvAlgo::Gemm1x1, shape(3, 9, 7, 5, 11, 1, 1, 0), 1e-6);
    }

    #[test]
    fn winograd_matches_direct_sum() {
        // Map sizes that are and are not multiples of the 4x4 tile. Winograd rounds about 10x
        // more than the direct sum (transform entries up to 8), hence the wider bound.
        check(ConvAlgo::Winograd, shape(2, 17, 12, 16, 9, 3, 1, 1), 1e-5);
        check(ConvAlgo::Winograd, shape(1, 20, 13, 10, 33, 3, 1, 1), 1e-5);
        check(ConvAlgo::Winograd, shape(1, 3, 5, 3, 2, 3, 1, 1), 1e-5);
    }

    #[test]
    fn chooser_picks_by_shape() {
        assert_eq!(
            choose(&shape(2, 320, 64, 64, 320, 3, 1, 1), false),
            ConvAlgo::Winograd
        );
        // SDXL's 1280-channel level at 16x16 (CFG batch 2): 32 tiles pay with many channels.
        assert_eq!(
            choose(&shape(2, 1280, 16, 16, 1280, 3, 1, 1), false),
            ConvAlgo::Winograd
        );
        assert_eq!(
            choose(&shape(2, 128, 16, 16, 1280, 3, 1, 1), false),
            ConvAlgo::Im2col
        );
        assert_eq!(
            choose(&shape(1, 1280, 16, 16, 1280, 3, 1, 1), false),
            ConvAlgo::Im2col
        );
        assert_eq!(
            choose(&shape(1, 1280, 16, 16, 1280, 3, 1, 1), true),
            ConvAlgo::Winograd
        );
        assert!(keeps_filter(&shape(2, 1920, 32, 32, 640, 3, 1, 1)));
        assert!(!keeps_filter(&shape(2, 1280, 16, 16, 1280, 3, 1, 1)));
        assert_eq!(
            choose(&shape(2, 320, 64, 64, 640, 1, 1, 0), false),
            ConvAlgo::Gemm1x1
        );
        assert_eq!(
            choose(&shape(2, 320, 64, 64, 320, 3, 2, 1), true),
            ConvAlgo::Im2col
        );
        assert_eq!(
            choose(&shape(1, 4, 4, 4, 4, 3, 1, 1), true),
            ConvAlgo::Im2col
        );
    }
}
