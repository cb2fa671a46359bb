//! Checkpoint loading: safetensors (memory-mapped) and PyTorch zip checkpoints (`.ckpt`/`.pth`,
//! optionally wrapping a `state_dict`), merged the way `SUPIR/util.py::create_SUPIR_model` merges
//! the SDXL base file and the SUPIR file: later files override and extend earlier ones.
//!
//! Tensors are read one at a time, converted once to the compute dtype, and the file pages they
//! came from are released, so a load needs about the weights' own size in memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;

use crate::{Error, Result};

/// Name and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// One checkpoint file, opened and indexed but not read.
pub struct Checkpoint {
    path: PathBuf,
    store: Store,
}

enum Store {
    /// Byte ranges are absolute offsets into the mapping.
    Safetensors {
        mmap: Mmap,
        index: HashMap<String, (TensorMeta, usize, usize)>,
    },
    Torch(candle_core::pickle::PthTensors),
    /// Tensors dequantised on load (Q8_0 and the other ggml types, f16, f32).
    Gguf {
        mmap: Mmap,
        index: crate::gguf::GgufIndex,
    },
}

/// On-disk format, from the file's first bytes (not its extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    TorchZip,
    Gguf,
}

fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens and indexes a checkpoint; fails with the file name on anything that is not a
    /// complete safetensors or PyTorch zip file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only; a file changed under us is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let format = sniff(&mmap).ok_or_else(|| {
            ckpt_err(
                path,
                "not a checkpoint: neither safetensors, a PyTorch zip archive nor GGUF",
            )
        })?;
        let store = match format {
            Format::Safetensors => {
                let index = index_safetensors(&mmap, path)?;
                Store::Safetensors { mmap, index }
            }
            Format::TorchZip => {
                drop(mmap);
                Store::Torch(open_torch(path)?)
            }
            Format::Gguf => {
                let index = crate::gguf::GgufIndex::read(&mmap, path)?;
                Store::Gguf { mmap, index }
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            store,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        match self.store {
            Store::Safetensors { .. } => Format::Safetensors,
            Store::Torch(_) => Format::TorchZip,
            Store::Gguf { .. } => Format::Gguf,
        }
    }

    /// Every stored tensor, sorted by name.
    pub fn tensors(&self) -> BTreeMap<String, TensorMeta> {
        match &self.store {
            Store::Safetensors { index, .. } => index
                .iter()
                .map(|(k, (m, _, _))| (k.clone(), m.clone()))
                .collect(),
            Store::Torch(p) => p
                .tensor_infos()
                .iter()
                .map(|(k, ti)| {
                    (
                        k.clone(),
                        TensorMeta {
                            dtype: ti.dtype,
                            shape: ti.layout.dims().to_vec(),
                        },
                    )
                })
                .collect(),
            Store::Gguf { index, .. } => index
                .tensors
                .iter()
                .map(|(k, (ty, shape, _, _))| {
                    (
                        k.clone(),
                        TensorMeta {
                            dtype: crate::gguf::GgufIndex::dtype(*ty),
                            shape: shape.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn meta(&self, key: &str) -> Option<TensorMeta> {
        match &self.store {
            Store::Safetensors { index, .. } => index.get(key).map(|(m, _, _)| m.clone()),
            Store::Torch(p) => p.tensor_infos().get(key).map(|ti| TensorMeta {
                dtype: ti.dtype,
                shape: ti.layout.dims().to_vec(),
            }),
            Store::Gguf { index, .. } => {
                index.tensors.get(key).map(|(ty, shape, _, _)| TensorMeta {
                    dtype: crate::gguf::GgufIndex::dtype(*ty),
                    shape: shape.clone(),
                })
            }
        }
    }

    /// Reads one tensor, converted to `dtype` on `dev`; `Ok(None)` when the key is absent.
    pub fn load(&self, key: &str, dtype: DType, dev: &Device) -> Result<Option<Tensor>> {
        let t = match &self.store {
            Store::Safetensors { mmap, index } => {
                let Some((meta, start, end)) = index.get(key) else {
                    return Ok(None);
                };
                let t = tensor_from_bytes(&mmap[*start..*end], meta)
                    .map_err(|e| ckpt_err(&self.path, format!("tensor `{key}`: {e}")))?;
                drop_pages(mmap, *start, *end);
                t
            }
            Store::Torch(p) => match p.get(key) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(ckpt_err(
                        &self.path,
                        format!("tensor `{key}` unreadable: {e}"),
                    ))
                }
            },
            Store::Gguf { mmap, index } => match index.load(mmap, key) {
                Ok(Some(t)) => {
                    if let Some((_, _, s, e)) = index.tensors.get(key) {
                        drop_pages(mmap, *s, *e);
                    }
                    t
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(ckpt_err(
                        &self.path,
                        format!("tensor `{key}` unreadable: {e}"),
                    ))
                }
            },
        };
        let t = t.to_dtype(dtype)?.to_device(dev)?;
        if let Store::Gguf { mmap, index } = &self.store {
            // Q8_0 / Q4_K linear weights keep the file's blocks (see `offer_gguf_blocks`).
            if let Some((quant, bytes)) = index.quantised_blocks(mmap, key) {
                crate::layers::offer_gguf_blocks(&t, quant, bytes);
                if let Some((_, _, s, e)) = index.tensors.get(key) {
                    drop_pages(mmap, *s, *e);
                }
            }
        }
        Ok(Some(t))
    }
}

/// Bytes `start..end` of the mapping were copied into a tensor: drops their pages from our
/// resident set.
fn drop_pages(mmap: &Mmap, start: usize, end: usize) {
    // SAFETY: a read-only file mapping; dropped pages are re-read on demand.
    unsafe {
        let _ = mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start);
    }
}

fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(b"GGUF") {
        return Some(Format::Gguf);
    }
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Some(Format::TorchZip);
    }
    if bytes.len() >= 9 {
        let n = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        if n > 1 && bytes[8] == b'{' {
            return Some(Format::Safetensors);
        }
    }
    None
}

fn index_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<HashMap<String, (TensorMeta, usize, usize)>> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        ckpt_err(
            path,
            format!("unreadable safetensors header (truncated or corrupt file?): {e}"),
        )
    })?;
    let data_start = 8 + header_len;
    let mut index = HashMap::new();
    for (name, info) in meta.tensors() {
        let dtype = st_dtype(info.dtype).ok_or_else(|| {
            ckpt_err(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", info.dtype),
            )
        })?;
        let (s, e) = (
            data_start + info.data_offsets.0,
            data_start + info.data_offsets.1,
        );
        let expected = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if e > bytes.len() || e < s || e - s != expected {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor `{name}` lies outside the file ({} bytes): the file is truncated or corrupt",
                    bytes.len()
                ),
            ));
        }
        index.insert(
            name.to_string(),
            (
                TensorMeta {
                    dtype,
                    shape: info.shape.clone(),
                },
                s,
                e,
            ),
        );
    }
    Ok(index)
}

