//! Returning freed heap memory to the system between the phases of a restore.
//!
//! Weights and activations are freed in many blocks that glibc keeps in its heap (and
//! [`keep_freed_heap`] tells it to keep large blocks too, to spare page faults inside and
//! between network calls). Between phases — text encoders dropped, stage 1 done, sampling
//! done — [`release_free_heap`] hands the free pages back, so the next phase starts from what
//! is really in use.

/// Tells glibc to keep freed blocks for reuse (call at start-up, before threads start; the CLI
/// and the benchmark examples do): by default it maps every block over 32 MiB afresh and gives
/// it back on free, so each layer's output costs a round of page faults and zeroing (measured:
/// 16% of a UNet step in the kernel), and it shrinks the heap whenever its free top passes a
/// threshold (the UNet frees over 1 GiB at the end of each call, faulted in again on the next
/// step). A trim threshold of -1 is SIZE_MAX: only [`release_free_heap`] gives memory back.
/// `SUPIR_MALLOC_DEFAULT=1` leaves glibc's defaults. Nothing elsewhere than glibc.
pub fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("SUPIR_MALLOC_DEFAULT").is_none() {
        // SAFETY: mallopt only tunes glibc's allocator.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
}

/// Drops the kernels' pooled scratch ([`crate::kernels::scratch`]), then `malloc_trim(0)` on glibc.
pub fn release_free_heap() {
    crate::kernels::scratch::release();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the glibc allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A `key:` line in kB of a `/proc` file (`/proc/self/status`, `/proc/meminfo`), in KiB;
/// `None` where there is no such file or line.
pub fn proc_kib(file: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resident memory of this process in GiB (`VmRSS`).
pub fn rss_gib() -> Option<f64> {
    proc_kib("/proc/self/status", "VmRSS").map(|k| k / (1024.0 * 1024.0))
}

/// Peak resident memory of this process in GiB (`VmHWM`).
pub fn peak_rss_gib() -> Option<f64> {
    proc_kib("/proc/self/status", "VmHWM").map(|k| k / (1024.0 * 1024.0))
}

/// Logs the resident memory at a phase boundary (tracing debug level).
pub fn trace_rss(phase: &str) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        if let Some(g) = rss_gib() {
            tracing::debug!("rss {g:.2} GiB: {phase}");
        }
    }
}
