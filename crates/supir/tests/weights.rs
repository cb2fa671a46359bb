//! Checkpoint loading: formats, dtypes, merge order, and the errors a user sees.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use supir::weights::{Checkpoint, Format, ShapeSource, WeightSource};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("supir-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn save(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

#[test]
fn safetensors_dtypes_load_as_compute_dtype() {
    let dev = Device::Cpu;
    let v = Tensor::new(&[[1.5f32, -2.25, 3.0], [0.5, 0.0, -1.0]], &dev).unwrap();
    let p = tmp("dtypes.safetensors");
    save(
        &p,
        &[
            ("a.f32", v.clone()),
            ("a.f16", v.to_dtype(DType::F16).unwrap()),
            ("a.bf16", v.to_dtype(DType::BF16).unwrap()),
        ],
    );
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.format(), Format::Safetensors);
    assert_eq!(ck.tensors().len(), 3);
    assert_eq!(ck.meta("a.bf16").unwrap().dtype, DType::BF16);
    for key in ["a.f32", "a.f16", "a.bf16"] {
        let t = ck.load(key, DType::F32, &dev).unwrap().unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            v.to_vec2::<f32>().unwrap(),
            "{key}"
        );
    }
    assert!(ck.load("nope", DType::F32, &dev).unwrap().is_none());
}

#[test]
fn later_files_override_and_extend_earlier_ones() {
    let dev = Device::Cpu;
    let base = tmp("base.safetensors");
    let over = tmp("over.safetensors");
    save(
        &base,
        &[
            ("m.w", Tensor::new(&[1f32, 1.0], &dev).unwrap()),
            ("m.b", Tensor::new(&[7f32], &dev).unwrap()),
            (
                "first_stage_model.encoder.conv_in.weight",
                Tensor::new(&[3f32], &dev).unwrap(),
            ),
        ],
    );
    save(
        &over,
        &[
            ("m.w", Tensor::new(&[2f32, 2.0], &dev).unwrap()),
            ("m.extra", Tensor::new(&[5f32], &dev).unwrap()),
        ],
    );
    let vb = WeightSource::open(&[&base, &over])
        .unwrap()
        .into_var_builder(DType::F32, &dev);
    let m = vb.pp("m");
    assert_eq!(m.get(2, "w").unwrap().to_vec1::<f32>().unwrap(), [2.0, 2.0]);
    assert_eq!(m.get(1, "b").unwrap().to_vec1::<f32>().unwrap(), [7.0]);
    assert_eq!(m.get(1, "extra").unwrap().to_vec1::<f32>().unwrap(), [5.0]);
    // denoise_encoder starts as a copy of the encoder when no file provides it.
    let d = vb
        .get(1, "first_stage_model.denoise_encoder.conv_in.weight")
        .unwrap();
    assert_eq!(d.to_vec1::<f32>().unwrap(), [3.0]);
}

#[test]
fn missing_key_and_wrong_shape_name_file_key_and_shapes() {
    let dev = Device::Cpu;
    let p = tmp("small.safetensors");
    save(
        &p,
        &[("x.weight", Tensor::zeros((4, 3), DType::F32, &dev).unwrap())],
    );
    let vb = WeightSource::open(&[&p])
        .unwrap()
        .into_var_builder(DType::F32, &dev);
    let err = vb.get((4, 3), "x.bias").unwrap_err().to_string();
    assert!(err.contains("missing weight `x.bias`"), "{err}");
    assert!(
        err.contains("[4, 3]") && err.contains("small.safetensors"),
        "{err}"
    );
    let err = vb.get((3, 4), "x.weight").unwrap_err().to_string();
    assert!(err.contains("small.safetensors"), "{err}");
    assert!(err.contains("`x.weight` has shape [4, 3]"), "{err}");
    assert!(err.contains("expects [3, 4]"), "{err}");
}

#[test]
fn truncated_and_foreign_files_are_clear_errors() {
    let dev = Device::Cpu;
    let p = tmp("full.safetensors");
    save(
        &p,
        &[("x", Tensor::zeros((64, 64), DType::F32, &dev).unwrap())],
    );
    let bytes = std::fs::read(&p).unwrap();
    let cut = tmp("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = Checkpoint::open(&cut).err().unwrap().to_string();
    assert!(
        err.contains("cut.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let header_cut = tmp("header-cut.safetensors");
    std::fs::write(&header_cut, &bytes[..20]).unwrap();
    let err = Checkpoint::open(&header_cut).err().unwrap().to_string();
    assert!(err.contains("header-cut.safetensors"), "{err}");

    let txt = tmp("notes.ckpt");
    std::fs::write(&txt, "hello, not weights").unwrap();
    let err = Checkpoint::open(&txt).err().unwrap().to_string();
    assert!(
        err.contains("notes.ckpt") && err.contains("not a checkpoint"),
        "{err}"
    );

    let err = Checkpoint::open(tmp("absent.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn shape_source_records_requests_without_allocating() {
    let dev = Device::Cpu;
    let src = ShapeSource::default();
    let vb = src.clone().into_var_builder(DType::F16, &dev);
    let big = vb.get((40_000, 40_000), "huge.weight").unwrap();
    assert_eq!(big.dims(), [40_000, 40_000]);
    assert_eq!(big.dtype(), DType::F16);
    let rec = src.requested();
    assert_eq!(rec.get("huge.weight"), Some(&vec![40_000, 40_000]));
    assert!(src.repeated().is_empty());
    vb.get(3, "small.bias").unwrap();
    vb.get(3, "small.bias").unwrap();
    assert_eq!(src.repeated(), ["small.bias"]);
}

/// Torch zip checkpoints made by `scripts/make_torch_ckpt_fixtures.py` (torch.save).
#[test]
fn torch_zip_checkpoints_plain_and_wrapped() {
    let dev = Device::Cpu;
    for (file, dtype) in [
        ("plain_f32.pth", DType::F32),
        ("wrapped_f16.ckpt", DType::F16),
        ("wrapped_bf16.ckpt", DType::BF16),
    ] {
        let path = data_dir().join(file);
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.format(), Format::TorchZip, "{file}");
        let metas = ck.tensors();
        assert_eq!(metas.len(), 2, "{file}: {metas:?}");
        let w = &metas["model.diffusion_model.w"];
        assert_eq!((w.dtype, w.shape.clone()), (dtype, vec![2, 3]), "{file}");
        let t = ck
            .load("model.diffusion_model.w", DType::F32, &dev)
            .unwrap()
            .unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]],
            "{file}"
        );
        let b = ck
            .load("first_stage_model.b", DType::F32, &dev)
            .unwrap()
            .unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), [-1.5, 0.25], "{file}");
    }
    let cut = tmp("cut.ckpt");
    let bytes = std::fs::read(data_dir().join("wrapped_f16.ckpt")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::open(&cut).err().unwrap().to_string();
    assert!(err.contains("cut.ckpt"), "{err}");
}
