//! `PIL2Tensor` / `Tensor2PIL` against the official code's golden data, and the two resampling kernels
//! against their formulas and small examples made with Pillow.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, Rgb, RgbImage, Rgba, RgbaImage};
use supir::image_io::convert::{
    pil2tensor, pil2tensor_size, pil_bicubic_resize_rgb8, pil_bicubic_resize_u8, rgb8_to_tensor,
    tensor2pil, to_rgb8, torch_bicubic_resize, torch_bicubic_resize_f32,
};
use supir::parity::fixture::{max_abs_diff, Fixture};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

fn param_u32(case: &supir::parity::fixture::Case, key: &str) -> u32 {
    case.params[key]
        .as_u64()
        .unwrap_or_else(|| panic!("param {key}")) as u32
}

/// `[H, W, 3]` u8 tensor -> RgbImage.
fn tensor_to_rgb8(t: &Tensor) -> RgbImage {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3);
    let raw = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
}

/// RgbImage -> `[H, W, 3]` f32 tensor (the layout of the fixture's `image_u8` outputs).
fn rgb8_to_hwc_f32(img: &RgbImage) -> Tensor {
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
    Tensor::from_vec(
        data,
        (img.height() as usize, img.width() as usize, 3),
        &Device::Cpu,
    )
    .unwrap()
}

fn check_pil2tensor(name: &str) {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let case = fx.case(name).unwrap();
    let img = tensor_to_rgb8(&fx.input(case, "image_u8").unwrap());
    let upscale = case.params["upscale"].as_f64().unwrap();
    let min_size = param_u32(case, "min_size");
    let (x, h0, w0) = pil2tensor(&img, upscale, min_size).unwrap();
    assert_eq!(h0, param_u32(case, "h0"), "{name}: h0");
    assert_eq!(w0, param_u32(case, "w0"), "{name}: w0");
    let expected = fx.output(case, "x").unwrap();
    let out = &case.outputs[0];
    let err = max_abs_diff(&x, &expected).unwrap();
    println!("{name}: max abs err {err:e} (atol {:e})", out.atol);
    assert!(
        err <= out.atol,
        "{name}: max abs err {err} > atol {}",
        out.atol
    );
}

#[test]
fn pil2tensor_up1_min128() {
    check_pil2tensor("pil2tensor_up1_min128");
}

#[test]
fn pil2tensor_up2_min64() {
    check_pil2tensor("pil2tensor_up2_min64");
}

#[test]
fn tensor2pil_fixture() {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let case = fx.case("tensor2pil").unwrap();
    let x = fx.input(case, "x").unwrap();
    let (h0, w0) = (param_u32(case, "h0"), param_u32(case, "w0"));
    let img = tensor2pil(&x, h0, w0).unwrap();
    assert_eq!((img.height(), img.width()), (h0, w0));
    let expected = fx.output(case, "image_u8").unwrap();
    let out = &case.outputs[0];
    let err = max_abs_diff(&rgb8_to_hwc_f32(&img), &expected).unwrap();
    let ours = rgb8_to_hwc_f32(&img)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let theirs = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    println!(
        "tensor2pil: max abs err {err} (atol {}), {differing} of {} values differ",
        out.atol,
        ours.len()
    );
    assert!(
        err <= out.atol,
        "tensor2pil: max abs err {err} > atol {}",
        out.atol
    );
    // The [3, H, W] form gives the same image.
    let img3 = tensor2pil(&x.squeeze(0).unwrap(), h0, w0).unwrap();
    assert_eq!(img3, img);
}

