//! DAPE's LoRA tensors (`DAPE.pth`, a flat dict of `<layer>.lora_A` / `<layer>.lora_B` as
//! `basicsr/models/dape_model.py` saves them) and their merge into the RAM weights, as
//! loralib 0.1.2's `train(False)` (called by `model.eval()` in `test_seesr.py::load_tag_model`)
//! does it:
//! - `lora.Linear` (BERT `query` / `key`): `W += (B @ A) * alpha / r`, `A [r, in]`, `B [out, r]`;
//! - `lora.MergedLinear` (Swin `attn.qkv`, `enable_lora = [True, False, True]`): `A [r·k, in]`,
//!   `B [out/3·k, r]` (k = 2 enabled parts), block `j` of `B` times block `j` of `A` (the grouped
//!   `conv1d` of `merge_AB`) lands in the rows of the `j`-th enabled part (q, then v); the k rows
//!   are untouched.
//!
//! The official load is `strict=False`: a key matching no layer is dropped silently. Here every
//! key must belong to a LoRA layer of `RAMLora`, else [`Lora::finish`] fails naming the file and
//! the key. The layers off SeeSR's tagging path (`tag_encoder` self-attention and layers past the
//! tagging head's depth, `text_decoder`) are checked by name against the RAM checkpoint and
//! otherwise ignored: SeeSR never runs them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::weights::WeightSource;
use crate::{Error, Result};

/// The LoRA tensors of one file, by key, and which of them a model build consumed.
pub struct Lora {
    vb: VarBuilder<'static>,
    keys: BTreeSet<String>,
    path: PathBuf,
    alpha: f64,
    used: Mutex<BTreeSet<String>>,
}

impl Lora {
    /// LoRA tensors served by `vb` (read in f32 whatever its dtype), `keys` all the keys of the
    /// file, `path` the file named in errors. `alpha` is loralib's `lora_alpha` (1 in RAMLora).
    pub fn new(
        vb: VarBuilder<'static>,
        keys: impl IntoIterator<Item = String>,
        path: impl Into<PathBuf>,
        alpha: f64,
    ) -> Self {
        Self {
            vb: vb.set_dtype(DType::F32),
            keys: keys.into_iter().collect(),
            path: path.into(),
            alpha,
            used: Mutex::default(),
        }
    }

    /// Opens a LoRA checkpoint (`DAPE.pth`: torch zip, or safetensors).
    pub fn open(path: &Path, alpha: f64, dev: &Device) -> Result<Self> {
        let src = WeightSource::open(&[path])?;
        let keys: Vec<String> = src.files()[0].tensors().into_keys().collect();
        Ok(Self::new(
            src.into_var_builder(DType::F32, dev),
            keys,
            path,
            alpha,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, msg: String) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            msg,
        }
    }

