//! RAM's input transform in `test_seesr.py::get_validation_prompt`:
//! `ram_transforms(tensor_transforms(image))` = `ToTensor` (u8 / 255, HWC -> CHW),
//! `Resize((384, 384))` on the tensor and `Normalize(ImageNet mean, std)`.
//!
//! torchvision 0.15.2 resolves a tensor `Resize`'s `antialias='warn'` to no antialiasing, i.e.
//! `F.interpolate(mode='bilinear', align_corners=False)`: source coordinate
//! `max(scale · (dst + 0.5) - 0.5, 0)` with `scale = in / out` (f32), the two neighbours
//! `floor` and `floor + 1` (clamped to the last pixel), weights `1 - λ`, `λ`.
//!
//! The arithmetic is that of torch 2.0.1's CPU kernel as compiled (AVX2 with FMA), which the
//! fixture reproduces bit for bit: the source coordinate is one fused multiply-add, the 2-D
//! weights are the rounded products `wy · wx`, and a pixel accumulates
//! `x01·w01`, then `+ x00·w00`, `+ x10·w10`, `+ x11·w11`, each a fused multiply-add. Then
//! `Normalize`: `(x - mean) / std` in f32.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The side of RAM's input (`Resize((384, 384))` in `test_seesr.py`).
pub const RAM_INPUT_SIZE: usize = 384;
/// `Normalize` mean and std of `ram_transforms` (ImageNet).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Per output index: the two source indices and their weights (ATen
/// `compute_source_index_and_lambda`, align_corners false).
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    if input == output {
        return (0..output).map(|i| (i, i, 1.0, 0.0)).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = scale.mul_add(o as f32 + 0.5, -0.5);
            let src = if src < 0.0 { 0.0 } else { src };
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// An RGB image `[H, W, 3]` u8 (as the pipeline and the fixtures hold it) -> RAM's
/// `pixel_values` `[1, 3, 384, 384]` f32.
pub fn preprocess(image: &Tensor) -> Result<Tensor> {
    preprocess_to(image, RAM_INPUT_SIZE, RAM_INPUT_SIZE)
}

/// [`preprocess`] to an `out_h x out_w` input.
pub fn preprocess_to(image: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (h, w, c) = image.dims3().map_err(|_| {
        Error::Option(format!(
            "RAM preprocess: image of shape {:?}, expected [H, W, 3] u8",
            image.dims()
        ))
    })?;
    if c != 3 || image.dtype() != DType::U8 || h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::Option(format!(
            "RAM preprocess: image {:?} {:?}, expected a non-empty [H, W, 3] u8 image",
            image.dims(),
            image.dtype()
        )));
    }
    let px: Vec<u8> = image.flatten_all()?.to_vec1()?;
    // ToTensor: CHW planes of u8 / 255.
    let planes: Vec<Vec<f32>> = (0..3)
        .map(|ch| (0..h * w).map(|i| px[i * 3 + ch] as f32 / 255.0).collect())
        .collect();
    let ty = linear_taps(h, out_h);
    let tx = linear_taps(w, out_w);
    let mut out = Vec::with_capacity(3 * out_h * out_w);
    for (ch, plane) in planes.iter().enumerate() {
        let (m, s) = (IMAGENET_MEAN[ch], IMAGENET_STD[ch]);
        for &(y0, y1, wy0, wy1) in &ty {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, wx0, wx1) in &tx {
                let (w00, w01, w10, w11) = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1);
                let v = r0[x1] * w01;
                let v = r0[x0].mul_add(w00, v);
                let v = r1[x0].mul_add(w10, v);
                let v = r1[x1].mul_add(w11, v);
                out.push((v - m) / s);
            }
        }
    }
    Ok(Tensor::from_vec(out, (1, 3, out_h, out_w), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_halving_averages() {
        assert_eq!(linear_taps(4, 4)[2], (2, 2, 1.0, 0.0));
        // 4 -> 2: src = 2 (o + 0.5) - 0.5 = 0.5, 2.5
        assert_eq!(linear_taps(4, 2), vec![(0, 1, 0.5, 0.5), (2, 3, 0.5, 0.5)]);
        // 2 -> 4: src = 0.5 (o + 0.5) - 0.5 = -0.25 (clamped), 0.25, 0.75, 1.25 (last pixel)
        let t = linear_taps(2, 4);
        assert_eq!(t[0], (0, 1, 1.0, 0.0));
        assert_eq!(t[3], (1, 1, 0.75, 0.25));
    }
}
