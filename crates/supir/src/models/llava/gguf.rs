//! llama.cpp's GGUF pair (WIP).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::Llava;
use crate::{Error, Result};

pub struct GgufPair {
    pub llm: PathBuf,
    pub mmproj: PathBuf,
}

impl GgufPair {
    pub fn find(_dir: &Path) -> Result<Option<Self>> {
        Ok(None)
    }
}

pub struct QuantizedLlama;
pub struct QuantizedCache;

impl QuantizedLlama {
    pub fn embed(&self, _ids: &Tensor) -> Result<Tensor> {
        Err(Error::NotAvailable("GGUF LLaVA".into()))
    }
    pub fn new_cache(&self) -> QuantizedCache {
        QuantizedCache
    }
    pub fn forward_embeds(&self, _e: &Tensor, _pos: usize, _c: &mut QuantizedCache) -> Result<Tensor> {
        Err(Error::NotAvailable("GGUF LLaVA".into()))
    }
    pub fn hidden_size(&self) -> usize {
        0
    }
}

pub fn load(_pair: &GgufPair, _clip: Option<&Path>, _dtype: DType, _dev: &Device) -> Result<Llava> {
    Err(Error::NotAvailable("GGUF LLaVA".into()))
}
