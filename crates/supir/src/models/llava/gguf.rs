//! llama.cpp's LLaVA GGUF pair: the language model (`llama` architecture, any of candle's
//! quantised types, SentencePiece vocabulary in `tokenizer.ggml.*`) and the `mmproj` file
//! (`clip` architecture: CLIP tower and projector, as llama.cpp's
//! `convert_image_encoder_to_gguf.py --llava-projector` writes them).
//!
//! The decoder, [`QuantizedLlama`], is written here (on candle's `rope_i` and, off the CPU,
//! its `QMatMul`) because candle's
//! `quantized_llama::ModelWeights` takes token ids only: LLaVA needs to feed the prompt as
//! embeddings (the image features spliced in), and its layers are private. llama.cpp's
//! converter permutes the q/k rows for its interleaved RoPE, so the decoder applies `rope_i`
//! (as candle's quantized Llama does), which on the permuted rows is the Hugging Face rotation.
//!
//! The `mmproj` tower is the CLIP vision model with its last layer dropped (llama.cpp reads the
//! penultimate layer's output by computing one layer less: `clip.vision.block_count` is the
//! layer count minus one), or, in newer files that keep every layer, computed up to the layer
//! `clip.vision.feature_layer` names; no post-layernorm; its tensors are renamed back to transformers' names (note the
//! converter's `mlp.fc1` -> `ffn_down`, `mlp.fc2` -> `ffn_up`) and built with candle's
//! `ClipVisionTransformer`, taking the last computed layer.
//!
//! Memory: on the CPU the decoder's matrices run on this crate's kernels
//! ([`DecoderKernels::Supir`]), which hold one copy of the file's Q4_K / Q8_0 blocks (Q4_K at
//! 4.75 bits per weight, the file's 4.5, with the scales unpacked); other quantised types
//! are requantised to Q8_0 at load. The token embedding stays as stored and is dequantised per
//! looked-up token. candle 0.11's `QMatMul` ([`DecoderKernels::Candle`], the path off the CPU)
//! repacks Q4_K, Q6_K and Q8_0 matrices into a tiled copy on x86 at their first product and
//! keeps both, so the pair needs about twice its file size there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use candle_transformers::models::llama::{Config as LlamaConfig, LlamaEosToks};
use candle_transformers::models::llava::MMProjector;
use candle_transformers::quantized_nn::RmsNorm;

use super::config::{Layout, LlavaConfig};
use super::preprocess::{ClipProcessorConfig, SizeSpec};
use super::sentencepiece::{Piece, PieceType, SentencePiece, SpOptions};
use super::tokenizer::LlavaTokenizer;
use super::{projector_config, Decoder, Llava};
use crate::{Error, Result};

/// The two files of a pair.
#[derive(Debug, Clone)]
pub struct GgufPair {
    pub llm: PathBuf,
    pub mmproj: PathBuf,
}

fn is_gguf(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn is_mmproj(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().contains("mmproj"))
}

impl GgufPair {
    /// `path` is an LLM `.gguf` (its `mmproj*.gguf` beside it) or a folder holding one LLM
    /// `.gguf` and one `mmproj*.gguf`. `None` when `path` holds no GGUF file.
    pub fn find(path: &Path) -> Result<Option<Self>> {
        let (dir, llm) = if is_gguf(path) {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                Some(path.to_path_buf()),
            )
        } else if path.is_dir() {
            (path.to_path_buf(), None)
        } else {
            return Ok(None);
        };
        let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| Error::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_gguf(p))
            .collect();
        ggufs.sort();
        if ggufs.is_empty() {
            return Ok(None);
        }
        let mmprojs: Vec<&PathBuf> = ggufs.iter().filter(|p| is_mmproj(p)).collect();
        let mmproj = match mmprojs.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(Error::NotFound {
                    path: dir.join("mmproj-model-f16.gguf"),
                    what: "the LLaVA GGUF pair's vision file (a `*mmproj*.gguf` beside the LLM)"
                        .into(),
                })
            }
            _ => {
                return Err(Error::Option(format!(
                    "{}: several mmproj GGUF files ({}); keep one per folder",
                    dir.display(),
                    mmprojs.len()
                )))
            }
        };
        let llm = match llm {
            Some(l) => l,
            None => {
                let llms: Vec<&PathBuf> = ggufs.iter().filter(|p| !is_mmproj(p)).collect();
                match llms.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(Error::NotFound {
                            path: dir.join("ggml-model-q4_k.gguf"),
                            what: "the LLaVA GGUF pair's language model".into(),
                        })
                    }
                    _ => {
                        return Err(Error::Option(format!(
                            "{}: several LLM GGUF files; give the one to use (--llava FILE.gguf)",
                            dir.display()
                        )))
                    }
                }
            }
        };
        Ok(Some(Self { llm, mmproj }))
    }
}

