//! Returning freed heap memory to the system between the phases of a restore.
//!
//! Weights and activations are freed in many blocks that glibc keeps in its heap (and the CLI
//! tells it to keep large blocks too, to spare page faults inside a network call). Between
//! phases — text encoders dropped, stage 1 done, sampling done — [`release_free_heap`] hands
//! the free pages back, so the next phase starts from what is really in use.

/// `malloc_trim(0)` on glibc; nothing elsewhere.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the glibc allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}