#[test]
fn pil2tensor_sizes_follow_python_rounding() {
    // 71x97 at upscale 1, min 128: short side to 128, 174.87 -> 192.
    let s = pil2tensor_size(71, 97, 1.0, 128, None).unwrap();
    assert_eq!((s.width, s.height, s.w0, s.h0), (128, 192, 71, 97));
    // Ties go to even as np.round / round(): 96 / 64 = 1.5 -> 2, 160 / 64 = 2.5 -> 2.
    let s = pil2tensor_size(96, 160, 1.0, 0, None).unwrap();
    assert_eq!((s.width, s.height), (128, 128));
    // w0/h0 round half to even: 5 * 2.5 = 12.5 -> 12, 7 * 2.5 = 17.5 -> 18.
    let s = pil2tensor_size(5, 7, 2.5, 64, None).unwrap();
    assert_eq!((s.w0, s.h0), (12, 18));
    // Default min_size 1024 on a 512x384 image: 1365.33 x 1024 -> 1344 x 1024.
    let s = pil2tensor_size(512, 384, 1.0, 1024, None).unwrap();
    assert_eq!((s.width, s.height, s.w0, s.h0), (1344, 1024, 512, 384));
    // fix_resize sets the short side and takes w0/h0 after it.
    let s = pil2tensor_size(300, 200, 2.0, 1024, Some(512.0)).unwrap();
    assert_eq!((s.width, s.height, s.w0, s.h0), (768, 512, 768, 512));
    // Bad input is an error, not a panic.
    assert!(pil2tensor_size(10, 10, 0.0, 0, None).is_err());
    assert!(pil2tensor_size(10, 10, f64::NAN, 0, None).is_err());
    assert!(pil2tensor_size(10, 10, 1.0, 0, None).is_err()); // rounds to 0
    assert!(pil2tensor_size(0, 10, 1.0, 64, None).is_err());
}

#[test]
fn rgb8_to_tensor_maps_to_minus1_1() {
    let img = RgbImage::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgb([0, 255, 51])
        } else {
            Rgb([128, 1, 254])
        }
    });
    let t = rgb8_to_tensor(&img).unwrap();
    assert_eq!(t.dims(), &[1, 3, 1, 2]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let f = |u: u8| (u as f64 / 255.0 * 2.0 - 1.0) as f32;
    assert_eq!(v, vec![f(0), f(128), f(255), f(1), f(51), f(254)]);
    assert_eq!(v[0], -1.0);
    assert_eq!(v[2], 1.0);
}

#[test]
fn tensor2pil_truncates_and_clips() {
    // x * 127.5 + 127.5: 0.999 -> 254.87 -> 254 (truncation), 2 -> 255, -2 -> 0, 0 -> 127.
    let x = Tensor::from_vec(
        vec![0.999f32, 2.0, -2.0, 0.0, -0.999, 0.5],
        (3, 1, 2),
        &Device::Cpu,
    )
    .unwrap();
    let img = tensor2pil(&x, 1, 2).unwrap();
    // Planar R = [0.999, 2], G = [-2, 0], B = [-0.999, 0.5].
    assert_eq!(img.as_raw(), &vec![254, 0, 0, 255, 127, 191]);
    assert!(tensor2pil(&x.unsqueeze(0).unwrap().repeat((2, 1, 1, 1)).unwrap(), 1, 2).is_err());
    assert!(tensor2pil(&x, 0, 2).is_err());
}

// ------------------------------------------------------------------------------------------------
// Pillow bicubic

fn lcg_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect()
}

#[test]
fn pil_bicubic_same_size_is_identity() {
    let src = lcg_bytes(7 * 5 * 3, 1);
    let out = pil_bicubic_resize_u8(&src, 7, 5, 3, 7, 5).unwrap();
    assert_eq!(out, src);
    // One axis unchanged: only the other pass runs; a single row/column stays exact in the other axis.
    let out = pil_bicubic_resize_u8(&src, 7, 5, 3, 11, 5).unwrap();
    assert_eq!(out.len(), 11 * 5 * 3);
}

#[test]
fn pil_bicubic_preserves_constants() {
    for &v in &[0u8, 1, 77, 128, 254, 255] {
        let src = vec![v; 13 * 9 * 3];
        for &(ow, oh) in &[(64, 64), (5, 3), (13, 20), (1, 1), (128, 192)] {
            let out = pil_bicubic_resize_u8(&src, 13, 9, 3, ow, oh).unwrap();
            assert!(out.iter().all(|&o| o == v), "{v} at {ow}x{oh}");
        }
    }
}