fn gguf_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// A candle result with the error naming the file.
fn ge<T>(path: &Path, r: candle_core::Result<T>) -> Result<T> {
    r.map_err(|e| gguf_err(path, super::map_candle(e)))
}

fn read_content(path: &Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let c = gguf_file::Content::read(&mut f).map_err(|e| gguf_err(path, super::map_candle(e)))?;
    Ok((c, f))
}

struct Meta<'a> {
    c: &'a gguf_file::Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, k: &str) -> Result<&gguf_file::Value> {
        self.c
            .metadata
            .get(k)
            .ok_or_else(|| gguf_err(self.path, format!("no metadata `{k}`")))
    }
    fn usize(&self, k: &str) -> Result<usize> {
        let v = self.get(k)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|e| gguf_err(self.path, format!("`{k}`: {}", super::map_candle(e))))
    }
    fn f32_or(&self, k: &str, d: f32) -> f32 {
        self.c
            .metadata
            .get(k)
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(d)
    }
    fn str(&self, k: &str) -> Option<&str> {
        self.c
            .metadata
            .get(k)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }
    fn bool_or(&self, k: &str, d: bool) -> bool {
        self.c
            .metadata
            .get(k)
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(d)
    }
    fn f32s(&self, k: &str) -> Result<Vec<f32>> {
        self.get(k)?
            .to_vec()
            .map_err(|e| gguf_err(self.path, format!("`{k}`: {}", super::map_candle(e))))?
            .iter()
            .map(|v| {
                v.to_f32()
                    .map_err(|e| gguf_err(self.path, format!("`{k}`: {}", super::map_candle(e))))
            })
            .collect()
    }
}

/// The LLM's vocabulary as the slow LLaMA tokenizer.
fn gguf_tokenizer(m: &Meta) -> Result<LlavaTokenizer> {
    if let Some(model) = m.str("tokenizer.ggml.model") {
        if model != "llama" {
            return Err(gguf_err(
                m.path,
                format!("tokenizer.ggml.model `{model}` (LLaVA-1.5 uses `llama`, SentencePiece)"),
            ));
        }
    }
    let tokens = m
        .get("tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| gguf_err(m.path, super::map_candle(e)))?;
    let scores = m.f32s("tokenizer.ggml.scores")?;
    let types = m
        .get("tokenizer.ggml.token_type")?
        .to_vec()
        .map_err(|e| gguf_err(m.path, super::map_candle(e)))?;
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(gguf_err(
            m.path,
            "tokens, scores and types differ in length",
        ));
    }
    let mut pieces = Vec::with_capacity(tokens.len());
    for ((t, s), k) in tokens.iter().zip(&scores).zip(types) {
        let piece = t
            .to_string()
            .map_err(|e| gguf_err(m.path, super::map_candle(e)))?
            .clone();
        let kind = k
            .to_i32()
            .map_err(|e| gguf_err(m.path, super::map_candle(e)))?;
        pieces.push(Piece {
            piece,
            score: *s,
            kind: PieceType::from_proto(kind as u64),
        });
    }
    let opts = SpOptions {
        add_dummy_prefix: m.bool_or("tokenizer.ggml.add_space_prefix", true),
        ..SpOptions::llama()
    };
    let sp = SentencePiece::from_pieces(pieces, opts).map_err(|e| gguf_err(m.path, e))?;
    let id = |k: &str| m.usize(k).ok().map(|x| x as u32);
    let bos = id("tokenizer.ggml.bos_token_id").or(sp.bos_id);
    let eos = id("tokenizer.ggml.eos_token_id").or(sp.eos_id);
    let add_bos = m.bool_or("tokenizer.ggml.add_bos_token", true);
    Ok(LlavaTokenizer::from_sentencepiece(sp, bos, eos, add_bos))
}

/// Which kernels a [`QuantizedLlama`] multiplies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecoderKernels {
    /// This crate's [`crate::layers::Linear`] (CPU): Q4_K and Q8_0 matrices keep the file's
    /// blocks, once, for [`crate::kernels::q4k`] / [`crate::kernels::q8`]; matrices of other
    /// quantised types (Q6_K in llama.cpp's `Q4_K_M` files, Q5_K, Q4_0, ...) are dequantised
    /// and requantised to Q8_0 at load (see [`REQUANT_Q8_REL_ERR`]); f32/f16/bf16 matrices
    /// stay as stored. The default on the CPU.
    #[default]
    Supir,
    /// candle's `QMatMul` on any device (the only choice off the CPU). On x86 candle 0.11
    /// keeps a second, repacked copy of Q4_K, Q6_K (prefill) and Q8_0 matrices at their first
    /// product, so the decoder needs about twice its file size.
    Candle,
}

