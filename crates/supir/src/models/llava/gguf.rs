//! llama.cpp's LLaVA GGUF pair: the language model (`llama` architecture, any of candle's
//! quantised types, SentencePiece vocabulary in `tokenizer.ggml.*`) and the `mmproj` file
//! (`clip` architecture: CLIP tower and projector, as llama.cpp's
//! `convert_image_encoder_to_gguf.py --llava-projector` writes them).
//!
//! The decoder, [`QuantizedLlama`], is written here from candle's quantised pieces
//! (`quantized_var_builder`, `quantized_nn`, `QMatMul`, `rope_i`) because candle's
//! `quantized_llama::ModelWeights` takes token ids only: LLaVA needs to feed the prompt as
//! embeddings (the image features spliced in), and its layers are private. llama.cpp's
//! converter permutes the q/k rows for its interleaved RoPE, so the decoder applies `rope_i`
//! (as candle's quantized Llama does), which on the permuted rows is the Hugging Face rotation.
//!
//! The `mmproj` tower is the CLIP vision model with its last layer dropped (llama.cpp reads the
//! penultimate layer's output by computing one layer less: `clip.vision.block_count` is the
//! layer count minus one) and no post-layernorm; its tensors are renamed back to transformers' names (note the
//! converter's `mlp.fc1` -> `ffn_down`, `mlp.fc2` -> `ffn_up`) and built with candle's
//! `ClipVisionTransformer`, taking the last computed layer.
//!
//! Memory: candle 0.11 repacks Q4_K (and, with AVX-512, Q8_0) matrices into a tiled copy on
//! x86 at their first product and keeps both, so the pair needs about twice its file size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use candle_transformers::models::llama::{Config as LlamaConfig, LlamaEosToks};
use candle_transformers::models::llava::MMProjector;
use candle_transformers::quantized_nn::{linear_no_bias, Embedding, Linear, RmsNorm};
use candle_transformers::quantized_var_builder::VarBuilder as QVarBuilder;

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

struct QLayer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: RmsNorm,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// A LLaMA decoder over GGUF weights that takes input embeddings (see the module docs).
pub struct QuantizedLlama {
    embed: Embedding,
    layers: Vec<QLayer>,
    norm: RmsNorm,
    output: Linear,
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

impl QuantizedLlama {
    /// From an opened `llama` GGUF; also returns the config it read.
    fn load(path: &Path, dev: &Device) -> Result<(Self, LlamaConfig, LlavaTokenizer)> {
        let (content, _) = read_content(path)?;
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
        drop(content);
        let vb =
            QVarBuilder::from_gguf(path, dev).map_err(|e| gguf_err(path, super::map_candle(e)))?;
        let embed = ge(path, Embedding::new(vocab, hidden, vb.pp("token_embd")))?;
        let kv = head_dim * n_kv_head;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let b = vb.pp(format!("blk.{i}"));
            layers.push(QLayer {
                attn_norm: ge(path, RmsNorm::new(hidden, eps, b.pp("attn_norm")))?,
                wq: ge(path, linear_no_bias(hidden, hidden, b.pp("attn_q")))?,
                wk: ge(path, linear_no_bias(hidden, kv, b.pp("attn_k")))?,
                wv: ge(path, linear_no_bias(hidden, kv, b.pp("attn_v")))?,
                wo: ge(path, linear_no_bias(hidden, hidden, b.pp("attn_output")))?,
                ffn_norm: ge(path, RmsNorm::new(hidden, eps, b.pp("ffn_norm")))?,
                w_gate: ge(path, linear_no_bias(hidden, ffn, b.pp("ffn_gate")))?,
                w_up: ge(path, linear_no_bias(hidden, ffn, b.pp("ffn_up")))?,
                w_down: ge(path, linear_no_bias(ffn, hidden, b.pp("ffn_down")))?,
            });
        }
        let norm = ge(path, RmsNorm::new(hidden, eps, vb.pp("output_norm")))?;
        let tied = !vb.contains_key("output.weight");
        let output = if tied {
            ge(path, linear_no_bias(hidden, vocab, vb.pp("token_embd")))?
        } else {
            ge(path, linear_no_bias(hidden, vocab, vb.pp("output")))?
        };
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
        Ok(self.embed.forward(ids)?)
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
    let vision = ClipVisionConfig {
        embed_dim,
        activation: Activation::QuickGelu,
        intermediate_size: m.usize("clip.vision.feed_forward_length")?,
        num_hidden_layers: m.usize("clip.vision.block_count")?,
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
        // The converter dropped the layers after the one LLaVA reads: the last one computed.
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
pub fn load(pair: &GgufPair, _clip: Option<&Path>, dtype: DType, dev: &Device) -> Result<Llava> {
    let (llm, text, tokenizer) = QuantizedLlama::load(&pair.llm, dev)?;
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
