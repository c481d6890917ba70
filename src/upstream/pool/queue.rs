//! `max_pending` places per backend, granted in arrival order (issue 19).
//!
//! Owns, for one pool: each backend's *lane* (handshakes ahead — allowed to connect
//! before their turn — and in flight, with the FIFO waiters of each), the handshakes
//! waiting for a backend to come back, and the tickets that order them all. Does not own
//! connecting or the handshake itself ([`crate::upstream::connect`]).
//!
//! A handshake takes a [`Ticket`] when it starts (its place in line for its whole life,
//! across failover and waits for a backend). On a backend it first waits to be *ahead*
//! (at most `max_pending` are): it may then open its TCP (and TLS) connection; then it
//! waits for a *place* (at most `max_pending` in flight), sends its request and holds
//! the place until the answer. The connect thus overlaps the handshakes in flight, and a
//! place covers only request → answer. Both waits are granted by ticket, smallest first.
//!
//! A handshake that found its backends unreachable waits for one to come back, and holds
//! its turn on its key's own backend meanwhile: no later ticket is let ahead there until
//! it has queued again (or left). When a backend comes back, all waiting for it are woken
//! at once and queue again by ticket, so the earliest arrivals keep their turn (FIFO
//! across the outage). A waiter that looks again on its own (every 250 ms) holds its
//! turn the same way.
//!
//! The size is read at each grant, so a reload that changes `max_pending` neither resets
//! the count nor adds a second set of places: holders of the old size stay counted, and
//! nothing more is granted until the count is under the new size (never more than
//! max(old, new) in flight, and not more than the new size once the old holders are done).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// A backend's queue holds at most this many handshakes per `max_pending` place; past
/// it a handshake is refused at once (503 `queue_timeout`), so the queue's memory is
/// bounded whatever the herd.
pub const QUEUE_PER_PLACE: usize = 256;

/// Where a handshake waits.
#[derive(Clone, Copy)]
enum Stage {
    /// To be let ahead (and connect).
    Ahead,
    /// For a place in flight (connected already).
    Place,
}

/// One backend's counts and waiters.
#[derive(Default)]
struct Lane {
    ahead: usize,
    in_flight: usize,
    waiting_ahead: BTreeMap<u64, oneshot::Sender<()>>,
    waiting_place: BTreeMap<u64, oneshot::Sender<()>>,
    /// Tickets of handshakes whose key's own backend this is, waiting for a backend to
    /// come back (or woken and not queued again yet): later tickets are not let ahead.
    holding: BTreeSet<u64>,
}

impl Lane {
    fn waiters(&mut self, stage: Stage) -> &mut BTreeMap<u64, oneshot::Sender<()>> {
        match stage {
            Stage::Ahead => &mut self.waiting_ahead,
            Stage::Place => &mut self.waiting_place,
        }
    }

    fn count(&mut self, stage: Stage) -> &mut usize {
        match stage {
            Stage::Ahead => &mut self.ahead,
            Stage::Place => &mut self.in_flight,
        }
    }

    fn is_idle(&self) -> bool {
        self.ahead == 0
            && self.in_flight == 0
            && self.waiting_ahead.is_empty()
            && self.waiting_place.is_empty()
            && self.holding.is_empty()
    }

    /// Grants what the size allows, smallest ticket first; "ahead" only to tickets
    /// before every handshake holding its turn here.
    fn dispatch(&mut self, size: usize) {
        grant(&mut self.waiting_place, &mut self.in_flight, size, None);
        let before = self.holding.first().copied();
        grant(&mut self.waiting_ahead, &mut self.ahead, size, before);
    }
}

fn grant(
    waiting: &mut BTreeMap<u64, oneshot::Sender<()>>,
    count: &mut usize,
    size: usize,
    before: Option<u64>,
) {
    while *count < size {
        let Some(entry) = waiting.first_entry() else {
            return;
        };
        if before.is_some_and(|r| *entry.key() > r) {
            return;
        }
        // A waiter that went away meanwhile removes itself under this lock, so the
        // receiver is there; a failed send is only a waiter dropped without its guard.
        if entry.remove().send(()).is_ok() {
            *count += 1;
        }
    }
}

