//! Multi-head scaled dot-product attention `softmax(scale · q kᵀ) v` on f32, per batch and
//! head, in blocks of queries so the score matrix held at once is `block x m`, never `n x m`
//! for every head.
//!
//! Layouts (row-major), with `hd = heads · d`:
//! - [`Layout::Tokens`]: `q [b][n][hd]`, `k`/`v` `[b][m][hd]`, `out [b][n][hd]` (the UNet's
//!   `CrossAttention` after its projections: heads are column blocks, no transposes needed);
//! - [`Layout::Channels`]: `q [b][hd][n]`, `k`/`v` `[b][hd][m]`, `out [b][hd][n]` (the VAE's
//!   single-head `AttnBlock` on NCHW maps).

use rayon::prelude::*;

use super::blas::sgemm_st;
use super::norm::exp;
use super::SyncPtr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Tokens,
    Channels,
}

/// Score floats per block, per worker (16 MiB).
const SCORE_BUDGET: usize = 4 << 20;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub b: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub d: usize,
}

pub fn attention(
    s: &AttnShape,
    layout: Layout,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let block = (SCORE_BUDGET / s.m.max(1)).clamp(1, s.n.max(1));
    attention_blocked(s, layout, scale, q, k, v, out, block)
}

/// [`attention`] with `block` queries per score block.
#[allow(clippy::too_many_arguments)]
pub fn attention_blocked(
    s: &AttnShape,
    layout: Layout,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    block: usize,
) {
    let hd = s.heads * s.d;
    assert_eq!(q.len(), s.b * s.n * hd, "attention: q size");
    assert_eq!(k.len(), s.b * s.m * hd, "attention: k size");
    assert_eq!(v.len(), s.b * s.m * hd, "attention: v size");
    assert_eq!(out.len(), s.b * s.n * hd, "attention: out size");
    if s.m == 0 {
        out.fill(0.0);
        return;
    }
    let block = block.clamp(1, s.n.max(1));
    let (qp, kp, vp, op) = (
        SyncPtr(q.as_ptr() as *mut f32),
        SyncPtr(k.as_ptr() as *mut f32),
        SyncPtr(v.as_ptr() as *mut f32),
        SyncPtr(out.as_mut_ptr()),
    );
    // One task per (batch item, head), each with its own score block; single-threaded GEMMs.
    (0..s.b * s.heads).into_par_iter().for_each_init(
        || super::scratch::take(block * s.m),
        |scores, task| {
            let (bi, h) = (task / s.heads, task % s.heads);
            // SAFETY: q/k/v are only read; this task writes only head h of batch item bi.
            unsafe {
                let qb = qp.get().add(bi * s.n * hd);
                let kb = kp.get().add(bi * s.m * hd);
                let vb = vp.get().add(bi * s.m * hd);
                let ob = op.get().add(bi * s.n * hd);
                head(s, layout, scale, h, block, qb, kb, vb, ob, scores);
            }
        },
    );
}

