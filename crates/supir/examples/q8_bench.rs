//! CPU time of one thread (immune to other processes' load) of the f32 packed GEMM and the Q8_0
//! and Q4_K kernel paths (and candle's own Q4_K `QMatMul`) at the UNet's linear-layer shapes: `cargo run --release -p supir --example q8_bench`.
use supir::kernels::q4k::Q4KWeight;
use supir::kernels::q8::{Q8Path, Q8Weight};
/// Process CPU time (user + system) in ns, from /proc/self/stat (10 ms ticks).
fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 10_000_000
}
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = cpu_ns();
    let mut reps = 0;
    while cpu_ns() - t < 1_500_000_000 {
        f();
        reps += 1;
    }
    (cpu_ns() - t) as f64 / reps as f64 / 1e6
}
fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .unwrap();
    for (m, k, n) in [
        (1024usize, 1280usize, 1280usize),
        (4096, 640, 640),
        (1024, 5120, 1280),
        (4096, 640, 5120),
        (4096, 2560, 640),
    ] {
        let x = supir::kernels::test_noise(m * k, 1);
        let w: Vec<f32> = supir::kernels::test_noise(n * k, 2)
            .iter()
            .map(|v| v * 0.02)
            .collect();
        let p = supir::kernels::packed::PackedWeight::new(&w, n, k, None);
        let f = time(|| {
            std::hint::black_box(p.matmul(&x, m));
        });
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let pb = supir::kernels::packed::PackedWeight::new(&wb, n, k, None);
        let b = time(|| {
            std::hint::black_box(pb.matmul(&x, m));
        });
        let t0 = cpu_ns();
        let q = Q8Weight::quantize(&w, n, k, None).unwrap();
        let q8_ms = (cpu_ns() - t0) as f64 / 1e6;
        let v = time(|| {
            std::hint::black_box(q.matmul_with(Q8Path::Avx512Vnni, &x, m));
        });
        let a = time(|| {
            std::hint::black_box(q.matmul_with(Q8Path::Avx2, &x, m));
        });
        let g = (m * n * k) as f64 / 1e6;
        println!("m{m} k{k} n{n}: f32 packed {f:.1} ms ({:.1} GMAC/s), bf16 packed {b:.1} ms (x{:.2} of f32), vnni {v:.1} ms ({:.1}) x{:.2}, avx2 {a:.1} ms ({:.1})", g / f, b / f, g / v, f / v, g / a);
        if !k.is_multiple_of(256) {
            println!("  q4_k: k = {k} is not a multiple of 256 (such layers fall back to q8_0)");
            continue;
        }
        let t0 = cpu_ns();
        let q4 = Q4KWeight::quantize(&w, n, k, None).unwrap();
        let quant_ms = (cpu_ns() - t0) as f64 / 1e6;
        println!("  quantising the {n}x{k} weight: q4_k {quant_ms:.0} ms CPU, q8_0 {q8_ms:.0} ms");
        let v4 = time(|| {
            std::hint::black_box(q4.matmul_with(Q8Path::Avx512Vnni, &x, m));
        });
        let a4 = time(|| {
            std::hint::black_box(q4.matmul_with(Q8Path::Avx2, &x, m));
        });
        let dev = candle_core::Device::Cpu;
        let wt = candle_core::Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
        let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
        let cq = candle_core::quantized::QMatMul::from_qtensor(
            candle_core::quantized::QTensor::quantize(&wt, candle_core::quantized::GgmlDType::Q4K)
                .unwrap(),
        )
        .unwrap();
        let c4 = time(|| {
            use candle_core::Module;
            std::hint::black_box(cq.forward(&xt).unwrap());
        });
        println!("  q4_k: vnni {v4:.1} ms ({:.1} GMAC/s, x{:.2} of f32), avx2 {a4:.1} ms ({:.1}), candle QMatMul {c4:.1} ms ({:.1})", g / v4, f / v4, g / a4, g / c4);
    }
}