#[derive(Default)]
struct Inner {
    /// `max_pending` now (0: no limit; nothing queues).
    size: usize,
    /// "A backend came back" events so far.
    generation: u64,
    lanes: BTreeMap<String, Lane>,
    /// Handshakes waiting for a backend to come back, with their key's own backend.
    back: BTreeMap<u64, (Option<String>, oneshot::Sender<()>)>,
    /// Handshakes told a backend is back that have not queued again yet, likewise.
    returning: BTreeMap<u64, Option<String>>,
}

impl Inner {
    /// The limit to grant up to: `max_pending`, or none when a reload set it to 0.
    fn limit(&self) -> usize {
        if self.size == 0 {
            usize::MAX
        } else {
            self.size
        }
    }

    fn dispatch_all(&mut self) {
        let size = self.limit();
        for lane in self.lanes.values_mut() {
            lane.dispatch(size);
        }
    }

    fn dispatch(&mut self, lane: &str) {
        let size = self.limit();
        if let Some(l) = self.lanes.get_mut(lane) {
            l.dispatch(size);
            if l.is_idle() {
                self.lanes.remove(lane);
            }
        }
    }

    /// The ticket queues again (or leaves): it no longer holds its turn anywhere, and
    /// later ones may be let ahead there now.
    fn release_turn(&mut self, ticket: u64) {
        let lane = match (self.back.remove(&ticket), self.returning.remove(&ticket)) {
            (Some((lane, _)), _) | (None, Some(lane)) => lane,
            (None, None) => None,
        };
        if let Some(lane) = lane {
            if let Some(l) = self.lanes.get_mut(&lane) {
                l.holding.remove(&ticket);
            }
            self.dispatch(&lane);
        }
    }
}

/// One pool's lanes and waits.
#[derive(Default)]
pub struct Queues {
    inner: Mutex<Inner>,
    next_ticket: AtomicU64,
}

/// Why a handshake did not get ahead.
pub enum Refused {
    /// `queue_timeout` passed.
    Timeout,
    /// The backend's queue is full ([`QUEUE_PER_PLACE`] × `max_pending`).
    Full,
}