/// Copies little-endian bytes into an aligned tensor of the stored dtype.
pub(crate) fn tensor_from_bytes(bytes: &[u8], meta: &TensorMeta) -> candle_core::Result<Tensor> {
    fn copy<T: candle_core::WithDType + Default + Clone>(
        bytes: &[u8],
        shape: &[usize],
    ) -> candle_core::Result<Tensor> {
        let n = bytes.len() / std::mem::size_of::<T>();
        let mut v = vec![T::default(); n];
        // SAFETY: `v` holds exactly `bytes.len()` bytes of plain-old-data `T`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len())
        };
        Tensor::from_vec(v, shape, &Device::Cpu)
    }
    let s = meta.shape.as_slice();
    match meta.dtype {
        DType::F16 => copy::<half::f16>(bytes, s),
        DType::BF16 => copy::<half::bf16>(bytes, s),
        DType::F32 => copy::<f32>(bytes, s),
        DType::F64 => copy::<f64>(bytes, s),
        DType::I64 => copy::<i64>(bytes, s),
        DType::I32 => copy::<i32>(bytes, s),
        DType::U32 => copy::<u32>(bytes, s),
        DType::U8 => copy::<u8>(bytes, s),
        d => candle_core::bail!("unsupported dtype {d:?}"),
    }
}

