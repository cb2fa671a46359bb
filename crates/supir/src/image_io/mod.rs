//! Images in and out: files on disk (`file`) and the official tensor conversions (`convert`:
//! `PIL2Tensor` / `Tensor2PIL` of `SUPIR/util.py`).

pub mod convert;
pub mod file;
