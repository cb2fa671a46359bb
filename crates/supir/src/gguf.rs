//! GGUF files (the format of llama.cpp and stable-diffusion.cpp): a streaming writer that keeps
//! the official key names with the diffusion networks' linear layers in Q8_0 or Q4_K, and the index the
//! weight loader ([`crate::weights::Checkpoint`]) reads any GGUF file through.
//!
//! Layout (GGUF v3): `"GGUF"`, version, tensor and key-value counts, the key-values, one info per
//! tensor (name, dims innermost first, ggml type, offset), padding to `general.alignment` (32),
//! then each tensor's bytes padded to the alignment. Q8_0 rows are ggml's
//! `quantize_row_q8_0_ref` blocks ([`crate::kernels::q8::quantize_row_gguf`]), so a layer
//! quantised at load from the original file and one read from the converted file hold the same
//! bytes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::kernels::{q4k, q8};
use crate::{Error, Result};

const ALIGNMENT: usize = 32;

/// How one tensor is stored in a GGUF file we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4K,
}

impl GgufType {
    fn ggml(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
        }
    }

    fn bytes(self, elems: usize) -> usize {
        match self {
            Self::F32 => 4 * elems,
            Self::F16 | Self::BF16 => 2 * elems,
            Self::Q8_0 => elems / q8::QK * q8::BLOCK_BYTES,
            Self::Q4K => elems / q4k::QK_K * q4k::BLOCK_BYTES,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        }
    }
}

/// What `supir convert gguf --type` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufTarget {
    /// Every float tensor of two or more dimensions in f16, vectors in f32.
    F16,
    /// As `F16`, but the linear weights under the quantised prefixes in Q8_0.
    Q8_0,
    /// As `Q8_0`, but those linear weights whose input width is a multiple of 256 in Q4_K
    /// (the layers `--diffusion-dtype q4_k` stores in Q4_K; the others stay Q8_0).
    Q4K,
}

/// The storage of `key` (shape `shape`) for `target`: Q8_0 for a `[out, in]` weight with `in`
/// a multiple of 32 under one of `prefixes` (the networks `--diffusion-dtype q8_0` quantises;
/// for `Q4K`, Q4_K when `in` is a multiple of 256), f32 for vectors and scalars (norms,
/// biases: tiny), f16 otherwise.
pub fn plan(key: &str, shape: &[usize], target: GgufTarget, prefixes: &[String]) -> GgufType {
    if shape.len() <= 1 {
        return GgufType::F32;
    }
    let linear = shape.len() == 2
        && key.ends_with(".weight")
        && shape[1].is_multiple_of(q8::QK)
        && prefixes.iter().any(|p| key.starts_with(p.as_str()));
    match target {
        GgufTarget::Q4K if linear && shape[1].is_multiple_of(q4k::QK_K) => GgufType::Q4K,
        GgufTarget::Q8_0 | GgufTarget::Q4K if linear => GgufType::Q8_0,
        _ => GgufType::F16,
    }
}

/// One tensor to write: its name, shape and storage.
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgufType,
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn pad(w: &mut impl Write, written: usize) -> std::io::Result<usize> {
    let n = written.next_multiple_of(ALIGNMENT) - written;
    w.write_all(&vec![0u8; n])?;
    Ok(n)
}