/// Requantising another type's matrix to Q8_0 (one f16 scale `d = max|w| / 127` per 32
/// weights): the largest weight error relative to its block's largest |weight| is half a step
/// plus the f16 rounding of `d` over 127 steps, `(0.5 + 127 / 2048) / 127` (0.44 %); Q6_K's
/// own steps are 1/32 of a 16-weight sub-block's range, so this adds about a seventh of its
/// rounding. The unit test `requantised_types_match_candle` measures it on random weights.
pub const REQUANT_Q8_REL_ERR: f64 = (0.5 + 127.0 / 2048.0) / 127.0;

/// One of the decoder's matrices on the kernels [`DecoderKernels`] chose.
enum QLinear {
    Supir(crate::layers::Linear),
    Candle(QMatMul),
}

impl QLinear {
    /// `qt` (`[out, in]`) for `kernels`.
    fn new(qt: QTensor, kernels: DecoderKernels) -> candle_core::Result<Self> {
        use crate::layers::{Linear as L, Quant};
        if kernels == DecoderKernels::Candle {
            return Ok(Self::Candle(QMatMul::from_qtensor(qt)?));
        }
        let cpu = Device::Cpu;
        let (n, k) = qt.shape().dims2()?;
        let l = match qt.dtype() {
            GgmlDType::Q4K => L::from_gguf_blocks(Quant::Q4K, &qt.data()?, n, k, None)?,
            GgmlDType::Q8_0 => L::from_gguf_blocks(Quant::Q8_0, &qt.data()?, n, k, None)?,
            GgmlDType::F32 => L::new(qt.dequantize(&cpu)?, None),
            GgmlDType::F16 => L::new(qt.dequantize_f16(&cpu)?, None),
            GgmlDType::BF16 => L::new(qt.dequantize(&cpu)?.to_dtype(DType::BF16)?, None),
            _ if k.is_multiple_of(crate::kernels::q8::QK) => {
                let w = qt.dequantize(&cpu)?.flatten_all()?.to_vec1::<f32>()?;
                drop(qt);
                L::quantized(Quant::Q8_0, &w, n, k, None)?
            }
            _ => L::new(qt.dequantize(&cpu)?, None),
        };
        Ok(Self::Supir(l))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Supir(l) => l.forward(x),
            Self::Candle(q) => q.forward(x),
        }
    }
}

struct QLayer {
    attn_norm: RmsNorm,
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    wo: QLinear,
    ffn_norm: RmsNorm,
    w_gate: QLinear,
    w_up: QLinear,
    w_down: QLinear,
}

/// A LLaMA decoder over GGUF weights that takes input embeddings (see the module docs).
pub struct QuantizedLlama {
    /// The token embedding as stored (quantised rows are dequantised per looked-up token).
    embed: QTensor,
    layers: Vec<QLayer>,
    norm: RmsNorm,
    output: QLinear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hidden: usize,
    cos: Tensor,
    sin: Tensor,
}

/// The KV cache of one [`QuantizedLlama`] decoding.
pub struct QuantizedCache {
    kvs: Vec<Option<(Tensor, Tensor)>>,
}

/// Reads a GGUF file's tensors one at a time (each named in its errors).
struct Tensors<'a> {
    content: &'a gguf_file::Content,
    file: std::fs::File,
    path: &'a Path,
    dev: Device,
}

impl Tensors<'_> {
    fn get(&mut self, name: &str, dims: &[usize]) -> Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(gguf_err(self.path, format!("no tensor `{name}`")));
        }
        let t = self
            .content
            .tensor(&mut self.file, name, &self.dev)
            .map_err(|e| gguf_err(self.path, format!("{name}: {}", super::map_candle(e))))?;
        if t.shape().dims() != dims {
            return Err(gguf_err(
                self.path,
                format!("{name}: shape {:?}, expected {dims:?}", t.shape().dims()),
            ));
        }
        Ok(t)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, k: DecoderKernels) -> Result<QLinear> {
        let t = self.get(name, &[out, inp])?;
        QLinear::new(t, k)
            .map_err(|e| gguf_err(self.path, format!("{name}: {}", super::map_candle(e))))
    }

    fn norm(&mut self, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        let t = self.get(name, &[size])?;
        ge(self.path, RmsNorm::from_qtensor(t, eps))
    }
}