impl Queues {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a reload's `max_pending` (grants what a larger size allows at once).
    pub fn resize(&self, size: u32) {
        let mut inner = self.lock();
        inner.size = size as usize;
        inner.dispatch_all();
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// A backend came back: wakes every handshake waiting for one, in ticket order, and
    /// holds later tickets back until they have queued again.
    pub fn tell(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        for (ticket, (lane, tx)) in std::mem::take(&mut inner.back) {
            // Sent or not (a waiter that just timed out queues again at once), it holds
            // its turn until it has.
            let _ = tx.send(());
            inner.returning.insert(ticket, lane);
        }
    }

    /// A place in line, for the handshake's whole life.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        Ticket {
            n: self.next_ticket.fetch_add(1, Ordering::Relaxed),
            queues: self.clone(),
        }
    }

    /// Waits until a backend comes back after `generation` (true) or `until` (false),
    /// holding the handshake's turn on `home` (its key's own backend) meanwhile and
    /// until it queues again.
    pub async fn wait_back(
        &self,
        ticket: &Ticket,
        home: Option<String>,
        generation: u64,
        until: Instant,
    ) -> bool {
        let rx = {
            let mut inner = self.lock();
            inner.release_turn(ticket.n);
            if let Some(lane) = &home {
                inner
                    .lanes
                    .entry(lane.clone())
                    .or_default()
                    .holding
                    .insert(ticket.n);
            }
            if inner.generation != generation {
                inner.returning.insert(ticket.n, home);
                return true;
            }
            let (tx, rx) = oneshot::channel();
            inner.back.insert(ticket.n, (home, tx));
            rx
        };
        let told = matches!(tokio::time::timeout_at(until, rx).await, Ok(Ok(())));
        if !told {
            // Looking again on its own: it still holds its turn until it queues again.
            let mut inner = self.lock();
            if let Some((lane, _)) = inner.back.remove(&ticket.n) {
                inner.returning.insert(ticket.n, lane);
            }
        }
        told
    }

    /// Waits (by ticket) to be let ahead on `lane`: then the handshake may connect.
    pub async fn ahead(
        self: &Arc<Self>,
        lane: &str,
        ticket: &Ticket,
        until: Instant,
    ) -> Result<Held, Refused> {
        let rx = {
            let mut inner = self.lock();
            let size = inner.size;
            let l = inner.lanes.entry(lane.to_owned()).or_default();
            if size > 0 && l.waiting_ahead.len() >= size.saturating_mul(QUEUE_PER_PLACE) {
                drop(inner);
                self.lock().release_turn(ticket.n);
                return Err(Refused::Full);
            }
            let (tx, rx) = oneshot::channel();
            l.waiting_ahead.insert(ticket.n, tx);
            // Queued: its turn is this entry now (which may let others ahead on its home).
            inner.release_turn(ticket.n);
            inner.dispatch(lane);
            rx
        };
        self.wait(lane, ticket.n, Stage::Ahead, rx, until)
            .await
            .ok_or(Refused::Timeout)
    }

    /// Waits (by ticket) for a place in flight on `lane`; gives up being ahead once it
    /// has one (or gives up).
    pub async fn place(
        self: &Arc<Self>,
        ahead: Held,
        ticket: &Ticket,
        until: Instant,
    ) -> Option<Held> {
        let rx = {
            let mut inner = self.lock();
            let (tx, rx) = oneshot::channel();
            let l = inner.lanes.entry(ahead.lane.clone()).or_default();
            l.waiting_place.insert(ticket.n, tx);
            inner.dispatch(&ahead.lane);
            rx
        };
        let lane = ahead.lane.clone();
        let place = self.wait(&lane, ticket.n, Stage::Place, rx, until).await;
        drop(ahead);
        place
    }

    async fn wait(
        self: &Arc<Self>,
        lane: &str,
        ticket: u64,
        stage: Stage,
        mut rx: oneshot::Receiver<()>,
        until: Instant,
    ) -> Option<Held> {
        // `rx` outlives the guard (declared first, dropped last): a grant sent until the
        // guard runs is received, and the guard gives it back.
        let mut guard = Waiter {
            queues: self,
            lane,
            ticket,
            stage,
            granted: false,
        };
        let got = matches!(tokio::time::timeout_at(until, &mut rx).await, Ok(Ok(())));
        guard.granted = got;
        drop(guard);
        got.then(|| Held {
            queues: self.clone(),
            lane: lane.to_owned(),
            stage,
        })
    }
}

/// Leaves the line when the wait ends without a grant (timeout, the client went away),
/// giving back a grant that arrived meanwhile.
struct Waiter<'a> {
    queues: &'a Queues,
    lane: &'a str,
    ticket: u64,
    stage: Stage,
    granted: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut inner = self.queues.lock();
        if let Some(l) = inner.lanes.get_mut(self.lane)
            && l.waiters(self.stage).remove(&self.ticket).is_none()
        {
            let count = l.count(self.stage);
            *count = count.saturating_sub(1);
        }
        inner.dispatch(self.lane);
    }
}

/// Being ahead, or a place in flight, on one backend: given back when dropped.
pub struct Held {
    queues: Arc<Queues>,
    lane: String,
    stage: Stage,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut inner = self.queues.lock();
        if let Some(l) = inner.lanes.get_mut(&self.lane) {
            let count = l.count(self.stage);
            *count = count.saturating_sub(1);
        }
        inner.dispatch(&self.lane);
    }
}

/// A handshake's place in line (arrival order), for its whole life.
pub struct Ticket {
    n: u64,
    queues: Arc<Queues>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queues.lock().release_turn(self.n);
    }
}
