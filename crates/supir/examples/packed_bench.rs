//! The linear layers' GEMM at the UNet's shapes: OpenBLAS sgemm (weights re-packed per call)
//! against `kernels::packed` (weights packed once), GFLOP/s, best of `reps`.
//!
//! usage: cargo run --release -p supir --example packed_bench -- [reps]

use std::time::Instant;

use supir::kernels::{blas, packed::PackedWeight, test_noise as noise};

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // As the CLI: keep freed blocks, so per-call outputs do not page-fault every time.
    supir::memory::keep_freed_heap();
    let reps: usize = std::env::args()
        .nth(1)
        .map_or(5, |s| s.parse().expect("reps"));
    println!("sgemm: {}", blas::backend_name());
    println!(
        "{:>6} {:>6} {:>6} | {:>9} {:>9} | {:>7}",
        "m", "k", "n", "blas", "packed", "pack s"
    );
    for (m, k, n) in [
        (512, 1280, 1280),
        (154, 2048, 1280),
        (512, 1280, 10240),
        (512, 5120, 1280),
        (2048, 640, 640),
        (2048, 640, 5120),
        (2048, 2560, 640),
        (8192, 320, 320),
    ] {
        let x = noise(m * k, 1);
        let w = noise(n * k, 2);
        let bias = noise(n, 3);
        let mut y = vec![0.0f32; m * n];
        let t_blas = best(reps, || {
            for row in y.chunks_mut(n) {
                row.copy_from_slice(&bias);
            }
            blas::sgemm_slices(false, true, m, n, k, 1.0, &x, k, &w, k, 1.0, &mut y, n);
        });
        let t0 = Instant::now();
        let p = PackedWeight::new(&w, n, k, Some(&bias));
        let t_pack = t0.elapsed().as_secs_f64();
        let mut yp = vec![0.0f32; m * n];
        let t_packed = best(reps, || p.matmul_into(&x, m, &mut yp));
        let err = y
            .iter()
            .zip(&yp)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        println!(
            "{m:>6} {k:>6} {n:>6} | {:>9.1} {:>9.1} | {t_pack:>7.4}  max|diff| {err:.2e}",
            gf / t_blas,
            gf / t_packed
        );
    }
}