/// A torch zip checkpoint: a plain state dict, or one wrapped as `{"state_dict": ...}` (the
/// official SUPIR `.ckpt` files), as `SUPIR/util.py::load_state_dict` accepts, or as
/// `{"model": ...}` (RAM's `ram_swin_large_14m.pth`, read by `load_checkpoint_swinlarge`).
fn open_torch(path: &Path) -> Result<candle_core::pickle::PthTensors> {
    use candle_core::pickle::PthTensors;
    // candle's unpickler trusts the bytes (string lengths, memo copies, nesting, tensor
    // sizes); what it would allocate is bounded here first.
    let entries = torch_archive_precheck(path)?;
    let wrapped = ["state_dict", "model"].into_iter().find_map(|k| {
        PthTensors::new(path, Some(k))
            .ok()
            .filter(|t| !t.tensor_infos().is_empty())
    });
    let tensors = match wrapped {
        Some(t) => t,
        None => PthTensors::new(path, None).map_err(|e| {
            ckpt_err(
                path,
                format!("unreadable PyTorch checkpoint (truncated or corrupt?): {e}"),
            )
        })?,
    };
    if tensors.tensor_infos().is_empty() {
        return Err(ckpt_err(
            path,
            "PyTorch archive holds no tensors (not a state dict)",
        ));
    }
    for (name, ti) in tensors.tensor_infos() {
        let bytes = ti
            .layout
            .dims()
            .iter()
            .try_fold(ti.dtype.size_in_bytes() as u64, |a, &d| {
                a.checked_mul(d as u64)
            });
        let stored = entries.get(&ti.path).copied();
        match (bytes, stored) {
            (Some(b), Some(s)) if b <= s => {}
            (_, None) => {
                return Err(ckpt_err(
                    path,
                    format!("tensor `{name}`: its storage `{}` is not in the archive", ti.path),
                ))
            }
            (b, Some(s)) => {
                return Err(ckpt_err(
                    path,
                    format!(
                        "tensor `{name}` of shape {:?} needs {} bytes, its storage holds {s}: the file is truncated or corrupt",
                        ti.layout.dims(),
                        b.map_or("more than 2^64".to_string(), |b| b.to_string())
                    ),
                ))
            }
        }
    }
    Ok(tensors)
}

/// Largest `data.pkl` read (a full SDXL state dict's is a few MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Largest nesting of pickled values (state dicts nest a handful of levels).
const MAX_PICKLE_DEPTH: usize = 1000;
/// Largest deflate ratio accepted for an archive entry (deflate's own maximum is about 1032).
const MAX_DEFLATE_RATIO: u64 = 1100;

