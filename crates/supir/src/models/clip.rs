//! The two SDXL text transformers, with the official checkpoints' key layouts.
//!
//! - [`ClipTextTransformer`]: HF `CLIPTextModel.text_model` (CLIP ViT-L/14 in SDXL, OpenCLIP-H
//!   in SD-2 / SeeSR), keys `embeddings.{token_embedding,position_embedding}.weight`,
//!   `encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}`,
//!   `final_layer_norm`. Pre-LN blocks, causal mask, no padding mask, `hidden_act` from the
//!   config (quick_gelu for CLIP-L, exact gelu for SD-2); sizes from the weights
//!   ([`ClipTextConfig::from_weights`]) or from a HF `config.json`
//!   ([`ClipTextConfig::from_hf_config`]).
//! - [`OpenClipTextTransformer`]: the text tower of open_clip's `CLIP` (ViT-bigG-14), keys
//!   `token_embedding.weight`, `positional_embedding`,
//!   `transformer.resblocks.N.{ln_1,attn.in_proj_weight/bias,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`,
//!   `ln_final`, `text_projection`. Pre-LN blocks, causal mask, exact (erf) gelu.
//!
//! Sizes: width, depth, MLP width, sequence length and projection width are read from the
//! weights' shapes ([`ClipTextConfig::from_weights`], [`OpenClipTextConfig::from_weights`]).
//! The head count is not visible in the weights; it comes from the known architectures:
//! CLIP ViT-L/14 (width 768) has 12 heads, OpenCLIP `ViT-L-14` 12, `ViT-H-14` 16 and
//! `ViT-bigG-14` 20 (64 channels per head). Any other model (such as the reference generator's
//! tiny test encoders, arch `tiny-openclip`) gets 2 heads, the generator's convention.

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};

use crate::layers::{LayerNorm, Linear};

fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    LayerNorm::load(vb, dim, eps)
}

fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::load(vb, in_dim, out_dim, true)
}

/// Both encoders use the CLIP BPE vocabulary.
pub const VOCAB_SIZE: usize = 49_408;
/// Every LayerNorm of both encoders. transformers 4.25's `CLIPTextTransformer` builds its
/// LayerNorms with torch's default eps (1e-5) and ignores `config.layer_norm_eps`.
const LAYER_NORM_EPS: f64 = 1e-5;
/// Heads of any encoder that is not a known architecture (the reference generator's tiny ones).
pub const FALLBACK_HEADS: usize = 2;

/// Causal additive mask `[t, t]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), dev)?.to_dtype(dtype)
}

/// Multi-head attention on `[b, t, c]` given the projected q, k, v:
/// `softmax(q k^T / sqrt(d) + mask) v`, heads merged back to `[b, t, c]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: &Tensor) -> Result<Tensor> {
    let (b, t, c) = q.dims3()?;
    let d = c / heads;
    let split = |x: &Tensor| x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let q = (q * (d as f64).powf(-0.5))?;
    let w = q.matmul(&k.t()?)?.broadcast_add(mask)?;
    let w = candle_nn::ops::softmax_last_dim(&w)?;
    w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// Ids as `u32` for the embedding lookup.
fn ids_u32(ids: &Tensor) -> Result<Tensor> {
    match ids.dtype() {
        DType::U32 => Ok(ids.clone()),
        _ => ids.to_dtype(DType::I64)?.to_dtype(DType::U32),
    }
}

// ------------------------------------------------------------------ CLIP-L (HF layout)

/// The MLP activation of an HF CLIP text model (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SDXL's CLIP-L).
    QuickGelu,
    /// Exact erf GELU (`"gelu"`; SD-2's OpenCLIP-H).
    Gelu,
    /// The tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
}

impl ClipActivation {
    /// The `hidden_act` string of a transformers config.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            _ => return None,
        })
    }

    fn forward(self, h: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => h * candle_nn::ops::sigmoid(&(h * 1.702)?)?,
            Self::Gelu => h.gelu_erf(),
            Self::GeluTanh => h.gelu(),
        }
    }
}

/// Sizes of an HF `CLIPTextModel`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
}

/// The keys of a transformers `CLIPTextConfig` JSON this crate reads.
#[derive(serde::Deserialize)]
struct HfClipTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
}