impl QuantizedLlama {
    /// From an opened `llama` GGUF; also returns the config it read. `kernels` is
    /// [`DecoderKernels::Candle`] off the CPU whatever is asked.
    fn load(
        path: &Path,
        dev: &Device,
        kernels: DecoderKernels,
    ) -> Result<(Self, LlamaConfig, LlavaTokenizer)> {
        let kernels = if dev.is_cpu() {
            kernels
        } else {
            DecoderKernels::Candle
        };
        let (content, file) = read_content(path)?;
        let m = Meta { c: &content, path };
        match m.str("general.architecture") {
            Some("llama") => {}
            other => {
                return Err(gguf_err(
                    path,
                    format!(
                        "architecture {other:?}: the LLaVA-1.5 language model must be `llama` \
                         (an mmproj file? its name must contain `mmproj`)"
                    ),
                ))
            }
        }
        let tokenizer = gguf_tokenizer(&m)?;
        let n_head = m.usize("llama.attention.head_count")?;
        let n_kv_head = m.usize("llama.attention.head_count_kv").unwrap_or(n_head);
        let n_layer = m.usize("llama.block_count")?;
        let hidden = m.usize("llama.embedding_length")?;
        let ffn = m.usize("llama.feed_forward_length")?;
        let ctx = m.usize("llama.context_length").unwrap_or(4096);
        let eps = m.f32_or("llama.attention.layer_norm_rms_epsilon", 1e-5) as f64;
        let theta = m.f32_or("llama.rope.freq_base", 10000.0);
        let head_dim = hidden / n_head;
        if m.usize("llama.rope.dimension_count").unwrap_or(head_dim) != head_dim {
            return Err(gguf_err(path, "partial RoPE is not supported"));
        }
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| gguf_err(path, "no tensor `token_embd.weight`"))?;
        let tied = !content.tensor_infos.contains_key("output.weight");
        let mut ts = Tensors {
            content: &content,
            file,
            path,
            dev: if kernels == DecoderKernels::Candle {
                dev.clone()
            } else {
                Device::Cpu
            },
        };
        let embed = ts.get("token_embd.weight", &[vocab, hidden])?;
        let kv = head_dim * n_kv_head;
        let k = kernels;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let b = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(QLayer {
                attn_norm: ts.norm(&b("attn_norm"), hidden, eps)?,
                wq: ts.linear(&b("attn_q"), hidden, hidden, k)?,
                wk: ts.linear(&b("attn_k"), kv, hidden, k)?,
                wv: ts.linear(&b("attn_v"), kv, hidden, k)?,
                wo: ts.linear(&b("attn_output"), hidden, hidden, k)?,
                ffn_norm: ts.norm(&b("ffn_norm"), hidden, eps)?,
                w_gate: ts.linear(&b("ffn_gate"), ffn, hidden, k)?,
                w_up: ts.linear(&b("ffn_up"), ffn, hidden, k)?,
                w_down: ts.linear(&b("ffn_down"), hidden, ffn, k)?,
            });
        }
        let norm = ts.norm("output_norm.weight", hidden, eps)?;
        let output = if tied {
            ts.linear("token_embd.weight", vocab, hidden, k)?
        } else {
            ts.linear("output.weight", vocab, hidden, k)?
        };
        drop(ts);
        drop(content);
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::new(inv, dev)?;
        let t = Tensor::arange(0u32, ctx as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((ctx, 1))?;
        let freqs = t.matmul(&inv.reshape((1, head_dim / 2))?)?;
        let cfg = LlamaConfig {
            hidden_size: hidden,
            intermediate_size: ffn,
            vocab_size: vocab,
            num_hidden_layers: n_layer,
            num_attention_heads: n_head,
            num_key_value_heads: n_kv_head,
            use_flash_attn: false,
            rms_norm_eps: eps,
            rope_theta: theta,
            bos_token_id: tokenizer.bos_id(),
            eos_token_id: tokenizer.eos_id().map(LlamaEosToks::Single),
            rope_scaling: None,
            max_position_embeddings: ctx,
            tie_word_embeddings: tied,
        };
        Ok((
            Self {
                embed,
                layers,
                norm,
                output,
                n_head,
                n_kv_head,
                head_dim,
                hidden,
                cos: freqs.cos()?,
                sin: freqs.sin()?,
            },
            cfg,
            tokenizer,
        ))
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let dev = ids.device().clone();
        Ok(self.embed.embedding(ids)?.to_device(&dev)?)
    }

    pub fn new_cache(&self) -> QuantizedCache {
        QuantizedCache {
            kvs: vec![None; self.layers.len()],
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    fn attention(
        &self,
        l: &QLayer,
        x: &Tensor,
        pos: usize,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let shape = |y: Tensor, heads: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = shape(l.wq.forward(x)?, self.n_head)?;
        let k = shape(l.wk.forward(x)?, self.n_kv_head)?;
        let v = shape(l.wv.forward(x)?, self.n_kv_head)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let rep = self.n_head / self.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, rep)?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = if t > 1 {
            let mask = candle_transformers::utils::build_causal_mask(t, pos, x.device())?
                .broadcast_as(att.shape())?;
            let neg = Tensor::new(f32::NEG_INFINITY, x.device())?.broadcast_as(att.shape())?;
            mask.where_cond(&neg, &att)?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, self.hidden))?;
        Ok(l.wo.forward(&y)?)
    }

    /// Logits `[1, V]` of the last position of `embeds` `[1, T, H]` starting at `pos`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        pos: usize,
        cache: &mut QuantizedCache,
    ) -> Result<Tensor> {
        let mut x = embeds.to_dtype(DType::F32)?;
        let t = x.dim(1)?;
        for (l, kv) in self.layers.iter().zip(cache.kvs.iter_mut()) {
            let h = self.attention(l, &l.attn_norm.forward(&x)?, pos, kv)?;
            x = (x + h)?;
            let n = l.ffn_norm.forward(&x)?;
            let g = candle_nn::ops::silu(&l.w_gate.forward(&n)?)?;
            let m = l.w_down.forward(&(g * l.w_up.forward(&n)?)?)?;
            x = (x + m)?;
        }
        let x = self.norm.forward(&x.narrow(1, t - 1, 1)?)?;
        Ok(self.output.forward(&x)?.squeeze(1)?.to_dtype(DType::F32)?)
    }
}

