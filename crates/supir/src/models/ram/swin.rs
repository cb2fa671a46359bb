//! RAM's image encoder, `ram/models/swin_transformer_lora.py::SwinTransformer` (patch 4, no
//! absolute position embedding, patch norm, `qkv_bias`, MLP with exact GELU, LayerNorm 1e-5),
//! keys under `visual_encoder.`:
//! `patch_embed.{proj,norm}`, `layers.I.blocks.J.{norm1,attn.{qkv,proj,relative_position_bias_table},
//! norm2,mlp.{fc1,fc2}}`, `layers.I.downsample.{norm,reduction}` (all stages but the last), `norm`.
//!
//! Sizes come from the weights: embedding width and patch size from `patch_embed.proj.weight`,
//! stages and blocks by counting, heads from each `relative_position_bias_table` (`[(2w-1)², heads]`),
//! MLP width from `fc1`. The input side and the window are the config's (`image_res`,
//! `window_size`). The `relative_position_index` and `attn_mask` buffers of the checkpoint are
//! not read (the official loader drops them); both are rebuilt here as the module builds them.
//! The `qkv` layers carry DAPE's LoRA (`lora.MergedLinear`, q and v), merged at load.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::lora::Lora;
use super::merged_linear;
use crate::layers::{compute_dtype, Conv2d, LayerNorm, Linear};
use crate::{Error, Result};

/// `nn.LayerNorm` default eps, used by every Swin norm.
pub const SWIN_LAYER_NORM_EPS: f64 = 1e-5;

/// `WindowAttention` + MLP of one `SwinTransformerBlock`.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    /// Effective window (the stage side when that is not larger than the configured window).
    window: usize,
    shift: usize,
    /// `relative_position_bias_table[relative_position_index]` as `[heads, N, N]`, N = window².
    bias: Tensor,
    /// The shifted-window mask `[nW, 1, N, N]` (0 / -100), for blocks with a shift.
    mask: Option<Tensor>,
}

/// `relative_position_index` of a `w x w` window: `[N²]`, `(dy + w - 1)(2w - 1) + dx + w - 1`.
fn relative_position_index(w: usize) -> Vec<u32> {
    let n = w * w;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n {
        let (hi, wi) = (i / w, i % w);
        for j in 0..n {
            let (hj, wj) = (j / w, j % w);
            let dy = hi + w - 1 - hj;
            let dx = wi + w - 1 - wj;
            idx.push((dy * (2 * w - 1) + dx) as u32);
        }
    }
    idx
}