fn default_hidden_act() -> String {
    "quick_gelu".into()
}

impl ClipTextConfig {
    /// CLIP ViT-L/14 (SDXL's first text encoder).
    pub fn vit_l_14() -> Self {
        Self {
            vocab_size: VOCAB_SIZE,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
        }
    }

    /// Sizes and activation from a transformers `config.json` of a `CLIPTextModel` (e.g.
    /// SD-2's `text_encoder/config.json`; `CLIPTextConfig` defaults to `quick_gelu`).
    /// `layer_norm_eps` is not read: transformers 4.25 ignores it (see `LAYER_NORM_EPS`).
    pub fn from_hf_config(path: impl AsRef<Path>) -> crate::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg_err = |msg: String| crate::Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let c: HfClipTextConfig =
            serde_json::from_str(&text).map_err(|e| cfg_err(e.to_string()))?;
        let hidden_act = ClipActivation::from_hf_name(&c.hidden_act)
            .ok_or_else(|| cfg_err(format!("hidden_act `{}` is not supported", c.hidden_act)))?;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(cfg_err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            max_position_embeddings: c.max_position_embeddings,
            hidden_act,
        })
    }

    /// Sizes from the weights under `vb` (the `text_model` prefix); heads: 12 for width 768
    /// (ViT-L/14), else [`FALLBACK_HEADS`].
    pub fn from_weights(vb: &VarBuilder) -> Result<Self> {
        let pos = vb.get_unchecked("embeddings.position_embedding.weight")?;
        let (max_position_embeddings, hidden_size) = pos.dims2()?;
        let layer = |i: usize| format!("encoder.layers.{i}.layer_norm1.weight");
        let num_hidden_layers = (0..).take_while(|&i| vb.contains_tensor(&layer(i))).count();
        let intermediate_size = vb.get_unchecked("encoder.layers.0.mlp.fc1.bias")?.dim(0)?;
        let num_attention_heads = if hidden_size == 768 {
            12
        } else {
            FALLBACK_HEADS
        };
        Ok(Self {
            vocab_size: VOCAB_SIZE,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            max_position_embeddings,
            hidden_act: ClipActivation::QuickGelu,
        })
    }
}

/// `CLIPEncoderLayer`: `x + attn(ln1(x))`, then `x + fc2(act(fc1(ln2(x))))`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: ClipActivation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let (c, m) = (cfg.hidden_size, cfg.intermediate_size);
        let att = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: layer_norm(c, LAYER_NORM_EPS, vb.pp("layer_norm1"))?,
            q_proj: linear(c, c, att.pp("q_proj"))?,
            k_proj: linear(c, c, att.pp("k_proj"))?,
            v_proj: linear(c, c, att.pp("v_proj"))?,
            out_proj: linear(c, c, att.pp("out_proj"))?,
            layer_norm2: layer_norm(c, LAYER_NORM_EPS, vb.pp("layer_norm2"))?,
            fc1: linear(c, m, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(m, c, vb.pp("mlp").pp("fc2"))?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = (
            self.q_proj.forward(&h)?,
            self.k_proj.forward(&h)?,
            self.v_proj.forward(&h)?,
        );
        let x = (x + self
            .out_proj
            .forward(&attention(&q, &k, &v, self.heads, mask)?)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        x + self.fc2.forward(&self.act.forward(&h)?)?
    }
}

