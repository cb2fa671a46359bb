//! Reader for PyTorch's legacy (pre-1.6, non-zip) `torch.save` format, the format of the `alex.pth` linear
//! layers in the `lpips` wheel and of torchvision's `alexnet-owt-7be5be79.pth`.
//!
//! Layout (`torch.serialization._legacy_save`): five pickles in a row (the magic number
//! `0x1950a86a20f9469cfc6c`, the protocol version 1001, a system-info dict, the object itself with tensors as
//! `_rebuild_tensor_v2(persistent_id('storage', StorageType, key, location, numel, view), offset, size,
//! stride, ...)`, and the sorted list of storage keys), then for each key its element count as a
//! little-endian u64 followed by the raw little-endian elements. Only what state dicts use is understood.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memmap2::Mmap;

use crate::{Error, Result};

const MAGIC: u128 = 0x1950a86a20f9469cfc6c;

/// Whether `bytes` starts like a legacy torch file (protocol-2 pickle of the magic number).
pub fn is_legacy(bytes: &[u8]) -> bool {
    bytes.len() >= 14
        && bytes[..4] == [0x80, 0x02, 0x8a, 0x0a]
        && u128::from_le_bytes({
            let mut b = [0u8; 16];
            b[..10].copy_from_slice(&bytes[4..14]);
            b
        }) == MAGIC
}

/// A pickled value, as far as state dicts need.
#[derive(Debug, Clone)]
enum Obj {
    Mark,
    None,
    /// A bool or float (never needed by value).
    Scalar,
    Int(i128),
    Str(String),
    Tuple(Vec<Obj>),
    List(Vec<Obj>),
    Dict(Vec<(Obj, Obj)>),
    Global(String, String),
    PersId(Box<Obj>),
    Tensor(TensorRef),
    /// A call we do not interpret (its result is never a tensor).
    Other,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage_key: String,
    elem: Elem,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Elem {
    F32,
    F64,
    F16,
    BF16,
    Other(usize),
}

impl Elem {
    fn from_storage(name: &str) -> Elem {
        match name {
            "FloatStorage" => Elem::F32,
            "DoubleStorage" => Elem::F64,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::Other(8),
            "IntStorage" => Elem::Other(4),
            "ShortStorage" => Elem::Other(2),
            _ => Elem::Other(1),
        }
    }
    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
            Elem::F16 | Elem::BF16 => 2,
            Elem::Other(n) => n,
        }
    }
}

