//! This instance's own truth about what it holds in the fleet's counts: the fields
//! (a client address, a subject) of its live connections, and the releases not yet sent
//! to Redis. Re-registration writes the held counts whole; a [`FleetPermit`]'s drop moves
//! one connection from held to released (and wakes the flusher). Synchronous and
//! lock-short: the relay's end drops a permit, never awaits Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// A field of an instance's hash: `i:<address>` or `s:<subject digest>`.
pub type Field = Arc<str>;

#[derive(Default)]
struct Inner {
    held: HashMap<Field, u32>,
    released: HashMap<Field, u32>,
    /// Redis holds this instance's registration: releases must be sent. When it does
    /// not, the next registration writes `held` whole, so nothing is queued.
    tracking: bool,
}

/// Held and released counts; shared by the fleet and every permit.
#[derive(Default)]
pub struct Counts {
    inner: Mutex<Inner>,
    /// Woken when a release is queued.
    pub(super) flush: Notify,
}

impl Counts {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one connection under `fields`.
    pub(super) fn hold(self: &Arc<Self>, fields: Vec<Field>) -> FleetPermit {
        let mut inner = self.lock();
        for f in &fields {
            *inner.held.entry(f.clone()).or_insert(0) += 1;
        }
        drop(inner);
        FleetPermit {
            counts: self.clone(),
            fields,
        }
    }

    /// What a registration writes (field, count pairs), starting to track releases anew:
    /// those queued so far are part of the snapshot already.
    pub(super) fn snapshot_and_track(&self) -> Vec<(Field, u32)> {
        let mut inner = self.lock();
        inner.tracking = true;
        inner.released.clear();
        inner.held.iter().map(|(f, n)| (f.clone(), *n)).collect()
    }

    /// Redis no longer holds the registration (or cannot be reached): stop queueing.
    pub(super) fn untrack(&self) {
        let mut inner = self.lock();
        inner.tracking = false;
        inner.released = HashMap::new();
    }

    /// The releases to send now.
    pub(super) fn take_released(&self) -> Vec<(Field, u32)> {
        let mut inner = self.lock();
        let out = inner.released.drain().collect();
        if inner.released.capacity() > 1024 {
            inner.released.shrink_to_fit();
        }
        out
    }

    /// Connections held under `field`.
    pub fn held(&self, field: &str) -> u32 {
        self.lock().held.get(field).copied().unwrap_or(0)
    }

    fn release(&self, fields: &[Field]) {
        let mut inner = self.lock();
        let mut queued = false;
        for f in fields {
            if let Some(n) = inner.held.get_mut(f) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.held.remove(f);
                }
            }
            if inner.tracking {
                *inner.released.entry(f.clone()).or_insert(0) += 1;
                queued = true;
            }
        }
        if inner.held.capacity() > 1024 && inner.held.len() < inner.held.capacity() / 4 {
            inner.held.shrink_to_fit();
        }
        drop(inner);
        if queued {
            self.flush.notify_one();
        }
    }
}

/// One connection's place in the fleet's counts; dropping it releases the place (sent to
/// Redis by the flusher, batched).
#[must_use = "the fleet count is released as soon as the permit is dropped"]
pub struct FleetPermit {
    counts: Arc<Counts>,
    fields: Vec<Field>,
}

impl Drop for FleetPermit {
    fn drop(&mut self) {
        self.counts.release(&self.fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_queued_only_while_tracked_and_a_snapshot_supersedes_them() {
        let counts = Arc::new(Counts::default());
        let a: Field = "i:192.0.2.1".into();
        let p1 = counts.hold(vec![a.clone()]);
        let p2 = counts.hold(vec![a.clone()]);
        drop(p1);
        assert!(
            counts.take_released().is_empty(),
            "not tracked: nothing queued"
        );
        assert_eq!(counts.snapshot_and_track(), vec![(a.clone(), 1)]);
        drop(p2);
        assert_eq!(counts.take_released(), vec![(a.clone(), 1)]);
        assert_eq!(counts.held(&a), 0);
        let p3 = counts.hold(vec![a.clone()]);
        drop(p3);
        assert!(counts.snapshot_and_track().is_empty());
        assert!(
            counts.take_released().is_empty(),
            "the snapshot already has it"
        );
    }
}
