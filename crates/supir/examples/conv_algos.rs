//! The NCHW convolution algorithms of `supir::kernels::conv` side by side at SUPIR's shapes:
//! im2col GEMM, Winograd F(4x4, 3x3) transforming the filter per call, Winograd with the filter
//! transform kept, and the filter transform alone; plus what `conv::choose` picks with and
//! without a kept transform. The data behind `choose`'s thresholds.
//!
//! usage: cargo run --release -p supir --example conv_algos -- [reps]

use std::time::Instant;

use supir::kernels::conv::{choose, conv2d_with, keeps_filter, ConvAlgo, ConvShape};
use supir::kernels::winograd_nchw::{conv3x3_transformed, filter_transform};

/// Best wall time of `reps` runs after one warm-up, in milliseconds.
fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // As the CLI: keep freed blocks, so per-call buffers do not page-fault every time.
    supir::memory::keep_freed_heap();
    let reps = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!(
        "3x3 conv, f32, {} threads, best of {reps}; ms",
        rayon::current_num_threads()
    );
    println!(
        "n x cin->cout x hw      tiles   im2col  wino/call  wino kept  filter   choose(call|kept)"
    );
    // (n, cin, cout, hw): the UNet at latent 64 (CFG batch 2), a batch of one, and smaller maps.
    for (n, cin, cout, hw) in [
        (2, 320, 320, 64),
        (2, 640, 640, 32),
        (2, 1280, 1280, 16),
        (2, 640, 1280, 16),
        (2, 1920, 1280, 16),
        (2, 2560, 1280, 16),
        (2, 128, 1280, 16),
        (1, 1280, 1280, 16),
        (2, 1280, 1280, 8),
    ] {
        let s = ConvShape {
            n,
            cin,
            h: hw,
            w: hw,
            cout,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        let x: Vec<f32> = (0..n * cin * hw * hw)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut out = vec![0f32; n * cout * hw * hw];
        let im2col = best_ms(reps, || {
            conv2d_with(ConvAlgo::Im2col, &s, &x, &w, None, &mut out)
        });
        let call = best_ms(reps, || {
            conv2d_with(ConvAlgo::Winograd, &s, &x, &w, None, &mut out)
        });
        let filter = best_ms(reps, || {
            std::hint::black_box(filter_transform(&w, cout, cin));
        });
        let u = filter_transform(&w, cout, cin);
        let kept = best_ms(reps, || conv3x3_transformed(&s, &x, &u, None, &mut out));
        let tiles = n * hw.div_ceil(4) * hw.div_ceil(4);
        println!(
            "{:<22} {tiles:>6} {im2col:>8.1} {call:>10.1} {kept:>10.1} {filter:>7.1}   {:?}|{:?}{}",
            format!("{n} x {cin}->{cout} x {hw}"),
            choose(&s, false),
            choose(&s, true),
            if keeps_filter(&s) {
                ""
            } else {
                " (too big to keep)"
            }
        );
    }
}