/// Writes `tensors` to `w` as GGUF v3, reading each one through `fetch` (f32 or any float dtype)
/// only when its bytes are due, so memory holds one tensor at a time. `name` goes in
/// `general.name`.
pub fn write(
    w: &mut impl Write,
    name: &str,
    tensors: &[PlannedTensor],
    mut fetch: impl FnMut(&PlannedTensor) -> Result<Tensor>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::Candle(candle_core::Error::wrap(e));
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    let kv: [(&str, &str); 2] = [("general.name", name), ("general.producer", "supir-rs")];
    head.extend_from_slice(&(kv.len() as u64 + 1).to_le_bytes());
    for (k, v) in kv {
        write_str(&mut head, k).map_err(io)?;
        head.extend_from_slice(&8u32.to_le_bytes()); // string
        write_str(&mut head, v).map_err(io)?;
    }
    write_str(&mut head, "general.alignment").map_err(io)?;
    head.extend_from_slice(&4u32.to_le_bytes()); // uint32
    head.extend_from_slice(&(ALIGNMENT as u32).to_le_bytes());
    let mut offset = 0usize;
    for t in tensors {
        let elems: usize = t.shape.iter().product();
        write_str(&mut head, &t.name).map_err(io)?;
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ty.ggml().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.ty.bytes(elems)).next_multiple_of(ALIGNMENT);
    }
    w.write_all(&head).map_err(io)?;
    let mut pos = head.len();
    pos += pad(w, pos).map_err(io)?;
    for t in tensors {
        let x = fetch(t)?;
        if x.dims() != t.shape.as_slice() {
            return Err(Error::Option(format!(
                "gguf: tensor `{}` is {:?}, planned {:?}",
                t.name,
                x.dims(),
                t.shape
            )));
        }
        let bytes: Vec<u8> = match t.ty {
            GgufType::F32 => x
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            GgufType::F16 => x
                .to_dtype(DType::F16)?
                .flatten_all()?
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            GgufType::BF16 => x
                .to_dtype(DType::BF16)?
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            GgufType::Q8_0 | GgufType::Q4K => {
                let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let mut out = Vec::with_capacity(t.ty.bytes(v.len()));
                for row in v.chunks(t.shape[t.shape.len() - 1].max(1)) {
                    if t.ty == GgufType::Q4K {
                        q4k::quantize_row_gguf(row, &mut out);
                    } else {
                        q8::quantize_row_gguf(row, &mut out);
                    }
                }
                out
            }
        };
        w.write_all(&bytes).map_err(io)?;
        pos += bytes.len();
        pos += pad(w, pos).map_err(io)?;
    }
    Ok(())
}

/// The key prefixes `--diffusion-dtype q8_0` quantises in a SUPIR state dict (GLVControl and
/// the UNet).
pub const SUPIR_QUANT_PREFIXES: [&str; 2] = ["model.diffusion_model.", "model.control_model."];

/// What [`convert`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertSummary {
    pub tensors: usize,
    pub q8_0: usize,
    pub q4_k: usize,
    pub bytes: u64,
}

/// Writes every float tensor of `inputs` (later files override earlier keys, as the loaders
/// read them) to the GGUF file `out` (atomically: nothing is left on failure), stored as
/// [`plan`] says; non-float tensors (step counters) are left out.
pub fn convert(
    inputs: &[impl AsRef<Path>],
    target: GgufTarget,
    prefixes: &[String],
    out: &Path,
) -> Result<ConvertSummary> {
    convert_planned(inputs, out, |k, meta| {
        Some((k.to_string(), plan(k, &meta.shape, target, prefixes)))
    })
}

/// [`convert`] with each tensor's stored name and type from `plan_one(official key, meta)`
/// (`None`: left out).
fn convert_planned(
    inputs: &[impl AsRef<Path>],
    out: &Path,
    plan_one: impl Fn(&str, &crate::weights::TensorMeta) -> Option<(String, GgufType)>,
) -> Result<ConvertSummary> {
    let files = inputs
        .iter()
        .map(crate::weights::Checkpoint::open)
        .collect::<Result<Vec<_>>>()?;
    let mut owner: std::collections::BTreeMap<String, (usize, crate::weights::TensorMeta)> =
        Default::default();
    for (i, f) in files.iter().enumerate() {
        for (k, m) in f.tensors() {
            if m.dtype.is_float() {
                owner.insert(k, (i, m));
            }
        }
    }
    let mut source = HashMap::new();
    let planned: Vec<PlannedTensor> = owner
        .iter()
        .filter_map(|(k, (_, meta))| {
            let (name, ty) = plan_one(k, meta)?;
            source.insert(name.clone(), k.clone());
            Some(PlannedTensor {
                name,
                shape: meta.shape.clone(),
                ty,
            })
        })
        .collect();
    let name = out
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    crate::image_io::file::write_atomic_with(out, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        })?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w, &name, &planned, |t| {
            let key = &source[&t.name];
            let f = &files[owner[key].0];
            f.load(key, DType::F32, &Device::Cpu)?
                .ok_or_else(|| Error::Option(format!("{}: `{key}` vanished", f.path().display())))
        })?;
        w.flush().map_err(|source| Error::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })?;
    Ok(ConvertSummary {
        tensors: planned.len(),
        q8_0: planned.iter().filter(|t| t.ty == GgufType::Q8_0).count(),
        q4_k: planned.iter().filter(|t| t.ty == GgufType::Q4K).count(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
    })
}

