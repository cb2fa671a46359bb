//! What checkpoint files hold, measured against the full-size SUPIR-v0 key list
//! (`assets/supir-v0-keys.tsv`, the official model built from `options/SUPIR_v0.yaml`).

use std::collections::BTreeMap;

use candle_core::DType;

use crate::weights::{Checkpoint, TensorMeta};

/// Every key and shape of the full-size official model (buffers included).
pub const FULL_SIZE_KEYS_TSV: &str = include_str!("../assets/supir-v0-keys.tsv");

/// Keys that are buffers, not needed for inference.
fn is_buffer(key: &str) -> bool {
    key.ends_with("position_ids") || key.ends_with("logit_scale")
}

/// `(key, shape)` rows of the full-size model, buffers excluded.
pub fn full_size_keys() -> BTreeMap<String, Vec<usize>> {
    FULL_SIZE_KEYS_TSV
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (k, s) = l.split_once('\t')?;
            let shape = s
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().expect("tsv shape"))
                .collect();
            (!is_buffer(k)).then(|| (k.to_string(), shape))
        })
        .collect()
}

/// Every file, key, shape and dtype of the full-size SeeSR release (`assets/seesr-keys.tsv`,
/// written by the refgen-seesr generator from the official models; buffers included).
pub const SEESR_KEYS_TSV: &str = include_str!("../assets/seesr-keys.tsv");

/// One row of [`SEESR_KEYS_TSV`]: a tensor of a release file (path relative to `preset/models`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseKey {
    pub file: String,
    pub key: String,
    pub shape: Vec<usize>,
    /// torch's name: `float32`, `int64`, ...
    pub dtype: String,
}

/// The rows of [`SEESR_KEYS_TSV`].
pub fn seesr_release_keys() -> Vec<ReleaseKey> {
    SEESR_KEYS_TSV
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let [file, key, shape, dtype] = f[..] else {
                return None;
            };
            let shape = shape
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().expect("tsv shape"))
                .collect();
            Some(ReleaseKey {
                file: file.into(),
                key: key.into(),
                shape,
                dtype: dtype.into(),
            })
        })
        .collect()
}

/// key -> shape of one release file (e.g. `seesr/unet/diffusion_pytorch_model.safetensors`).
pub fn seesr_file_keys(file: &str) -> BTreeMap<String, Vec<usize>> {
    seesr_release_keys()
        .into_iter()
        .filter(|r| r.file == file)
        .map(|r| (r.key, r.shape))
        .collect()
}

/// Which published file normally provides a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    SdxlBase,
    Supir,
}

/// A named part of the model: the keys under `prefix`, minus those under `exclude`.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    pub name: &'static str,
    pub prefix: &'static str,
    pub exclude: Option<&'static str>,
    pub origin: Origin,
}

impl Part {
    pub fn contains(&self, key: &str) -> bool {
        key.starts_with(self.prefix) && !self.exclude.is_some_and(|e| key.starts_with(e))
    }
}

pub const PARTS: &[Part] = &[
    Part {
        name: "SDXL UNet",
        prefix: "model.diffusion_model.",
        exclude: Some("model.diffusion_model.project_modules."),
        origin: Origin::SdxlBase,
    },
    Part {
        name: "ZeroSFT / ZeroCrossAttn connectors",
        prefix: "model.diffusion_model.project_modules.",
        exclude: None,
        origin: Origin::Supir,
    },
    Part {
        name: "GLVControl",
        prefix: "model.control_model.",
        exclude: None,
        origin: Origin::Supir,
    },
    Part {
        name: "VAE",
        prefix: "first_stage_model.",
        exclude: Some("first_stage_model.denoise_encoder."),
        origin: Origin::SdxlBase,
    },
    Part {
        name: "VAE denoise_encoder",
        prefix: "first_stage_model.denoise_encoder.",
        exclude: None,
        origin: Origin::Supir,
    },
    Part {
        name: "CLIP ViT-L text encoder",
        prefix: "conditioner.embedders.0.",
        exclude: None,
        origin: Origin::SdxlBase,
    },
    Part {
        name: "OpenCLIP ViT-bigG text encoder",
        prefix: "conditioner.embedders.1.",
        exclude: None,
        origin: Origin::SdxlBase,
    },
];