/// HF `CLIPTextTransformer` (`...transformer.text_model`).
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextTransformer {
    /// `vb` at the `text_model` prefix. Every layer and `final_layer_norm` are loaded, as in the
    /// checkpoint, even when a hidden state before them is used.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let token_embedding =
            embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            layer_norm(cfg.hidden_size, LAYER_NORM_EPS, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            cfg: cfg.clone(),
        })
    }

    /// `CLIPTextModel.from_pretrained(dir)`: `vb` at the root of its `model.safetensors` (keys
    /// `text_model.*`; the `position_ids` buffer is not read).
    pub fn from_text_model(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Self::new(vb.pp("text_model"), cfg)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `hidden_states[layer_idx]` of `CLIPTextModel(ids, output_hidden_states=True)`: index 0 is
    /// the embeddings' output, index i the output of layer i; a negative index counts from the
    /// end as in Python (-1 = last layer, without `final_layer_norm`). `ids`: `[b, t]`.
    pub fn hidden_state(&self, ids: &Tensor, layer_idx: i64) -> Result<Tensor> {
        let n = self.layers.len() as i64;
        let idx = if layer_idx < 0 {
            n + 1 + layer_idx
        } else {
            layer_idx
        };
        if !(0..=n).contains(&idx) {
            candle_core::bail!("CLIP hidden state {layer_idx} out of range for {n} layers");
        }
        let t = ids.dim(1)?;
        let x = self.token_embedding.forward(&ids_u32(ids)?)?;
        let mut x = x.broadcast_add(&self.position_embedding.narrow(0, 0, t)?)?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        for layer in &self.layers[..idx as usize] {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }

    /// `last_hidden_state` `[b, t, hidden_size]` of `CLIPTextModel(ids)` (output `[0]`, what SD-2's
    /// `_encode_prompt` uses): all layers, then `final_layer_norm`. No padding mask: padding
    /// tokens are attended under the causal mask, as with `attention_mask=None`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.hidden_state(ids, self.layers.len() as i64)?;
        self.final_layer_norm.forward(&x)
    }
}

// ------------------------------------------------------------------ OpenCLIP (open_clip layout)

/// Sizes of an open_clip text tower.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipTextConfig {
    pub vocab_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_width: usize,
    pub context_length: usize,
    /// Width of `text_projection`'s output (the pooled embedding).
    pub embed_dim: usize,
}

impl OpenClipTextConfig {
    /// OpenCLIP ViT-bigG-14 (SDXL's second text encoder).
    pub fn vit_bigg_14() -> Self {
        Self {
            vocab_size: VOCAB_SIZE,
            width: 1280,
            layers: 32,
            heads: 20,
            mlp_width: 5120,
            context_length: 77,
            embed_dim: 1280,
        }
    }

    /// Heads of an open_clip architecture name: `ViT-L-14` 12, `ViT-H-14` 16, `ViT-bigG-14` 20,
    /// anything else [`FALLBACK_HEADS`].
    pub fn heads_for_arch(arch: &str) -> usize {
        match arch {
            "ViT-L-14" => 12,
            "ViT-H-14" => 16,
            "ViT-bigG-14" => 20,
            _ => FALLBACK_HEADS,
        }
    }

    /// Sizes from the weights under `vb` (the `model` prefix); heads from `arch`
    /// ([`Self::heads_for_arch`]).
    pub fn from_weights(vb: &VarBuilder, arch: &str) -> Result<Self> {
        let (context_length, width) = vb.get_unchecked("positional_embedding")?.dims2()?;
        let block = |i: usize| format!("transformer.resblocks.{i}.ln_1.weight");
        let layers = (0..).take_while(|&i| vb.contains_tensor(&block(i))).count();
        let mlp_width = vb
            .get_unchecked("transformer.resblocks.0.mlp.c_fc.bias")?
            .dim(0)?;
        let embed_dim = vb.get_unchecked("text_projection")?.dim(1)?;
        Ok(Self {
            vocab_size: VOCAB_SIZE,
            width,
            layers,
            heads: Self::heads_for_arch(arch),
            mlp_width,
            context_length,
            embed_dim,
        })
    }
}

/// open_clip `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + c_proj(gelu(c_fc(ln_2(x))))`.
#[derive(Debug, Clone)]
struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    heads: usize,
}

impl ResidualAttentionBlock {
    fn new(vb: VarBuilder, cfg: &OpenClipTextConfig) -> Result<Self> {
        let (c, m) = (cfg.width, cfg.mlp_width);
        let att = vb.pp("attn");
        // nn.MultiheadAttention packs q, k, v into one [3c, c] projection.
        let in_proj = Linear::new(
            att.get((3 * c, c), "in_proj_weight")?,
            Some(att.get(3 * c, "in_proj_bias")?),
        );
        Ok(Self {
            ln_1: layer_norm(c, LAYER_NORM_EPS, vb.pp("ln_1"))?,
            in_proj,
            out_proj: linear(c, c, att.pp("out_proj"))?,
            ln_2: layer_norm(c, LAYER_NORM_EPS, vb.pp("ln_2"))?,
            c_fc: linear(c, m, vb.pp("mlp").pp("c_fc"))?,
            c_proj: linear(m, c, vb.pp("mlp").pp("c_proj"))?,
            heads: cfg.heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let qkv = self.in_proj.forward(&self.ln_1.forward(x)?)?;
        let (q, k, v) = (
            qkv.narrow(D::Minus1, 0, c)?,
            qkv.narrow(D::Minus1, c, c)?,
            qkv.narrow(D::Minus1, 2 * c, c)?,
        );
        let x = (x + self
            .out_proj
            .forward(&attention(&q, &k, &v, self.heads, mask)?)?)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&x)?)?.gelu_erf()?;
        x + self.c_proj.forward(&h)?
    }
}

