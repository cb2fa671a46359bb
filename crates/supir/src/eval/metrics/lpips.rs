//! LPIPS (Zhang et al. 2018), AlexNet variant, as `lpips.LPIPS(net='alex', version='0.1')` computes it
//! (lower is more similar):
//!
//! 1. RGB in `[0, 1]` mapped to `[-1, 1]` (`normalize=True`), then the scaling layer
//!    `(x - shift) / scale` with `shift = [-0.030, -0.088, -0.188]`, `scale = [0.458, 0.448, 0.450]`;
//! 2. torchvision's AlexNet `features` (conv 11/4/2, ReLU, max-pool 3/2, conv 5/1/2, ReLU, max-pool, three
//!    conv 3/1/1 + ReLU), tapped after each of the 5 ReLUs;
//! 3. per tap: unit-normalise over channels (`x / (||x|| + 1e-10)`), squared difference, the linear layer (a
//!    bias-free 1x1 conv to one channel), spatial mean; the sum over the 5 taps.
//!
//! Neither part of the weights ships with supir: the linear layers are `lpips`' `weights/v0.1/alex.pth`
//! (keys `linK.model.1.weight`) and the backbone torchvision's AlexNet (`features.N.weight/bias`, or the
//! `net.sliceS.N.*` keys of a saved LPIPS module). Both may be safetensors, PyTorch zip or legacy `.pth`
//! files. Channel counts are read from the weights (kernel sizes, strides and paddings are AlexNet's).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig};
use image::RgbImage;

use super::torch_legacy::{is_legacy, LegacyPth};
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// The scaling layer's constants (`lpips.ScalingLayer`).
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// `(features index, kernel, stride, padding, max-pool before it)` of AlexNet's five convolutions.
const CONVS: [(usize, usize, usize, usize, bool); 5] = [
    (0, 11, 4, 2, false),
    (3, 5, 1, 2, true),
    (6, 3, 1, 1, true),
    (8, 3, 1, 1, false),
    (10, 3, 1, 1, false),
];

/// Smallest side AlexNet's two max-pools accept (conv 11/4/2 gives 7, the pools 3 then 1).
pub const MIN_SIDE: u32 = 31;

/// One weight file of any supported format, read key by key.
enum Source {
    Checkpoint(Checkpoint),
    Legacy(LegacyPth),
}

impl Source {
    fn open(path: &Path) -> Result<Self> {
        let mut head = [0u8; 16];
        let n = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            f.read(&mut head).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
        };
        if is_legacy(&head[..n]) {
            Ok(Source::Legacy(LegacyPth::open(path)?))
        } else {
            Ok(Source::Checkpoint(Checkpoint::open(path)?))
        }
    }

    fn path(&self) -> &Path {
        match self {
            Source::Checkpoint(c) => c.path(),
            Source::Legacy(l) => l.path(),
        }
    }

    /// The first of `keys` present, as f32.
    fn get(&self, keys: &[String], dev: &Device) -> Result<Tensor> {
        for key in keys {
            let t = match self {
                Source::Checkpoint(c) => c.load(key, DType::F32, dev)?,
                Source::Legacy(l) => l.load(key, dev)?,
            };
            if let Some(t) = t {
                return Ok(t);
            }
        }
        Err(Error::Checkpoint {
            path: self.path().to_path_buf(),
            msg: format!("missing LPIPS weight `{}`", keys.join("` or `")),
        })
    }
}

/// The LPIPS network: AlexNet feature convolutions and the five linear layers.
pub struct Lpips {
    convs: Vec<(Conv2d, bool)>,
    /// Linear-layer weights as `[1, C, 1, 1]`.
    lins: Vec<Tensor>,
    device: Device,
}