/// Checks a torch zip archive before candle's unpickler reads it: every `data.pkl` is scanned
/// opcode by opcode (the opcodes candle knows) for string lengths past the end of the data,
/// oversized integers, nesting deeper than [`MAX_PICKLE_DEPTH`] and memo copies that would
/// amplify the pickle beyond a small multiple of its size. Returns each entry's size, which
/// bounds the tensors read from it: stored entries fit in the file, deflated ones within
/// [`MAX_DEFLATE_RATIO`] of their compressed size.
fn torch_archive_precheck(path: &Path) -> Result<HashMap<String, u64>> {
    use std::io::Read;
    let corrupt = |msg: String| ckpt_err(path, format!("unreadable PyTorch checkpoint: {msg}"));
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| corrupt(format!("not a zip archive (truncated or corrupt?): {e}")))?;
    let mut sizes = HashMap::new();
    let mut pickles = Vec::new();
    for i in 0..zip.len() {
        let e = zip
            .by_index_raw(i)
            .map_err(|e| corrupt(format!("archive entry {i}: {e}")))?;
        let (size, csize) = (e.size(), e.compressed_size());
        let ok = match e.compression() {
            zip::CompressionMethod::Stored => size == csize && csize <= file_len,
            _ => csize <= file_len && size <= csize.saturating_mul(MAX_DEFLATE_RATIO),
        };
        if !ok {
            return Err(corrupt(format!(
                "archive entry `{}` claims {size} bytes from {csize} stored",
                e.name()
            )));
        }
        if e.name().ends_with("data.pkl") {
            pickles.push(i);
        }
        sizes.insert(e.name().to_string(), size);
    }
    for i in pickles {
        let mut e = zip
            .by_index(i)
            .map_err(|e| corrupt(format!("archive entry {i}: {e}")))?;
        let name = e.name().to_string();
        let mut buf = Vec::new();
        e.by_ref()
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| corrupt(format!("`{name}`: {e}")))?;
        if buf.len() as u64 > MAX_PICKLE_BYTES {
            return Err(corrupt(format!(
                "`{name}` is over {MAX_PICKLE_BYTES} bytes"
            )));
        }
        scan_pickle(&buf).map_err(|m| corrupt(format!("`{name}`: {m}")))?;
    }
    // candle names storages `<archive>/data/<key>` relative to the `data.pkl` folder: the
    // same strings as the archive's entry names.
    Ok(sizes)
}

