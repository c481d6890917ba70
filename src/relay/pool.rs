//! Relay buffers, lent out only while bytes are in flight (SPEC §4).
//!
//! An idle connection holds no buffer: a pump borrows one for a read and gives it back
//! when the read would block with nothing left to forward. Each worker thread keeps a
//! small free list, so a busy relay reuses buffers and allocates nothing per frame.

use std::cell::RefCell;

/// Buffers kept per thread. 64 × 16 KiB = 1 MiB per worker at the default size: enough
/// to absorb bursts across many connections without hoarding memory.
const MAX_POOLED_PER_THREAD: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Takes a zeroed-or-reused buffer of exactly `size` bytes.
pub fn take(size: usize) -> Box<[u8]> {
    let reused = FREE.with(|f| {
        let mut free = f.borrow_mut();
        // Sizes differ only across routes; a mismatching buffer is dropped, not kept.
        while let Some(buf) = free.pop() {
            if buf.len() == size {
                return Some(buf);
            }
        }
        None
    });
    reused.unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
}

/// Returns a buffer to this thread's free list (or frees it when the list is full).
pub fn give(buf: Box<[u8]>) {
    FREE.with(|f| {
        let mut free = f.borrow_mut();
        if free.len() < MAX_POOLED_PER_THREAD {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let a = take(1024);
        let ptr = a.as_ptr();
        give(a);
        let b = take(1024);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1024);
    }

    #[test]
    fn mismatched_sizes_are_not_handed_out() {
        give(take(512));
        assert_eq!(take(2048).len(), 2048);
    }
}
