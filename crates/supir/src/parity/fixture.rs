//! Golden-data folders made by the official code: `cases.json` + `cases.safetensors`, beside the
//! model files (`fixtures/supir-tiny`: `config.yaml`, `weights.safetensors`; `fixtures/seesr-tiny`:
//! the official SeeSR download layout).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// One expected output of a case and its allowed max abs error.
#[derive(Debug, Clone, Deserialize)]
pub struct CaseOutput {
    pub name: String,
    pub max_abs: f64,
    pub atol: f64,
}

/// One golden case: `kind` selects the component, `params` its call arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Inputs that are another case's tensor: name -> key in `cases.safetensors` (SeeSR layout).
    #[serde(default)]
    pub shared_inputs: HashMap<String, String>,
    #[serde(default)]
    pub outputs: Vec<CaseOutput>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

/// A loaded fixture folder.
pub struct Fixture {
    pub dir: PathBuf,
    pub cases: Vec<Case>,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join("cases.json");
        let text = std::fs::read_to_string(&manifest_path).map_err(|source| Error::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Fixture {
            path: manifest_path.clone(),
            msg: e.to_string(),
        })?;
        let tensors_path = dir.join("cases.safetensors");
        let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu).map_err(|e| {
            Error::Fixture {
                path: tensors_path.clone(),
                msg: e.to_string(),
            }
        })?;
        Ok(Self {
            dir,
            cases: manifest.cases,
            tensors,
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("weights.safetensors")
    }

    pub fn case(&self, name: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.name == name)
    }

    /// `<case>/in/<name>` as stored (f32, or i32 for token ids), or the other case's tensor a
    /// shared input names.
    pub fn input(&self, case: &Case, name: &str) -> Result<Tensor> {
        match case.shared_inputs.get(name) {
            Some(key) => self.tensor(key),
            None => self.tensor(&format!("{}/in/{name}", case.name)),
        }
    }

    /// Whether the case has the input `name` (its own or shared).
    pub fn has_input(&self, case: &Case, name: &str) -> bool {
        case.shared_inputs.contains_key(name)
            || self
                .tensors
                .contains_key(&format!("{}/in/{name}", case.name))
    }

    /// `<case>/out/<name>` (f32).
    pub fn output(&self, case: &Case, name: &str) -> Result<Tensor> {
        self.tensor(&format!("{}/out/{name}", case.name))
    }

    fn tensor(&self, key: &str) -> Result<Tensor> {
        self.tensors
            .get(key)
            .cloned()
            .ok_or_else(|| Error::Fixture {
                path: self.dir.join("cases.safetensors"),
                msg: format!("no tensor `{key}`"),
            })
    }
}

/// Max abs difference of two tensors of the same shape, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::Option(format!(
            "shape mismatch: got {:?}, expected {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let d = (a.to_dtype(candle_core::DType::F64)? - b.to_dtype(candle_core::DType::F64)?)?;
    Ok(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}