/// The `attn_mask` buffer of a shifted block on an `h x w` map: region ids (3 x 3 regions cut at
/// `-window` and `-shift`) per window token, -100 between tokens of different regions.
fn shift_mask(h: usize, w: usize, window: usize, shift: usize, dev: &Device) -> Result<Tensor> {
    let region = |x: usize, len: usize| {
        if x < len - window {
            0
        } else if x < len - shift {
            1
        } else {
            2
        }
    };
    let (nh, nw, n) = (h / window, w / window, window * window);
    let mut ids = vec![0f32; nh * nw * n];
    for y in 0..h {
        for x in 0..w {
            let win = (y / window) * nw + x / window;
            let tok = (y % window) * window + x % window;
            ids[win * n + tok] = (region(y, h) * 3 + region(x, w)) as f32;
        }
    }
    let ids = Tensor::from_vec(ids, (nh * nw, n), dev)?;
    let diff = ids.unsqueeze(1)?.broadcast_sub(&ids.unsqueeze(2)?)?;
    let zeros = diff.zeros_like()?;
    let mask = diff
        .ne(&zeros)?
        .where_cond(&(zeros.ones_like()? * -100.0)?, &zeros)?;
    Ok(mask.unsqueeze(1)?)
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        lora: Option<&Lora>,
        dim: usize,
        res: (usize, usize),
        window_cfg: usize,
        odd: bool,
        cdt: DType,
    ) -> Result<Self> {
        let (h, w) = res;
        let (window, shift) = if h.min(w) <= window_cfg {
            (h.min(w), 0)
        } else {
            (window_cfg, if odd { window_cfg / 2 } else { 0 })
        };
        if !h.is_multiple_of(window) || !w.is_multiple_of(window) {
            return Err(Error::Option(format!(
                "{}: a {h}x{w} token map is not a whole number of {window}x{window} windows",
                vb.prefix()
            )));
        }
        let attn = vb.pp("attn");
        let table_key = "relative_position_bias_table";
        let heads = attn.get_unchecked(table_key)?.dim(1)?;
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(Error::Option(format!(
                "{}: {heads} heads do not divide width {dim}",
                attn.prefix()
            )));
        }
        let table = attn
            .get(((2 * window - 1) * (2 * window - 1), heads), table_key)?
            .to_dtype(cdt)?
            .contiguous()?;
        let n = window * window;
        let idx = Tensor::from_vec(relative_position_index(window), n * n, table.device())?;
        let bias = table
            .index_select(&idx, 0)?
            .reshape((n, n, heads))?
            .permute((2, 0, 1))?
            .contiguous()?;
        let mask = if shift > 0 {
            Some(shift_mask(h, w, window, shift, table.device())?.to_dtype(cdt)?)
        } else {
            None
        };
        let qkv_vb = attn.pp("qkv");
        let qkv_delta = match lora {
            Some(l) => l.merged_delta(&qkv_vb.prefix(), 3 * dim, dim, &[true, false, true])?,
            None => None,
        };
        let qkv = merged_linear(&qkv_vb, dim, 3 * dim, qkv_delta.into_iter().collect())?;
        let hidden = vb.pp("mlp").pp("fc1").get_unchecked("bias")?.dim(0)?;
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, SWIN_LAYER_NORM_EPS)?,
            qkv,
            proj: Linear::load(attn.pp("proj"), dim, dim, true)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, SWIN_LAYER_NORM_EPS)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), dim, hidden, true)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), hidden, dim, true)?,
            heads,
            window,
            shift,
            bias,
            mask,
        })
    }

    /// `x [B, H·W, C]` -> same shape (`SwinTransformerBlock.forward`).
    fn forward(&self, x: &Tensor, res: (usize, usize)) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let (h, w) = res;
        let (win, s) = (self.window, self.shift as i32);
        let mut t = self.norm1.forward(x)?.reshape((b, h, w, c))?;
        if s > 0 {
            t = t.roll(-s, 1)?.roll(-s, 2)?;
        }
        // window_partition -> [B·nW, win², C]
        let (nh, nw) = (h / win, w / win);
        let t = t
            .reshape(vec![b, nh, win, nw, win, c])?
            .permute(vec![0, 1, 3, 2, 4, 5])?
            .contiguous()?
            .reshape((b * nh * nw, win * win, c))?;
        let t = self.attention(&t, b, nh * nw)?;
        // window_reverse -> [B, H, W, C]
        let mut t = t
            .reshape(vec![b, nh, nw, win, win, c])?
            .permute(vec![0, 1, 3, 2, 4, 5])?
            .contiguous()?
            .reshape((b, h, w, c))?;
        if s > 0 {
            t = t.roll(s, 1)?.roll(s, 2)?;
        }
        let x = (x + t.reshape((b, l, c))?)?;
        let m = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        Ok((&x + self.fc2.forward(&m)?)?)
    }

    /// `WindowAttention.forward` on `x [B·nW, N, C]`.
    fn attention(&self, x: &Tensor, b: usize, n_win: usize) -> Result<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let (heads, d) = (self.heads, c / self.heads);
        let qkv = self.qkv.forward(x)?.reshape(vec![bw, n, 3, heads, d])?;
        let part = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = (part(0)? * (d as f64).powf(-0.5))?;
        let (k, v) = (part(1)?, part(2)?);
        let mut a = q.matmul(&k.t()?)?.broadcast_add(&self.bias)?;
        if let Some(mask) = &self.mask {
            a = a
                .reshape(vec![b, n_win, heads, n, n])?
                .broadcast_add(mask)?
                .reshape((bw, heads, n, n))?;
        }
        let a = candle_nn::ops::softmax_last_dim(&a)?;
        let o = a.matmul(&v)?.transpose(1, 2)?.reshape((bw, n, c))?;
        Ok(self.proj.forward(&o)?)
    }
}

/// `PatchMerging`: 2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm,
/// `reduction` 4C -> 2C without bias.
#[derive(Debug, Clone)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn forward(&self, x: &Tensor, res: (usize, usize)) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let (h, w) = res;
        let x = x
            .reshape(vec![b, h / 2, 2, w / 2, 2, c])?
            .permute(vec![0, 1, 3, 4, 2, 5])?
            .contiguous()?
            .reshape((b, (h / 2) * (w / 2), 4 * c))?;
        Ok(self.reduction.forward(&self.norm.forward(&x)?)?)
    }
}

#[derive(Debug, Clone)]
struct Stage {
    blocks: Vec<Block>,
    downsample: Option<PatchMerging>,
    res: (usize, usize),
}

/// The Swin transformer of RAM (`visual_encoder`).
#[derive(Debug, Clone)]
pub struct SwinTransformer {
    patch_embed: Conv2d,
    patch_norm: LayerNorm,
    stages: Vec<Stage>,
    norm: LayerNorm,
    image_size: usize,
    in_chans: usize,
    num_features: usize,
    cdt: DType,
}