// ------------------------------------------------------------ stable-diffusion.cpp's files
//
// stable-diffusion.cpp (github.com/leejet/stable-diffusion.cpp; read at commit 97d29908, and
// run as vendored in the PyPI sdist stable-diffusion-cpp-python 0.4.7, ggml 0.9.8, on the tiny
// fixture: `tests/data/sdcpp/`) converts checkpoints with
// `sd-cli -M convert -m IN -o OUT.gguf --type f32|f16|q8_0|q4_K|... [--convert-name]`:
// - names: kept as in the input file, unless `--convert-name` is given; then
//   `src/name_conversion.cpp::convert_tensor_name` renames them to its loader's names. For an
//   SGM (SDXL / SUPIR) file the UNet (`model.diffusion_model.`), the VAE
//   (`first_stage_model.`) and any other prefix keep the official names; the text encoders
//   move: `conditioner.embedders.0.` -> `cond_stage_model.` (CLIP-L, already in HF naming)
//   and `conditioner.embedders.1.model.` -> `cond_stage_model.1.` with OpenCLIP's names turned
//   into HF CLIP's (`convert_open_clip_to_hf_clip_name`; `in_proj` stays fused).
// - left out: what its loader never reads ([`sdcpp_unused`]: the text encoders' `position_ids`
//   and `logit_scale`, `denoiser.sigmas`, the DDPM schedule buffers, EMA counters).
// - types (`tensor_should_be_converted`): every tensor whose innermost dimension is a multiple
//   of the block size is converted, except biases (`.bias`), `.scale` tensors, the UNet's
//   `time_embed.` / `label_emb.` and anything named `embedding`; so the linear weights and the
//   norms' weight vectors are quantised, 3x3 and 1x1 convolutions (innermost dimension 3 or 1)
//   are not, and a layer not wide enough for the block keeps its type (no fallback to a smaller
//   block). The text encoders' linears are quantised too. What is not converted keeps the
//   input's type (an f16 bias stays f16 in a `--type f32` file). It decides on the converted
//   name: OpenCLIP's `attn.in_proj_bias` is quantised under its own name (it does not end in
//   `.bias`), kept as `in_proj.bias` with `--convert-name`.
// - the file: GGUF v3 without key-values (no `general.alignment`: 32), the tensors in an order
//   that changes from run to run (even with `-t 1`); names, types, shapes and bytes do not.
//   Q8_0 blocks are ggml's `quantize_row_q8_0_ref`, Q4_K blocks ggml's weighted `quantize_q4_K`
//   (an importance of 1 per column): both byte for byte ours.
//
// Our loader reads such files: a missing official key is looked up under its
// stable-diffusion.cpp name ([`sdcpp_name`]), block-quantised tensors that our layers hold in
// f32 / f16 (norms, text encoders) are dequantised, and Q8_0 / Q4_K linear weights of the
// diffusion networks keep their blocks. [`convert_sdcpp_style`] writes the same tensors with
// our writer (tested against files it wrote).

