//! Linear layers on 4-bit weights: `y[m×n] = x[m×k] · Wᵀ + b` with `W [n×k]` in GGUF's Q4_K
//! blocks and `x` quantised per call to Q8_K, multiplied as ggml's `vec_dot_q4_K_q8_K` does.
//!
//! A Q4_K block holds 256 weights of one row: an f16 `d` and `dmin`, 12 bytes packing eight
//! 6-bit scales `sc_j` and mins `m_j` (one pair per sub-block of 32), and 128 bytes of nibbles
//! `q` (0..=15): `w = d·sc_j·q − dmin·m_j`. A Q8_K activation block holds 256 signed bytes `qx`
//! and an f32 scale `dx` (`x = dx·qx`). Per output, row block and column:
//!
//! `y += dx·d·Σ_j sc_j·Σ_{i∈j} q_i·qx_i − dx·dmin·Σ_j m_j·Σ_{i∈j} qx_i`
//!
//! Both integer sums are exact in every path (AVX512-VNNI, AVX2, plain); only the f32
//! accumulation over blocks may round differently.
//!
//! - AVX512-VNNI: the nibbles are unsigned, so `vpdpbusd` takes them as they are (no offset,
//!   unlike Q8_0); a sub-block's sums are scaled by `sc_j` with `vpmulld`, the mins term is
//!   `vpdpwssd` on 16-bit pairs `(m_2t, m_2t+1)·(Σqx_2t, Σqx_2t+1)`. [`MR`] rows x 32 columns.
//! - AVX2: `vpmaddubsw` (nibble x signed byte, no saturation: 2·15·128 < 2^15) then `vpmaddwd`
//!   against `sc_j` in both 16-bit halves, which applies the scale in the same instruction that
//!   widens the pairs; 2 rows x 16 columns.
//! - elsewhere the plain loops.
//!
//! `W` is repacked once: the nibbles stay 4-bit (columns `j` and `j + 16` of a 32-column
//! panel share a byte), scales and mins are unpacked to bytes and `d`, `dmin` widened to f32
//! (4.75 bits per weight in all, GGUF's 4.5); [`Q4KWeight::gguf_blocks`] gives the exact GGUF
//! bytes back. Threading and blocking as in [`super::q8`]; [`super::q8::best_path`] (and
//! `SUPIR_Q8=avx2|plain`) picks the path.
//!
//! Quantisation ([`quantize_row_gguf`]) writes the bytes stable-diffusion.cpp writes (`sd-cli
//! -M convert --type q4_K`): ggml's `quantize_q4_K` given an importance of 1 for every column,
//! which is what it passes (ggml then takes its weighted path, not `quantize_row_q4_K_ref`,
//! llama.cpp's choice without an importance matrix). Per sub-block of 32, weights
//! `sqrt(2·mean_block(x²) + x²)`, a weighted least-squares fit of scale and min for the levels
//! of each of 37 grid scales, the fit of least weighted error kept; the eight scales and the
//! eight mins then get 6-bit levels and an f16 step each from a weighted search of their own;
//! the nibbles are re-quantised with those rounded values. Every f32 operation is done in
//! ggml's order (no fused multiply-adds, as its `ggml-base` is built), with its rounding
//! (`nearest_int`: ties to even), so the bytes are equal (tested on all 5060 blocks of a file
//! stable-diffusion.cpp wrote, and on edge blocks quantised by its ggml). Candle's
//! `BlockQ4K::from_float` (ggml's older `make_qkx1_quants`) picks other values in the same
//! format: its blocks load and multiply the same way.

use half::f16;

use super::q8::Q8Path;
use super::SyncPtr;

/// Values per Q4_K / Q8_K block (GGUF `QK_K`).
pub const QK_K: usize = 256;
/// Bytes of one GGUF Q4_K block.
pub const BLOCK_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
/// Columns per packed panel.
const NR: usize = 32;
/// Nibble bytes of one panel's block (`NR x 256 / 2`).
const PANEL_QS: usize = NR * QK_K / 2;
/// Scale (or min) bytes of one panel's block (`8 x NR`).
const PANEL_SC: usize = 8 * NR;
/// Rows per AVX512-VNNI micro-kernel call.
const MR: usize = 4;
/// Rows per AVX2 micro-kernel call.
const MR2: usize = 2;
/// Most blocks per depth pass (1024 values, a 16 KiB nibble panel).
const KCB: usize = 4;
const MC_MAX: usize = 144;
const NC_MAX: usize = 512;

/// ggml's `nearest_int`: the bits of `v + 1.5·2^23`, so that rounding happens in the f32
/// addition (to even on a tie) for `|v| < 2^22`; the same bits as ggml beyond that, where its
/// result is meaningless anyway.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Levels of a sub-block (0..=15).
const NMAX: i32 = 15;
/// Scale candidates tried per sub-block: `(15 + RMIN + RDELTA·s) / (max - min)` for
/// `s` in `0..=NSTEP`.
const RMIN: f32 = -0.9;
const RDELTA: f32 = 0.05;
const NSTEP: i32 = 36;
/// The 6-bit scales' and mins' largest level.
const NMAX6: i32 = 63;