/// One head of one batch item, query block by query block.
///
/// # Safety
/// `qb`, `kb`, `vb`, `ob` point at the batch item's `q`, `k`, `v`, `out` (sizes as in
/// [`attention_blocked`]); only head `h` of `ob` is written.
#[allow(clippy::too_many_arguments)]
unsafe fn head(
    s: &AttnShape,
    layout: Layout,
    scale: f32,
    h: usize,
    block: usize,
    qb: *const f32,
    kb: *const f32,
    vb: *const f32,
    ob: *mut f32,
    scores: &mut [f32],
) {
    let hd = s.heads * s.d;
    let mut q0 = 0;
    while q0 < s.n {
        let nq = block.min(s.n - q0);
        let sc = scores[..nq * s.m].as_mut_ptr();
        match layout {
            // S = scale · Q_h[q0..] K_hᵀ: Q rows at stride hd, column offset h·d.
            Layout::Tokens => sgemm_st(
                false,
                true,
                nq,
                s.m,
                s.d,
                scale,
                qb.add(q0 * hd + h * s.d),
                hd,
                kb.add(h * s.d),
                hd,
                0.0,
                sc,
                s.m,
            ),
            // Q_h is [d][n]: S = scale · Q_h[:, q0..]ᵀ K_h.
            Layout::Channels => sgemm_st(
                true,
                false,
                nq,
                s.m,
                s.d,
                scale,
                qb.add(h * s.d * s.n + q0),
                s.n,
                kb.add(h * s.d * s.m),
                s.m,
                0.0,
                sc,
                s.m,
            ),
        }
        for row in scores[..nq * s.m].chunks_exact_mut(s.m) {
            softmax(row);
        }
        let sc = scores[..nq * s.m].as_ptr();
        match layout {
            // O_h[q0..] = S V_h.
            Layout::Tokens => sgemm_st(
                false,
                false,
                nq,
                s.d,
                s.m,
                1.0,
                sc,
                s.m,
                vb.add(h * s.d),
                hd,
                0.0,
                ob.add(q0 * hd + h * s.d),
                hd,
            ),
            // O_h[:, q0..] = V_h Sᵀ ([d][m] · [m][nq]).
            Layout::Channels => sgemm_st(
                false,
                true,
                s.d,
                nq,
                s.m,
                1.0,
                vb.add(h * s.d * s.m),
                s.m,
                sc,
                s.m,
                0.0,
                ob.add(h * s.d * s.n + q0),
                s.n,
            ),
        }
        q0 += nq;
    }
}

super::avx2_dispatch! {
    /// Numerically stable softmax of one row, in place (16-lane max and sum).
    fn softmax(row: &mut [f32]) {
        let mut mx = [f32::NEG_INFINITY; 16];
        let mut it = row.chunks_exact(16);
        for c in &mut it {
            for l in 0..16 {
                mx[l] = if c[l] > mx[l] { c[l] } else { mx[l] };
            }
        }
        let mx = it.remainder().iter().chain(mx.iter()).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut acc = [0.0f32; 16];
        let mut it = row.chunks_exact_mut(16);
        for c in &mut it {
            for l in 0..16 {
                c[l] = exp(c[l] - mx);
                acc[l] += c[l];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for v in it.into_remainder() {
            *v = exp(*v - mx);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Plain attention in f64 (tests).
pub fn attention_reference(
    s: &AttnShape,
    layout: Layout,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let hd = s.heads * s.d;
    let at = |t: &[f32], len: usize, b: usize, i: usize, c: usize| -> f64 {
        match layout {
            Layout::Tokens => t[(b * len + i) * hd + c] as f64,
            Layout::Channels => t[(b * hd + c) * len + i] as f64,
        }
    };
    let mut out = vec![0.0f32; s.b * s.n * hd];
    for b in 0..s.b {
        for h in 0..s.heads {
            for i in 0..s.n {
                let sc: Vec<f64> = (0..s.m)
                    .map(|j| {
                        (0..s.d)
                            .map(|c| at(q, s.n, b, i, h * s.d + c) * at(k, s.m, b, j, h * s.d + c))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..s.d {
                    let o: f64 = (0..s.m)
                        .map(|j| e[j] / z * at(v, s.m, b, j, h * s.d + c))
                        .sum();
                    let idx = match layout {
                        Layout::Tokens => (b * s.n + i) * hd + h * s.d + c,
                        Layout::Channels => (b * hd + h * s.d + c) * s.n + i,
                    };
                    out[idx] = o as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise as noise;

    #[test]
    fn blocked_attention_matches_reference() {
        for layout in [Layout::Tokens, Layout::Channels] {
            let s = AttnShape {
                b: 2,
                n: 19,
                m: 23,
                heads: 3,
                d: 8,
            };
            let hd = s.heads * s.d;
            let q = noise(s.b * s.n * hd, 1);
            let k = noise(s.b * s.m * hd, 2);
            let v = noise(s.b * s.m * hd, 3);
            let r = attention_reference(&s, layout, 0.7, &q, &k, &v);
            for block in [1, 5, 19] {
                let mut out = vec![f32::NAN; q.len()];
                attention_blocked(&s, layout, 0.7, &q, &k, &v, &mut out, block);
                for (a, e) in out.iter().zip(&r) {
                    assert!((a - e).abs() < 1e-5, "{layout:?} block {block}: {a} vs {e}");
                }
            }
        }
    }
}
