//! Reader for ncnn models (`.param` text graph + `.bin` weights), limited to what convolutional
//! networks such as RRDBNet need: the `Convolution` layers' weights, in graph order.
//!
//! `.bin` layout: for each layer with weights, in `.param` order, its blobs back to back. A
//! convolution stores its kernel `[out, in, kh, kw]` behind a 4-byte tag (fp16, or raw f32 when the
//! tag is 0), then, when `bias_term` is set, `out` raw f32 biases with no tag.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::f16;

use crate::{Error, Result};

const MAGIC: &str = "7767517";
const TAG_FP16: u32 = 0x0130_6B47;
const TAG_RAW_F32: u32 = 0;

/// Layer types that carry no weights in `.bin`; any other type besides `Convolution` is refused.
const WEIGHTLESS: &[&str] = &[
    "Input",
    "Split",
    "Concat",
    "Eltwise",
    "BinaryOp",
    "Interp",
    "ReLU",
    "Sigmoid",
    "Crop",
    "Padding",
    "Slice",
    "Reshape",
    "Permute",
    "Noop",
    "Pooling",
    "PixelShuffle",
    "UnaryOp",
];

/// Fused activation of an ncnn layer (`9=activation_type`, `10=activation_params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    None,
    Relu,
    /// Leaky ReLU with this negative slope.
    LeakyRelu(f32),
    Other(i32),
}

/// Storage precision of a blob in `.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobType {
    F16,
    F32,
}

/// One `Convolution` layer with its weights as stored (no precision lost: `weight` holds the
/// values the file encodes, `weight_type` how it encodes them).
#[derive(Debug, Clone)]
pub struct Conv {
    pub name: String,
    pub out_channels: usize,
    pub in_channels: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    pub pad: usize,
    pub activation: Activation,
    pub weight_type: BlobType,
    /// `[out, in, kh, kw]`, row-major.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl Conv {
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel.0,
            self.kernel.1,
        ]
    }
}

/// Integer and float-array parameters of one `.param` line.
struct Params {
    ints: HashMap<i32, f64>,
    arrays: HashMap<i32, Vec<f64>>,
}

impl Params {
    fn parse(fields: &[&str], path: &Path, line: usize) -> Result<Self> {
        let bad = |f: &str| Error::Ncnn {
            path: path.to_path_buf(),
            msg: format!("line {line}: bad parameter `{f}`"),
        };
        let mut ints = HashMap::new();
        let mut arrays = HashMap::new();
        for f in fields {
            let (k, v) = f.split_once('=').ok_or_else(|| bad(f))?;
            let k: i32 = k.parse().map_err(|_| bad(f))?;
            if k <= -23300 {
                let mut it = v.split(',');
                let n: usize = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| bad(f))?;
                let vals = it
                    .map(|x| x.parse::<f64>().map_err(|_| bad(f)))
                    .collect::<Result<Vec<_>>>()?;
                if vals.len() != n {
                    return Err(bad(f));
                }
                arrays.insert(-k - 23300, vals);
            } else {
                ints.insert(k, v.parse::<f64>().map_err(|_| bad(f))?);
            }
        }
        Ok(Self { ints, arrays })
    }

    fn int(&self, k: i32, default: usize) -> usize {
        self.ints.get(&k).map_or(default, |&v| v as usize)
    }
}