impl SwinTransformer {
    /// Weights under `vb` (`visual_encoder`), LoRA of `lora` merged into the `qkv` layers;
    /// `image_size` and `window_size` from the Swin config.
    pub fn new(
        vb: VarBuilder,
        lora: Option<&Lora>,
        image_size: usize,
        window_size: usize,
    ) -> Result<Self> {
        if window_size == 0 {
            return Err(Error::Option("RAM: window_size 0".into()));
        }
        let cdt = compute_dtype(vb.dtype(), vb.device());
        let pe = vb.pp("patch_embed");
        let proj_w = pe.pp("proj").get_unchecked("weight")?;
        let (embed, in_chans, p, p2) = proj_w.dims4()?;
        if p != p2 || p == 0 || !image_size.is_multiple_of(p) {
            return Err(Error::Option(format!(
                "visual_encoder: patch {p}x{p2} does not tile a {image_size} px input"
            )));
        }
        let patch_embed = Conv2d::load(pe.pp("proj"), in_chans, embed, p, p, 0)?;
        let patch_norm = LayerNorm::load(pe.pp("norm"), embed, SWIN_LAYER_NORM_EPS)?;
        let n_stages = (0..)
            .take_while(|i| vb.contains_tensor(&format!("layers.{i}.blocks.0.norm1.weight")))
            .count();
        if n_stages == 0 {
            return Err(Error::Option(
                "visual_encoder: no `layers.0.blocks.0` weights".into(),
            ));
        }
        let mut res = (image_size / p, image_size / p);
        let mut stages = Vec::with_capacity(n_stages);
        let mut dim = embed;
        for i in 0..n_stages {
            let sv = vb.pp(format!("layers.{i}"));
            let depth = (0..)
                .take_while(|j| sv.contains_tensor(&format!("blocks.{j}.norm1.weight")))
                .count();
            let blocks = (0..depth)
                .map(|j| {
                    Block::new(
                        sv.pp(format!("blocks.{j}")),
                        lora,
                        dim,
                        res,
                        window_size,
                        j % 2 == 1,
                        cdt,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < n_stages {
                if !res.0.is_multiple_of(2) || !res.1.is_multiple_of(2) {
                    return Err(Error::Option(format!(
                        "visual_encoder: stage {i} map {}x{} is not even",
                        res.0, res.1
                    )));
                }
                let dv = sv.pp("downsample");
                Some(PatchMerging {
                    norm: LayerNorm::load(dv.pp("norm"), 4 * dim, SWIN_LAYER_NORM_EPS)?,
                    reduction: Linear::load(dv.pp("reduction"), 4 * dim, 2 * dim, false)?,
                })
            } else {
                None
            };
            stages.push(Stage {
                blocks,
                downsample,
                res,
            });
            if i + 1 < n_stages {
                res = (res.0 / 2, res.1 / 2);
                dim *= 2;
            }
        }
        Ok(Self {
            patch_embed,
            patch_norm,
            stages,
            norm: LayerNorm::load(vb.pp("norm"), dim, SWIN_LAYER_NORM_EPS)?,
            image_size,
            in_chans,
            num_features: dim,
            cdt,
        })
    }

    /// Width of the output tokens (`num_features`, RAM's `vision_width`).
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `x [B, 3, S, S]` -> `[B, 1 + L, C]`: the mean token first, then the final-stage tokens
    /// after `norm` (`SwinTransformer.forward` without `idx_to_group_img`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != self.in_chans || h != self.image_size || w != self.image_size {
            return Err(Error::Option(format!(
                "RAM image encoder: input {:?}, expected [B, {}, {s}, {s}]",
                x.dims(),
                self.in_chans,
                s = self.image_size
            )));
        }
        let x = self.patch_embed.forward(&x.to_dtype(self.cdt)?)?;
        let mut x = self
            .patch_norm
            .forward(&x.flatten_from(2)?.transpose(1, 2)?)?;
        for st in &self.stages {
            for blk in &st.blocks {
                x = blk.forward(&x, st.res)?;
            }
            if let Some(ds) = &st.downsample {
                x = ds.forward(&x, st.res)?;
            }
        }
        let x = self.norm.forward(&x)?;
        let cls = x.mean_keepdim(D::Minus2)?;
        Ok(Tensor::cat(&[&cls, &x], 1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_matches_the_module() {
        // coords diff (dy, dx) shifted by w-1, dy scaled by 2w-1: corners of a 2x2 window.
        let idx = relative_position_index(2);
        assert_eq!(idx.len(), 16);
        assert_eq!(idx[0], 4); // (0,0)-(0,0): (1)*3 + 1
        assert_eq!(idx[3], 0); // (0,0)-(1,1): 0*3 + 0
        assert_eq!(idx[12], 8); // (1,1)-(0,0): 2*3 + 2
    }
}