/// Scale and (negated) min of one sub-block of 32 values `x`, levels in `l`: the weighted
/// least-squares fit of `x ≈ scale·l + min` (`min <= 0`) for the levels of each grid scale,
/// keeping the fit of least weighted squared error (ggml's `make_qkx3_quants`, as
/// `quantize_q4_K` calls it with an importance matrix: weights `w`). Every f32 operation in
/// ggml's order, so the results are its bits.
#[inline(always)]
fn fit_sub_block(x: &[f32], w: &[f32], l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        l.fill(0);
        return (0.0, -min);
    }
    // Start from the plain min/max scale.
    let iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best += w[i] * (diff * diff);
    }
    let mut cand = [0u8; 32];
    for s in 0..=NSTEP {
        // `min` is the best fit's so far (as in ggml), not the values' minimum.
        let iscale = (RMIN + RDELTA * s as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            cand[i] = q as u8;
            let wq = w[i] * q as f32;
            sum_l += wq;
            sum_l2 += wq * q as f32;
            sum_xl += wq * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0.0f32;
            for i in 0..n {
                let diff = this_scale * cand[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best {
                l.copy_from_slice(&cand[..n]);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// One f32 per sub-block of a block.
type Lanes = [f32; 8];

/// [`fit_sub_block`] on the eight sub-blocks of a block, sub-block `j` in lane `j` (`xt[i][j]`:
/// value `i` of sub-block `j`, `wt[i][j]` its weight); returns the scales and negated mins,
/// levels to `lt[i][j]`. With AVX2 the eight run side by side, each lane doing the scalar
/// operations in their order (branches as selects), so the bits are the same.
fn fit_sub_blocks(xt: &[Lanes; 32], wt: &[Lanes; 32], lt: &mut [[u8; 8]; 32]) -> (Lanes, Lanes) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { fit_sub_blocks_avx2(xt, wt, lt) };
    }
    fit_sub_blocks_scalar(xt, wt, lt)
}

/// [`fit_sub_blocks`] one sub-block after the other.
fn fit_sub_blocks_scalar(
    xt: &[Lanes; 32],
    wt: &[Lanes; 32],
    lt: &mut [[u8; 8]; 32],
) -> (Lanes, Lanes) {
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let x: [f32; 32] = std::array::from_fn(|i| xt[i][j]);
        let w: [f32; 32] = std::array::from_fn(|i| wt[i][j]);
        let mut l = [0u8; 32];
        (scales[j], mins[j]) = fit_sub_block(&x, &w, &mut l);
        for i in 0..32 {
            lt[i][j] = l[i];
        }
    }
    (scales, mins)
}

/// [`fit_sub_blocks`] on AVX2 (no FMA: every product is rounded before its sum, as in ggml).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fit_sub_blocks_avx2(
    xt: &[Lanes; 32],
    wt: &[Lanes; 32],
    lt: &mut [[u8; 8]; 32],
) -> (Lanes, Lanes) {
    use std::arch::x86_64::*;
    let ld = |v: &Lanes| _mm256_loadu_ps(v.as_ptr());
    let zero = _mm256_setzero_ps();
    let magic = _mm256_set1_ps(12_582_912.0);
    let (mask, bias) = (
        _mm256_set1_epi32(0x007f_ffff),
        _mm256_set1_epi32(0x0040_0000),
    );
    let top = _mm256_set1_epi32(NMAX);
    // ggml's level of `v`: `nearest_int(v)` clamped to 0..=NMAX, as f32.
    let level = |v: __m256| {
        let i = _mm256_and_si256(_mm256_castps_si256(_mm256_add_ps(v, magic)), mask);
        let i = _mm256_sub_epi32(i, bias);
        let i = _mm256_min_epi32(_mm256_max_epi32(i, _mm256_setzero_si256()), top);
        _mm256_cvtepi32_ps(i)
    };
    // `if c { a } else { b }` lane by lane.
    let sel = |c: __m256, a: __m256, b: __m256| _mm256_blendv_ps(b, a, c);
    let x: [__m256; 32] = std::array::from_fn(|i| ld(&xt[i]));
    let w: [__m256; 32] = std::array::from_fn(|i| ld(&wt[i]));
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = _mm256_mul_ps(sum_w, x[0]);
    for i in 1..32 {
        // `minps(a, b)` is `a < b ? a : b`, `maxps(a, b)` is `a > b ? a : b`.
        min = _mm256_min_ps(x[i], min);
        max = _mm256_max_ps(x[i], max);
        sum_w = _mm256_add_ps(sum_w, w[i]);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w[i], x[i]));
    }
    min = sel(_mm256_cmp_ps::<_CMP_GT_OQ>(min, zero), zero, min);
    let min0 = min;
    let flat = _mm256_cmp_ps::<_CMP_LE_OQ>(max, min0);
    let iscale = _mm256_div_ps(_mm256_set1_ps(NMAX as f32), _mm256_sub_ps(max, min));
    let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);
    let mut best = zero;
    let mut l = [zero; 32];
    for i in 0..32 {
        l[i] = level(_mm256_mul_ps(iscale, _mm256_sub_ps(x[i], min)));
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, l[i]), min), x[i]);
        best = _mm256_add_ps(best, _mm256_mul_ps(w[i], _mm256_mul_ps(diff, diff)));
    }
    let mut cand = [zero; 32];
    for s in 0..=NSTEP {
        let step = _mm256_set1_ps(RMIN + RDELTA * s as f32 + NMAX as f32);
        let iscale = _mm256_div_ps(step, _mm256_sub_ps(max, min));
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        for i in 0..32 {
            cand[i] = level(_mm256_mul_ps(iscale, _mm256_sub_ps(x[i], min)));
            let wq = _mm256_mul_ps(w[i], cand[i]);
            sum_l = _mm256_add_ps(sum_l, wq);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wq, cand[i]));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wq, x[i]));
        }
        let det = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        let sc = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l));
        let mn = _mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl));
        let (sc, mn) = (_mm256_div_ps(sc, det), _mm256_div_ps(mn, det));
        let clamp = _mm256_cmp_ps::<_CMP_GT_OQ>(mn, zero);
        let this_scale = sel(clamp, _mm256_div_ps(sum_xl, sum_l2), sc);
        let this_min = sel(clamp, zero, mn);
        let mut err = zero;
        for i in 0..32 {
            let fit = _mm256_add_ps(_mm256_mul_ps(this_scale, cand[i]), this_min);
            let diff = _mm256_sub_ps(fit, x[i]);
            err = _mm256_add_ps(err, _mm256_mul_ps(w[i], _mm256_mul_ps(diff, diff)));
        }
        let better = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(det, zero),
            _mm256_cmp_ps::<_CMP_LT_OQ>(err, best),
        );
        if _mm256_movemask_ps(better) != 0 {
            best = sel(better, err, best);
            scale = sel(better, this_scale, scale);
            min = sel(better, this_min, min);
            for i in 0..32 {
                l[i] = sel(better, cand[i], l[i]);
            }
        }
    }
    let mut out = [[0.0f32; 8]; 32];
    for i in 0..32 {
        _mm256_storeu_ps(out[i].as_mut_ptr(), sel(flat, zero, l[i]));
        lt[i] = out[i].map(|v| v as u8);
    }
    let neg = |v: __m256| _mm256_xor_ps(v, _mm256_set1_ps(-0.0));
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    _mm256_storeu_ps(scales.as_mut_ptr(), sel(flat, zero, scale));
    _mm256_storeu_ps(mins.as_mut_ptr(), neg(sel(flat, min0, min)));
    (scales, mins)
}

