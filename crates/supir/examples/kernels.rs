//! The UNet's and the VAE's hot ops, timed in isolation at the full-size shapes of a 512x512
//! image (latent 64x64, CFG batch 2), through the same candle calls the model makes.
//! `scripts/kernels_torch.py` times the same list with PyTorch.
//!
//! usage: cargo run --release -p supir --example kernels -- [reps] [filter]
//!
//! Prints one line per op: name, then for candle's stock op and for ours (`supir::layers`, the
//! path the models take) the best seconds of `reps` (default 5, after one warm-up) and the rate:
//! GFLOP/s for matmuls, convolutions and attention, GB/s (bytes read + written once) for
//! normalisations. Ops the models run through candle have no `ours` column.

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear};
use supir::layers;

fn randn(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
}

fn best(reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        let _out = f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Rate unit of one op.
enum Work {
    Flop(f64),
    Bytes(f64),
}

type Run = Box<dyn FnMut() -> Result<Tensor>>;

struct Op {
    name: String,
    work: Work,
    run: Run,
    ours: Option<Run>,
}

fn conv3x3(b: usize, cin: usize, cout: usize, hw: usize) -> Result<Op> {
    let x = randn(&[b, cin, hw, hw])?;
    let (w, bias) = (
        (randn(&[cout, cin, 3, 3])? * (1.0 / (9.0 * cin as f64).sqrt()))?,
        randn(&[cout])?,
    );
    let conv = Conv2d::new(
        w.clone(),
        Some(bias.clone()),
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
    );
    let ours = layers::Conv2d::new(w, Some(bias), 1, 1);
    let x2 = x.clone();
    Ok(Op {
        name: format!("conv3x3 {cin}->{cout} {hw}x{hw} b{b}"),
        work: Work::Flop(2.0 * (b * cout * hw * hw * cin * 9) as f64),
        run: Box::new(move || conv.forward(&x)),
        ours: Some(Box::new(move || ours.forward(&x2))),
    })
}

fn matmul(m: usize, k: usize, n: usize) -> Result<Op> {
    let (a, w) = (randn(&[m, k])?, randn(&[k, n])?);
    // Ours: the same product as a bias-free Linear with the transposed weight.
    let lin = layers::Linear::new(w.t()?.contiguous()?, None);
    let a2 = a.clone();
    Ok(Op {
        name: format!("matmul {m}x{k} @ {k}x{n}"),
        work: Work::Flop(2.0 * (m * k * n) as f64),
        run: Box::new(move || a.matmul(&w)),
        ours: Some(Box::new(move || lin.forward(&a2))),
    })
}

/// `candle_nn::Linear` on `[b, n, k]` tokens: the transposed-weight batched matmul the UNet runs.
fn linear(b: usize, n: usize, k: usize, out: usize) -> Result<Op> {
    let x = randn(&[b, n, k])?;
    let (w, bias) = (randn(&[out, k])?, randn(&[out])?);
    let lin = Linear::new(w.clone(), Some(bias.clone()));
    let ours = layers::Linear::new(w, Some(bias));
    let x2 = x.clone();
    Ok(Op {
        name: format!("linear [{b},{n},{k}] -> {out}"),
        work: Work::Flop(2.0 * (b * n * k * out) as f64),
        run: Box::new(move || lin.forward(&x)),
        ours: Some(Box::new(move || ours.forward(&x2))),
    })
}

/// `softmax(q k^T) v` as `CrossAttention` runs it, on contiguous `[b, h, n, d]` heads.
fn attention(b: usize, heads: usize, n: usize, m: usize, d: usize) -> Result<Op> {
    let q = randn(&[b, heads, n, d])?;
    let k = randn(&[b, heads, m, d])?;
    let v = randn(&[b, heads, m, d])?;
    // Ours on the token-major [b, n, heads*d] projections.
    let tok = |t: &Tensor, len: usize| {
        t.transpose(1, 2)?
            .contiguous()?
            .reshape((b, len, heads * d))
    };
    let (qt, kt, vt) = (tok(&q, n)?, tok(&k, m)?, tok(&v, m)?);
    Ok(Op {
        name: format!("attention b{b} h{heads} {n}x{m} d{d}"),
        work: Work::Flop(4.0 * (b * heads * n * m * d) as f64),
        run: Box::new(move || {
            let attn = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            attn.matmul(&v)
        }),
        ours: Some(Box::new(move || {
            layers::attention(&qt, &kt, &vt, heads, 1.0)
        })),
    })
}

fn group_norm(shape: &[usize], eps: f64) -> Result<Op> {
    let x = randn(shape)?;
    let c = shape[1];
    let (g, bt) = (
        Tensor::ones(c, DType::F32, &Device::Cpu)?,
        Tensor::zeros(c, DType::F32, &Device::Cpu)?,
    );
    let gn = GroupNorm::new(g.clone(), bt.clone(), c, 32, eps)?;
    let ours = layers::GroupNorm::new(g, bt, 32, eps)?;
    let x2 = x.clone();
    Ok(Op {
        name: format!("group_norm+silu {shape:?}"),
        work: Work::Bytes(8.0 * x.elem_count() as f64),
        run: Box::new(move || gn.forward(&x)?.silu()),
        ours: Some(Box::new(move || ours.forward_silu(&x2))),
    })
}

fn layer_norm(shape: &[usize]) -> Result<Op> {
    let x = randn(shape)?;
    let c = shape[shape.len() - 1];
    let ln = LayerNorm::new(
        Tensor::ones(c, DType::F32, &Device::Cpu)?,
        Tensor::zeros(c, DType::F32, &Device::Cpu)?,
        1e-5,
    );
    Ok(Op {
        name: format!("layer_norm {shape:?}"),
        work: Work::Bytes(8.0 * x.elem_count() as f64),
        run: Box::new(move || ln.forward(&x)),
        ours: None,
    })
}

fn silu(shape: &[usize]) -> Result<Op> {
    let x = randn(shape)?;
    Ok(Op {
        name: format!("silu {shape:?}"),
        work: Work::Bytes(8.0 * x.elem_count() as f64),
        run: Box::new(move || x.silu()),
        ours: None,
    })
}

/// GEGLU's `a * gelu_erf(gate)` on the halves of `[b, n, 2 * inner]`.
fn geglu(b: usize, n: usize, inner: usize) -> Result<Op> {
    let p = randn(&[b, n, 2 * inner])?;
    Ok(Op {
        name: format!("geglu [{b},{n},{}]", 2 * inner),
        work: Work::Bytes(12.0 * (b * n * inner) as f64),
        run: Box::new(move || {
            let a = p.narrow(D::Minus1, 0, inner)?;
            let gate = p.narrow(D::Minus1, inner, inner)?;
            a * gate.gelu_erf()?
        }),
        ours: None,
    })
}

fn add(shape: &[usize]) -> Result<Op> {
    let (x, y) = (randn(shape)?, randn(shape)?);
    Ok(Op {
        name: format!("add {shape:?}"),
        work: Work::Bytes(12.0 * x.elem_count() as f64),
        run: Box::new(move || &x + &y),
        ours: None,
    })
}

/// `[B, C, H, W]` -> `[B, H*W, C]` contiguous (`to_tokens`): a transposing copy.
fn to_tokens(shape: &[usize]) -> Result<Op> {
    let x = randn(shape)?;
    let (b, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    Ok(Op {
        name: format!("transpose-copy {shape:?}"),
        work: Work::Bytes(8.0 * x.elem_count() as f64),
        run: Box::new(move || x.reshape((b, c, hw))?.transpose(1, 2)?.contiguous()),
        ours: None,
    })
}

fn ops() -> Result<Vec<Op>> {
    Ok(vec![
        // The reference shapes.
        matmul(2048, 1280, 1280)?,
        conv3x3(2, 640, 640, 32)?,
        conv3x3(2, 320, 320, 64)?,
        conv3x3(1, 128, 128, 256)?,
        // UNet, latent 64x64, batch 2.
        conv3x3(2, 1280, 1280, 16)?,
        linear(2, 1024, 640, 640)?,
        linear(2, 1024, 640, 5120)?,
        linear(2, 1024, 2560, 640)?,
        linear(2, 256, 1280, 1280)?,
        linear(2, 256, 1280, 10240)?,
        linear(2, 256, 5120, 1280)?,
        linear(2, 77, 2048, 1280)?,
        attention(2, 10, 1024, 1024, 64)?,
        attention(2, 20, 256, 256, 64)?,
        attention(2, 10, 1024, 77, 64)?,
        attention(2, 20, 256, 77, 64)?,
        group_norm(&[2, 320, 64, 64], 1e-5)?,
        group_norm(&[2, 640, 32, 32], 1e-5)?,
        group_norm(&[2, 1280, 16, 16], 1e-5)?,
        layer_norm(&[2, 1024, 640])?,
        layer_norm(&[2, 256, 1280])?,
        silu(&[2, 320, 64, 64])?,
        geglu(2, 1024, 2560)?,
        geglu(2, 256, 5120)?,
        add(&[2, 320, 64, 64])?,
        to_tokens(&[2, 640, 32, 32])?,
        // VAE at 512x512 (decoder's widest levels).
        conv3x3(1, 512, 512, 64)?,
        conv3x3(1, 512, 512, 128)?,
        conv3x3(1, 256, 256, 256)?,
        conv3x3(1, 128, 128, 512)?,
        group_norm(&[1, 128, 512, 512], 1e-6)?,
        silu(&[1, 128, 512, 512])?,
    ])
}

fn main() -> Result<()> {
    // As the CLI: keep freed blocks, so per-call outputs do not page-fault every time.
    supir::memory::keep_freed_heap();
    let args: Vec<String> = std::env::args().collect();
    let reps = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let filter = args.get(2).cloned().unwrap_or_default();
    println!("sgemm: {}", supir::kernels::blas::backend_name());
    println!("op\tcandle_s\tcandle_rate\tours_s\tours_rate");
    for mut op in ops()? {
        if !op.name.contains(&filter) {
            continue;
        }
        let rate = |s: f64| match op.work {
            Work::Flop(f) => format!("{:.1} GFLOP/s", f / s / 1e9),
            Work::Bytes(b) => format!("{:.1} GB/s", b / s / 1e9),
        };
        let s = best(reps, &mut op.run)?;
        let (c_s, c_r) = (format!("{s:.5}"), rate(s));
        let (o_s, o_r) = match op.ours.as_mut() {
            Some(f) => {
                let s = best(reps, f)?;
                (format!("{s:.5}"), rate(s))
            }
            None => ("-".into(), "-".into()),
        };
        println!("{}\t{c_s}\t{c_r}\t{o_s}\t{o_r}", op.name);
    }
    Ok(())
}