    /// `(A, B)` of `layer` if the file has them, marked as used; `A` must have `in_dim` columns.
    fn pair(&self, layer: &str, in_dim: usize) -> Result<Option<(Tensor, Tensor, usize)>> {
        let (ka, kb) = (format!("{layer}.lora_A"), format!("{layer}.lora_B"));
        match (self.keys.contains(&ka), self.keys.contains(&kb)) {
            (false, false) => return Ok(None),
            (true, false) => return Err(self.err(format!("`{ka}` without `{kb}`"))),
            (false, true) => return Err(self.err(format!("`{kb}` without `{ka}`"))),
            (true, true) => {}
        }
        let a = self.vb.get_unchecked(&ka)?.contiguous()?;
        let (rows, cols) = a.dims2().map_err(|_| {
            self.err(format!(
                "LoRA tensor `{ka}` has shape {:?}, expected [r, {in_dim}]",
                a.dims()
            ))
        })?;
        if cols != in_dim || rows == 0 {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                key: ka,
                expected: vec![rows.max(1), in_dim],
                actual: a.dims().to_vec(),
            });
        }
        let b = self.vb.get_unchecked(&kb)?.contiguous()?;
        let mut used = self.used.lock().expect("poisoned");
        used.insert(ka);
        used.insert(kb);
        Ok(Some((a, b, rows)))
    }

    fn check_b(&self, layer: &str, b: &Tensor, expected: [usize; 2]) -> Result<()> {
        if b.dims() != expected {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                key: format!("{layer}.lora_B"),
                expected: expected.to_vec(),
                actual: b.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// The merge term `(B @ A) · alpha / r` `[out, in]` of the `lora.Linear` `layer`, if the file
    /// has its pair.
    pub fn linear_delta(
        &self,
        layer: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<Tensor>> {
        let Some((a, b, r)) = self.pair(layer, in_dim)? else {
            return Ok(None);
        };
        self.check_b(layer, &b, [out_dim, r])?;
        Ok(Some((b.matmul(&a)? * (self.alpha / r as f64))?))
    }

    /// The merge term `[out, in]` of the `lora.MergedLinear` `layer` whose `out` rows are
    /// `enable.len()` equal parts, LoRA on the parts marked `true` (zero rows elsewhere).
    pub fn merged_delta(
        &self,
        layer: &str,
        out_dim: usize,
        in_dim: usize,
        enable: &[bool],
    ) -> Result<Option<Tensor>> {
        let parts = enable.len();
        let k = enable.iter().filter(|&&e| e).count();
        if parts == 0 || k == 0 || !out_dim.is_multiple_of(parts) {
            return Err(Error::Option(format!(
                "{layer}: {out_dim} rows in {parts} parts, {k} with LoRA"
            )));
        }
        let Some((a, b, rk)) = self.pair(layer, in_dim)? else {
            return Ok(None);
        };
        if !rk.is_multiple_of(k) {
            return Err(self.err(format!(
                "LoRA tensor `{layer}.lora_A` has {rk} rows, not a multiple of {k} enabled parts"
            )));
        }
        let (r, part) = (rk / k, out_dim / parts);
        self.check_b(layer, &b, [part * k, r])?;
        let scale = self.alpha / r as f64;
        let dev = a.device().clone();
        let mut blocks = Vec::with_capacity(parts);
        let mut j = 0;
        for &on in enable {
            if on {
                let bj = b.narrow(0, j * part, part)?;
                let aj = a.narrow(0, j * r, r)?;
                blocks.push((bj.matmul(&aj)? * scale)?);
                j += 1;
            } else {
                blocks.push(Tensor::zeros((part, in_dim), DType::F32, &dev)?);
            }
        }
        Ok(Some(Tensor::cat(&blocks, 0)?))
    }

    /// Fails on any key not consumed by the build that is not a LoRA tensor of a `RAMLora` layer
    /// SeeSR leaves unused (BERT `query` / `key` of `tag_encoder` and `text_decoder`, whose
    /// `.weight` the RAM checkpoint `ram_vb` must hold).
    pub fn finish(&self, ram_vb: &VarBuilder) -> Result<()> {
        let used = self.used.lock().expect("poisoned");
        for key in self.keys.iter().filter(|k| !used.contains(*k)) {
            let layer = key
                .strip_suffix(".lora_A")
                .or_else(|| key.strip_suffix(".lora_B"));
            let Some(layer) = layer else {
                return Err(self.err(format!(
                    "`{key}` is not a LoRA tensor (`*.lora_A` / `*.lora_B`); a DAPE file holds only those"
                )));
            };
            let off_path = (layer.starts_with("tag_encoder.encoder.layer.")
                || layer.starts_with("text_decoder.bert.encoder.layer."))
                && [
                    ".attention.self.query",
                    ".attention.self.key",
                    ".crossattention.self.query",
                    ".crossattention.self.key",
                ]
                .iter()
                .any(|s| layer.ends_with(s));
            if !(off_path && ram_vb.contains_tensor(&format!("{layer}.weight"))) {
                return Err(self.err(format!(
                    "LoRA tensor `{key}` matches no layer of RAM (RAMLora's LoRA layers are \
                     `visual_encoder.layers.N.blocks.M.attn.qkv` and the BERT attention \
                     `query` / `key` of `tagging_head`, `tag_encoder`, `text_decoder`)"
                )));
            }
        }
        Ok(())
    }
}

/// `weight + Σ deltas` in f32 (in the given order, as loralib adds them), then `dtype`.
pub(super) fn merge(weight: Tensor, deltas: &[Tensor], dtype: DType) -> Result<Tensor> {
    let mut w = weight;
    for d in deltas {
        w = (w + d)?;
    }
    Ok(w.to_dtype(dtype)?)
}