/// Walks a pickle's opcodes tracking, per stack value, its nesting depth and an estimate of
/// its in-memory size (values, plus string bytes / 8), the way candle's `Stack` would build
/// them (memo puts and gets copy values). Stops quietly at anything candle itself refuses
/// (unknown opcode, stack underflow): those are candle's errors to report.
fn scan_pickle(b: &[u8]) -> std::result::Result<(), String> {
    #[derive(Clone, Copy)]
    enum V {
        Mark,
        Val { weight: u64, depth: usize },
    }
    let budget = 64 * b.len() as u64 + (1 << 20);
    let mut total = 0u64;
    let mut stack: Vec<V> = Vec::new();
    let mut memo: HashMap<u32, V> = HashMap::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Option<&[u8]> {
        let s = b.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(s)
    };
    let leaf = V::Val {
        weight: 1,
        depth: 1,
    };
    fn combine(vs: &[V]) -> V {
        let (mut w, mut d) = (1u64, 0usize);
        for v in vs {
            if let V::Val { weight, depth } = v {
                w = w.saturating_add(*weight);
                d = d.max(*depth);
            }
        }
        V::Val {
            weight: w,
            depth: d + 1,
        }
    }
    fn pop_n(stack: &mut Vec<V>, n: usize) -> Option<Vec<V>> {
        if stack.len() < n {
            return None;
        }
        Some(stack.split_off(stack.len() - n))
    }
    fn pop_mark(stack: &mut Vec<V>) -> Option<Vec<V>> {
        let m = stack.iter().rposition(|v| matches!(v, V::Mark))?;
        let vs = stack.split_off(m + 1);
        stack.pop();
        Some(vs)
    }
    while let Some(&op) = b.get(pos) {
        pos += 1;
        let pushed = match op {
            0x80 => {
                if take(&mut pos, 1).is_none() {
                    return Ok(());
                }
                None
            }
            b'c' => {
                let mut n = 0;
                for _ in 0..2 {
                    let Some(l) = b[pos..].iter().position(|&c| c == b'\n') else {
                        return Ok(());
                    };
                    n += l;
                    pos += l + 1;
                }
                Some(V::Val {
                    weight: 1 + n as u64 / 8,
                    depth: 1,
                })
            }
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                if take(&mut pos, n).is_none() {
                    return Ok(());
                }
                Some(leaf)
            }
            b'X' => {
                let Some(l) = take(&mut pos, 4) else {
                    return Ok(());
                };
                let len = u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize;
                if len > b.len() - pos {
                    return Err(format!(
                        "a string of {len} bytes at offset {pos} runs past the end of the pickle"
                    ));
                }
                pos += len;
                Some(V::Val {
                    weight: 1 + len as u64 / 8,
                    depth: 1,
                })
            }
            0x8a => {
                let Some(n) = take(&mut pos, 1) else {
                    return Ok(());
                };
                let n = n[0] as usize;
                if n > 8 {
                    return Err(format!("a {n}-byte integer (at most 8 are read)"));
                }
                if take(&mut pos, n).is_none() {
                    return Ok(());
                }
                Some(leaf)
            }
            0x88 | 0x89 | b'N' | b'}' | b'd' | b')' | b']' => Some(leaf),
            b'(' => Some(V::Mark),
            b'Q' => match stack.pop() {
                Some(v @ V::Val { .. }) => Some(combine(&[v])),
                _ => return Ok(()),
            },
            b't' | b'e' | b'u' => {
                let Some(mut vs) = pop_mark(&mut stack) else {
                    return Ok(());
                };
                if op != b't' {
                    let Some(c) = stack.pop() else {
                        return Ok(());
                    };
                    vs.push(c);
                }
                Some(combine(&vs))
            }
            0x85..=0x87 | b'a' | b's' | b'b' | b'R' | 0x81 => {
                let n = match op {
                    0x85 => 1,
                    0x86 | b'a' | b'b' | b'R' | 0x81 => 2,
                    _ => 3,
                };
                let Some(vs) = pop_n(&mut stack, n) else {
                    return Ok(());
                };
                Some(combine(&vs))
            }
            b'h' | b'j' | b'q' | b'r' => {
                let n = if matches!(op, b'h' | b'q') { 1 } else { 4 };
                let Some(a) = take(&mut pos, n) else {
                    return Ok(());
                };
                let mut id = [0u8; 4];
                id[..n].copy_from_slice(a);
                let id = u32::from_le_bytes(id);
                if matches!(op, b'h' | b'j') {
                    match memo.get(&id) {
                        Some(&v) => Some(v),
                        None => return Ok(()),
                    }
                } else {
                    let Some(&v) = stack.last() else {
                        return Ok(());
                    };
                    if let V::Val { weight, .. } = v {
                        total = total.saturating_add(weight);
                    }
                    memo.insert(id, v);
                    None
                }
            }
            b'.' => return Ok(()),
            _ => return Ok(()),
        };
        if let Some(v) = pushed {
            if let V::Val { weight, depth } = v {
                if depth > MAX_PICKLE_DEPTH {
                    return Err(format!("values nested over {MAX_PICKLE_DEPTH} deep"));
                }
                // A container built from stack values moves them (one new node); leaves and
                // memo gets are new memory.
                let built = matches!(
                    op,
                    b'Q' | b't' | b'e' | b'u' | 0x85..=0x87 | b'a' | b's' | b'b' | b'R' | 0x81
                );
                total = total.saturating_add(if built { 1 } else { weight });
                if total > budget {
                    return Err(format!(
                        "its values would take over {budget} units of memory ({} bytes of pickle): a memo-copy bomb?",
                        b.len()
                    ));
                }
            }
            stack.push(v);
        }
    }
    Ok(())
}

/// Several checkpoints seen as one state dict: a key in a later file overrides the same key in an
/// earlier one (SDXL base first, then the SUPIR file), as the official `strict=False` loads do.
/// Clones share the opened files.
#[derive(Clone)]
pub struct WeightSource {
    files: Arc<Vec<Checkpoint>>,
}

impl WeightSource {
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let files = paths
            .iter()
            .map(Checkpoint::open)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            files: Arc::new(files),
        })
    }

    pub fn files(&self) -> &[Checkpoint] {
        &self.files
    }

    /// The file that provides `key` (the last one holding it).
    fn provider(&self, key: &str) -> Option<(&Checkpoint, TensorMeta)> {
        self.files
            .iter()
            .rev()
            .find_map(|f| f.meta(key).map(|m| (f, m)))
    }

    /// `first_stage_model.denoise_encoder.*` falls back to `first_stage_model.encoder.*`: the
    /// official model initialises the denoise encoder as a copy of the encoder before loading.
    /// A key missing under its official name is also looked up under stable-diffusion.cpp's
    /// ([`crate::gguf::sdcpp_name`]).
    fn resolve(&self, key: &str) -> Option<(&Checkpoint, String, TensorMeta)> {
        if let Some((f, m)) = self.provider(key) {
            return Some((f, key.to_string(), m));
        }
        // stable-diffusion.cpp's names for the text encoders (its GGUF converter's).
        if let Some(alias) = crate::gguf::sdcpp_name(key) {
            if let Some((f, m)) = self.provider(&alias) {
                return Some((f, alias, m));
            }
        }
        let alias = key.strip_prefix("first_stage_model.denoise_encoder.")?;
        let alias = format!("first_stage_model.encoder.{alias}");
        self.provider(&alias).map(|(f, m)| (f, alias, m))
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn into_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }
}