impl Lpips {
    /// Loads the linear layers (`lpips`' `alex.pth` or a conversion) and the AlexNet backbone.
    pub fn load(
        lin: impl AsRef<Path>,
        backbone: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self> {
        let lin = Source::open(lin.as_ref())?;
        let net = Source::open(backbone.as_ref())?;
        let mut convs = Vec::new();
        let mut lins = Vec::new();
        let mut in_ch = 3;
        for (slice, &(idx, k, stride, padding, pool)) in CONVS.iter().enumerate() {
            let names = |p: &str| {
                vec![
                    format!("features.{idx}.{p}"),
                    format!("net.slice{}.{idx}.{p}", slice + 1),
                ]
            };
            let w = net.get(&names("weight"), device)?;
            let b = net.get(&names("bias"), device)?;
            let shape = w.dims().to_vec();
            let out_ch = shape[0];
            if shape != [out_ch, in_ch, k, k] || b.dims() != [out_ch] {
                return Err(Error::ShapeMismatch {
                    path: net.path().to_path_buf(),
                    key: names("weight")[0].clone(),
                    expected: vec![out_ch, in_ch, k, k],
                    actual: shape,
                });
            }
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            convs.push((Conv2d::new(w, Some(b), cfg), pool));
            let l = lin.get(
                &[
                    format!("lin{slice}.model.1.weight"),
                    format!("lins.{slice}.model.1.weight"),
                ],
                device,
            )?;
            if l.dims() != [1, out_ch, 1, 1] {
                return Err(Error::ShapeMismatch {
                    path: lin.path().to_path_buf(),
                    key: format!("lin{slice}.model.1.weight"),
                    expected: vec![1, out_ch, 1, 1],
                    actual: l.dims().to_vec(),
                });
            }
            lins.push(l);
            in_ch = out_ch;
        }
        Ok(Self {
            convs,
            lins,
            device: device.clone(),
        })
    }

    /// LPIPS between two batches `[N, 3, H, W]` in `[-1, 1]`; returns `[N]`.
    pub fn forward(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dev = a.device();
        let shift = Tensor::new(&SHIFT, dev)?.reshape((1, 3, 1, 1))?;
        let scale = Tensor::new(&SCALE, dev)?.reshape((1, 3, 1, 1))?;
        let mut xa = a.broadcast_sub(&shift)?.broadcast_div(&scale)?;
        let mut xb = b.broadcast_sub(&shift)?.broadcast_div(&scale)?;
        let mut total: Option<Tensor> = None;
        for ((conv, pool), lin) in self.convs.iter().zip(&self.lins) {
            if *pool {
                xa = xa.max_pool2d_with_stride(3, 2)?;
                xb = xb.max_pool2d_with_stride(3, 2)?;
            }
            xa = conv.forward(&xa)?.relu()?;
            xb = conv.forward(&xb)?.relu()?;
            let unit = |x: &Tensor| -> candle_core::Result<Tensor> {
                let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
                x.broadcast_div(&(norm + 1e-10)?)
            };
            let d = (unit(&xa)? - unit(&xb)?)?.sqr()?;
            // 1x1 conv to one channel = weighted channel sum; then the spatial mean.
            let v = d
                .broadcast_mul(lin)?
                .sum(1)?
                .mean(D::Minus1)?
                .mean(D::Minus1)?;
            total = Some(match total {
                None => v,
                Some(t) => (t + v)?,
            });
        }
        Ok(total.expect("five layers"))
    }

    /// LPIPS between two same-size 8-bit RGB images (`lpips(x / 255, y / 255, normalize=True)`); each side
    /// must be at least [`MIN_SIDE`] pixels.
    pub fn distance(&self, a: &RgbImage, b: &RgbImage) -> Result<f64> {
        if a.dimensions() != b.dimensions() {
            return Err(Error::Option(format!(
                "lpips: image sizes differ ({}x{} vs {}x{})",
                a.width(),
                a.height(),
                b.width(),
                b.height()
            )));
        }
        if a.width() < MIN_SIDE || a.height() < MIN_SIDE {
            return Err(Error::Option(format!(
                "lpips: needs at least {MIN_SIDE}x{MIN_SIDE} pixels, got {}x{}",
                a.width(),
                a.height()
            )));
        }
        let to_tensor = |img: &RgbImage| -> Result<Tensor> {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let data: Vec<f32> = img
                .as_raw()
                .iter()
                .map(|&v| 2.0 * (v as f32 / 255.0) - 1.0)
                .collect();
            Ok(Tensor::from_vec(data, (1, h, w, 3), &self.device)?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let d = self.forward(&to_tensor(a)?, &to_tensor(b)?)?;
        Ok(d.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
    }
}