/// Outputs of the OpenCLIP text tower as `FrozenOpenCLIPEmbedder2` uses them.
#[derive(Debug, Clone)]
pub struct OpenClipTextOutput {
    /// Input of the last block, `[b, t, width]` (no `ln_final`).
    pub penultimate: Tensor,
    /// Output of the last block, `[b, t, width]` (no `ln_final`).
    pub last: Tensor,
    /// `ln_final(last)` at the end-of-text token (argmax of the ids) `@ text_projection`,
    /// `[b, embed_dim]`.
    pub pooled: Tensor,
}

/// The text tower of open_clip's `CLIP` (`conditioner.embedders.1.model`; the visual tower is
/// not part of it).
#[derive(Debug, Clone)]
pub struct OpenClipTextTransformer {
    token_embedding: Embedding,
    positional_embedding: Tensor,
    resblocks: Vec<ResidualAttentionBlock>,
    ln_final: LayerNorm,
    text_projection: Tensor,
    cfg: OpenClipTextConfig,
}

impl OpenClipTextTransformer {
    /// `vb` at the `model` prefix.
    pub fn new(vb: VarBuilder, cfg: &OpenClipTextConfig) -> Result<Self> {
        let token_embedding = embedding(cfg.vocab_size, cfg.width, vb.pp("token_embedding"))?;
        let positional_embedding =
            vb.get((cfg.context_length, cfg.width), "positional_embedding")?;
        let resblocks = (0..cfg.layers)
            .map(|i| ResidualAttentionBlock::new(vb.pp("transformer").pp("resblocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let ln_final = layer_norm(cfg.width, LAYER_NORM_EPS, vb.pp("ln_final"))?;
        let text_projection = vb.get((cfg.width, cfg.embed_dim), "text_projection")?;
        Ok(Self {
            token_embedding,
            positional_embedding,
            resblocks,
            ln_final,
            text_projection,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &OpenClipTextConfig {
        &self.cfg
    }

    /// The final LayerNorm alone (the legacy embedder applies it to the chosen layer).
    pub fn ln_final(&self, x: &Tensor) -> Result<Tensor> {
        self.ln_final.forward(x)
    }

    /// All blocks over `ids` `[b, t]` (`encode_with_transformer` with `legacy=False`).
    pub fn forward(&self, ids: &Tensor) -> Result<OpenClipTextOutput> {
        let (b, t) = ids.dims2()?;
        let ids = ids_u32(ids)?;
        let x = self.token_embedding.forward(&ids)?;
        let mut x = x.broadcast_add(&self.positional_embedding.narrow(0, 0, t)?)?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        let mut penultimate = x.clone();
        for (i, block) in self.resblocks.iter().enumerate() {
            if i + 1 == self.resblocks.len() {
                penultimate = x.clone();
            }
            x = block.forward(&x, &mask)?;
        }
        // Pool at the first position of the largest id (the end-of-text token).
        let rows = ids.to_vec2::<u32>()?;
        let normed = self.ln_final.forward(&x)?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let mut pos = 0;
                for (j, &id) in row.iter().enumerate() {
                    if id > row[pos] {
                        pos = j;
                    }
                }
                normed.get(r)?.get(pos)
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&picked, 0)?.matmul(&self.text_projection)?;
        debug_assert_eq!(pooled.dims2()?, (b, self.cfg.embed_dim));
        Ok(OpenClipTextOutput {
            penultimate,
            last: x,
            pooled,
        })
    }
}