/// 6-bit levels `l` of a block's eight sub-block scales (or mins) `v` (all `>= 0`), weighted
/// by the sub-blocks' summed weights `w`, and the f32 step they multiply (ggml's
/// `make_qp_quants`): the best of nine steps around `max / 63`, then up to five passes moving
/// single levels while that raises the fit `(Σw·v·l)² / Σw·l²`.
fn fit_scales(v: &[f32; 8], w: &[f32; 8], l: &mut [u8; 8]) -> f32 {
    let mut max = 0.0f32;
    for &x in v {
        max = if max > x { max } else { x };
    }
    if max < 1e-15 {
        *l = [0; 8];
        return 0.0;
    }
    let mut iscale = NMAX6 as f32 / max;
    for i in 0..8 {
        // Stored as a byte, as ggml does (no clamp here: `v <= max`).
        l[i] = nearest_int(iscale * v[i]) as u8;
    }
    let step = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..8 {
        let diff = v[i] - step * l[i] as f32;
        best += w[i] * diff * diff;
    }
    for s in (-4..=4).filter(|&s| s != 0) {
        let iscale_s = (0.1f32 * s as f32 + NMAX6 as f32) / max;
        let step_s = 1.0 / iscale_s;
        let mut err = 0.0f32;
        for i in 0..8 {
            let q = nearest_int(iscale_s * v[i]).min(NMAX6);
            let diff = v[i] - step_s * q as f32;
            err += w[i] * diff * diff;
        }
        if err < best {
            best = err;
            iscale = iscale_s;
        }
    }
    let (mut sum_lx, mut sum_l2) = (0.0f32, 0.0f32);
    for i in 0..8 {
        let q = nearest_int(iscale * v[i]).min(NMAX6);
        l[i] = q as u8;
        sum_lx += w[i] * v[i] * q as f32;
        sum_l2 += w[i] * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..8 {
            let li = l[i] as f32;
            let mut lx = sum_lx - w[i] * v[i] * li;
            let mut l2 = sum_l2 - w[i] * li * li;
            if lx > 0.0 && l2 > 0.0 {
                let q = nearest_int(v[i] * l2 / lx).min(NMAX6);
                if q != l[i] as i32 {
                    lx += w[i] * v[i] * q as f32;
                    l2 += w[i] * q as f32 * q as f32;
                    if lx * lx * sum_l2 > sum_lx * sum_lx * l2 {
                        l[i] = q as u8;
                        (sum_lx, sum_l2) = (lx, l2);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if sum_l2 > 0.0 {
        sum_lx / sum_l2
    } else {
        0.0
    }
}

/// The 6-bit scale and min of sub-block `j` from a block's 12 packed bytes.
#[inline(always)]
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Packs eight 6-bit scales and mins into GGUF's 12 bytes (the inverse of [`scale_min`]).
fn pack_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (sc[j], mn[j]);
        if j < 4 {
            s[j] |= ls;
            s[j + 4] |= lm;
        } else {
            s[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    s
}

/// GGUF Q4_K blocks of one row (`x.len()` a multiple of 256), appended to `out`.
pub fn quantize_row_gguf(x: &[f32], out: &mut Vec<u8>) {
    assert!(
        x.len().is_multiple_of(QK_K),
        "q4_k: row length not a multiple of 256"
    );
    quantize_blocks(x, out);
}

/// [`quantize_row_gguf`]'s loops. Plain f32 arithmetic, no fused multiply-adds (ggml's
/// quantisers are built without them, in `ggml-base`).
fn quantize_blocks(x: &[f32], out: &mut Vec<u8>) {
    for blk in x.chunks_exact(QK_K) {
        // Weights `sqrt(2·mean(x²) + x_i²)` (an importance of 1 for every column, as
        // stable-diffusion.cpp passes).
        let mut sum_x2 = 0.0f32;
        for &v in blk {
            sum_x2 += v * v;
        }
        let sigma2 = 2.0 * sum_x2 / QK_K as f32;
        let xt: [Lanes; 32] = std::array::from_fn(|i| std::array::from_fn(|j| blk[32 * j + i]));
        let wt: [Lanes; 32] = xt.map(|r| r.map(|v| (sigma2 + v * v).sqrt()));
        let mut sw = [0.0f32; 8];
        for r in &wt {
            for j in 0..8 {
                sw[j] += r[j];
            }
        }
        let mut lt = [[0u8; 8]; 32];
        let (scales, mins) = fit_sub_blocks(&xt, &wt, &mut lt);
        let mut l: [u8; QK_K] = std::array::from_fn(|p| lt[p % 32][p / 32]);
        let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
        let d = f16::from_f32(fit_scales(&scales, &sw, &mut ls));
        let dmin = f16::from_f32(fit_scales(&mins, &sw, &mut lm));
        let packed = pack_scales(&ls, &lm);
        // Re-quantised with the stored (rounded) scales; a sub-block whose scale rounds to 0
        // keeps the levels of its fit, as ggml's do.
        for j in 0..8 {
            let (sc, m) = scale_min(j, &packed);
            let dj = d.to_f32() * sc as f32;
            if dj != 0.0 {
                let dm = dmin.to_f32() * m as f32;
                for i in 0..32 {
                    l[32 * j + i] = nearest_int((blk[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
                }
            }
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&packed);
        for c in 0..QK_K / 64 {
            out.extend((0..32).map(|i| l[64 * c + i] | (l[64 * c + 32 + i] << 4)));
        }
    }
}

/// GGUF Q4_K bytes of any number of blocks, dequantised (as ggml's `dequantize_row_q4_K`).
pub fn dequantize_gguf(blocks: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() / BLOCK_BYTES * QK_K);
    for b in blocks.chunks_exact(BLOCK_BYTES) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
        let (s, qs) = (&b[4..16], &b[16..]);
        for i in 0..QK_K {
            let (sc, m) = scale_min(i / 32, s);
            out.push(d * sc as f32 * nibble(qs, i) as f32 - dmin * m as f32);
        }
    }
    out
}

/// Weight `i` (0..256) of a block's 128 nibble bytes: within each 64 weights, the first 32
/// are the low nibbles of 32 bytes, the next 32 their high nibbles.
fn nibble(qs: &[u8], i: usize) -> u8 {
    let (c, r) = (i / 64, i % 64);
    if r < 32 {
        qs[32 * c + r] & 0xf
    } else {
        qs[32 * c + r - 32] >> 4
    }
}

/// `W` in GGUF Q4_K, repacked for the kernels.
#[derive(Debug)]
pub struct Q4KWeight {
    n: usize,
    k: usize,
    /// Blocks per row (`k / 256`).
    kb: usize,
    /// Panel `q`, block `b` (at `(q·kb + b)·PANEL_QS`): 64 groups of 4 depths, each 64 bytes;
    /// byte `4c + e` of group `g` holds depth `4g + e` of column `c` (low nibble) and of
    /// column `c + 16` (high nibble). 0 past `n`.
    qs: Vec<u8>,
    /// `sc_j` of panel `q`, block `b`, column `c` at `(q·kb + b)·PANEL_SC + j·NR + c`.
    sc: Vec<u8>,
    /// `m_j` in pairs: `(q·kb + b)·PANEL_SC + t·2NR + 2c + (j − 2t)` for `j ∈ {2t, 2t + 1}`.
    mn: Vec<u8>,
    /// `d` and `dmin` of panel `q`, block `b`, column `c` at `(q·kb + b)·NR + c`.
    d: Vec<f32>,
    dmin: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Q4KWeight {
    /// Quantises `w [n×k]` (row-major; `k` a multiple of 256) to Q4_K and packs it.
    pub fn quantize(
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Self> {
        if !k.is_multiple_of(QK_K) || w.len() != n * k {
            candle_core::bail!("q4_k: a {n}x{k} weight needs its input width a multiple of {QK_K}");
        }
        use rayon::prelude::*;
        let row_bytes = k / QK_K * BLOCK_BYTES;
        let mut gguf = vec![0u8; n * row_bytes];
        gguf.par_chunks_mut(row_bytes.max(1))
            .zip(w.par_chunks(k.max(1)))
            .for_each(|(out, row)| {
                let mut v = Vec::with_capacity(row_bytes);
                quantize_row_gguf(row, &mut v);
                out.copy_from_slice(&v);
            });
        Self::from_gguf(&gguf, n, k, bias)
    }

    /// Packs GGUF Q4_K bytes of `W [n×k]` (`n` rows of `k / 256` blocks of [`BLOCK_BYTES`]).
    pub fn from_gguf(
        blocks: &[u8],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Self> {
        let kb = k / QK_K;
        if !k.is_multiple_of(QK_K) || blocks.len() != n * kb * BLOCK_BYTES {
            candle_core::bail!(
                "q4_k: {} bytes are not a {n}x{k} weight in {BLOCK_BYTES}-byte blocks",
                blocks.len()
            );
        }
        if let Some(b) = bias {
            if b.len() != n {
                candle_core::bail!("q4_k: bias of {} values for {n} outputs", b.len());
            }
        }
        let panels = n.div_ceil(NR);
        let mut qs = vec![0u8; panels * kb * PANEL_QS];
        let mut sc = vec![0u8; panels * kb * PANEL_SC];
        let mut mn = vec![0u8; panels * kb * PANEL_SC];
        let mut d = vec![0.0f32; panels * kb * NR];
        let mut dmin = vec![0.0f32; panels * kb * NR];
        use rayon::prelude::*;
        let per = |size: usize| (kb * size).max(1);
        qs.par_chunks_mut(per(PANEL_QS))
            .zip(sc.par_chunks_mut(per(PANEL_SC)))
            .zip(mn.par_chunks_mut(per(PANEL_SC)))
            .zip(d.par_chunks_mut(per(NR)).zip(dmin.par_chunks_mut(per(NR))))
            .enumerate()
            .for_each(|(q, (((qs, sc), mn), (d, dmin)))| {
                for c in 0..NR.min(n - q * NR) {
                    let col = q * NR + c;
                    for b in 0..kb {
                        let blk = &blocks[(col * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                        d[b * NR + c] = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                        dmin[b * NR + c] = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                        for j in 0..8 {
                            let (s, m) = scale_min(j, &blk[4..16]);
                            sc[b * PANEL_SC + j * NR + c] = s;
                            mn[b * PANEL_SC + (j / 2) * 2 * NR + 2 * c + j % 2] = m;
                        }
                        let (lane, shift) = (c % 16, 4 * (c / 16));
                        for i in 0..QK_K {
                            let v = nibble(&blk[16..], i);
                            qs[b * PANEL_QS + (i / 4) * 64 + lane * 4 + i % 4] |= v << shift;
                        }
                    }
                }
            });
        let bias = bias.map(|b| {
            let mut v = b.to_vec();
            v.resize(panels * NR, 0.0);
            v
        });
        Ok(Self {
            n,
            k,
            kb,
            qs,
            sc,
            mn,
            d,
            dmin,
            bias,
        })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (nibbles, scales, mins, `d`, `dmin`, bias).
    pub fn bytes(&self) -> usize {
        self.qs.len()
            + self.sc.len()
            + self.mn.len()
            + 4 * (self.d.len() + self.dmin.len())
            + 4 * self.bias.as_ref().map_or(0, Vec::len)
    }

    /// The bias as given, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref().map(|b| &b[..self.n])
    }

    /// Nibble of column `col` at depth `p`.
    fn q(&self, col: usize, p: usize) -> u8 {
        let (q, c, b, i) = (col / NR, col % NR, p / QK_K, p % QK_K);
        let byte = self.qs[(q * self.kb + b) * PANEL_QS + (i / 4) * 64 + (c % 16) * 4 + i % 4];
        (byte >> (4 * (c / 16))) & 0xf
    }

    /// `(sc_j, m_j)` of column `col`, block `b`.
    fn scale_min(&self, col: usize, b: usize, j: usize) -> (u8, u8) {
        let (q, c) = (col / NR, col % NR);
        let base = (q * self.kb + b) * PANEL_SC;
        (
            self.sc[base + j * NR + c],
            self.mn[base + (j / 2) * 2 * NR + 2 * c + j % 2],
        )
    }

    /// `(d, dmin)` of column `col`, block `b`.
    fn d(&self, col: usize, b: usize) -> (f32, f32) {
        let i = ((col / NR) * self.kb + b) * NR + col % NR;
        (self.d[i], self.dmin[i])
    }

    /// The GGUF Q4_K bytes of `W` (row-major blocks), as [`from_gguf`](Self::from_gguf) takes.
    pub fn gguf_blocks(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.n * self.kb * BLOCK_BYTES);
        for col in 0..self.n {
            for b in 0..self.kb {
                let (d, dmin) = self.d(col, b);
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(dmin).to_le_bytes());
                let sc: [u8; 8] = std::array::from_fn(|j| self.scale_min(col, b, j).0);
                let mn: [u8; 8] = std::array::from_fn(|j| self.scale_min(col, b, j).1);
                out.extend_from_slice(&pack_scales(&sc, &mn));
                let p = b * QK_K;
                for c in 0..QK_K / 64 {
                    out.extend((0..32).map(|i| {
                        self.q(col, p + 64 * c + i) | (self.q(col, p + 64 * c + 32 + i) << 4)
                    }));
                }
            }
        }
        out
    }

    /// `W` dequantised, `[n×k]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.n * self.k];
        for (col, row) in w.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            for (p, v) in row.iter_mut().enumerate() {
                let b = p / QK_K;
                let (d, dmin) = self.d(col, b);
                let (sc, m) = self.scale_min(col, b, (p % QK_K) / 32);
                *v = d * sc as f32 * self.q(col, p) as f32 - dmin * m as f32;
            }
        }
        w
    }

    /// `x [m×k] · Wᵀ + b` on the fastest path of this CPU.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(super::q8::best_path(), x, m)
    }

    /// [`matmul`](Self::matmul) on `path`. Panics when the CPU lacks it or `x` is not `m×k`.
    pub fn matmul_with(&self, path: Q8Path, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "q4_k: input size");
        assert!(
            path.supported(),
            "q4_k: the {} kernel is not available",
            path.name()
        );
        let mut out = vec![0.0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let acts = Activations::quantize(x, m, k, MR.max(MR2));
        if path == Q8Path::Plain {
            self.plain(&acts, m, &mut out);
            return out;
        }
        let mr = if path == Q8Path::Avx512Vnni { MR } else { MR2 };
        let c = SyncPtr(out.as_mut_ptr());
        super::for_each_gemm_block(
            (m, n, k),
            (mr, NR),
            (MC_MAX, NC_MAX),
            |i0, rows, j0, cols| {
                // SAFETY: blocks are disjoint `rows x cols` parts of the `m x n` output; the path
                // is supported (asserted above).
                unsafe { self.block(path, &acts, i0, rows, j0, cols, c.get().add(i0 * n + j0)) }
            },
        );
        out
    }

    /// The plain loops over the same integers.
    fn plain(&self, a: &Activations, m: usize, out: &mut [f32]) {
        let n = self.n;
        for i in 0..m {
            for col in 0..n {
                let mut acc = self.bias.as_ref().map_or(0.0, |b| b[col]);
                for b in 0..self.kb {
                    let (mut isum, mut msum) = (0i32, 0i32);
                    for j in 0..8 {
                        let (sc, mn) = self.scale_min(col, b, j);
                        let mut s = 0i32;
                        for t in 0..32 {
                            let p = b * QK_K + j * 32 + t;
                            s += a.q[i * a.lda + p] as i32 * self.q(col, p) as i32;
                        }
                        isum += sc as i32 * s;
                        let pair = a.xs[(i * self.kb + b) * 4 + j / 2];
                        let xsum = (pair >> (16 * (j % 2))) as i16;
                        msum += mn as i32 * xsum as i32;
                    }
                    let (d, dmin) = self.d(col, b);
                    let dx = a.d[i * self.kb + b];
                    acc += isum as f32 * (d * dx);
                    acc -= msum as f32 * (dmin * dx);
                }
                out[i * n + col] = acc;
            }
        }
    }

    /// One output block: rows `i0 ..+rows`, columns `j0 ..+cols` (from a panel boundary),
    /// written at `c` with row stride `n`.
    ///
    /// # Safety
    /// `path` is supported; `c` points at element `(i0, j0)` of the `m x n` output.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        path: Q8Path,
        a: &Activations,
        i0: usize,
        rows: usize,
        j0: usize,
        cols: usize,
        c: *mut f32,
    ) {
        let (n, kb) = (self.n, self.kb);
        let mr = if path == Q8Path::Avx512Vnni { MR } else { MR2 };
        let step = kb.div_ceil(kb.div_ceil(KCB).max(1)).max(1);
        for b0 in (0..kb).step_by(step) {
            let nblk = (kb - b0).min(step);
            let first = b0 == 0;
            for ip in 0..rows.div_ceil(mr) {
                let r0 = i0 + ip * mr;
                let valid = (rows - ip * mr).min(mr);
                for jp in 0..cols.div_ceil(NR) {
                    let j = j0 + jp * NR;
                    let pb = (j / NR) * kb + b0;
                    let bias = match (&self.bias, first) {
                        (Some(bv), true) => bv.as_ptr().add(j),
                        _ => std::ptr::null(),
                    };
                    let tile = Tile {
                        nblk,
                        qa: a.q.as_ptr().add(r0 * a.lda + b0 * QK_K),
                        lda: a.lda,
                        da: a.d.as_ptr().add(r0 * kb + b0),
                        xs: a.xs.as_ptr().add((r0 * kb + b0) * 4),
                        ldd: kb,
                        w: self.qs.as_ptr().add(pb * PANEL_QS),
                        sc: self.sc.as_ptr().add(pb * PANEL_SC),
                        mn: self.mn.as_ptr().add(pb * PANEL_SC),
                        d: self.d.as_ptr().add(pb * NR),
                        dmin: self.dmin.as_ptr().add(pb * NR),
                        c: c.add(ip * mr * n + jp * NR),
                        ldc: n,
                        mr: valid,
                        nr: (n - j).min(NR),
                        first,
                        bias,
                    };
                    match path {
                        Q8Path::Avx512Vnni => kernel_vnni(&tile),
                        _ => {
                            kernel_avx2_half(&tile, 0);
                            kernel_avx2_half(&tile, 16);
                        }
                    }
                }
            }
        }
    }
}

/// Activations in Q8_K (candle's `BlockQ8K::from_float`): per row and block of 256, `dx =
/// max/−127` with `max` the value of largest magnitude, `qx = round(x/dx)`, and the sums of
/// `qx` per sub-block of 32 as 16-bit pairs (`t`: sub-blocks `2t`, `2t + 1`), rows padded with
/// zeros to a multiple of the kernels' heights.
struct Activations {
    q: Vec<i8>,
    d: Vec<f32>,
    xs: Vec<i32>,
    lda: usize,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize, row_multiple: usize) -> Self {
        let kb = k / QK_K;
        let rows = m.next_multiple_of(row_multiple);
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0.0f32; rows * kb];
        let mut xs = vec![0i32; rows * kb * 4];
        let (kq, kd) = (k.max(1), kb.max(1));
        let quant_row = |(xr, (qr, (dr, sr))): Row| quantize_row(xr, qr, dr, sr);
        if m * k >= 1 << 16 {
            use rayon::prelude::*;
            let outs = q.par_chunks_exact_mut(kq).zip(
                d.par_chunks_exact_mut(kd)
                    .zip(xs.par_chunks_exact_mut(4 * kd)),
            );
            x.par_chunks_exact(kq).take(m).zip(outs).for_each(quant_row);
        } else {
            let outs = q
                .chunks_exact_mut(kq)
                .zip(d.chunks_exact_mut(kd).zip(xs.chunks_exact_mut(4 * kd)));
            x.chunks_exact(kq).take(m).zip(outs).for_each(quant_row);
        }
        Self { q, d, xs, lda: k }
    }
}

type Row<'a> = (&'a [f32], (&'a mut [i8], (&'a mut [f32], &'a mut [i32])));

super::avx2_dispatch! {
    /// One activation row to Q8_K blocks (see [`Activations`]).
    fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], xs: &mut [i32]) {
        let blocks = x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K));
        for ((blk, qb), (db, sb)) in blocks.zip(d.iter_mut().zip(xs.chunks_exact_mut(4))) {
            let (mut max, mut amax) = (0.0f32, 0.0f32);
            for &v in blk {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                *db = 0.0;
                qb.fill(0);
                sb.fill(0);
                continue;
            }
            let iscale = -127.0 / max;
            for (o, &v) in qb.iter_mut().zip(blk) {
                *o = (iscale * v).round().clamp(-128.0, 127.0) as i8;
            }
            for (t, s) in sb.iter_mut().enumerate() {
                let sum = |j: usize| qb[32 * j..32 * j + 32].iter().map(|&v| v as i32).sum::<i32>();
                *s = (sum(2 * t) as u16 as i32) | ((sum(2 * t + 1) as u16 as i32) << 16);
            }
            *db = 1.0 / iscale;
        }
    }
}

/// One micro-kernel call: `nblk` blocks of activation rows `qa` (stride `lda`; scales `da`,
/// sub-block sums `xs`, stride `ldd` blocks) against one packed panel, into `c`.
struct Tile {
    nblk: usize,
    qa: *const i8,
    lda: usize,
    da: *const f32,
    xs: *const i32,
    ldd: usize,
    w: *const u8,
    sc: *const u8,
    mn: *const u8,
    d: *const f32,
    dmin: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    first: bool,
    bias: *const f32,
}

/// Adds `acc` (two 16-column halves per row) to `c` (or to the bias on the first pass).
///
/// # Safety
/// AVX512F present; `c` covers `t.mr x t.nr` outputs, the bias (if any) 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_vnni(t: &Tile, acc: &[[std::arch::x86_64::__m512; 2]; MR]) {
    use std::arch::x86_64::*;
    let zf = _mm512_setzero_ps();
    let (b0, b1) = if t.bias.is_null() {
        (zf, zf)
    } else {
        (_mm512_loadu_ps(t.bias), _mm512_loadu_ps(t.bias.add(16)))
    };
    let bits = if t.nr >= 32 {
        u32::MAX
    } else {
        (1u32 << t.nr) - 1
    };
    let (m0, m1) = ((bits & 0xffff) as __mmask16, (bits >> 16) as __mmask16);
    for (r, acc) in acc.iter().enumerate().take(t.mr) {
        let ci = t.c.add(r * t.ldc);
        let (v0, v1) = if t.first {
            (_mm512_add_ps(acc[0], b0), _mm512_add_ps(acc[1], b1))
        } else {
            (
                _mm512_add_ps(acc[0], _mm512_maskz_loadu_ps(m0, ci)),
                _mm512_add_ps(acc[1], _mm512_maskz_loadu_ps(m1, ci.add(16))),
            )
        };
        _mm512_mask_storeu_ps(ci, m0, v0);
        _mm512_mask_storeu_ps(ci.add(16), m1, v1);
    }
}

