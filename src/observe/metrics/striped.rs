//! A counter that threads add to without sharing a cache line: the per-message counters
//! (`wsgate_messages_total`, `wsgate_bytes_total`) are bumped at every relay wake by every
//! connection of a route, on every worker thread. One atomic per route would bounce its
//! cache line between cores on each wake; here each thread adds to its own stripe and a
//! scrape sums them.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Atomic;

/// Stripes per counter: threads beyond this share stripes (round robin), which only
/// brings back some sharing, never a wrong sum.
const STRIPES: usize = 16;

/// One stripe on its own cache line (128 bytes: the adjacent-line prefetcher pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

#[derive(Debug, Default)]
pub struct Striped([Stripe; STRIPES]);

/// This thread's stripe, handed out round robin the first time a thread adds.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    MINE.with(|mine| {
        if mine.get() == usize::MAX {
            mine.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        mine.get()
    })
}

impl Atomic<u64> for Striped {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    /// Returns the stripe's previous value (the whole sum would read every stripe).
    fn inc_by(&self, v: u64) -> u64 {
        self.0[stripe()].0.fetch_add(v, Ordering::Relaxed)
    }

    fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_what_every_thread_added() {
        let counter = std::sync::Arc::new(Striped::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let c = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.inc_by(3);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(counter.get(), 20 * 1000 * 3);
        // 20 threads over 16 stripes: more than one stripe was used.
        assert!(
            counter
                .0
                .iter()
                .filter(|s| s.0.load(Ordering::Relaxed) > 0)
                .count()
                > 1
        );
    }
}