impl WeightSource {
    /// [`WeightSource::resolve`], or the missing-key error (with the shape asked for, if any).
    fn resolved(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<(&Checkpoint, String, TensorMeta)> {
        self.resolve(name).ok_or_else(|| Error::MissingKey {
            key: name.to_string(),
            expected: expected.to_vec(),
            files: self.file_list(),
        })
    }

    /// The stored meta of `name`, checked against the shape a module asks for.
    fn checked(&self, name: &str, expected: &[usize]) -> Result<TensorMeta> {
        let (file, key, meta) = self.resolved(name, expected)?;
        if meta.shape != expected {
            return Err(Error::ShapeMismatch {
                path: file.path.clone(),
                key,
                expected: expected.to_vec(),
                actual: meta.shape,
            });
        }
        Ok(meta)
    }

    /// A var builder that checks every requested key and shape against the files without
    /// reading them: each tensor is a zero-stride view of one zero. Building a network on it
    /// validates the checkpoints for that network at no memory cost.
    pub fn into_checking_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(CheckOnly(self)), dtype, dev.clone())
    }
}

impl SimpleBackend for WeightSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.checked(name, s.dims())
            .map_err(candle_core::Error::wrap)?;
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (file, key, _) = self.resolved(name, &[]).map_err(candle_core::Error::wrap)?;
        match file.load(&key, dtype, dev) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => unreachable!("indexed key `{key}` vanished"),
            Err(e) => Err(candle_core::Error::wrap(e)),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// [`WeightSource::into_checking_var_builder`]'s backend.
struct CheckOnly(WeightSource);

impl SimpleBackend for CheckOnly {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .checked(name, s.dims())
            .map_err(candle_core::Error::wrap)?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (_, _, meta) = self
            .0
            .resolved(name, &[])
            .map_err(candle_core::Error::wrap)?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(meta.shape)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// A weight source that holds no data: every requested tensor is a zero-stride view of one
/// scalar, and every request is recorded. Builds the full-size model without allocating it, to
/// check which keys and shapes the model asks for.
/// Clones share one record.
#[derive(Default, Clone)]
pub struct ShapeSource {
    /// Shapes answered by `get_unchecked` (a module that reads its sizes off the weights).
    known: Arc<HashMap<String, Vec<usize>>>,
    requested: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    /// Keys asked for with a shape more than once (a module building a weight twice).
    repeated: Arc<Mutex<Vec<String>>>,
}

impl ShapeSource {
    /// `known` answers shape-less requests; all other requests are answered with the asked shape.
    pub fn new(known: HashMap<String, Vec<usize>>) -> Self {
        Self {
            known: Arc::new(known),
            requested: Arc::default(),
            repeated: Arc::default(),
        }
    }

    /// Every `(key, shape)` asked for so far.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.requested.lock().expect("poisoned").clone()
    }

    /// Keys requested with a shape more than once, in request order.
    pub fn repeated(&self) -> Vec<String> {
        self.repeated.lock().expect("poisoned").clone()
    }

    /// A var builder over this source (clone the source first to read the record afterwards).
    pub fn into_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }

    fn record(&self, name: &str, shape: &[usize]) {
        self.requested
            .lock()
            .expect("poisoned")
            .insert(name.to_string(), shape.to_vec());
    }
}