/// An opened legacy checkpoint: its float tensors by state-dict key, read on demand.
pub struct LegacyPth {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorRef>,
    /// Byte offset of each storage's first element.
    storages: HashMap<String, (usize, usize)>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.pos + n > self.buf.len() {
            return Err("truncated file".into());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.buf[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    /// Runs one pickle up to STOP and returns its value.
    fn pickle(&mut self) -> std::result::Result<Obj, String> {
        let mut stack: Vec<Obj> = Vec::new();
        let mut memo: HashMap<u32, Obj> = HashMap::new();
        let pop = |s: &mut Vec<Obj>| s.pop().ok_or_else(|| "pickle stack underflow".to_string());
        let pop_mark = |s: &mut Vec<Obj>| -> std::result::Result<Vec<Obj>, String> {
            let i = s
                .iter()
                .rposition(|o| matches!(o, Obj::Mark))
                .ok_or("pickle MARK missing")?;
            let items = s.split_off(i + 1);
            s.pop();
            Ok(items)
        };
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                b'.' => return pop(&mut stack),
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    stack.push(Obj::Global(m, n));
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    memo.insert(k, stack.last().ok_or("BINPUT on empty stack")?.clone());
                }
                b'r' => {
                    let k = self.u32()?;
                    memo.insert(k, stack.last().ok_or("BINPUT on empty stack")?.clone());
                }
                0x94 => {
                    let k = memo.len() as u32;
                    memo.insert(k, stack.last().ok_or("MEMOIZE on empty stack")?.clone());
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    stack.push(memo.get(&k).ok_or("BINGET of unknown memo")?.clone());
                }
                b'(' => stack.push(Obj::Mark),
                b')' => stack.push(Obj::Tuple(vec![])),
                b't' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = stack.split_off(stack.len() - n);
                    stack.push(Obj::Tuple(items));
                }
                b']' => stack.push(Obj::List(vec![])),
                b'l' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Obj::List(items));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![pop(&mut stack)?]
                    } else {
                        pop_mark(&mut stack)?
                    };
                    if let Some(Obj::List(l)) = stack.last_mut() {
                        l.extend(items);
                    }
                }
                b'}' => stack.push(Obj::Dict(vec![])),
                b'd' => {
                    let items = pop_mark(&mut stack)?;
                    stack.push(Obj::Dict(pairs(items)));
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = pop(&mut stack)?;
                        let k = pop(&mut stack)?;
                        vec![k, v]
                    } else {
                        pop_mark(&mut stack)?
                    };
                    if let Some(Obj::Dict(d)) = stack.last_mut() {
                        d.extend(pairs(items));
                    }
                }
                b'J' => stack.push(Obj::Int(self.u32()? as i32 as i128)),
                b'K' => stack.push(Obj::Int(self.u8()? as i128)),
                b'M' => stack.push(Obj::Int(self.u16()? as i128)),
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    if n > 16 {
                        return Err("integer too large".into());
                    }
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    stack.push(Obj::Int(v));
                }
                b'N' => stack.push(Obj::None),
                0x88 | 0x89 => stack.push(Obj::Scalar),
                b'G' => {
                    self.take(8)?;
                    stack.push(Obj::Scalar);
                }
                b'U' | b'T' | b'X' | 0x8c | b'B' | b'C' => {
                    let n = match op {
                        b'U' | 0x8c | b'C' => self.u8()? as usize,
                        _ => self.u32()? as usize,
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    stack.push(Obj::Str(s));
                }
                0x95 => {
                    self.take(8)?;
                }
                b'0' => {
                    pop(&mut stack)?;
                }
                b'1' => {
                    pop_mark(&mut stack)?;
                }
                b'2' => stack.push(stack.last().ok_or("DUP on empty stack")?.clone()),
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    stack.push(Obj::PersId(Box::new(pid)));
                }
                b'R' | 0x81 => {
                    let args = pop(&mut stack)?;
                    let func = pop(&mut stack)?;
                    stack.push(reduce(func, args)?);
                }
                b'b' => {
                    // BUILD sets attributes (a state dict's `_metadata`); nothing we need.
                    pop(&mut stack)?;
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }
}