/// `MR x 32` tile on `vpdpbusd` (nibbles unsigned, activations signed).
///
/// # Safety
/// AVX512F/BW/VNNI present; the tile's pointers cover `MR` activation rows, `nblk` blocks of
/// the panel, and `mr x nr` outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_vnni(t: &Tile) {
    use std::arch::x86_64::*;
    let zf = _mm512_setzero_ps();
    let zi = _mm512_setzero_si512();
    let lo = _mm512_set1_epi8(0x0f);
    let mut acc = [[zf; 2]; MR];
    let rows: [*const i8; MR] = std::array::from_fn(|r| t.qa.add(r * t.lda));
    for b in 0..t.nblk {
        let wb = t.w.add(b * PANEL_QS);
        let sc = t.sc.add(b * PANEL_SC);
        let mn = t.mn.add(b * PANEL_SC);
        let mut isum = [[zi; 2]; MR];
        for j in 0..8 {
            let mut s = [[zi; 2]; MR];
            for g in 0..8 {
                let v = _mm512_loadu_si512(wb.add((j * 8 + g) * 64) as *const _);
                let w0 = _mm512_and_si512(v, lo);
                let w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
                for r in 0..MR {
                    let p = rows[r].add(b * QK_K + j * 32 + g * 4) as *const i32;
                    let x = _mm512_set1_epi32(p.read_unaligned());
                    s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, x);
                    s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, x);
                }
            }
            let c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(j * NR) as *const _));
            let c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.add(j * NR + 16) as *const _));
            for r in 0..MR {
                isum[r][0] = _mm512_add_epi32(isum[r][0], _mm512_mullo_epi32(s[r][0], c0));
                isum[r][1] = _mm512_add_epi32(isum[r][1], _mm512_mullo_epi32(s[r][1], c1));
            }
        }
        let (d0, d1) = (
            _mm512_loadu_ps(t.d.add(b * NR)),
            _mm512_loadu_ps(t.d.add(b * NR + 16)),
        );
        let (m0, m1) = (
            _mm512_loadu_ps(t.dmin.add(b * NR)),
            _mm512_loadu_ps(t.dmin.add(b * NR + 16)),
        );
        for r in 0..MR {
            let mut ms = [zi; 2];
            for tt in 0..4 {
                let x = _mm512_set1_epi32(*t.xs.add((r * t.ldd + b) * 4 + tt));
                let p = mn.add(tt * 2 * NR);
                let v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const _));
                let v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(32) as *const _));
                ms[0] = _mm512_dpwssd_epi32(ms[0], v0, x);
                ms[1] = _mm512_dpwssd_epi32(ms[1], v1, x);
            }
            let dx = _mm512_set1_ps(*t.da.add(r * t.ldd + b));
            let a0 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(isum[r][0]),
                _mm512_mul_ps(d0, dx),
                acc[r][0],
            );
            let a1 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(isum[r][1]),
                _mm512_mul_ps(d1, dx),
                acc[r][1],
            );
            acc[r][0] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms[0]), _mm512_mul_ps(m0, dx), a0);
            acc[r][1] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms[1]), _mm512_mul_ps(m1, dx), a1);
        }
    }
    store_vnni(t, &acc);
}

