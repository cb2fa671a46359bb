//! RAM's image-tag recognition decoder, `tagging_head` (`ram/models/bert_lora.py::BertModel`
//! built from `q2l_config.json`, run with `mode='tagging'`): the embeddings and every layer's
//! self-attention are deleted (`RAMLora.del_selfattention`), so each layer is
//! cross-attention from the label queries to the image embeddings (all tokens, mask all ones:
//! the inverted mask adds 0), `crossattention.output` (dense, residual, LayerNorm), then the FFN
//! (`intermediate` with exact GELU, `output` dense, residual, LayerNorm).
//!
//! Keys `tagging_head.encoder.layer.N.{crossattention.{self.{query,key,value},output.{dense,
//! LayerNorm}},intermediate.dense,output.{dense,LayerNorm}}`. Widths come from the weights; the
//! head count (`num_attention_heads`) and LayerNorm eps are the config's.
//!
//! LoRA: `query` and `key` are `lora.Linear`. `tie_encoder_decoder_weights(tag_encoder,
//! tagging_head)` makes `tag_encoder.encoder.layer.N` (N below the tagging head's depth) share
//! these layers' weight tensors, so `eval()` merges both modules' LoRA into them: first
//! `tag_encoder`'s (registered first), then `tagging_head`'s.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::lora::Lora;
use super::merged_linear;
use crate::layers::{attention, LayerNorm, Linear};
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct TagLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_dense: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The tagging head: `forward(queries [B, C, hidden], image_embeds [B, M, width])`.
#[derive(Debug, Clone)]
pub struct TaggingHead {
    layers: Vec<TagLayer>,
    heads: usize,
    hidden: usize,
    encoder_width: usize,
}

/// Sizes of one LoRA-carrying projection and the prefixes whose LoRA merges into it, in order.
fn lora_linear(
    root: &VarBuilder,
    lora: Option<&Lora>,
    prefixes: &[String],
    in_dim: usize,
    out_dim: usize,
) -> Result<Linear> {
    let own = root.pp(prefixes.last().expect("own prefix"));
    let mut deltas = Vec::new();
    if let Some(l) = lora {
        for p in prefixes {
            if let Some(d) = l.linear_delta(p, out_dim, in_dim)? {
                deltas.push(d);
            }
        }
    }
    merged_linear(&own, in_dim, out_dim, deltas)
}

impl TaggingHead {
    /// Weights under `root.pp("tagging_head")` (`root` is the RAM checkpoint's root, for the
    /// tied `tag_encoder` LoRA names); `heads` and `eps` from `q2l_config`.
    pub fn new(root: &VarBuilder, lora: Option<&Lora>, heads: usize, eps: f64) -> Result<Self> {
        let layer_key =
            |i: usize| format!("tagging_head.encoder.layer.{i}.crossattention.self.query.bias");
        let n = (0..)
            .take_while(|&i| root.contains_tensor(&layer_key(i)))
            .count();
        if n == 0 {
            return Err(Error::Option(
                "RAM: no `tagging_head.encoder.layer.0` weights".into(),
            ));
        }
        let l0 = "tagging_head.encoder.layer.0";
        let hidden = root
            .get_unchecked(&format!("{l0}.crossattention.self.query.bias"))?
            .dim(0)?;
        let encoder_width = root
            .get_unchecked(&format!("{l0}.crossattention.self.key.weight"))?
            .dim(1)?;
        let inter = root
            .get_unchecked(&format!("{l0}.intermediate.dense.bias"))?
            .dim(0)?;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(Error::Option(format!(
                "RAM tagging head: {heads} heads do not divide width {hidden}"
            )));
        }
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("tagging_head.encoder.layer.{i}");
            let vb = root.pp(&name);
            let att = "crossattention.self";
            let proj = |p: &str, in_dim| {
                lora_linear(
                    root,
                    lora,
                    &[
                        format!("tag_encoder.encoder.layer.{i}.{att}.{p}"),
                        format!("{name}.{att}.{p}"),
                    ],
                    in_dim,
                    hidden,
                )
            };
            let ca = vb.pp("crossattention");
            layers.push(TagLayer {
                query: proj("query", hidden)?,
                key: proj("key", encoder_width)?,
                value: Linear::load(ca.pp("self").pp("value"), encoder_width, hidden, true)?,
                attn_dense: Linear::load(ca.pp("output").pp("dense"), hidden, hidden, true)?,
                attn_norm: LayerNorm::load(ca.pp("output").pp("LayerNorm"), hidden, eps)?,
                intermediate: Linear::load(vb.pp("intermediate").pp("dense"), hidden, inter, true)?,
                output: Linear::load(vb.pp("output").pp("dense"), inter, hidden, true)?,
                output_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), hidden, eps)?,
            });
        }
        Ok(Self {
            layers,
            heads,
            hidden,
            encoder_width,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn encoder_width(&self) -> usize {
        self.encoder_width
    }

    /// `queries [B, C, hidden]`, `image_embeds [B, M, encoder_width]` -> `[B, C, hidden]`.
    pub fn forward(&self, queries: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let scale = ((self.hidden / self.heads) as f64).powf(-0.5);
        let mut h = queries.clone();
        for l in &self.layers {
            let q = l.query.forward(&h)?;
            let k = l.key.forward(image_embeds)?;
            let v = l.value.forward(image_embeds)?;
            let ctx = attention(&q, &k, &v, self.heads, scale)?;
            let a = l.attn_norm.forward(&(l.attn_dense.forward(&ctx)? + &h)?)?;
            let i = l.intermediate.forward(&a)?.gelu_erf()?;
            h = l.output_norm.forward(&(l.output.forward(&i)? + &a)?)?;
        }
        Ok(h)
    }
}