/// transformers' name of an `mmproj` tensor.
fn hf_name(gguf: &str) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("mm.") {
        return Some(format!("model.mm_projector.{rest}"));
    }
    let rest = gguf.strip_prefix("v.")?;
    let fixed = match rest {
        "class_embd" => Some("embeddings.class_embedding".to_string()),
        "patch_embd.weight" => Some("embeddings.patch_embedding.weight".into()),
        "position_embd.weight" => Some("embeddings.position_embedding.weight".into()),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(format!("vision_model.{f}"));
    }
    if let Some(s) = rest.strip_prefix("pre_ln.") {
        return Some(format!("vision_model.pre_layrnorm.{s}"));
    }
    if let Some(s) = rest.strip_prefix("post_ln.") {
        return Some(format!("vision_model.post_layernorm.{s}"));
    }
    let rest = rest.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_out" => "self_attn.out_proj",
        "ln1" => "layer_norm1",
        "ln2" => "layer_norm2",
        "ffn_down" => "mlp.fc1",
        "ffn_up" => "mlp.fc2",
        _ => return None,
    };
    Some(format!("vision_model.encoder.layers.{layer}.{hf}.{param}"))
}

/// `clip.vision.feature_layer`, when the file has it: the hidden state LLaVA reads, as
/// llama.cpp's clip.cpp counts them (0 is the encoder's input, `i` the output of layer `i`, so
/// LLaVA-1.5's `hidden_states[-2]` of 24 layers is 23). Newer converters keep every layer and
/// write this key; the tower then computes `i` layers and reads the last. One layer only
/// (several, concatenated, are Granite Vision's), within `1..=block_count`. The post-layernorm
/// is not applied (LLaVA reads a hidden state, taken before it).
fn feature_layer(m: &Meta, block_count: usize) -> Result<Option<usize>> {
    const KEY: &str = "clip.vision.feature_layer";
    let Some(v) = m.c.metadata.get(KEY) else {
        return Ok(None);
    };
    let bad = |msg: String| gguf_err(m.path, format!("`{KEY}`: {msg}"));
    let int = |v: &gguf_file::Value| -> Result<i64> {
        v.to_i32()
            .map(i64::from)
            .or_else(|_| v.to_u32().map(i64::from))
            .or_else(|_| v.to_i64())
            .or_else(|_| v.to_u64().map(|x| x as i64))
            .map_err(|_| bad(format!("{v:?} is not an integer")))
    };
    let values: Vec<i64> = match v {
        gguf_file::Value::Array(a) => a.iter().map(int).collect::<Result<_>>()?,
        v => vec![int(v)?],
    };
    match values.as_slice() {
        [i] if *i >= 1 && *i as usize <= block_count => Ok(Some(*i as usize)),
        [i] => Err(bad(format!(
            "layer {i} is outside 1..={block_count} (`clip.vision.block_count`)"
        ))),
        _ => Err(bad(format!(
            "{values:?}: several feature layers (concatenated, as Granite Vision's) are not \
             LLaVA-1.5's; one is supported"
        ))),
    }
}

