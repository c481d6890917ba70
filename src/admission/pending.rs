//! `limits.max_pending_handshakes` (SPEC §2, §3 "Admission before work"): the
//! process-wide number of connections between accept and relay (PROXY header, TLS, the
//! request head, the upstream handshake). The listener takes a slot *before* it accepts,
//! so beyond the bound new connections wait in the kernel's accept queue instead of
//! becoming tasks; a slot is given back when its connection starts relaying or ends.
//!
//! A reload may change the bound: growing adds slots at once; shrinking retires free
//! slots at once and the rest as they come back, so the bound is never exceeded for long
//! and no connection is disturbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The handshake slots of the process.
pub struct HandshakeSlots {
    semaphore: Arc<Semaphore>,
    /// The configured bound.
    size: AtomicUsize,
    /// Slots to retire as they come back (after a reload lowered the bound).
    debt: Arc<AtomicUsize>,
}

/// One connection's slot; dropping it frees the slot (or retires it, after a shrink).
#[must_use = "the slot is freed as soon as it is dropped"]
pub struct HandshakeSlot {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
}

impl HandshakeSlots {
    pub fn new(size: usize) -> HandshakeSlots {
        HandshakeSlots {
            semaphore: Arc::new(Semaphore::new(size.min(Semaphore::MAX_PERMITS))),
            size: AtomicUsize::new(size),
            debt: Arc::default(),
        }
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> HandshakeSlot {
        let permit = self.semaphore.clone().acquire_owned().await.ok();
        HandshakeSlot {
            permit,
            debt: self.debt.clone(),
        }
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<HandshakeSlot> {
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        Some(HandshakeSlot {
            permit: Some(permit),
            debt: self.debt.clone(),
        })
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        let size = self.size.load(Ordering::Acquire);
        let retiring = self.debt.load(Ordering::Acquire);
        (size + retiring).saturating_sub(self.semaphore.available_permits())
    }

    /// Changes the bound (a reload).
    pub fn resize(&self, size: usize) {
        let size = size.min(Semaphore::MAX_PERMITS);
        let old = self.size.swap(size, Ordering::AcqRel);
        if size > old {
            let mut grow = size - old;
            // Cancel retirements still owed before adding slots.
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    let paid = d.min(grow);
                    grow -= paid;
                    Some(d - paid)
                });
            self.semaphore.add_permits(grow);
        } else if size < old {
            let shrink = old - size;
            let retired = self.semaphore.forget_permits(shrink);
            self.debt.fetch_add(shrink - retired, Ordering::AcqRel);
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let owed = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1));
        if owed.is_ok() {
            permit.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_come_back() {
        let s = HandshakeSlots::new(2);
        let a = s.try_acquire().expect("first");
        let _b = s.try_acquire().expect("second");
        assert!(s.try_acquire().is_none());
        assert_eq!(s.in_use(), 2);
        drop(a);
        assert_eq!(s.in_use(), 1);
        assert!(s.try_acquire().is_some());
    }

    #[test]
    fn shrinking_retires_slots_as_they_come_back() {
        let s = HandshakeSlots::new(3);
        let held: Vec<_> = (0..3).filter_map(|_| s.try_acquire()).collect();
        s.resize(1);
        assert!(s.try_acquire().is_none());
        let mut held = held.into_iter();
        drop(held.next());
        assert!(s.try_acquire().is_none(), "retired, not freed");
        drop(held.next());
        assert!(s.try_acquire().is_none(), "retired, not freed");
        drop(held.next());
        let one = s.try_acquire().expect("the one slot left");
        assert!(s.try_acquire().is_none());
        drop(one);
        assert_eq!(s.in_use(), 0);
    }

    #[test]
    fn growing_cancels_debt_first() {
        let s = HandshakeSlots::new(2);
        let held: Vec<_> = (0..2).filter_map(|_| s.try_acquire()).collect();
        s.resize(1);
        s.resize(3);
        drop(held);
        let again: Vec<_> = (0..4).filter_map(|_| s.try_acquire()).collect();
        assert_eq!(again.len(), 3);
    }

    #[tokio::test]
    async fn acquire_waits_for_a_free_slot() {
        let s = Arc::new(HandshakeSlots::new(1));
        let first = s.acquire().await;
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.acquire().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(_))));
    }
}