/// Reads every `Convolution` of `param`/`bin`, in graph order, checking that the `.bin` is consumed
/// exactly.
pub fn read_convolutions(param: &Path, bin: &Path) -> Result<Vec<Conv>> {
    let text = std::fs::read_to_string(param).map_err(|source| Error::Io {
        path: param.to_path_buf(),
        source,
    })?;
    let data = std::fs::read(bin).map_err(|source| Error::Io {
        path: bin.to_path_buf(),
        source,
    })?;
    let perr = |msg: String| Error::Ncnn {
        path: param.to_path_buf(),
        msg,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        Some((_, l)) if l.trim() == MAGIC => {}
        _ => return Err(perr(format!("not an ncnn param file (no {MAGIC} magic)"))),
    }
    lines
        .next()
        .ok_or_else(|| perr("missing layer/blob counts".into()))?;

    let mut reader = BinReader {
        data: &data,
        pos: 0,
        path: bin.to_path_buf(),
    };
    let mut convs = Vec::new();
    for (i, line) in lines {
        let lineno = i + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 {
            return Err(perr(format!("line {lineno}: truncated layer line")));
        }
        let (kind, name) = (fields[0], fields[1]);
        let counts: Option<(usize, usize)> = fields[2].parse().ok().zip(fields[3].parse().ok());
        let (bottoms, tops) =
            counts.ok_or_else(|| perr(format!("line {lineno}: bad blob counts")))?;
        let first_param = bottoms.checked_add(tops).and_then(|n| n.checked_add(4));
        let Some(first_param) = first_param.filter(|&n| n <= fields.len()) else {
            return Err(perr(format!("line {lineno}: missing blob names")));
        };
        let params = Params::parse(&fields[first_param..], param, lineno)?;
        match kind {
            "Convolution" => convs.push(read_conv(name, &params, &mut reader, lineno)?),
            k if WEIGHTLESS.contains(&k) => {}
            k => {
                return Err(perr(format!(
                    "line {lineno}: layer type `{k}` ({name}) is not supported"
                )))
            }
        }
    }
    if reader.pos != data.len() {
        return Err(Error::Ncnn {
            path: bin.to_path_buf(),
            msg: format!(
                "{} bytes left after the last layer: the .bin does not match the .param",
                data.len() - reader.pos
            ),
        });
    }
    Ok(convs)
}

fn read_conv(name: &str, p: &Params, r: &mut BinReader, line: usize) -> Result<Conv> {
    let out_channels = p.int(0, 0);
    let kw = p.int(1, 0);
    let kh = p.int(11, kw);
    let dw = p.int(2, 1);
    let sw = p.int(3, 1);
    let pad = p.int(4, 0);
    let bias_term = p.int(5, 0) != 0;
    let weight_size = p.int(6, 0);
    let activation = match p.int(9, 0) {
        0 => Activation::None,
        1 => Activation::Relu,
        2 => Activation::LeakyRelu(
            p.arrays
                .get(&10)
                .and_then(|a| a.first())
                .map_or(0.0, |&v| v as f32),
        ),
        t => Activation::Other(t as i32),
    };
    let per_in = out_channels
        .checked_mul(kh)
        .and_then(|n| n.checked_mul(kw))
        .unwrap_or(0);
    if per_in == 0 || !weight_size.is_multiple_of(per_in) {
        return Err(Error::Ncnn {
            path: r.path.clone(),
            msg: format!("line {line}: {name}: weight size {weight_size} is not out*kh*kw*in"),
        });
    }
    let (weight_type, weight) = r.tagged(weight_size, name)?;
    let bias = if bias_term {
        Some(r.raw_f32(out_channels, name)?)
    } else {
        None
    };
    Ok(Conv {
        name: name.to_string(),
        out_channels,
        in_channels: weight_size / per_in,
        kernel: (kh, kw),
        stride: (p.int(13, sw), sw),
        dilation: (p.int(12, dw), dw),
        pad,
        activation,
        weight_type,
        weight,
        bias,
    })
}

struct BinReader<'a> {
    data: &'a [u8],
    pos: usize,
    path: PathBuf,
}