#[test]
fn pil_bicubic_rejects_bad_sizes() {
    assert!(pil_bicubic_resize_u8(&[0; 12], 2, 2, 3, 0, 4).is_err());
    assert!(pil_bicubic_resize_u8(&[0; 11], 2, 2, 3, 4, 4).is_err());
}

/// Pillow 9.4.0 `Image.fromarray(a, "L").resize((ow, oh), Image.BICUBIC)` on
/// `a = (np.arange(h * w) * 37 % 256).reshape(h, w)` (uint8), h = 5, w = 6.
const PIL_SRC_W: usize = 6;
const PIL_SRC_H: usize = 5;

fn pil_src() -> Vec<u8> {
    (0..PIL_SRC_W * PIL_SRC_H)
        .map(|i| (i * 37 % 256) as u8)
        .collect()
}

#[test]
fn pil_bicubic_matches_pillow_examples() {
    let src = pil_src();
    for (ow, oh, expected) in PILLOW_EXAMPLES {
        let out = pil_bicubic_resize_u8(&src, PIL_SRC_W, PIL_SRC_H, 1, *ow, *oh).unwrap();
        assert_eq!(&out[..], *expected, "{ow}x{oh}");
    }
}

include!("data/pillow_bicubic_examples.rs");

#[test]
fn pil_bicubic_rgb_channels_are_independent() {
    let src = pil_src();
    let rgb: Vec<u8> = src.iter().flat_map(|&v| [v, 255 - v, v / 2]).collect();
    let img = RgbImage::from_raw(PIL_SRC_W as u32, PIL_SRC_H as u32, rgb).unwrap();
    let out = pil_bicubic_resize_rgb8(&img, 9, 7).unwrap();
    let grey = pil_bicubic_resize_u8(&src, PIL_SRC_W, PIL_SRC_H, 1, 9, 7).unwrap();
    for (px, g) in out.pixels().zip(grey) {
        assert_eq!(px.0[0], g);
    }
}

// ------------------------------------------------------------------------------------------------
// torch bicubic

/// Keys cubic convolution kernel, a = -0.75, in f64.
fn keys(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// The formula of `interpolate(mode='bicubic', align_corners=False)` in f64, one axis.
fn reference_1d(src: &[f64], out: usize) -> Vec<f64> {
    let n = src.len();
    let scale = n as f64 / out as f64;
    (0..out)
        .map(|i| {
            let real = scale * (i as f64 + 0.5) - 0.5;
            let f = real.floor();
            (-1..=2)
                .map(|k| {
                    let idx = (f as i64 + k).clamp(0, n as i64 - 1) as usize;
                    keys(real - (f + k as f64)) * src[idx]
                })
                .sum()
        })
        .collect()
}

#[test]
fn torch_bicubic_same_size_is_identity() {
    let src: Vec<f32> = lcg_bytes(2 * 6 * 7, 3)
        .iter()
        .map(|&v| v as f32 / 97.0 - 1.0)
        .collect();
    let out = torch_bicubic_resize_f32(&src, 2, 6, 7, 6, 7).unwrap();
    assert_eq!(out, src);
}

#[test]
fn torch_bicubic_preserves_constants() {
    let src = vec![0.3f32; 2 * 5 * 4];
    for &(oh, ow) in &[(9, 11), (2, 3), (5, 17), (1, 1)] {
        let out = torch_bicubic_resize_f32(&src, 2, 5, 4, oh, ow).unwrap();
        assert!(out.iter().all(|&v| (v - 0.3).abs() < 1e-6), "{oh}x{ow}");
    }
}

#[test]
fn torch_bicubic_matches_formula() {
    let src8 = lcg_bytes(5 * 4, 9);
    let src: Vec<f32> = src8.iter().map(|&v| v as f32 / 255.0).collect();
    for &(oh, ow) in &[(9, 11), (2, 3), (5, 17), (12, 4), (1, 1)] {
        let out = torch_bicubic_resize_f32(&src, 1, 5, 4, oh, ow).unwrap();
        // Separable reference: rows first, then columns.
        let rows: Vec<Vec<f64>> = (0..5)
            .map(|y| {
                let r: Vec<f64> = src[y * 4..y * 4 + 4].iter().map(|&v| v as f64).collect();
                reference_1d(&r, ow)
            })
            .collect();
        for x in 0..ow {
            let col: Vec<f64> = rows.iter().map(|r| r[x]).collect();
            let col = reference_1d(&col, oh);
            for y in 0..oh {
                let d = (out[y * ow + x] as f64 - col[y]).abs();
                assert!(
                    d < 2e-6,
                    "{oh}x{ow} at ({y},{x}): {} vs {}",
                    out[y * ow + x],
                    col[y]
                );
            }
        }
    }
}

include!("data/torch_bicubic_weights.rs");

/// The weights, border merging included, are bit-identical to torch's: resize an identity matrix along
/// the height (the width is unchanged, an exact identity) and read each output row.
#[test]
fn torch_bicubic_weights_match_torch() {
    let mut checked = 0;
    for &(n, o, i, expected) in TORCH_WEIGHTS {
        let eye: Vec<f32> = (0..n * n)
            .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
            .collect();
        let out = torch_bicubic_resize_f32(&eye, 1, n, n, o, n).unwrap();
        let row = &out[i * n..(i + 1) * n];
        let mut want = vec![0f32; n];
        for &(k, w) in expected {
            want[k] = w;
        }
        assert_eq!(row, &want[..], "{n} -> {o}, output {i}");
        checked += 1;
    }
    assert_eq!(checked, TORCH_WEIGHTS.len());
}

#[test]
fn torch_bicubic_tensor_wrapper() {
    let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4, 5))
        .unwrap();
    let y = torch_bicubic_resize(&x, 7, 9).unwrap();
    assert_eq!(y.dims(), &[2, 3, 7, 9]);
    let plane = x
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let expect = torch_bicubic_resize_f32(&plane, 1, 4, 5, 7, 9).unwrap();
    let got = y
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, expect);
    assert!(torch_bicubic_resize(&x.flatten_all().unwrap(), 2, 2).is_err());
}