/// Coverage of one part by a set of tensors.
#[derive(Debug, Clone)]
pub struct PartCoverage {
    pub part: Part,
    /// Keys present with the expected shape.
    pub present: usize,
    pub expected: usize,
    /// Keys present with another shape: (key, expected, actual).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl PartCoverage {
    pub fn complete(&self) -> bool {
        self.present == self.expected && self.wrong_shape.is_empty()
    }
}

/// What one file (or a merged set) holds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub tensors: usize,
    pub parameters: u64,
    pub dtypes: BTreeMap<String, usize>,
    /// Parameters per top-level module (`model.diffusion_model`, `first_stage_model.encoder`, ...).
    pub modules: BTreeMap<String, u64>,
    pub coverage: Vec<PartCoverage>,
    /// Keys the full-size model does not use.
    pub unknown: usize,
}

/// Top-level module of a key: two dotted components, three under `conditioner.embedders`.
fn module_of(key: &str) -> String {
    let n = if key.starts_with("conditioner.embedders.") {
        3
    } else {
        2
    };
    key.split('.').take(n).collect::<Vec<_>>().join(".")
}

pub fn summarize(tensors: &BTreeMap<String, TensorMeta>) -> Summary {
    let full = full_size_keys();
    // Keys under stable-diffusion.cpp's names count as the official ones they stand for.
    let aliases: std::collections::HashMap<String, &String> = full
        .keys()
        .filter_map(|k| crate::gguf::sdcpp_name(k).map(|a| (a, k)))
        .collect();
    let renamed: BTreeMap<String, TensorMeta> = tensors
        .iter()
        .map(|(k, m)| (aliases.get(k).map_or(k, |o| *o).clone(), m.clone()))
        .collect();
    let tensors = &renamed;
    let mut dtypes = BTreeMap::new();
    let mut modules = BTreeMap::new();
    let mut parameters = 0u64;
    let mut unknown = 0;
    for (k, m) in tensors {
        let n: u64 = m.shape.iter().product::<usize>() as u64;
        parameters += n;
        *dtypes.entry(dtype_name(m.dtype)).or_insert(0) += 1;
        *modules.entry(module_of(k)).or_insert(0) += n;
        if !full.contains_key(k) && !is_buffer(k) {
            unknown += 1;
        }
    }
    let coverage = PARTS
        .iter()
        .map(|part| {
            let mut cov = PartCoverage {
                part: *part,
                present: 0,
                expected: 0,
                wrong_shape: vec![],
            };
            for (k, shape) in full.iter().filter(|(k, _)| part.contains(k)) {
                cov.expected += 1;
                match tensors.get(k) {
                    Some(m) if &m.shape == shape => cov.present += 1,
                    Some(m) => cov
                        .wrong_shape
                        .push((k.clone(), shape.clone(), m.shape.clone())),
                    None => {}
                }
            }
            cov
        })
        .collect();
    Summary {
        tensors: tensors.len(),
        parameters,
        dtypes,
        modules,
        coverage,
        unknown,
    }
}

/// The merged view of several files, later ones overriding earlier ones.
pub fn merged(files: &[Checkpoint]) -> BTreeMap<String, TensorMeta> {
    let mut all = BTreeMap::new();
    for f in files {
        all.extend(f.tensors());
    }
    all
}

pub fn dtype_name(d: DType) -> String {
    match d {
        DType::F16 => "f16".into(),
        DType::BF16 => "bf16".into(),
        DType::F32 => "f32".into(),
        DType::F64 => "f64".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}
