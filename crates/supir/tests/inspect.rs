//! Part coverage of checkpoint contents against the full-size key list.

use std::collections::BTreeMap;

use candle_core::DType;
use supir::inspect::{full_size_keys, summarize};
use supir::weights::TensorMeta;

fn metas(filter: impl Fn(&str) -> bool) -> BTreeMap<String, TensorMeta> {
    full_size_keys()
        .into_iter()
        .filter(|(k, _)| filter(k))
        .map(|(k, shape)| {
            (
                k,
                TensorMeta {
                    dtype: DType::F16,
                    shape,
                },
            )
        })
        .collect()
}

fn status(s: &supir::inspect::Summary, part: &str) -> (usize, usize, bool) {
    let c = s.coverage.iter().find(|c| c.part.name == part).unwrap();
    (c.present, c.expected, c.complete())
}

#[test]
fn sdxl_and_supir_files_split_the_model() {
    // An SDXL base file: everything but the SUPIR additions.
    let sdxl = summarize(&metas(|k| {
        !k.starts_with("model.control_model.")
            && !k.contains("project_modules")
            && !k.contains("denoise_encoder")
    }));
    assert!(status(&sdxl, "SDXL UNet").2);
    assert!(status(&sdxl, "VAE").2);
    assert!(status(&sdxl, "OpenCLIP ViT-bigG text encoder").2);
    let (present, expected, complete) = status(&sdxl, "GLVControl");
    assert_eq!((present, complete), (0, false));
    assert_eq!(expected, 810);
    assert_eq!(sdxl.unknown, 0);

    let mut all = metas(|_| true);
    assert!(summarize(&all).coverage.iter().all(|c| c.complete()));
    all.insert(
        "junk.weight".into(),
        TensorMeta {
            dtype: DType::F32,
            shape: vec![1],
        },
    );
    all.get_mut("model.control_model.input_blocks.0.0.weight")
        .unwrap()
        .shape = vec![1, 2];
    let s = summarize(&all);
    assert_eq!(s.unknown, 1);
    let c = s
        .coverage
        .iter()
        .find(|c| c.part.name == "GLVControl")
        .unwrap();
    assert_eq!(c.wrong_shape.len(), 1);
    assert!(!c.complete());
    assert_eq!(s.dtypes["f32"], 1);
}

#[test]
fn stable_diffusion_cpp_names_count_as_the_official_parts() {
    // An SDXL GGUF from stable-diffusion.cpp's `--convert-name`: text encoders renamed.
    let sdcpp: BTreeMap<String, TensorMeta> = metas(|k| !k.starts_with("model.control_model."))
        .into_iter()
        .map(|(k, m)| (supir::gguf::sdcpp_name(&k).unwrap_or(k), m))
        .collect();
    assert!(sdcpp
        .keys()
        .any(|k| k.starts_with("cond_stage_model.1.transformer.text_model.")));
    let s = summarize(&sdcpp);
    assert!(status(&s, "CLIP ViT-L text encoder").2);
    assert!(status(&s, "OpenCLIP ViT-bigG text encoder").2);
    assert!(status(&s, "SDXL UNet").2);
    assert_eq!(s.unknown, 0);
}