fn pairs(items: Vec<Obj>) -> Vec<(Obj, Obj)> {
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

fn ints(o: &Obj) -> Option<Vec<usize>> {
    match o {
        Obj::Tuple(v) | Obj::List(v) => v
            .iter()
            .map(|x| match x {
                Obj::Int(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Applies the callables state dicts use: `OrderedDict()`, `_rebuild_tensor(_v2)`, `_rebuild_parameter`.
fn reduce(func: Obj, args: Obj) -> std::result::Result<Obj, String> {
    let Obj::Global(module, name) = &func else {
        return Ok(Obj::Other);
    };
    let args = match args {
        Obj::Tuple(a) => a,
        _ => return Ok(Obj::Other),
    };
    match (module.as_str(), name.as_str()) {
        // `OrderedDict()` filled by SETITEMS, or (older torch) `OrderedDict([[key, value], ...])`.
        ("collections", "OrderedDict") => Ok(Obj::Dict(match args.into_iter().next() {
            Some(Obj::List(items)) => items
                .into_iter()
                .filter_map(|kv| match kv {
                    Obj::List(mut kv) | Obj::Tuple(mut kv) if kv.len() == 2 => {
                        let v = kv.pop()?;
                        Some((kv.pop()?, v))
                    }
                    _ => None,
                })
                .collect(),
            _ => vec![],
        })),
        ("torch._utils", "_rebuild_parameter") => Ok(args.into_iter().next().unwrap_or(Obj::None)),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let bad = || format!("malformed {name} arguments");
            if args.len() < 4 {
                return Err(bad());
            }
            let Obj::PersId(pid) = &args[0] else {
                return Err(bad());
            };
            let Obj::Tuple(pid) = pid.as_ref() else {
                return Err(bad());
            };
            let (Some(Obj::Global(_, storage)), Some(Obj::Str(key))) = (pid.get(1), pid.get(2))
            else {
                return Err(bad());
            };
            let Obj::Int(offset) = args[1] else {
                return Err(bad());
            };
            Ok(Obj::Tensor(TensorRef {
                storage_key: key.clone(),
                elem: Elem::from_storage(storage),
                offset: offset as usize,
                size: ints(&args[2]).ok_or_else(bad)?,
                stride: ints(&args[3]).ok_or_else(bad)?,
            }))
        }
        _ => Ok(Obj::Other),
    }
}

impl LegacyPth {
    /// Opens and indexes a legacy checkpoint (a state dict, or a dict holding one under `state_dict`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("legacy torch file: {msg}"),
        };
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only mapping; a file changed under us is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !is_legacy(&mmap) {
            return Err(err("bad magic number".into()));
        }
        let mut r = Reader { buf: &mmap, pos: 0 };
        let mut header = Vec::new();
        for _ in 0..5 {
            header.push(r.pickle().map_err(&err)?);
        }
        let keys: Vec<String> = match &header[4] {
            Obj::List(l) => l
                .iter()
                .filter_map(|k| match k {
                    Obj::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => return Err(err("storage key list missing".into())),
        };
        let mut dict = match header.swap_remove(3) {
            Obj::Dict(d) => d,
            _ => return Err(err("the saved object is not a dict".into())),
        };
        if let Some(pos) = dict.iter().position(|(k, v)| {
            matches!(k, Obj::Str(s) if s == "state_dict") && matches!(v, Obj::Dict(_))
        }) {
            if let (_, Obj::Dict(inner)) = dict.swap_remove(pos) {
                dict = inner;
            }
        }
        let mut tensors = HashMap::new();
        for (k, v) in dict {
            if let (Obj::Str(k), Obj::Tensor(t)) = (k, v) {
                tensors.insert(k, t);
            }
        }
        let mut elem_of: HashMap<&str, usize> = HashMap::new();
        for t in tensors.values() {
            elem_of.insert(&t.storage_key, t.elem.size());
        }
        let mut storages = HashMap::new();
        let mut pos = r.pos;
        for key in &keys {
            let n = mmap
                .get(pos..pos + 8)
                .ok_or_else(|| err(format!("storage {key} truncated")))?;
            let numel = u64::from_le_bytes(n.try_into().unwrap()) as usize;
            let es = *elem_of.get(key.as_str()).unwrap_or(&1);
            pos += 8;
            storages.insert(key.clone(), (pos, numel));
            pos += numel * es;
            if pos > mmap.len() {
                return Err(err(format!("storage {key} truncated")));
            }
        }
        drop(elem_of);
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
            storages,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// State-dict keys of the tensors.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|k| k.as_str())
    }

    /// Shape of a stored tensor.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|t| t.size.as_slice())
    }

    /// Reads one tensor as f32 on `dev`; `None` if the key is absent.
    pub fn load(&self, key: &str, dev: &Device) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.get(key) else {
            return Ok(None);
        };
        let err = |msg: String| Error::Checkpoint {
            path: self.path.clone(),
            msg: format!("legacy torch file, tensor {key}: {msg}"),
        };
        let &(start, numel) = self
            .storages
            .get(&t.storage_key)
            .ok_or_else(|| err(format!("storage {} missing", t.storage_key)))?;
        let es = t.elem.size();
        let read = |i: usize| -> std::result::Result<f32, String> {
            if i >= numel {
                return Err("view outside its storage".into());
            }
            let b = &self.mmap[start + i * es..start + (i + 1) * es];
            Ok(match t.elem {
                Elem::F32 => f32::from_le_bytes(b.try_into().unwrap()),
                Elem::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
                Elem::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
                Elem::BF16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
                Elem::Other(_) => return Err("not a floating-point tensor".into()),
            })
        };
        let n: usize = t.size.iter().product();
        let mut data = Vec::with_capacity(n);
        let mut idx = vec![0usize; t.size.len()];
        for _ in 0..n {
            let off = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            data.push(read(off).map_err(&err)?);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(Some(Tensor::from_vec(data, t.size.clone(), dev)?))
    }
}