impl SimpleBackend for ShapeSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.requested.lock().expect("poisoned").contains_key(name) {
            self.repeated
                .lock()
                .expect("poisoned")
                .push(name.to_string());
        }
        self.record(name, s.dims());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(shape) = self.known.get(name) else {
            candle_core::bail!("shape-only source: no shape known for `{name}`")
        };
        self.record(name, shape);
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape.as_slice())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.known.is_empty() || self.known.contains_key(name)
    }
}

/// Seeded random weights for any requested key: builds a network of any size without a
/// checkpoint, for timing. Values are a unit-variance uniform draw (cheaper than a normal one;
/// the speed of the networks does not depend on it), scaled like trained weights:
/// - 1-D `*weight` (norm scales): `1 + 0.1 u`;
/// - other 1-D tensors (biases): `0.01 u`;
/// - N-D weights: `u / sqrt(fan_in)`, `fan_in` the product of all but the first dimension.
///
/// Each tensor's values depend on the seed and its key only, not on the order of requests.
/// Shape-less requests (`get_unchecked`, modules that read their sizes off the weights) are
/// answered from `known`, e.g. [`crate::inspect::full_size_keys`].
#[derive(Clone)]
pub struct RandomSource {
    known: Arc<HashMap<String, Vec<usize>>>,
    seed: u64,
}

/// Values drawn per independently seeded chunk: the result does not depend on thread count.
const RANDOM_CHUNK: usize = 1 << 20;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fills `out` with `offset + scale * u`, `u` uniform with unit variance, from `seed`.
fn fill_uniform(out: &mut [f32], seed: u64, offset: f32, scale: f32) {
    let mut state = seed;
    // Uniform on [-sqrt(3), sqrt(3)) has unit variance.
    let k = scale * 3f32.sqrt() / (1u64 << 31) as f32;
    for pair in out.chunks_mut(2) {
        let r = splitmix64(&mut state);
        for (i, v) in pair.iter_mut().enumerate() {
            let bits = (r >> (32 * i)) as u32;
            *v = offset + k * (bits as i64 - (1i64 << 31)) as f32;
        }
    }
}

impl RandomSource {
    /// `known` answers shape-less requests; `seed` selects the draw.
    pub fn new(known: HashMap<String, Vec<usize>>, seed: u64) -> Self {
        Self {
            known: Arc::new(known),
            seed,
        }
    }

    /// Over the full-size SUPIR-v0 key list.
    pub fn full_size(seed: u64) -> Self {
        Self::new(crate::inspect::full_size_keys().into_iter().collect(), seed)
    }

    /// A var builder over this source.
    pub fn into_var_builder(self, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, dev.clone())
    }

    /// The tensor for `name` at `shape`, in f32 on the CPU.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let (offset, scale) = match shape.len() {
            0 | 1 if name.ends_with("weight") => (1.0, 0.1),
            0 | 1 => (0.0, 0.01),
            _ => (
                0.0,
                1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(),
            ),
        };
        let base = self.seed ^ fnv1a(name);
        let mut data = vec![0f32; n];
        let chunks: Vec<(usize, &mut [f32])> = data.chunks_mut(RANDOM_CHUNK).enumerate().collect();
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        if chunks.len() <= 1 || threads <= 1 {
            for (i, c) in chunks {
                fill_uniform(
                    c,
                    base ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407),
                    offset,
                    scale,
                );
            }
        } else {
            let per = chunks.len().div_ceil(threads);
            let mut chunks = chunks;
            std::thread::scope(|s| {
                while !chunks.is_empty() {
                    let rest = chunks.split_off(per.min(chunks.len()));
                    let mine = std::mem::replace(&mut chunks, rest);
                    s.spawn(move || {
                        for (i, c) in mine {
                            let seed = base ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407);
                            fill_uniform(c, seed, offset, scale);
                        }
                    });
                }
            });
        }
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}

impl SimpleBackend for RandomSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(name, s.dims())?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(shape) = self.known.get(name) else {
            candle_core::bail!("random source: no shape known for `{name}`")
        };
        self.tensor(name, shape)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.known.contains_key(name)
    }
}
