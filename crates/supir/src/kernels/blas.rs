//! Single-precision GEMM behind every fast CPU layer: OpenBLAS's `cblas_sgemm`, loaded at run
//! time from the system (Debian: `libopenblas0-pthread`), else the pure-Rust `gemm` crate that
//! candle itself uses.
//!
//! Loading at run time keeps the build free of a C dependency (a fresh machine builds and runs
//! without it) while a machine with OpenBLAS gets its AVX-512 kernels (about 2x the `gemm`
//! crate on the bench shapes, `supir bench kernels`).
//!
//! Threads: OpenBLAS is set to one thread and [`sgemm`] splits a large product into row or
//! column blocks over rayon's pool, so all parallel work shares one pool (OpenBLAS's own
//! workers spin after each call and would take the cores the next rayon loop needs).
//! [`sgemm_st`] is the single-threaded call for use inside parallel loops.
//!
//! Environment: `SUPIR_BLAS=off` forces the fallback; `SUPIR_BLAS=/path/libopenblas.so` picks
//! a library.

use std::sync::OnceLock;

use super::SyncPtr;

/// `cblas_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type SgemmFn = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

const CBLAS_ROW_MAJOR: i32 = 101;
const CBLAS_NO_TRANS: i32 = 111;
const CBLAS_TRANS: i32 = 112;

struct Blas {
    sgemm: SgemmFn,
    name: String,
    // Keeps the library mapped for as long as `sgemm` may be called (the whole process).
    _lib: libloading::Library,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(load).as_ref()
}

fn load() -> Option<Blas> {
    let choice = std::env::var("SUPIR_BLAS").unwrap_or_default();
    if choice.eq_ignore_ascii_case("off") || choice == "0" {
        return None;
    }
    let candidates: Vec<String> = if choice.is_empty() {
        [
            "libopenblas.so.0",
            "libopenblas.so",
            "libopenblas.0.dylib",
            "libopenblas.dylib",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    } else {
        vec![choice]
    };
    for path in candidates {
        // SAFETY: loading a BLAS runs its initialisers only; the symbol type is the CBLAS ABI.
        let lib = match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => lib,
            Err(_) => continue,
        };
        let sgemm = match unsafe { lib.get::<SgemmFn>(b"cblas_sgemm\0") } {
            Ok(f) => *f,
            Err(_) => continue,
        };
        let mut name = path.clone();
        type ConfigFn = unsafe extern "C" fn() -> *const std::os::raw::c_char;
        if let Ok(f) = unsafe { lib.get::<ConfigFn>(b"openblas_get_config\0") } {
            // SAFETY: returns a static NUL-terminated string.
            let s = unsafe { std::ffi::CStr::from_ptr(f()) };
            name = format!("{path} ({})", s.to_string_lossy().trim());
        }
        type SetThreadsFn = unsafe extern "C" fn(i32);
        if let Ok(f) = unsafe { lib.get::<SetThreadsFn>(b"openblas_set_num_threads\0") } {
            // SAFETY: plain setter of the library's thread count.
            unsafe { f(1) };
        }
        tracing::debug!("sgemm from {name}");
        return Some(Blas {
            sgemm,
            name,
            _lib: lib,
        });
    }
    None
}

/// Which sgemm runs: the loaded library with its build configuration, or the `gemm` crate.
pub fn backend_name() -> String {
    match blas() {
        Some(b) => format!("OpenBLAS {}", b.name),
        None => "gemm crate (pure Rust; install libopenblas0 for about 2x)".to_string(),
    }
}

/// Whether OpenBLAS was found.
pub fn have_openblas() -> bool {
    blas().is_some()
}

/// Products below this many multiply-adds run on one thread.
const SPLIT_MIN: usize = 1 << 22;