impl BinReader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.pos.saturating_add(n);
        if end > self.data.len() {
            return Err(Error::Ncnn {
                path: self.path.clone(),
                msg: format!(
                    "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                    self.pos,
                    self.data.len()
                ),
            });
        }
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A blob behind a 4-byte storage tag: fp16 (padded to 4 bytes) or raw f32.
    fn tagged(&mut self, n: usize, what: &str) -> Result<(BlobType, Vec<f32>)> {
        let tag = u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes"));
        match tag {
            TAG_FP16 => {
                let bytes = self.take(n.saturating_mul(2).div_ceil(4).saturating_mul(4), what)?;
                let v = bytes[..n * 2]
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect();
                Ok((BlobType::F16, v))
            }
            TAG_RAW_F32 => Ok((BlobType::F32, self.raw_f32(n, what)?)),
            t => Err(Error::Ncnn {
                path: self.path.clone(),
                msg: format!(
                    "{what}: unsupported weight storage tag {t:#010x} (int8 or quantized models are not supported)"
                ),
            }),
        }
    }

    fn raw_f32(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        Ok(self
            .take(n.saturating_mul(4), what)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("supir-ncnn-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Two convolutions: an fp16 3x3 with bias and leaky ReLU, then a raw-f32 1x1 without bias.
    fn model() -> (String, Vec<u8>) {
        let param = "7767517\n4 4\n\
            Input in 0 1 data\n\
            Convolution c0 1 1 data a 0=2 1=3 4=1 5=1 6=18 9=2 -23310=1,2.000000e-01\n\
            Interp up 1 1 a b 0=1 1=2.0 2=2.0\n\
            Convolution c1 1 1 b out 0=1 1=1 6=2\n";
        let mut bin = TAG_FP16.to_le_bytes().to_vec();
        for i in 0..18 {
            bin.extend(f16::from_f32(i as f32 * 0.5).to_le_bytes());
        }
        // 18 halves = 36 bytes: already 4-aligned.
        bin.extend(1.5f32.to_le_bytes());
        bin.extend((-2.0f32).to_le_bytes());
        bin.extend(0u32.to_le_bytes());
        bin.extend(0.25f32.to_le_bytes());
        bin.extend(4.0f32.to_le_bytes());
        (param.to_string(), bin)
    }

    #[test]
    fn reads_fp16_and_raw_convolutions() {
        let d = tmpdir("ok");
        let (param, bin) = model();
        let convs = read_convolutions(
            &write(&d, "m.param", param.as_bytes()),
            &write(&d, "m.bin", &bin),
        )
        .unwrap();
        assert_eq!(convs.len(), 2);
        let c0 = &convs[0];
        assert_eq!(c0.weight_shape(), [2, 1, 3, 3]);
        assert_eq!(c0.pad, 1);
        assert_eq!(c0.activation, Activation::LeakyRelu(0.2));
        assert_eq!(c0.weight_type, BlobType::F16);
        assert_eq!(c0.weight[17], 8.5);
        assert_eq!(c0.bias.as_deref(), Some(&[1.5, -2.0][..]));
        let c1 = &convs[1];
        assert_eq!(c1.weight_shape(), [1, 2, 1, 1]);
        assert_eq!(c1.weight_type, BlobType::F32);
        assert_eq!(c1.weight, vec![0.25, 4.0]);
        assert!(c1.bias.is_none());
        assert_eq!(c1.activation, Activation::None);
    }

    #[test]
    fn rejects_truncated_and_oversized_bin() {
        let d = tmpdir("bad");
        let (param, bin) = model();
        let p = write(&d, "m.param", param.as_bytes());
        let short = write(&d, "short.bin", &bin[..bin.len() - 3]);
        let err = read_convolutions(&p, &short).unwrap_err().to_string();
        assert!(
            err.contains("short.bin") && err.contains("truncated"),
            "{err}"
        );
        let mut long = bin.clone();
        long.extend([0u8; 8]);
        let long = write(&d, "long.bin", &long);
        let err = read_convolutions(&p, &long).unwrap_err().to_string();
        assert!(err.contains("8 bytes left"), "{err}");
        let not_param = write(&d, "x.param", b"hello\n");
        let err = read_convolutions(&not_param, &short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
