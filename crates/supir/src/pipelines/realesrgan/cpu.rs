//! CPU engine for RRDBNet's 3x3 convolutions without im2col.
//!
//! Feature maps are pixel-major with a one-pixel zero border: `[(h+2)*(w+2), stride]`, channels
//! contiguous. For output pixel `p` (flat index), a 3x3 convolution is `sum_t in[p + o_t] @ W_t`
//! over the nine tap offsets `o_t`, so each tap is one GEMM over a shifted slice of the same
//! buffer. Outputs are computed for the flat range spanning the interior; the border columns this
//! range crosses get garbage, which the epilogue zeroes (they are the next layer's padding).
//! Dense-block concatenations are channel ranges of one buffer, so no copies are made.

use candle_core::{DType, Device, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernels::winograd::{self, Winograd3x3};

/// Output rows (pixels) per GEMM chunk: the chunk's accumulator stays in cache across the taps.
const CHUNK: usize = 256;

/// A 3x3 convolution (stride 1, zero padding 1) repacked as nine `[cin, cout]` tap matrices.
pub(crate) struct PackedConv {
    pub cin: usize,
    pub cout: usize,
    /// `[9][cin][cout]`, tap `t = ky * 3 + kx` (empty when `wino` is set).
    taps: Vec<f32>,
    bias: Vec<f32>,
    /// The Winograd F(4x4, 3x3) form, used instead of the taps when present.
    wino: Option<Box<Winograd3x3>>,
}

impl PackedConv {
    /// From PyTorch-layout `weight [cout, cin, 3, 3]` and `bias [cout]`; with `winograd`, run by
    /// the Winograd F(4x4, 3x3) kernel.
    pub fn new(weight: &Tensor, bias: &Tensor, winograd: bool) -> candle_core::Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("expected a 3x3 kernel, got {kh}x{kw}");
        }
        // The Winograd form replaces the taps (4x their size: 36 against 9 per cin x cout).
        let taps = if winograd {
            Vec::new()
        } else {
            weight
                .to_dtype(DType::F32)?
                .permute((2, 3, 1, 0))?
                .flatten_all()?
                .to_vec1::<f32>()?
        };
        let wino = if winograd {
            Some(Box::new(Winograd3x3::from_tensors(weight, Some(bias))?))
        } else {
            None
        };
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Self {
            cin,
            cout,
            taps,
            bias,
            wino,
        })
    }
}

/// Pixel-major feature map with a zero border: `[(h+2)*(w+2), stride]` f32.
pub(crate) struct Padded {
    pub data: Vec<f32>,
    pub h: usize,
    pub w: usize,
    pub stride: usize,
}

impl Padded {
    pub fn zeros(h: usize, w: usize, stride: usize) -> Self {
        Self {
            data: vec![0.0; (h + 2) * (w + 2) * stride],
            h,
            w,
            stride,
        }
    }

    /// From `[c, h, w]` (one image of an NCHW batch), into channels `0..c` of a `stride`-wide map.
    pub fn from_chw(x: &Tensor, stride: usize) -> candle_core::Result<Self> {
        let (c, h, w) = x.dims3()?;
        let v = x
            .to_dtype(DType::F32)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut p = Self::zeros(h, w, stride);
        let pw = w + 2;
        for y in 0..h {
            for x in 0..w {
                let d = ((y + 1) * pw + x + 1) * stride;
                let s = (y * w + x) * c;
                p.data[d..d + c].copy_from_slice(&v[s..s + c]);
            }
        }
        Ok(p)
    }

    /// Channels `0..c` as `[c, h, w]`.
    pub fn to_chw(&self, c: usize, device: &Device) -> candle_core::Result<Tensor> {
        let pw = self.w + 2;
        let mut v = Vec::with_capacity(self.h * self.w * c);
        for y in 0..self.h {
            for x in 0..self.w {
                let s = ((y + 1) * pw + x + 1) * self.stride;
                v.extend_from_slice(&self.data[s..s + c]);
            }
        }
        Tensor::from_vec(v, (self.h, self.w, c), device)?
            .permute((2, 0, 1))?
            .contiguous()
    }

    /// Nearest-neighbour x2 of channels `0..c`.
    pub fn upsample2(&self, c: usize) -> Self {
        let (h, w) = (self.h * 2, self.w * 2);
        let mut out = Self::zeros(h, w, c);
        let (spw, dpw) = (self.w + 2, w + 2);
        out.data
            .par_chunks_mut(dpw * c)
            .enumerate()
            .for_each(|(row, dst)| {
                if row == 0 || row > h {
                    return;
                }
                let sy = (row - 1) / 2 + 1;
                for x in 0..w {
                    let s = (sy * spw + x / 2 + 1) * self.stride;
                    let d = (x + 1) * c;
                    dst[d..d + c].copy_from_slice(&self.data[s..s + c]);
                }
            });
        out
    }
}

/// Raw access to a [`Padded`] map, so one map can be read and written (disjoint channels) by
/// the same convolution. Valid while the map it came from is alive and not moved.
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *mut f32,
    h: usize,
    w: usize,
    stride: usize,
}

// SAFETY: views are only used inside `conv`, whose chunks write disjoint rows.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl Padded {
    pub fn view(&mut self) -> View {
        View {
            ptr: self.data.as_mut_ptr(),
            h: self.h,
            w: self.w,
            stride: self.stride,
        }
    }
}

