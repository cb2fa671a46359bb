//! Reusable f32 work buffers for the kernels' internal scratch (Winograd transforms, im2col
//! columns, attention scores). A fresh `vec![0.0; n]` per call costs a memset of the whole
//! buffer (or page faults when the allocator maps it anew): up to 48 MB per Winograd call at the
//! UNet's first level. Buffers taken here come back to a small pool when dropped and are handed
//! out again as they are: their contents are stale, so callers write before they read.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Buffers kept between calls (the largest kernel takes two at a time; rayon tasks one each).
const KEEP: usize = 4;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A work buffer of `len` floats with stale contents; back to the pool on drop.
pub struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

/// Takes a buffer of at least `len` floats from the pool (the smallest that fits, else the
/// largest grown to `len`; only the growth is zeroed).
pub fn take(len: usize) -> Scratch {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pick = pool
        .iter()
        .enumerate()
        .filter(|(_, b)| b.len() >= len)
        .min_by_key(|(_, b)| b.len())
        .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.len()))
        .map(|(i, _)| i);
    let mut buf = pick.map(|i| pool.swap_remove(i)).unwrap_or_default();
    drop(pool);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    Scratch { buf, len }
}

/// Frees every pooled buffer (between pipeline phases, with the heap trim).
pub fn release() {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEEP {
            pool.push(std::mem::take(&mut self.buf));
        } else if let Some(small) = pool.iter_mut().min_by_key(|b| b.len()) {
            // Keep the larger buffers: they are the costly ones to make again.
            if small.len() < self.buf.len() {
                std::mem::swap(small, &mut self.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_with_the_asked_length() {
        release();
        let ptr = {
            let mut a = take(1000);
            assert_eq!(a.len(), 1000);
            a.fill(3.0);
            a.as_ptr()
        };
        // The same allocation comes back, contents kept (stale), length as asked.
        let b = take(500);
        assert_eq!(b.len(), 500);
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.iter().all(|v| *v == 3.0));
        // Growing keeps the old contents and zeroes the growth.
        drop(b);
        let c = take(2000);
        assert_eq!(c.len(), 2000);
        assert!(c[1000..].iter().all(|v| *v == 0.0));
        drop(c);
        release();
        assert!(POOL.lock().unwrap().is_empty());
    }
}
