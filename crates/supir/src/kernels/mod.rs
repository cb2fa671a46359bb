//! CPU kernels that candle lacks or runs slowly, all on f32 and tested against plain forms.
//!
//! - [`blas`]: row-major sgemm (OpenBLAS loaded at run time, else the `gemm` crate);
//! - [`conv`]: NCHW conv2d as GEMMs (pointwise, im2col, or [`winograd_nchw`] for 3x3);
//! - [`norm`]: GroupNorm fused with SiLU, a vectorisable `exp`;
//! - [`packed`]: the linear layers' GEMM with the weight packed once (AVX-512);
//! - [`q8`], [`q4k`]: linear layers on GGUF Q8_0 / Q4_K weights with integer dot products;
//! - [`attention`]: multi-head attention in query blocks;
//! - [`scratch`]: reusable work buffers, so per-call scratch is not zeroed every time;
//! - [`winograd`]: channels-last Winograd F(4x4, 3x3) with its own micro-kernels
//!   (Real-ESRGAN's engine).

pub mod attention;
pub mod blas;
pub mod conv;
pub mod elementwise;
pub mod norm;
pub mod packed;
pub mod q4k;
pub mod q8;
pub mod scratch;
pub mod winograd;
pub mod winograd_nchw;

/// Defines `fn $name(args)` whose body is compiled twice, plain and with AVX2+FMA enabled, and
/// picks the AVX2 build at run time when the CPU has it (the crate is built for baseline
/// x86-64, so without this the element-wise loops stay on 4-wide SSE2).
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) {
                    generic($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// A raw pointer shared by the workers of one parallel loop. Every use documents why the
/// workers' accesses are disjoint (or read-only).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the kernels only hand it to workers that write disjoint elements or only read.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Runs `block(i0, rows, j0, cols)` over the GEMM output `m x n` cut into blocks of at most
/// `mc_max` rows (near-equal, whole multiples of `mr`) and `nc_max` columns (from multiples of
/// `nr`), as rayon tasks unless there is one block or the product (`m·n·k`) is small. Each
/// block is handed to exactly one call, so callers may write their blocks without locks.
pub(crate) fn for_each_gemm_block(
    (m, n, k): (usize, usize, usize),
    (mr, nr): (usize, usize),
    (mc_max, nc_max): (usize, usize),
    block: impl Fn(usize, usize, usize, usize) + Sync,
) {
    let mblocks = m.div_ceil(mc_max);
    let mc = m.div_ceil(mblocks).next_multiple_of(mr);
    let nc = nc_max.min(n.next_multiple_of(nr));
    let (mb, nb) = (m.div_ceil(mc), n.div_ceil(nc));
    let task = |t: usize| {
        let (i0, j0) = ((t / nb) * mc, (t % nb) * nc);
        block(i0, (m - i0).min(mc), j0, (n - j0).min(nc));
    };
    if mb * nb == 1 || 2 * m * n * k < (1 << 22) {
        (0..mb * nb).for_each(task);
    } else {
        use rayon::prelude::*;
        (0..mb * nb).into_par_iter().for_each(task);
    }
}

/// Tests of the integer kernels: every vector path this CPU has gives `run(Plain)` within
/// `1e-5 · (1 + |y|)` (the integer sums are exact; only the f32 accumulation order differs).
#[cfg(test)]
pub(crate) fn assert_vector_paths_match_plain(what: &str, run: impl Fn(q8::Q8Path) -> Vec<f32>) {
    use q8::Q8Path;
    let reference = run(Q8Path::Plain);
    for path in [Q8Path::Avx512Vnni, Q8Path::Avx2] {
        if !path.supported() {
            eprintln!("{} not on this CPU; skipped", path.name());
            continue;
        }
        let y = run(path);
        for (i, (u, v)) in y.iter().zip(&reference).enumerate() {
            let tol = 1e-5 * (1.0 + v.abs());
            assert!(
                (u - v).abs() <= tol,
                "{} {what} [{i}]: {u} vs {v}",
                path.name()
            );
        }
    }
}

/// Deterministic values in [-1, 1) (xorshift): the kernels' test and benchmark inputs.
pub fn test_noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
