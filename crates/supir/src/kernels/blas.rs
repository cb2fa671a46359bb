//! Single-precision GEMM behind every fast CPU layer: OpenBLAS's `cblas_sgemm`, loaded at run
//! time from the system (Debian: `libopenblas0-pthread`), else the pure-Rust `gemm` crate that
//! candle itself uses.
//!
//! Loading at run time keeps the build free of a C dependency (a fresh machine builds and runs
//! without it) while a machine with OpenBLAS gets its AVX-512 kernels (about 2x the `gemm`
//! crate on the bench shapes, `supir bench kernels`).
//!
//! Environment: `SUPIR_BLAS=off` forces the fallback; `SUPIR_BLAS=/path/libopenblas.so` picks
//! a library; `OPENBLAS_NUM_THREADS` is honoured by OpenBLAS itself.

use std::sync::OnceLock;

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

/// Row-major `C[m×n] = alpha · op(A) · op(B) + beta · C`, `op(A)` `m×k`, `op(B)` `k×n`;
/// `ta`/`tb` say that `A` is stored `k×m` / `B` `n×k`. `lda`, `ldb`, `ldc` are row strides.
/// With `beta == 0` `C` is not read.
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
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
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
    // SAFETY: the extents were checked above; `c` is a unique borrow.
    unsafe {
        sgemm(
            ta,
            tb,
            m,
            n,
            k,
            alpha,
            a.as_ptr(),
            lda,
            b.as_ptr(),
            ldb,
            beta,
            c.as_mut_ptr(),
            ldc,
        )
    }
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