// ------------------------------------------------------------------------------------------------
// HWC3 / convert("RGB")

#[test]
fn to_rgb8_flattens_alpha_on_white() {
    let img = RgbaImage::from_fn(4, 1, |x, _| match x {
        0 => Rgba([10, 20, 30, 255]),
        1 => Rgba([10, 20, 30, 0]),
        2 => Rgba([200, 100, 0, 128]),
        _ => Rgba([0, 0, 0, 1]),
    });
    let rgb = to_rgb8(&DynamicImage::ImageRgba8(img));
    // f32: c * a/255 + 255 * (1 - a/255), truncated.
    let f = |c: u8, a: u8| {
        let al = a as f32 / 255.0;
        (c as f32 * al + 255.0 * (1.0 - al)) as u8
    };
    assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);
    assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 255]);
    assert_eq!(rgb.get_pixel(2, 0).0, [f(200, 128), f(100, 128), f(0, 128)]);
    // 255 * (1 - 128/255) is 126.99999 in f32: truncated to 126 (numpy gives the same).
    assert_eq!(rgb.get_pixel(2, 0).0, [227, 177, 126]);
    assert_eq!(rgb.get_pixel(3, 0).0, [f(0, 1), f(0, 1), f(0, 1)]);
}

#[test]
fn to_rgb8_grey_and_16_bit() {
    let g = GrayImage::from_fn(2, 1, |x, _| image::Luma([x as u8 * 100 + 5]));
    let rgb = to_rgb8(&DynamicImage::ImageLuma8(g));
    assert_eq!(rgb.as_raw(), &vec![5, 5, 5, 105, 105, 105]);
    let im16 =
        image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_raw(1, 1, vec![0xffff, 0x80ff, 0x00ff])
            .unwrap();
    let rgb = to_rgb8(&DynamicImage::ImageRgb16(im16));
    assert_eq!(rgb.as_raw(), &vec![0xff, 0x80, 0x00]);
    let rgb = RgbImage::from_raw(1, 1, vec![1, 2, 3]).unwrap();
    assert_eq!(to_rgb8(&DynamicImage::ImageRgb8(rgb.clone())), rgb);
}