/// The `mmproj` file: CLIP tower, projector, the vision config and the image processor.
fn load_mmproj(
    path: &Path,
    hidden: usize,
    dtype: DType,
    dev: &Device,
) -> Result<(
    ClipVisionTransformer,
    MMProjector,
    LlavaConfig,
    ClipProcessorConfig,
)> {
    let (content, mut file) = read_content(path)?;
    let m = Meta { c: &content, path };
    if m.str("general.architecture") != Some("clip") {
        return Err(gguf_err(
            path,
            format!(
                "architecture {:?}: an mmproj file must be `clip`",
                m.str("general.architecture")
            ),
        ));
    }
    if m.bool_or("clip.use_gelu", false) {
        return Err(gguf_err(
            path,
            "clip.use_gelu: CLIP ViT-L/14 uses quick_gelu",
        ));
    }
    if let Some(p) = m.str("clip.projector_type") {
        if p != "mlp" {
            return Err(gguf_err(
                path,
                format!("projector type `{p}` (LLaVA-1.5: mlp)"),
            ));
        }
    }
    let eps = m.f32_or("clip.vision.attention.layer_norm_epsilon", 1e-5);
    if (eps - 1e-5).abs() > 1e-9 {
        return Err(gguf_err(
            path,
            format!("layer_norm_epsilon {eps} (candle's CLIP: 1e-5)"),
        ));
    }
    let embed_dim = m.usize("clip.vision.embedding_length")?;
    let block_count = m.usize("clip.vision.block_count")?;
    // The layers to compute: all the file has (legacy converters dropped those after the one
    // LLaVA reads), or up to the one `clip.vision.feature_layer` names.
    let layers = feature_layer(&m, block_count)?.unwrap_or(block_count);
    let vision = ClipVisionConfig {
        embed_dim,
        activation: Activation::QuickGelu,
        intermediate_size: m.usize("clip.vision.feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: m.usize("clip.vision.attention.head_count")?,
        projection_dim: m.usize("clip.vision.projection_dim").unwrap_or(768),
        num_channels: 3,
        image_size: m.usize("clip.vision.image_size")?,
        patch_size: m.usize("clip.vision.patch_size")?,
    };
    let mean = m.f32s("clip.vision.image_mean")?;
    let std = m.f32s("clip.vision.image_std")?;
    if mean.len() != 3 || std.len() != 3 {
        return Err(gguf_err(path, "image_mean / image_std must have 3 values"));
    }
    let s = vision.image_size as u32;
    let processor = ClipProcessorConfig {
        size: SizeSpec::Shortest { shortest_edge: s },
        crop_size: SizeSpec::HeightWidth {
            height: s,
            width: s,
        },
        image_mean: [mean[0], mean[1], mean[2]],
        image_std: [std[0], std[1], std[2]],
        ..ClipProcessorConfig::default()
    };
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else {
            continue;
        };
        // Layers past the feature layer are not computed: not loaded either.
        let layer = hf
            .strip_prefix("vision_model.encoder.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        if layer.is_some_and(|i| i >= layers) {
            continue;
        }
        let t = content
            .tensor(&mut file, name, dev)
            .and_then(|q| q.dequantize(dev))
            .map_err(|e| gguf_err(path, format!("{name}: {}", super::map_candle(e))))?;
        tensors.insert(hf, t);
    }
    for (n, what) in [
        ("vision_model.embeddings.class_embedding", "v.class_embd"),
        ("model.mm_projector.0.weight", "mm.0.weight"),
        ("model.mm_projector.2.weight", "mm.2.weight"),
    ] {
        if !tensors.contains_key(n) {
            return Err(gguf_err(path, format!("no tensor `{what}`")));
        }
    }
    // The pooled output's norm is unused (dropped by the converter): neutral values.
    for (n, ones) in [("weight", true), ("bias", false)] {
        let k = format!("vision_model.post_layernorm.{n}");
        if let std::collections::hash_map::Entry::Vacant(slot) = tensors.entry(k) {
            slot.insert(if ones {
                Tensor::ones(embed_dim, DType::F32, dev)?
            } else {
                Tensor::zeros(embed_dim, DType::F32, dev)?
            });
        }
    }
    let cfg = LlavaConfig {
        layout: Layout::Original,
        text: LlamaConfig {
            hidden_size: hidden,
            ..candle_transformers::models::llama::Config::config_7b_v2(false)
        },
        mm_hidden_size: embed_dim,
        vision,
        // The converter dropped the layers after the one LLaVA reads, or `feature_layer`
        // limited the tower to it: the last one computed.
        select_layer: -1,
        keep_cls: false,
        projector_type: "mlp2x_gelu".into(),
    };
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, dev);
    let tower = ge(
        path,
        ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision),
    )?;
    let projector = ge(path, MMProjector::load(&vb, &projector_config(&cfg)))?;
    Ok((tower, projector, cfg, processor))
}

