//! transformers' sampling for `generate(do_sample=True, temperature, top_p)`: the warpers in
//! its order (temperature, top-k with the default k = 50, top-p keeping at least one token),
//! softmax, one multinomial draw; greedy (argmax) at temperature 0.
//!
//! candle's `LogitsProcessor` is not used: its top-k-then-top-p compares the top-p mass with the
//! probabilities of the whole vocabulary, where transformers renormalises over the top-k
//! tokens first. The draw uses our own seeded generator (torch's cannot be replayed), so a seed
//! gives the same caption every time, not the official one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f64,
    /// 1.0: off.
    pub top_p: f64,
    /// 0: off.
    pub top_k: usize,
    pub seed: u64,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            params,
        }
    }

    /// The next token for `logits` (one row, f32).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut scores = warp(logits, &self.params);
        // softmax
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let u: f64 = self.rng.random::<f64>() * sum;
        let mut acc = 0f64;
        let mut last = 0;
        for (i, &p) in scores.iter().enumerate() {
            if p > 0.0 {
                acc += p as f64;
                last = i;
                if u < acc {
                    return i as u32;
                }
            }
        }
        last as u32
    }
}

/// First index of the maximum (torch's `argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The warped scores (filtered entries at `-inf`).
pub fn warp(logits: &[f32], p: &SamplingParams) -> Vec<f32> {
    let t = p.temperature as f32;
    let mut s: Vec<f32> = logits.iter().map(|&x| x / t).collect();
    let n = s.len();
    if p.top_k > 0 && p.top_k < n {
        // Remove everything below the k-th largest score (ties with it kept).
        let mut sorted = s.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[p.top_k - 1];
        for x in s.iter_mut() {
            if *x < kth {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if p.top_p < 1.0 {
        // Ascending sort; drop tokens whose cumulative probability is <= 1 - top_p.
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = idx.iter().map(|&i| (s[i] - max).exp()).collect();
        let total: f32 = e.iter().sum();
        let cut = (1.0 - p.top_p) as f32;
        let mut cum = 0f32;
        for (j, &i) in idx.iter().enumerate() {
            cum += e[j] / total;
            // keep at least one (the most likely)
            if cum <= cut && j + 1 < n {
                s[i] = f32::NEG_INFINITY;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f64, top_p: f64, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            seed: 7,
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_head_reaching_p() {
        // probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let kept = |p: f64| {
            warp(&logits, &params(1.0, p, 0))
                .iter()
                .filter(|x| x.is_finite())
                .count()
        };
        assert_eq!(kept(0.4), 1);
        assert_eq!(kept(0.7), 2);
        assert_eq!(kept(0.85), 3);
        assert_eq!(kept(0.99), 4);
        assert_eq!(kept(0.01), 1);
    }

    #[test]
    fn top_k_then_top_p_renormalises_over_the_top_k() {
        // top-2 of (0.4, 0.2, 0.2, 0.2) keeps 0.4 and one... ties: all 0.2 kept (>= kth).
        let logits: Vec<f32> = [0.6f32, 0.3, 0.05, 0.05].iter().map(|p| p.ln()).collect();
        // top_k 2: (0.6, 0.3) renormalised to (2/3, 1/3); top_p 0.7 keeps both.
        let w = warp(&logits, &params(1.0, 0.7, 2));
        assert_eq!(w.iter().filter(|x| x.is_finite()).count(), 2);
        // Without top-k, top_p 0.6 over the full vocabulary keeps one.
        let w = warp(&logits, &params(1.0, 0.6, 0));
        assert_eq!(w.iter().filter(|x| x.is_finite()).count(), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0, 0.9, 50)
            });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        let mut g = Sampler::new(params(0.0, 0.7, 50));
        assert_eq!(g.sample(&logits), argmax(&logits));
    }
}
