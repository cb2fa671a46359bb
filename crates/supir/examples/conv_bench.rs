//! GFLOP/s of 3x3 convolution (stride 1, pad 1, f32, CPU) at RRDBNet's and SUPIR's shapes:
//! candle's `conv2d`, Real-ESRGAN's `PackedCpu` engine (shifted-buffer GEMMs), the Winograd
//! F(4x4, 3x3) kernel on a channels-last map (as Real-ESRGAN calls it) and through its NCHW
//! tensor wrapper. FLOPs are counted as direct convolution, `2 · 9 · cin · cout · n · h · w`.
//!
//! Two figures per engine: from the best wall time of `reps` runs, and from the mean process CPU
//! time per run times the thread count (steadier on a shared machine; it counts rayon's spinning).
//!
//! usage: cargo run --release -p supir --example conv_bench -- [reps] [rrdb|supir|all] [engines]
//! (`engines`: letters of `cpwn`, default all: candle, PackedCpu, Winograd, Winograd NCHW)

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use supir::kernels::winograd::{self, Input, Winograd3x3};
use supir::pipelines::realesrgan::PackedConvBench;

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best wall time and mean CPU time of `reps` runs after one warm-up, in seconds.
fn measure(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let c0 = cpu_seconds();
    let wall = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (wall, (cpu_seconds() - c0) / reps as f64)
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let which = args.get(2).map_or("all", String::as_str);
    let engines = args.get(3).map_or("cpwn", String::as_str);
    let rrdb = [
        (1, 64, 32, 256, 256),
        (1, 96, 32, 256, 256),
        (1, 128, 32, 256, 256),
        (1, 160, 32, 256, 256),
        (1, 192, 64, 256, 256),
    ];
    let supir = [
        (2, 640, 640, 32, 32),
        (2, 320, 320, 64, 64),
        (1, 128, 128, 256, 256),
    ];
    let mut shapes = Vec::new();
    if which != "supir" {
        shapes.extend(rrdb);
    }
    if which != "rrdb" {
        shapes.extend(supir);
    }
    // Tiles per Winograd chunk (default: the kernel's choice).
    let chunk: Option<usize> = std::env::var("CONV_BENCH_CHUNK")
        .ok()
        .and_then(|s| s.parse().ok());
    let threads = rayon::current_num_threads();
    println!("3x3 conv, f32, {threads} threads, {reps} runs; GFLOP/s (direct-conv FLOPs) from best wall | mean CPU time");
    println!(
        "{:<24} {:>13} {:>13} {:>13} {:>13}",
        "n x cin->cout x h x w", "candle", "PackedCpu", "Winograd", "Wino NCHW"
    );
    let dev = Device::Cpu;
    for (n, cin, cout, h, w) in shapes {
        let flop = 2.0 * 9.0 * (cin * cout * n * h * w) as f64;
        let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
        let wt = (Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev)? / (9.0 * cin as f64).sqrt())?;
        let b = Tensor::zeros(cout, candle_core::DType::F32, &dev)?;
        let mut cells = Vec::new();
        let mut cell = |on: char, f: &mut dyn FnMut()| {
            cells.push(if engines.contains(on) {
                let (wall, cpu) = measure(reps, f);
                format!(
                    "{:>6.1} |{:>5.1}",
                    flop / wall / 1e9,
                    flop / (cpu / threads as f64) / 1e9
                )
            } else {
                "-".to_string()
            });
        };
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let candle = candle_nn::Conv2d::new(wt.clone(), Some(b.clone()), cfg);
        cell('c', &mut || {
            candle.forward(&x).unwrap();
        });
        let mut packed = PackedConvBench::new(&wt, &b, h, w)?;
        cell('p', &mut || (0..n).for_each(|_| packed.run()));
        let k = Winograd3x3::from_tensors(&wt, Some(&b))?;
        let src = x.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?;
        let mut dst = vec![0.0f32; h * w * cout];
        cell('w', &mut || {
            for img in src.chunks_exact(h * w * cin) {
                let out = OutPtr(dst.as_mut_ptr());
                let input = Input::new(img, h, w, w * cin, cin, cin);
                winograd::conv_chunked(&k, input, chunk.unwrap_or(0), |y, x, v| {
                    // SAFETY: each pixel is written once, inside `dst`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.as_ptr(),
                            out.get().add((y * w + x) * cout),
                            cout,
                        )
                    }
                });
            }
        });
        cell('n', &mut || {
            winograd::conv2d_nchw(&x, &k).unwrap();
        });
        println!(
            "{:<24} {:>13} {:>13} {:>13} {:>13}",
            format!("{n} x {cin}->{cout} x {h}x{w}"),
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: disjoint per-pixel writes within one convolution.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