/// Row-major `C[m×n] = alpha · op(A) · op(B) + beta · C`, `op(A)` `m×k`, `op(B)` `k×n`;
/// `ta`/`tb` say that `A` is stored `k×m` / `B` `n×k`. `lda`, `ldb`, `ldc` are row strides.
/// With `beta == 0` `C` is not read. Large products are split over rayon's threads (blocks of
/// rows of `C`, or of columns when `C` is wide).
///
/// # Safety
/// The pointers must cover the matrices their shapes and strides describe, and `C` must not
/// overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < SPLIT_MIN || blas().is_none() {
        // The gemm crate parallelises by itself.
        return sgemm_st(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    let (a, b, c) = (SyncPtr(a as *mut f32), SyncPtr(b as *mut f32), SyncPtr(c));
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    // Blocks of a multiple of 16 rows/columns, about one per thread.
    let step = len.div_ceil(threads).next_multiple_of(16).min(len);
    use rayon::prelude::*;
    (0..len.div_ceil(step)).into_par_iter().for_each(|i| {
        let (p0, p1) = (i * step, ((i + 1) * step).min(len));
        let (a, b, c) = (a.get(), b.get(), c.get());
        // SAFETY: the blocks of C are disjoint; A/B offsets stay inside the caller's extents.
        unsafe {
            if by_rows {
                let a0 = if ta { a.add(p0) } else { a.add(p0 * lda) };
                let c0 = c.add(p0 * ldc);
                sgemm_st(ta, tb, p1 - p0, n, k, alpha, a0, lda, b, ldb, beta, c0, ldc);
            } else {
                let b0 = if tb { b.add(p0 * ldb) } else { b.add(p0) };
                let c0 = c.add(p0);
                sgemm_st(ta, tb, m, p1 - p0, k, alpha, a, lda, b0, ldb, beta, c0, ldc);
            }
        }
    });
}

/// [`sgemm`] on the calling thread only (inside parallel loops).
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_st(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if let Some(blas) = blas() {
        let t = |x: bool| if x { CBLAS_TRANS } else { CBLAS_NO_TRANS };
        (blas.sgemm)(
            CBLAS_ROW_MAJOR,
            t(ta),
            t(tb),
            m as i32,
            n as i32,
            k as i32,
            alpha,
            a,
            lda.max(1) as i32,
            b,
            ldb.max(1) as i32,
            beta,
            c,
            ldc.max(1) as i32,
        );
        return;
    }
    // gemm crate: dst = alpha_g·dst + beta_g·lhs·rhs with explicit (column, row) strides.
    let (a_cs, a_rs) = if ta { (lda, 1) } else { (1, lda) };
    let (b_cs, b_rs) = if tb { (ldb, 1) } else { (1, ldb) };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        beta != 0.0,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        beta,
        alpha,
        false,
        false,
        false,
        if m * n * k < SPLIT_MIN || rayon::current_thread_index().is_some() {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        },
    );
}

/// Safe [`sgemm`] on slices, bounds checked from the shapes.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_slices(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    check(ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // SAFETY: the extents were checked; `c` is a unique borrow.
    unsafe { sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) }
}

/// Safe [`sgemm_st`] on slices (inside parallel loops).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_slices_st(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    check(ta, tb, m, n, k, a, lda, b, ldb, c, ldc);
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // SAFETY: the extents were checked; `c` is a unique borrow.
    unsafe { sgemm_st(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) }
}

/// Panics unless the slices cover the matrices their shapes and strides describe.
#[allow(clippy::too_many_arguments)]
fn check(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &[f32],
    ldc: usize,
) {
    let need = |rows: usize, cols: usize, ld: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * ld + cols
        }
    };
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    assert!(
        ac <= lda.max(1) && a.len() >= need(ar, ac, lda),
        "sgemm: A too small"
    );
    assert!(
        bc <= ldb.max(1) && b.len() >= need(br, bc, ldb),
        "sgemm: B too small"
    );
    assert!(
        n <= ldc.max(1) && c.len() >= need(m, n, ldc),
        "sgemm: C too small"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: bool, tb: bool, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_in_every_transpose() {
        let (m, n, k) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
            .collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let lda = if ta { m } else { k };
            let ldb = if tb { k } else { n };
            let mut c = vec![1.0f32; m * n];
            sgemm_slices(ta, tb, m, n, k, 1.0, &a, lda, &b, ldb, 0.0, &mut c, n);
            let r = naive(ta, tb, m, n, k, &a, &b);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - y).abs() < 1e-4, "{ta} {tb}: {x} vs {y}");
            }
            // beta = 1 accumulates, alpha scales.
            let mut c2 = r.clone();
            sgemm_slices(ta, tb, m, n, k, 2.0, &a, lda, &b, ldb, 1.0, &mut c2, n);
            for (x, y) in c2.iter().zip(&r) {
                assert!((x - 3.0 * y).abs() < 1e-4);
            }
        }
    }
}