/// OpenCLIP text-model names and their HF CLIP names, as stable-diffusion.cpp renames them.
const OPEN_CLIP_TOP: [(&str, &str); 5] = [
    (
        "ln_final.bias",
        "transformer.text_model.final_layer_norm.bias",
    ),
    (
        "ln_final.weight",
        "transformer.text_model.final_layer_norm.weight",
    ),
    (
        "positional_embedding",
        "transformer.text_model.embeddings.position_embedding.weight",
    ),
    (
        "token_embedding.weight",
        "transformer.text_model.embeddings.token_embedding.weight",
    ),
    ("text_projection", "transformer.text_model.text_projection"),
];
const OPEN_CLIP_BLOCK: [(&str, &str); 12] = [
    ("attn.in_proj_bias", "self_attn.in_proj.bias"),
    ("attn.in_proj_weight", "self_attn.in_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
];

/// The name stable-diffusion.cpp's `--convert-name` gives the official SGM key `key`, when it
/// differs (the text encoders; see the notes above).
pub fn sdcpp_name(key: &str) -> Option<String> {
    if let Some(rest) = key.strip_prefix("conditioner.embedders.0.") {
        return Some(format!("cond_stage_model.{rest}"));
    }
    let rest = key.strip_prefix("conditioner.embedders.1.model.")?;
    if let Some((_, hf)) = OPEN_CLIP_TOP.iter().find(|(o, _)| *o == rest) {
        return Some(format!("cond_stage_model.1.{hf}"));
    }
    if let Some(block) = rest.strip_prefix("transformer.resblocks.") {
        if let Some((i, suffix)) = block.split_once('.') {
            if let Some((_, hf)) = OPEN_CLIP_BLOCK.iter().find(|(o, _)| *o == suffix) {
                return Some(format!(
                    "cond_stage_model.1.transformer.text_model.encoder.layers.{i}.{hf}"
                ));
            }
        }
    }
    Some(format!("cond_stage_model.1.model.{rest}"))
}

/// Whether stable-diffusion.cpp's loader (and so its converter) leaves the SGM key `key` out:
/// the text encoders' `position_ids` and `logit_scale`, `denoiser.sigmas`, the DDPM schedule
/// buffers but `alphas_cumprod`, `model_ema.` counters and its copy of the UNet.
pub fn sdcpp_unused(key: &str) -> bool {
    const UNUSED_PREFIXES: [&str; 15] = [
        "betas",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.0.model.logit_scale",
        "conditioner.embedders.1.model.logit_scale",
        "model_ema.decay",
        "model_ema.num_updates",
        "model_ema.diffusion_model",
        "denoiser.sigmas",
    ];
    UNUSED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The type stable-diffusion.cpp's `--type ty` converter stores the tensor it names `key` (shape
/// `shape`, outermost first, stored as `input` in the input file) in: `ty`, or `input` for what
/// it does not convert (see the notes above).
pub fn sdcpp_plan(key: &str, shape: &[usize], ty: GgufType, input: GgufType) -> GgufType {
    let block = match ty {
        GgufType::Q8_0 => q8::QK,
        GgufType::Q4K => q4k::QK_K,
        _ => 1,
    };
    let inner = shape.last().copied().unwrap_or(1);
    let kept = !inner.is_multiple_of(block)
        || key.ends_with(".bias")
        || key.ends_with(".scale")
        || key.ends_with(".weight_scale")
        || key.contains("time_embed.")
        || key.contains("label_emb.")
        || key.contains("embedding");
    if kept {
        input
    } else {
        ty
    }
}

/// Writes `inputs` as stable-diffusion.cpp's `-M convert --type ty [--convert-name]` does: the
/// same tensors ([`sdcpp_unused`] left out), names ([`sdcpp_name`] when `convert_name`) and
/// types ([`sdcpp_plan`]), from our writer and quantisers (its Q8_0 bytes; see the notes above
/// for Q4_K). Inputs in a float type other than f32 / f16 / bf16 are read as f32.
pub fn convert_sdcpp_style(
    inputs: &[impl AsRef<Path>],
    ty: GgufType,
    convert_name: bool,
    out: &Path,
) -> Result<ConvertSummary> {
    convert_planned(inputs, out, |k, meta| {
        if sdcpp_unused(k) {
            return None;
        }
        let name = if convert_name { sdcpp_name(k) } else { None };
        let name = name.unwrap_or_else(|| k.to_string());
        let input = match meta.dtype {
            DType::F16 => GgufType::F16,
            DType::BF16 => GgufType::BF16,
            _ => GgufType::F32,
        };
        // It decides on the converted name (`in_proj_bias` is `in_proj.bias` by then).
        let ty = sdcpp_plan(&name, &meta.shape, ty, input);
        Some((name, ty))
    })
}

/// The tensors of a GGUF file: ggml type, shape (outermost first) and absolute byte range.
#[derive(Debug)]
pub struct GgufIndex {
    pub tensors: HashMap<String, (GgmlDType, Vec<usize>, usize, usize)>,
}

/// A bounded reader over the header bytes: every length is checked against what is left
/// before anything is allocated.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end
            .ok_or_else(|| format!("header runs past the end of the file at byte {}", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count of items of at least `min_size` bytes each that must fit in the rest.
    fn count(&mut self, min_size: usize) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(format!(
                "count {n} at byte {} exceeds the file",
                self.pos - 8
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.count(1)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
    /// Skips a metadata value of type `ty`; returns it when it is an unsigned integer.
    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<Option<u64>, String> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            8 => {
                self.string()?;
                Ok(None)
            }
            9 => {
                if depth > 4 {
                    return Err("metadata arrays nested too deep".into());
                }
                let et = self.u32()?;
                let n = self.count(fixed(et).unwrap_or(8))?;
                for _ in 0..n {
                    self.value(et, depth + 1)?;
                }
                Ok(None)
            }
            t => {
                let size = fixed(t).ok_or_else(|| format!("unknown metadata type {t}"))?;
                let b = self.take(size)?;
                Ok(match t {
                    0 => Some(b[0] as u64),
                    2 => Some(u16::from_le_bytes([b[0], b[1]]) as u64),
                    4 => Some(u32::from_le_bytes(b.try_into().expect("4")) as u64),
                    10 => Some(u64::from_le_bytes(b.try_into().expect("8"))),
                    _ => None,
                })
            }
        }
    }
}

/// ggml's type numbers (`ggml.h`), for the types candle reads.
fn ggml_type(ty: u32) -> Option<GgmlDType> {
    use GgmlDType as G;
    Some(match ty {
        0 => G::F32,
        1 => G::F16,
        2 => G::Q4_0,
        3 => G::Q4_1,
        6 => G::Q5_0,
        7 => G::Q5_1,
        8 => G::Q8_0,
        9 => G::Q8_1,
        10 => G::Q2K,
        11 => G::Q3K,
        12 => G::Q4K,
        13 => G::Q5K,
        14 => G::Q6K,
        15 => G::Q8K,
        30 => G::BF16,
        _ => return None,
    })
}

impl GgufIndex {
    /// Reads the header of the GGUF file (v2 or v3) in `bytes` (named `path` in errors); every
    /// tensor must lie inside the file.
    pub fn read(bytes: &[u8], path: &Path) -> Result<Self> {
        Self::parse(bytes).map_err(|msg| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a readable GGUF file: {msg}"),
        })
    }

    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4)? != b"GGUF" {
            return Err("no GGUF magic".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("version {version} (2 and 3 are read)"));
        }
        let n_tensors = r.count(8 + 4 + 8 + 4 + 8)?;
        let n_kv = r.count(8 + 4 + 1)?;
        let mut alignment = ALIGNMENT as u64;
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            if key == "general.alignment" {
                alignment = v
                    .filter(|a| (1..=1 << 16).contains(a))
                    .ok_or("bad general.alignment")?;
            }
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 8 {
                return Err(format!("tensor `{name}` has {n_dims} dimensions"));
            }
            let mut dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            dims.reverse();
            let ty = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let data = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = HashMap::new();
        for (name, dims, ty, offset) in infos {
            let dtype = ggml_type(ty)
                .ok_or_else(|| format!("tensor `{name}` has unknown ggml type {ty}"))?;
            let elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let (bs, ts) = (dtype.block_size() as u64, dtype.type_size() as u64);
            let len = elems
                .filter(|e| e % bs == 0)
                .and_then(|e| (e / bs).checked_mul(ts))
                .ok_or_else(|| {
                    format!("tensor `{name}`: {dims:?} is not whole {bs}-value blocks")
                })?;
            let start = data.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() as u64 => {
                    let dims = dims.iter().map(|&d| d as usize).collect();
                    tensors.insert(name, (dtype, dims, s as usize, e as usize));
                }
                _ => {
                    return Err(format!(
                        "tensor `{name}` lies outside the file ({} bytes): truncated or corrupt",
                        bytes.len()
                    ))
                }
            }
        }
        Ok(Self { tensors })
    }

    /// The dtype a tensor dequantises to (f16 / bf16 / f32 for those types, f32 for block
    /// types).
    pub fn dtype(ty: GgmlDType) -> DType {
        match ty {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The raw blocks of tensor `key` when it is stored in a block type the linear layers
    /// run on (Q8_0, Q4_K).
    pub fn quantised_blocks<'a>(
        &self,
        bytes: &'a [u8],
        key: &str,
    ) -> Option<(crate::layers::Quant, &'a [u8])> {
        let (ty, _, s, e) = self.tensors.get(key)?;
        let quant = match ty {
            GgmlDType::Q8_0 => crate::layers::Quant::Q8_0,
            GgmlDType::Q4K => crate::layers::Quant::Q4K,
            _ => return None,
        };
        Some((quant, &bytes[*s..*e]))
    }

    /// Tensor `key` of the file `bytes`, dequantised; `None` when absent.
    pub fn load(&self, bytes: &[u8], key: &str) -> candle_core::Result<Option<Tensor>> {
        let Some((ty, dims, s, e)) = self.tensors.get(key) else {
            return Ok(None);
        };
        let raw = &bytes[*s..*e];
        let dims = dims.as_slice();
        let t = match ty {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let meta = crate::weights::TensorMeta {
                    dtype: Self::dtype(*ty),
                    shape: dims.to_vec(),
                };
                crate::weights::tensor_from_bytes(raw, &meta)?
            }
            _ => {
                // candle's block types read the bytes in place: copy them to an 8-aligned
                // buffer first (a file offset need not be aligned for them).
                let mut words = vec![0u64; raw.len().div_ceil(8)];
                // SAFETY: `words` holds at least `raw.len()` bytes.
                let aligned = unsafe {
                    std::ptr::copy_nonoverlapping(
                        raw.as_ptr(),
                        words.as_mut_ptr() as *mut u8,
                        raw.len(),
                    );
                    std::slice::from_raw_parts(words.as_ptr() as *const u8, raw.len())
                };
                let storage = QStorage::from_data(Cow::Borrowed(aligned), &Device::Cpu, *ty)?;
                QTensor::new(storage, dims)?.dequantize(&Device::Cpu)?
            }
        };
        Ok(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise;

    #[test]
    fn written_files_read_back_with_candle_and_our_index() {
        let w = test_noise(8 * 64, 1);
        let conv = test_noise(4 * 2 * 3 * 3, 2);
        let b = test_noise(8, 3);
        let items: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
            ("model.diffusion_model.a.weight", vec![8, 64], w.clone()),
            ("model.diffusion_model.a.bias", vec![8], b.clone()),
            (
                "model.diffusion_model.c.weight",
                vec![4, 2, 3, 3],
                conv.clone(),
            ),
            ("conditioner.t.weight", vec![8, 64], w.clone()),
        ];
        let prefixes = vec!["model.diffusion_model.".to_string()];
        let planned: Vec<PlannedTensor> = items
            .iter()
            .map(|(n, s, _)| PlannedTensor {
                name: n.to_string(),
                shape: s.clone(),
                ty: plan(n, s, GgufTarget::Q8_0, &prefixes),
            })
            .collect();
        let tys: Vec<GgufType> = planned.iter().map(|p| p.ty).collect();
        assert_eq!(
            tys,
            [GgufType::Q8_0, GgufType::F32, GgufType::F16, GgufType::F16]
        );
        let mut buf = Vec::new();
        write(&mut buf, "test", &planned, |p| {
            let (_, s, v) = items.iter().find(|i| i.0 == p.name).unwrap();
            Ok(Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu)?)
        })
        .unwrap();
        let index = GgufIndex::read(&buf, Path::new("t.gguf")).unwrap();
        assert_eq!(index.tensors.len(), 4);
        // The Q8_0 bytes are ggml's: candle's quantiser gives the same blocks.
        let (ty, dims, s, e) = &index.tensors["model.diffusion_model.a.weight"];
        assert_eq!((*ty, dims.as_slice()), (GgmlDType::Q8_0, &[8usize, 64][..]));
        let t = Tensor::from_vec(w.clone(), (8, 64), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert_eq!(&buf[*s..*e], &theirs.data().unwrap()[..]);
        // Values: exact for f32, f16-rounded for f16, within Q8_0's step for the linear.
        let get = |k: &str| {
            index
                .load(&buf, k)
                .unwrap()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(get("model.diffusion_model.a.bias"), b);
        let c = get("model.diffusion_model.c.weight");
        assert!(c.iter().zip(&conv).all(|(x, y)| (x - y).abs() <= 1e-3));
        let q = get("model.diffusion_model.a.weight");
        assert!(q.iter().zip(&w).all(|(x, y)| (x - y).abs() <= 1.0 / 127.0));
        assert!(index.load(&buf, "absent").unwrap().is_none());
        // Truncated: refused with the file named.
        let err = GgufIndex::read(&buf[..buf.len() - 40], Path::new("t.gguf")).unwrap_err();
        assert!(err.to_string().contains("t.gguf"), "{err}");
    }

    #[test]
    fn q4_k_files_hold_our_blocks_and_fall_back_to_q8_0() {
        let prefixes = vec!["m.".to_string()];
        let w = test_noise(4 * 512, 4);
        let items: Vec<(&str, Vec<usize>)> =
            vec![("m.a.weight", vec![4, 512]), ("m.b.weight", vec![4, 64])];
        let planned: Vec<PlannedTensor> = items
            .iter()
            .map(|(n, s)| PlannedTensor {
                name: n.to_string(),
                shape: s.clone(),
                ty: plan(n, s, GgufTarget::Q4K, &prefixes),
            })
            .collect();
        assert_eq!(planned[0].ty, GgufType::Q4K);
        assert_eq!(
            planned[1].ty,
            GgufType::Q8_0,
            "64 wide: not whole Q4_K blocks"
        );
        let mut buf = Vec::new();
        write(&mut buf, "t", &planned, |p| {
            let n: usize = p.shape.iter().product();
            Ok(Tensor::from_vec(
                w[..n].to_vec(),
                p.shape.as_slice(),
                &Device::Cpu,
            )?)
        })
        .unwrap();
        let index = GgufIndex::read(&buf, Path::new("t.gguf")).unwrap();
        let (ty, _, s, e) = &index.tensors["m.a.weight"];
        assert_eq!(*ty, GgmlDType::Q4K);
        let mut want = Vec::new();
        q4k::quantize_row_gguf(&w, &mut want);
        assert_eq!(&buf[*s..*e], &want[..]);
        let (quant, raw) = index.quantised_blocks(&buf, "m.a.weight").unwrap();
        assert_eq!((quant, raw.len()), (crate::layers::Quant::Q4K, 4 * 2 * 144));
        let back = index.load(&buf, "m.a.weight").unwrap().unwrap();
        let back = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, q4k::dequantize_gguf(raw));
    }

    #[test]
    fn stable_diffusion_cpp_names_and_types() {
        let k = "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight";
        let n = sdcpp_name(k).unwrap();
        assert_eq!(
            n,
            "cond_stage_model.1.transformer.text_model.encoder.layers.7.self_attn.in_proj.weight"
        );
        assert_eq!(
            sdcpp_name("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight")
                .unwrap(),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"
        );
        assert_eq!(
            sdcpp_name("conditioner.embedders.1.model.text_projection").unwrap(),
            "cond_stage_model.1.transformer.text_model.text_projection"
        );
        assert_eq!(sdcpp_name("model.diffusion_model.out.2.weight"), None);
        let (q, f16, f32) = (GgufType::Q8_0, GgufType::F16, GgufType::F32);
        assert_eq!(sdcpp_plan(&n, &[3840, 1280], q, f16), q);
        assert_eq!(
            sdcpp_plan("x.norm.weight", &[320], q, f32),
            q,
            "norm weights too"
        );
        // What it does not convert keeps the input's type.
        assert_eq!(sdcpp_plan("x.norm.bias", &[320], q, f32), f32);
        assert_eq!(sdcpp_plan("x.norm.bias", &[320], f32, f16), f16);
        assert_eq!(sdcpp_plan("c.weight", &[320, 320, 3, 3], q, f32), f32);
        assert_eq!(sdcpp_plan("c.weight", &[320, 320, 3, 3], f16, f32), f16);
        assert_eq!(
            sdcpp_plan("m.time_embed.0.weight", &[1280, 320], q, f16),
            f16
        );
        assert_eq!(
            sdcpp_plan("t.token_embedding.weight", &[49408, 768], q, f16),
            f16
        );
        // OpenCLIP's fused bias under its own name is no `.bias`.
        assert_eq!(sdcpp_plan("r.0.attn.in_proj_bias", &[3840], q, f16), q);
        // Q4_K: a 640-wide linear keeps its type (no fallback).
        assert_eq!(
            sdcpp_plan("a.to_q.weight", &[640, 640], GgufType::Q4K, f16),
            f16
        );
        assert_eq!(
            sdcpp_plan("a.to_k.weight", &[640, 2048], GgufType::Q4K, f16),
            GgufType::Q4K
        );
        assert!(sdcpp_unused("denoiser.sigmas"));
        assert!(sdcpp_unused("conditioner.embedders.1.model.logit_scale"));
        assert!(!sdcpp_unused("alphas_cumprod"));
        assert!(!sdcpp_unused("model.diffusion_model.out.2.weight"));
    }
}