/// Loads a GGUF pair (the LLM computes in f32 over its quantised weights, the tower in f32;
/// `dtype` is the type the prompt embeddings are handed over in).
pub fn load(pair: &GgufPair, clip: Option<&Path>, dtype: DType, dev: &Device) -> Result<Llava> {
    load_with(pair, clip, dtype, dev, DecoderKernels::default())
}

/// [`load`] with the decoder's matrices on `kernels`.
pub fn load_with(
    pair: &GgufPair,
    _clip: Option<&Path>,
    dtype: DType,
    dev: &Device,
    kernels: DecoderKernels,
) -> Result<Llava> {
    let (llm, text, tokenizer) = QuantizedLlama::load(&pair.llm, dev, kernels)?;
    let (tower, projector, mut cfg, processor) =
        load_mmproj(&pair.mmproj, text.hidden_size, DType::F32, dev)?;
    let proj_out = projector
        .forward(&Tensor::zeros((1, 1, cfg.mm_hidden_size), DType::F32, dev)?)
        .map_err(|e| gguf_err(&pair.mmproj, super::map_candle(e)))?
        .dim(D::Minus1)?;
    if proj_out != text.hidden_size {
        return Err(gguf_err(
            &pair.mmproj,
            format!(
                "projects to width {proj_out}, the language model {} has width {}",
                pair.llm.display(),
                text.hidden_size
            ),
        ));
    }
    cfg.text = text;
    Ok(Llava::from_parts(
        tower,
        projector,
        Decoder::Quantized(llm),
        cfg,
        tokenizer,
        processor,
        dtype,
        dev,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(p)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        let d = d.max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let s = b.abs().unwrap().flatten_all().unwrap();
        d / s.max(0).unwrap().to_scalar::<f32>().unwrap() as f64
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The decoder on this crate's kernels against candle's `QMatMul` on the fixtures' f16
    /// and Q8_0 files: a 20-position prefill, then one decode step. f16: both are f32 sums of
    /// the same values (measured 5e-7 of the largest logit). Q8_0: the two quantise the
    /// activations differently (candle: f16 block scales, or one scale per 256 values where it
    /// repacks; here f32 scales per 32 values), so each is compared with the f16 file's
    /// logits (the values the Q8_0 file was quantised from), within the parity bound
    /// [`crate::parity::llava::GGUF_Q8_LOGITS_REL`], ours no further off than candle's.
    #[test]
    fn supir_kernels_match_candle_qmatmul() {
        let dev = Device::Cpu;
        let run = |path: &Path, k: DecoderKernels| -> Vec<Tensor> {
            let (m, cfg, _) = QuantizedLlama::load(path, &dev, k).unwrap();
            let h = cfg.hidden_size;
            let x = Tensor::from_vec(values(20 * h, 3), (1, 20, h), &dev).unwrap();
            let x1 = Tensor::from_vec(values(h, 4), (1, 1, h), &dev).unwrap();
            let mut cache = m.new_cache();
            let ids = Tensor::new(&[[1u32, 5, 300]], &dev).unwrap();
            vec![
                m.embed(&ids).unwrap(),
                m.forward_embeds(&x, 0, &mut cache).unwrap(),
                m.forward_embeds(&x1, 20, &mut cache).unwrap(),
            ]
        };
        for fx in ["llava-tiny", "llava-alt"] {
            let f16 = data(&format!("{fx}/gguf/llm-f16.gguf"));
            let q8 = data(&format!("{fx}/gguf/llm-q8_0.gguf"));
            let reference = run(&f16, DecoderKernels::Candle);
            let ours = run(&f16, DecoderKernels::Supir);
            assert_eq!(
                max_rel(&ours[0], &reference[0]),
                0.0,
                "{fx}: f16 embeddings"
            );
            for i in 1..3 {
                let r = max_rel(&ours[i], &reference[i]);
                eprintln!("{fx} f16 step {i}: ours vs candle {r:.2e}");
                assert!(r < 1e-5, "{fx} f16 step {i}: {r:.3e}");
            }
            let ours = run(&q8, DecoderKernels::Supir);
            let theirs = run(&q8, DecoderKernels::Candle);
            assert_eq!(max_rel(&ours[0], &theirs[0]), 0.0, "{fx}: q8_0 embeddings");
            for i in 1..3 {
                let (a, b) = (
                    max_rel(&ours[i], &reference[i]),
                    max_rel(&theirs[i], &reference[i]),
                );
                eprintln!("{fx} q8_0 step {i}: vs f16 ours {a:.2e}, candle {b:.2e}");
                assert!(
                    a < crate::parity::llava::GGUF_Q8_LOGITS_REL,
                    "{fx} step {i}: {a:.3e}"
                );
                assert!(a <= b * 2.0, "{fx} step {i}: ours {a:.3e}, candle {b:.3e}");
            }
        }
    }

    /// One matrix of each GGUF type on this crate's kernels and on candle's `QMatMul` (5 rows
    /// and 1 row) against the exact product. Q4_K and Q8_0 keep the blocks; Q6_K, Q5_K and Q4_0 are requantised to Q8_0: their weights move by at most
    /// [`REQUANT_Q8_REL_ERR`] of each 32-block's largest |weight| (measured 4.2e-3 to 4.3e-3),
    /// asserted here.
    #[test]
    fn requantised_types_match_candle() {
        let dev = Device::Cpu;
        let (n, k) = (64, 512);
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &dev).unwrap();
        // Errors of the product against the exact one on the file's values, relative to the
        // largest output: the activations' 8-bit quantisation dominates (candle: 2.7e-3 to
        // 4.6e-3; ours the same on Q4_K and Q8_0, up to 6.6e-3 with the requantised weights).
        for (dt, bound) in [
            (GgmlDType::Q4K, 1e-2),
            (GgmlDType::Q8_0, 1e-2),
            (GgmlDType::Q6K, 1.5e-2),
            (GgmlDType::Q5K, 1.5e-2),
            (GgmlDType::Q4_0, 1.5e-2),
            (GgmlDType::F16, 1e-5),
        ] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let stored = q.dequantize(&dev).unwrap();
            let data = q.data().unwrap().to_vec();
            let again = || {
                QTensor::new(
                    candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Borrowed(&data),
                        &dev,
                        dt,
                    )
                    .unwrap(),
                    (n, k),
                )
                .unwrap()
            };
            let ours = QLinear::new(again(), DecoderKernels::Supir).unwrap();
            let theirs = QLinear::new(again(), DecoderKernels::Candle).unwrap();
            if let QLinear::Supir(l) = &ours {
                if !matches!(dt, GgmlDType::Q4K | GgmlDType::Q8_0 | GgmlDType::F16) {
                    // The requantised weights against the file's values, per 32-block.
                    let got = ours_weights(l, n, k);
                    let want = stored.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let mut worst = 0f64;
                    for (g, s) in got.chunks(32).zip(want.chunks(32)) {
                        let amax = s.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                        for (a, b) in g.iter().zip(s) {
                            worst = worst.max((a - b).abs() as f64 / amax);
                        }
                    }
                    eprintln!("{dt:?} -> q8_0: weight err / block max {worst:.2e}");
                    assert!(worst <= REQUANT_Q8_REL_ERR, "{dt:?}: {worst:.3e}");
                }
            }
            for m in [5, 1] {
                let x = Tensor::from_vec(values(m * k, 7 + m as u32), (1, m, k), &dev).unwrap();
                let exact = x.broadcast_matmul(&stored.t().unwrap()).unwrap();
                let a = max_rel(&ours.forward(&x).unwrap(), &exact);
                let b = max_rel(&theirs.forward(&x).unwrap(), &exact);
                eprintln!("{dt:?} m={m}: max err / max |y| ours {a:.2e}, candle {b:.2e}");
                assert!(a < bound, "{dt:?} m={m}: {a:.3e} >= {bound:.0e}");
            }
        }
    }

    /// The weights a Linear holds, through products with the identity.
    fn ours_weights(l: &crate::layers::Linear, n: usize, k: usize) -> Vec<f32> {
        // Dequantised exactly: Q8_0 blocks times one-hot rows (the activation quantisation
        // of a one-hot row is exact).
        let eye = Tensor::eye(k, DType::F32, &Device::Cpu).unwrap();
        let wt = l.forward(&eye).unwrap(); // [k, n] = Wᵀ
        wt.t()
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .take(n * k)
            .collect()
    }
}