/// `MR2 x 16` tile (columns `half ..+16` of the panel: the low nibbles for 0, the high ones
/// for 16) on `vpmaddubsw` + `vpmaddwd` with the sub-block scales.
///
/// # Safety
/// AVX2 and FMA present; as [`kernel_vnni`], with `MR2` activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2_half(t: &Tile, half: usize) {
    use std::arch::x86_64::*;
    if t.nr <= half {
        return;
    }
    let zf = _mm256_setzero_ps();
    let zi = _mm256_setzero_si256();
    let lo = _mm256_set1_epi8(0x0f);
    let mut acc = [[zf; 2]; MR2];
    let rows: [*const i8; MR2] = std::array::from_fn(|r| t.qa.add(r * t.lda));
    // (sc, sc) in the two 16-bit halves of each column's lane.
    let pairs = |p: *const u8| {
        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const _));
        _mm256_or_si256(v, _mm256_slli_epi32(v, 16))
    };
    for b in 0..t.nblk {
        let wb = t.w.add(b * PANEL_QS);
        let sc = t.sc.add(b * PANEL_SC + half);
        let mn = t.mn.add(b * PANEL_SC + 2 * half);
        let mut isum = [[zi; 2]; MR2];
        for j in 0..8 {
            let c0 = pairs(sc.add(j * NR));
            let c1 = pairs(sc.add(j * NR + 8));
            for g in 0..8 {
                let p = wb.add((j * 8 + g) * 64);
                let v0 = _mm256_loadu_si256(p as *const _);
                let v1 = _mm256_loadu_si256(p.add(32) as *const _);
                let (w0, w1) = if half == 0 {
                    (_mm256_and_si256(v0, lo), _mm256_and_si256(v1, lo))
                } else {
                    (
                        _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo),
                        _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo),
                    )
                };
                for r in 0..MR2 {
                    let px = rows[r].add(b * QK_K + j * 32 + g * 4) as *const i32;
                    let x = _mm256_set1_epi32(px.read_unaligned());
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x), c0);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x), c1);
                    isum[r][0] = _mm256_add_epi32(isum[r][0], p0);
                    isum[r][1] = _mm256_add_epi32(isum[r][1], p1);
                }
            }
        }
        let db = t.d.add(b * NR + half);
        let mb = t.dmin.add(b * NR + half);
        let (d0, d1) = (_mm256_loadu_ps(db), _mm256_loadu_ps(db.add(8)));
        let (m0, m1) = (_mm256_loadu_ps(mb), _mm256_loadu_ps(mb.add(8)));
        for r in 0..MR2 {
            let mut ms = [zi; 2];
            for tt in 0..4 {
                let x = _mm256_set1_epi32(*t.xs.add((r * t.ldd + b) * 4 + tt));
                let p = mn.add(tt * 2 * NR);
                let v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const _));
                let v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(16) as *const _));
                ms[0] = _mm256_add_epi32(ms[0], _mm256_madd_epi16(v0, x));
                ms[1] = _mm256_add_epi32(ms[1], _mm256_madd_epi16(v1, x));
            }
            let dx = _mm256_set1_ps(*t.da.add(r * t.ldd + b));
            let a0 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum[r][0]),
                _mm256_mul_ps(d0, dx),
                acc[r][0],
            );
            let a1 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum[r][1]),
                _mm256_mul_ps(d1, dx),
                acc[r][1],
            );
            acc[r][0] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms[0]), _mm256_mul_ps(m0, dx), a0);
            acc[r][1] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms[1]), _mm256_mul_ps(m1, dx), a1);
        }
    }
    let cols = (t.nr - half).min(16);
    for (r, acc) in acc.iter().enumerate().take(t.mr) {
        let ci = t.c.add(r * t.ldc + half);
        let mut v = [0.0f32; 16];
        _mm256_storeu_ps(v.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(v.as_mut_ptr().add(8), acc[1]);
        for (j, v) in v.iter().enumerate().take(cols) {
            let prev = if !t.first {
                *ci.add(j)
            } else if t.bias.is_null() {
                0.0
            } else {
                *t.bias.add(half + j)
            };
            *ci.add(j) = prev + v;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_vnni(_: &Tile) {
    unreachable!("q4_k: no VNNI off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_avx2_half(_: &Tile, _: usize) {
    unreachable!("q4_k: no AVX2 off x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_noise;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Candle's tensor over our GGUF blocks of `W [n×k]`.
    fn candle_q4k(q: &Q4KWeight) -> QTensor {
        let dims = vec![q.n(), q.k()];
        qtensor_from_ggml(GgmlDType::Q4K, &q.gguf_blocks(), dims, &Device::Cpu).unwrap()
    }

    /// `tests/data/sdcpp/ggml-q4_K-edge.bin`: 32 blocks of 256 f32 (little-endian), then the
    /// Q4_K blocks stable-diffusion.cpp's ggml made of them (see that folder's README.md).
    fn ggml_edge_blocks() -> (Vec<f32>, &'static [u8]) {
        const FILE: &[u8] = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/sdcpp/ggml-q4_K-edge.bin"
        ));
        let n = FILE.len() / (4 * QK_K + BLOCK_BYTES);
        let (x, blocks) = FILE.split_at(n * 4 * QK_K);
        let x = x
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        (x.collect(), blocks)
    }

    #[test]
    fn quantisation_matches_ggml_q4_k() {
        // Edge blocks: all zero, zero and constant sub-blocks, all positive / negative,
        // outliers, constant, 1e-12 and 1e-30 scaled (steps below f16's range),
        // 1e4 scaled, one live sub-block, ties, an exact grid, every other weight zero; then
        // 17 of noise at scales 0.01..3.
        let (x, theirs) = ggml_edge_blocks();
        assert_eq!(x.len(), 32 * QK_K);
        let mut ours = Vec::new();
        quantize_row_gguf(&x, &mut ours);
        for (b, (o, t)) in ours
            .chunks(BLOCK_BYTES)
            .zip(theirs.chunks(BLOCK_BYTES))
            .enumerate()
        {
            assert_eq!(o, t, "block {b}");
        }
        assert_eq!(ours.len(), theirs.len());
        // Rows of any length quantise block by block.
        let (n, k) = (8, 1024);
        let q = Q4KWeight::quantize(&x, n, k, None).unwrap();
        assert_eq!(q.gguf_blocks(), theirs);
        // Packing, unpacking and dequantisation agree with candle's on the same blocks.
        let back = Q4KWeight::from_gguf(theirs, n, k, None).unwrap();
        assert_eq!(back.gguf_blocks(), theirs);
        let candle_f32 = candle_q4k(&back)
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(back.dequantize(), candle_f32);
        assert_eq!(dequantize_gguf(theirs), candle_f32);
    }

    #[test]
    fn sub_block_lanes_match_the_scalar_fit() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for seed in 0..400u64 {
                let mut x = test_noise(QK_K, 100 + seed);
                let scale = 10f32.powi((seed % 11) as i32 - 8);
                x.iter_mut().for_each(|v| *v *= scale);
                // Lanes of every kind: zero, constant, all positive / negative, one outlier,
                // quantised steps (ties), noise.
                for j in 0..8 {
                    let sub = &mut x[32 * j..32 * (j + 1)];
                    match (seed as usize + j) % 9 {
                        0 => sub.fill(0.0),
                        1 => sub.fill(0.7 * scale),
                        2 => sub.iter_mut().for_each(|v| *v = v.abs() + 0.1 * scale),
                        3 => sub.iter_mut().for_each(|v| *v = -v.abs()),
                        4 => sub[seed as usize % 32] = 50.0 * scale,
                        5 => sub.iter_mut().for_each(|v| *v = (*v * 8.0).round() / 8.0),
                        _ => {}
                    }
                }
                let sigma2 = 2.0 * x.iter().fold(0.0f32, |a, v| a + v * v) / QK_K as f32;
                let xt: [Lanes; 32] =
                    std::array::from_fn(|i| std::array::from_fn(|j| x[32 * j + i]));
                let wt: [Lanes; 32] = xt.map(|r| r.map(|v| (sigma2 + v * v).sqrt()));
                let (mut lv, mut ls) = ([[0u8; 8]; 32], [[0u8; 8]; 32]);
                // SAFETY: the CPU has AVX2.
                let (sv, mv) = unsafe { fit_sub_blocks_avx2(&xt, &wt, &mut lv) };
                let (ss, ms) = fit_sub_blocks_scalar(&xt, &wt, &mut ls);
                let bits = |v: Lanes| v.map(f32::to_bits);
                assert_eq!(bits(sv), bits(ss), "seed {seed}: scales");
                assert_eq!(bits(mv), bits(ms), "seed {seed}: mins");
                assert_eq!(lv, ls, "seed {seed}: levels");
            }
        }
    }

    #[test]
    fn quantisation_is_closer_than_candles() {
        // The weighted search's blocks are nearer the weights than candle's (ggml's older
        // `make_qkx1_quants`), measured in RMS error on noise.
        let (n, k) = (16, 1024);
        let w: Vec<f32> = test_noise(n * k, 9).iter().map(|v| 0.05 * v).collect();
        let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        let candle = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
        let candle = dequantize_gguf(&candle.data().unwrap());
        let ours = Q4KWeight::quantize(&w, n, k, None).unwrap().dequantize();
        let rms = |d: &[f32]| {
            let s: f64 = d
                .iter()
                .zip(&w)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            (s / w.len() as f64).sqrt()
        };
        let (ours, candle) = (rms(&ours), rms(&candle));
        println!("q4_k RMS error on noise: ours {ours:.3e}, candle's {candle:.3e}");
        assert!(ours < candle, "{ours} vs {candle}");
    }

    #[test]
    fn every_path_matches_the_plain_integer_sums() {
        for (m, n, k, bias) in [
            (1, 1, 256, false),
            (7, 33, 512, true),
            (13, 17, 768, true),
            (150, 70, 1280, true),
            (300, 544, 2560, false),
            (37, 1030, 256, true),
        ] {
            let x = test_noise(m * k, 1 + m as u64);
            let w: Vec<f32> = test_noise(n * k, 2 + n as u64)
                .iter()
                .map(|v| 0.05 * v)
                .collect();
            let b = test_noise(n, 3);
            let b = bias.then_some(&b[..]);
            let q = Q4KWeight::quantize(&w, n, k, b).unwrap();
            assert_eq!(q.bias(), b);
            super::super::assert_vector_paths_match_plain(&format!("{m}x{n}x{k}"), |path| {
                q.matmul_with(path, &x, m)
            });
        }
    }

    #[test]
    fn the_product_matches_candle_and_is_close_to_f32() {
        let (m, n, k) = (24, 96, 1280);
        let x = test_noise(m * k, 5);
        let w = test_noise(n * k, 6);
        let q = Q4KWeight::quantize(&w, n, k, None).unwrap();
        let y = q.matmul(&x, m);
        // candle's QMatMul on the same blocks (Q8_K activations too): the same integer sums,
        // summed in another order.
        let qm = QMatMul::from_qtensor(candle_q4k(&q)).unwrap();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let theirs = qm.forward(&xt).unwrap().flatten_all().unwrap();
        let theirs = theirs.to_vec1::<f32>().unwrap();
        let scale = theirs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (i, (u, v)) in y.iter().zip(&theirs).enumerate() {
            assert!((u - v).abs() <= 1e-5 * scale, "[{i}]: {u} vs candle {v}");
        }
        // Against f32 with the dequantised weights (activation rounding only) and the f32
        // weights (both roundings).
        let wd = q.dequantize();
        let rel = |w: &[f32]| {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    num += (y[i * n + j] as f64 - r).powi(2);
                    den += r * r;
                }
            }
            (num / den).sqrt()
        };
        let (act, both) = (rel(&wd), rel(&w));
        println!("q4_k x Q8_K vs f32: {act:.2e} (dequantised weights), {both:.2e} (f32 weights)");
        // Q8_K on the activations: ~0.3 %; 4-bit weights on uniform noise: ~7 %.
        assert!(act < 0.01, "activation rounding {act}");
        assert!(both < 0.12 && both > act, "relative error {both}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q4KWeight::quantize(&[0.0; 256], 2, 128, None).is_err());
        assert!(Q4KWeight::from_gguf(&[0; 143], 1, 256, None).is_err());
        assert!(Q4KWeight::quantize(&[0.0; 512], 2, 256, Some(&[0.0])).is_err());
    }
}