/// What follows the convolution, per output value `v = acc + bias`.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue {
    pub leaky: Option<f32>,
    /// `v = v * scale + res[channel]` with the residual map's channels `0..cout`.
    pub residual: Option<(View, f32)>,
    /// Then `v = v * scale + res2[channel]`.
    pub outer: Option<(View, f32)>,
}

impl Epilogue {
    pub const NONE: Self = Self {
        leaky: None,
        residual: None,
        outer: None,
    };
    pub fn leaky(slope: f32) -> Self {
        Self {
            leaky: Some(slope),
            ..Self::NONE
        }
    }
}

/// `dst[:, off..off+cout] = epilogue(conv(src[:, 0..cin]))`. `src` and `dst` may be the same
/// map when the channel ranges are disjoint; residual maps must not be written by this call.
pub(crate) fn conv(c: &PackedConv, src: View, dst: View, off: usize, epi: Epilogue) {
    let (h, w) = (src.h, src.w);
    let pw = w + 2;
    assert!(dst.h == h && dst.w == w && off + c.cout <= dst.stride && c.cin <= src.stride);
    if src.ptr == dst.ptr {
        assert!(off >= c.cin);
    }
    for (r, _) in [epi.residual, epi.outer].into_iter().flatten() {
        assert!(r.h == h && r.w == w && c.cout <= r.stride);
    }
    if let Some(k) = &c.wino {
        return conv_winograd(k, src, dst, off, epi);
    }
    // Flat output range covering every interior pixel.
    let first = pw + 1;
    let end = h * pw + w + 1;
    let n = end - first;
    let (cin, cout) = (c.cin, c.cout);
    let (s_stride, d_stride) = (src.stride, dst.stride);
    let taps = &c.taps;
    let bias = &c.bias;
    (0..n.div_ceil(CHUNK)).into_par_iter().for_each(|ci| {
        // Whole-struct captures (the raw pointers alone are not Sync).
        let (src, dst, epi) = (src, dst, epi);
        let p0 = first + ci * CHUNK;
        let m = CHUNK.min(end - p0);
        // SAFETY: rows p0..p0+m of dst's channels off..off+cout belong to this chunk only; the
        // reads (src channels 0..cin, residual maps) never overlap any written channels.
        unsafe {
            let d = dst.ptr.add(p0 * d_stride + off);
            for t in 0..9 {
                let o = (t / 3) as isize * pw as isize + (t % 3) as isize - pw as isize - 1;
                let lhs = src.ptr.offset((p0 as isize + o) * s_stride as isize) as *const f32;
                let rhs = taps.as_ptr().add(t * cin * cout);
                gemm::gemm(
                    m,
                    cout,
                    cin,
                    d,
                    1,
                    d_stride as isize,
                    t > 0,
                    lhs,
                    1,
                    s_stride as isize,
                    rhs,
                    1,
                    cout as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for p in p0..p0 + m {
                let row = std::slice::from_raw_parts_mut(dst.ptr.add(p * d_stride + off), cout);
                let col = p % pw;
                if col == 0 || col == pw - 1 {
                    row.fill(0.0);
                    continue;
                }
                for (k, v) in row.iter_mut().enumerate() {
                    let mut x = *v + bias[k];
                    if let Some(slope) = epi.leaky {
                        x = x.max(x * slope);
                    }
                    if let Some((r, scale)) = epi.residual {
                        x = x * scale + *r.ptr.add(p * r.stride + k);
                    }
                    if let Some((r, scale)) = epi.outer {
                        x = x * scale + *r.ptr.add(p * r.stride + k);
                    }
                    *v = x;
                }
            }
        }
    });
}

/// [`conv`] by the Winograd kernel: interior pixels only (the zero border is left as it is).
fn conv_winograd(k: &Winograd3x3, src: View, dst: View, off: usize, epi: Epilogue) {
    let (h, w) = (src.h, src.w);
    let pw = w + 2;
    // SAFETY: interior pixel (y, x) is flat index (y + 1) * pw + x + 1 of `src`, whose channels
    // 0..cin are not written by this call (`conv` checked `off >= cin` for a shared map).
    let input = unsafe {
        winograd::Input::from_raw(
            src.ptr.add((pw + 1) * src.stride),
            h,
            w,
            pw * src.stride,
            src.stride,
        )
    };
    winograd::conv(k, input, |y, x, v| {
        let (dst, epi) = (dst, epi);
        let p = (y + 1) * pw + x + 1;
        for (c, val) in v.iter_mut().enumerate() {
            let mut x = *val;
            if let Some(slope) = epi.leaky {
                x = x.max(x * slope);
            }
            // SAFETY: pixel p is inside the residual maps (same size, checked by `conv`).
            unsafe {
                if let Some((r, scale)) = epi.residual {
                    x = x * scale + *r.ptr.add(p * r.stride + c);
                }
                if let Some((r, scale)) = epi.outer {
                    x = x * scale + *r.ptr.add(p * r.stride + c);
                }
            }
            *val = x;
        }
        // SAFETY: each pixel is visited once, so this write to dst's channels off..off+cout is
        // the only access to them during the call.
        unsafe {
            std::ptr::copy_nonoverlapping(v.as_ptr(), dst.ptr.add(p * dst.stride + off), v.len())
        };
    });
}
