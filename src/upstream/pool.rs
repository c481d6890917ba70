//! Upstream pools: the live backends of every upstream, their health, drain flags and
//! active connections, and the choice of a backend for a sticky key (weighted rendezvous
//! from [`super::hash`], skipping backends that are down, draining or — with
//! `balance.bounded_load` — too loaded).
//!
//! Owns the per-pool background tasks (DNS refresh, active health checks), which hold only
//! a `Weak` and end when the pools are dropped. Does not own the connection itself
//! ([`super::connect`]) nor closing established connections of a drained backend (the
//! connection registry does that from the [`DrainOrder`] the admin call returns).
//!
//! Health model:
//! - with `health_check`: a backend starts up; `unhealthy_after` consecutive failed
//!   active checks mark it down, and only `healthy_after` consecutive passing active
//!   checks mark it up again;
//! - passive detection, with or without active checks: after `unhealthy_after` (without
//!   checks [`DEFAULT_UNHEALTHY_AFTER`]) failed connects in a row the backend is ejected:
//!   it gets no new connections, and a probe (a TCP connect) tries it after
//!   [`PROBE_FIRST`], then after back-offs growing by a quarter up to [`PROBE_MAX`]; the first
//!   probe that connects (or a connection that succeeds) lets it back in, so a backend
//!   that was down for a second costs about a second of refusals, not a fixed cool-off;
//! - a backend back in (probe, passing checks) or added by a reload or DNS gets its
//!   rendezvous weight ramped linearly over `slow_start` (from 1 ‰ of its weight);
//! - `max_pending`: upstream handshakes in flight per backend, the rest waiting in
//!   arrival order ([`queue`]) at most `queue_timeout`;
//! - a reload that drops `health_check` marks every backend up and restarts its streaks
//!   (nothing else would bring a backend it marked down back);
//! - only failures to reach a backend (TCP connect, TLS) are passive failures: once the
//!   request is sent, whatever goes wrong may be the request's doing and is only counted
//!   in `connect_errors`;
//! - passive detection never takes a backend out when that would leave more than
//!   `max_ejected` of the pool's backends out (down or cooling off, whatever put them
//!   there); active checks are not bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;
use tokio::time::Instant;

mod admin;
mod pools;
pub mod queue;

pub use admin::{AdminReply, DrainOrder, admin};
pub use pools::{BackendSnapshot, Pools, UpstreamSnapshot};

use super::hash;
use super::health;
use super::resolve::{self, Entry, Resolver};
use crate::config::file::DEFAULT_UNHEALTHY_AFTER;
use crate::config::{HealthCheck, Upstream, UpstreamKind, UpstreamTls};

/// The first probe of an ejected backend comes this long after the ejection.
pub const PROBE_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two probes of an ejected backend.
pub const PROBE_MAX: Duration = Duration::from_millis(250);
/// Slow start begins a backend at this share of its weight (in thousandths).
const RAMP_FLOOR_PERMILLE: u64 = 1;
/// `ramp_from_ms` of a backend that is not ramping.
const NOT_RAMPING: u64 = u64::MAX;

/// How long the health task sleeps when its pool has no `health_check` (it is woken
/// early when a reload adds one).
const NO_CHECK_SLEEP: Duration = Duration::from_secs(3600);

/// Options that are not in the config file: the resolver (tests inject one) and how
/// often names are looked up again.
#[derive(Clone)]
pub struct PoolOptions {
    pub resolver: Arc<dyn Resolver>,
    pub dns_refresh: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            resolver: Arc::new(resolve::SystemResolver),
            dns_refresh: resolve::DEFAULT_REFRESH,
        }
    }
}

// === backends ===

/// One resolved backend: an address of a configured entry. Shared by the pool's member
/// list and every [`Lease`] on it, so counts survive re-resolution and reloads.
#[derive(Debug)]
pub struct BackendState {
    pub addr: SocketAddr,
    /// `addr` as text: the rendezvous identity, the metric label, the access-log value.
    pub identity: String,
    /// The configured `addr` it was resolved from (`chat-2.internal:9001`).
    pub entry: String,
    /// Host part of `entry`: SNI and `Host` header towards the backend.
    pub host: String,
    seed: u64,
    weight: AtomicU32,
    up: AtomicBool,
    draining: AtomicBool,
    active: AtomicU64,
    connect_errors: AtomicU64,
    /// Consecutive failed connects (passive detection), reset by any success.
    fails: AtomicU32,
    /// Consecutive failed active checks, reset by a passing one.
    check_fails: AtomicU32,
    /// Consecutive passing active checks, reset by any failure.
    passes: AtomicU32,
    /// Taken out by passive detection until a probe (or a connection) reaches it.
    ejected: AtomicBool,
    /// Failed `unhealthy_after` connects in a row: probed until reached, ejected or not
    /// (`max_ejected` may keep it in), so that handshakes waiting for it learn when it is
    /// back.
    suspect: AtomicBool,
    /// A probe task is looking after this ejected backend.
    probing: AtomicBool,
    /// Slow start: when (ms since the pool's epoch) it came back or was added;
    /// [`NOT_RAMPING`] otherwise.
    ramp_from_ms: AtomicU64,
    /// `max_ejected` kept this failing backend in (warned once per episode).
    eject_refused: AtomicBool,
    /// Kept-alive HTTP/1.1 connections for plain requests (`http: proxy` routes).
    pub(in crate::upstream) idle_http: super::idle::IdleConns,
}

impl BackendState {
    fn new(addr: SocketAddr, entry: &str, weight: u32) -> BackendState {
        let identity = addr.to_string();
        let host = entry
            .rsplit_once(':')
            .map_or(entry, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        BackendState {
            seed: hash::backend_seed(&identity),
            addr,
            identity,
            entry: entry.to_owned(),
            host,
            weight: AtomicU32::new(weight),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            active: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            check_fails: AtomicU32::new(0),
            passes: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            ramp_from_ms: AtomicU64::new(NOT_RAMPING),
            eject_refused: AtomicBool::new(false),
            idle_http: Default::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    fn eligible(&self, now_ms: u64) -> bool {
        !self.is_out(now_ms) && !self.is_draining()
    }

    /// Taken out by health: down (active checks), or ejected (passive failures).
    fn is_out(&self, _now_ms: u64) -> bool {
        !self.is_up() || self.ejected.load(Ordering::Acquire)
    }

    /// Its rendezvous weight now, × `scale` (see [`ramp_scale`]): ramped during slow
    /// start, from 1 ‰ of it.
    fn ramped_weight(&self, now_ms: u64, slow_start_ms: u64, scale: u64) -> u32 {
        let full = u64::from(self.weight()) * scale;
        let from = self.ramp_from_ms.load(Ordering::Relaxed);
        let elapsed = now_ms.saturating_sub(from);
        let ramped = if from == NOT_RAMPING || slow_start_ms == 0 {
            full
        } else if elapsed >= slow_start_ms {
            self.ramp_from_ms.store(NOT_RAMPING, Ordering::Relaxed);
            full
        } else {
            // u128: weight × scale × elapsed overflows u64 for a long ramp.
            let share = u128::from(full) * u128::from(elapsed) / u128::from(slow_start_ms);
            let share = u64::try_from(share).unwrap_or(full);
            share.max(RAMP_FLOOR_PERMILLE * full / 1000).max(1)
        };
        // Never above u32::MAX: `scale` keeps every weight × scale under it.
        u32::try_from(ramped).unwrap_or(u32::MAX)
    }
}

/// What every weight is multiplied by while one ramps: 1000 (thousandths, so a weight-1
/// backend can ramp from 1 ‰), less when the largest weight × 1000 would not fit in
/// `u32` (the hash's weights). Every backend gets the same factor, so the shares of
/// those not ramping stay as configured.
fn ramp_scale(backends: &[Arc<BackendState>]) -> u64 {
    let max = backends
        .iter()
        .map(|b| u64::from(b.weight()))
        .max()
        .unwrap_or(1);
    (u64::from(u32::MAX) / max.max(1)).clamp(1, 1000)
}

/// Being let ahead on a backend (allowed to connect before its place), or a place among
/// its `max_pending` upstream handshakes in flight; `None` inside when the upstream has
/// no limit. Hold a place until the upstream's answer.
#[must_use]
pub struct Turn(#[allow(dead_code)] Option<queue::Held>);

/// Counts one waiting handshake in the pool's queue gauge while it waits.
struct Waiting<'a>(&'a AtomicI64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one connection on a backend while it lives (bounded load, metrics); the
/// connection holds it from the choice until the relay ends.
#[derive(Debug)]
#[must_use]
pub struct Lease(Arc<BackendState>);

impl Lease {
    fn new(backend: Arc<BackendState>) -> Lease {
        backend.active.fetch_add(1, Ordering::Relaxed);
        Lease(backend)
    }

    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

// === one pool ===

/// The member list, replaced whole (never edited) when DNS or config changes.
#[derive(Debug, Default)]
struct Members {
    /// Sorted by identity (the rendezvous tie rule).
    backends: Vec<Arc<BackendState>>,
    /// (seed, weight) per backend, for [`hash::rank`].
    keys: Vec<(u64, u32)>,
}

/// One upstream's live pool.
pub struct Pool {
    name: String,
    spec: RwLock<Arc<Upstream>>,
    /// Bumped with every new spec (under its lock): a refresh that read an older one
    /// must not install the member list it computed (a reload ran meanwhile).
    generation: AtomicU64,
    members: RwLock<Arc<Members>>,
    /// Identities and entries drained through the admin API; kept across rebuilds.
    drained: Mutex<BTreeSet<String>>,
    /// Last good addresses of each configured entry: a failed lookup keeps them.
    resolved: Mutex<BTreeMap<String, Vec<SocketAddr>>>,
    /// Held while a passive ejection is decided (`max_ejected`).
    ejecting: Mutex<()>,
    /// Where a builtin upstream listens (the echo server): shared with [`Pools`], which
    /// sets it when a reload first needs the echo server, so a pool switched to
    /// `builtin: echo` finds it.
    builtin: Arc<OnceLock<SocketAddr>>,
    options: PoolOptions,
    epoch: Instant,
    /// Wakes the background tasks early when a reload changed the config; dropped with
    /// the pool, which ends them (a closed channel is seen even by a task that was busy).
    wake: watch::Sender<()>,
    /// Upgrades waiting for a `max_pending` place, or for a backend to come back, now
    /// (`wsgate_upstream_queue`).
    queue_waiting: Arc<AtomicI64>,
    /// The backends' `max_pending` lanes, and the handshakes waiting for a backend to
    /// come back, told (and the generation bumped) whenever one does: a probe or a
    /// connection reached a suspect backend, active checks passed again, a backend was
    /// added.
    back: Arc<queue::Queues>,
    /// Time spent waiting for a place (`wsgate_upstream_queue_seconds`).
    queue_seconds: Histogram,
}

impl Pool {
    fn new(
        upstream: Arc<Upstream>,
        builtin: Arc<OnceLock<SocketAddr>>,
        options: PoolOptions,
    ) -> Pool {
        let queues = Arc::new(queue::Queues::default());
        queues.resize(upstream.max_pending);
        Pool {
            name: upstream.name.clone(),
            spec: RwLock::new(upstream),
            generation: AtomicU64::new(0),
            members: RwLock::new(Arc::default()),
            drained: Mutex::default(),
            resolved: Mutex::default(),
            ejecting: Mutex::default(),
            builtin,
            options,
            epoch: Instant::now(),
            wake: watch::Sender::new(()),
            queue_waiting: Arc::default(),
            back: queues,
            // 1 ms … 16 s.
            queue_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }

    /// The generation of "a backend came back" events: read it before trying backends,
    /// give it to [`Pool::wait_back`] after they all failed.
    pub fn back_generation(&self) -> u64 {
        self.back.generation()
    }

    /// A handshake's place in line (arrival order) for its whole life: take one before
    /// the first [`Pool::wait_ahead`] of a handshake with `max_pending` set.
    pub fn ticket(&self) -> queue::Ticket {
        self.back.ticket()
    }

    /// Waits until a backend comes back after `generation` (true), or until `until`
    /// (false). Counted in the queue gauge: the handshake waits for its backend. Woken
    /// handshakes keep their turn: later tickets are not let ahead before they queue again.
    /// It holds its turn on the key's own backend meanwhile (see [`queue`]).
    pub async fn wait_back(
        &self,
        ticket: &queue::Ticket,
        key: &[u8],
        generation: u64,
        until: Instant,
    ) -> bool {
        let members = self.members();
        let home = hash::rank(key, &members.keys)
            .first()
            .map(|&i| members.backends[i].identity.clone());
        self.queue_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.queue_waiting);
        self.back.wait_back(ticket, home, generation, until).await
    }

    /// Upgrades waiting in this upstream's queues now, and the histogram of waits.
    pub fn queue_state(&self) -> (i64, Histogram) {
        (
            self.queue_waiting.load(Ordering::Relaxed),
            self.queue_seconds.clone(),
        )
    }

    /// Waits (by ticket) until `b` lets this handshake ahead — at most `max_pending` are
    /// — so it may connect while the handshakes in flight finish; until `until` (the
    /// handshake's first wait plus `queue_timeout`: failover does not restart the clock).
    /// Dropping the future (the client went away) leaves the queue at once. `Err(Full)`
    /// at once when [`queue::QUEUE_PER_PLACE`] × `max_pending` wait already.
    pub async fn wait_ahead(
        &self,
        b: &BackendState,
        ticket: &queue::Ticket,
        until: Instant,
    ) -> Result<Turn, queue::Refused> {
        if self.spec().max_pending == 0 {
            return Ok(Turn(None));
        }
        let started = Instant::now();
        self.queue_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.queue_waiting);
        let ahead = self.back.ahead(&b.identity, ticket, until).await;
        self.queue_seconds.observe(started.elapsed().as_secs_f64());
        ahead.map(|held| Turn(Some(held)))
    }

    /// Once connected: waits (by ticket) for one of `b`'s `max_pending` places in flight,
    /// giving up being ahead when it has it; `None` when `until` passed.
    pub async fn wait_place(
        &self,
        ahead: Turn,
        ticket: &queue::Ticket,
        until: Instant,
    ) -> Option<Turn> {
        let Turn(Some(held)) = ahead else {
            return Some(Turn(None));
        };
        // Counted as waiting, but not observed again: `wsgate_upstream_queue_seconds` is
        // the wait to be let ahead (after it, at most `max_pending` handshakes are before
        // this one).
        self.queue_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.queue_waiting);
        let place = self.back.place(held, ticket, until).await;
        place.map(|held| Turn(Some(held)))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn spec(&self) -> Arc<Upstream> {
        self.versioned_spec().0
    }

    /// The spec and its generation, read together.
    fn versioned_spec(&self) -> (Arc<Upstream>, u64) {
        let spec = self.spec.read().unwrap_or_else(PoisonError::into_inner);
        (spec.clone(), self.generation.load(Ordering::Acquire))
    }

    fn members(&self) -> Arc<Members> {
        match self.members.read() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The backends now in the pool (sorted by identity).
    pub fn backends(&self) -> Vec<Arc<BackendState>> {
        self.members().backends.clone()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The key's backends in rendezvous order, to be taken one at a time.
    pub fn candidates(&self, key: &[u8], bounded_load: Option<f64>) -> Candidates {
        let members = self.members();
        let slow_start = self.spec().slow_start;
        let now = self.now_ms();
        let ramping = !slow_start.is_zero()
            && members
                .backends
                .iter()
                .any(|b| b.ramp_from_ms.load(Ordering::Relaxed) != NOT_RAMPING);
        let order = if ramping {
            let ms = u64::try_from(slow_start.as_millis()).unwrap_or(u64::MAX);
            let scale = ramp_scale(&members.backends);
            let keys: Vec<(u64, u32)> = members
                .backends
                .iter()
                .map(|b| (b.seed, b.ramped_weight(now, ms, scale)))
                .collect();
            hash::rank(key, &keys)
        } else {
            hash::rank(key, &members.keys)
        };
        Candidates {
            tried: vec![false; members.backends.len()],
            members,
            order,
            bounded_load,
            now_ms: now,
        }
    }

    /// A backend that could not be reached (TCP connect or TLS failed, or timed out):
    /// passive health, bounded by `max_ejected`.
    pub fn connect_failed(&self, b: &BackendState) {
        b.connect_errors.fetch_add(1, Ordering::Relaxed);
        b.passes.store(0, Ordering::Relaxed);
        let fails = b.fails.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let spec = self.spec();
        let threshold = spec
            .health_check
            .as_ref()
            .map_or(DEFAULT_UNHEALTHY_AFTER, |hc| hc.unhealthy_after);
        if fails < threshold {
            return;
        }
        if !b.suspect.swap(true, Ordering::AcqRel) {
            self.start_probe(b, spec.connect_timeout);
        }
        // One ejection decided at a time, so two failing backends cannot both see room
        // for one more.
        let _one_at_a_time = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.now_ms();
        if b.is_out(now) {
            return;
        }
        if !self.may_eject(b, spec.max_ejected, now) {
            let warned = b.eject_refused.swap(true, Ordering::Relaxed);
            if !warned {
                tracing::warn!(upstream = %self.name, backend = %b.identity, fails, max_ejected = spec.max_ejected, "backend failing, but max_ejected percent of the backends are out already: it stays in");
            }
            return;
        }
        b.eject_refused.store(false, Ordering::Relaxed);
        // Out until a probe reaches it again (half-open probing with a short, growing
        // back-off), so that it is back about as soon as it accepts.
        if !b.ejected.swap(true, Ordering::AcqRel) {
            tracing::warn!(upstream = %self.name, backend = %b.identity, fails, "backend failing; ejected until a probe reaches it (first in {PROBE_FIRST:?})");
        }
    }

    /// Starts probing a suspect backend (one task per backend at a time).
    fn start_probe(&self, b: &BackendState, connect_timeout: Duration) {
        let Some(state) = self
            .members()
            .backends
            .iter()
            .find(|m| std::ptr::eq(m.as_ref(), b))
            .cloned()
        else {
            return;
        };
        if state.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            state.probing.store(false, Ordering::Release);
            return;
        };
        let probe = Probe {
            upstream: self.name.clone(),
            epoch: self.epoch,
            connect_timeout,
            back: self.back.clone(),
        };
        rt.spawn(probe.run(state));
    }

    /// Whether taking `b` out keeps the backends out within `max_ejected` percent of the
    /// pool (SPEC §2), counting every backend out already, whatever put it there.
    fn may_eject(&self, b: &BackendState, max_ejected: u8, now: u64) -> bool {
        let members = self.members();
        let total = members.backends.len();
        let out = members
            .backends
            .iter()
            .filter(|m| !std::ptr::eq(m.as_ref(), b) && m.is_out(now))
            .count();
        (out + 1) * 100 <= total * usize::from(max_ejected)
    }

    /// The backend was reached and the request sent, then the handshake failed (no
    /// answer, a close without one, a broken 101, a timeout): counted in
    /// `connect_errors`, never against its health, since the request may be the cause.
    pub fn exchange_failed(&self, b: &BackendState) {
        b.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A completed upstream handshake: the failure streak ends.
    pub fn connect_succeeded(&self, b: &BackendState) {
        b.fails.store(0, Ordering::Relaxed);
        b.eject_refused.store(false, Ordering::Relaxed);
        let was_suspect = b.suspect.swap(false, Ordering::AcqRel);
        if b.ejected.swap(false, Ordering::AcqRel) {
            b.ramp_from_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        if was_suspect {
            self.back.tell();
        }
    }

    /// One active check's verdict, with hysteresis.
    pub(crate) fn check_result(&self, b: &BackendState, ok: bool) {
        let Some(hc) = self.spec().health_check.clone() else {
            return;
        };
        if ok {
            b.check_fails.store(0, Ordering::Relaxed);
            let passes = b.passes.fetch_add(1, Ordering::AcqRel).saturating_add(1);
            if passes >= hc.healthy_after && !b.up.swap(true, Ordering::AcqRel) {
                b.ramp_from_ms.store(self.now_ms(), Ordering::Relaxed);
                self.back.tell();
                tracing::info!(upstream = %self.name, backend = %b.identity, "backend up (health checks pass)");
            }
        } else {
            b.passes.store(0, Ordering::Relaxed);
            let fails = b
                .check_fails
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            if fails >= hc.unhealthy_after {
                self.mark_down(b, "health checks fail");
            }
        }
    }

    /// Probes every backend once ([`health::check_all`]) and records the verdicts.
    async fn check_health(&self, hc: &HealthCheck, tls: Option<&UpstreamTls>) {
        let backends = self.backends();
        let targets: Vec<health::Target<'_>> = backends
            .iter()
            .map(|b| health::Target {
                addr: b.addr,
                host: &b.host,
                entry: &b.entry,
            })
            .collect();
        let verdicts = health::check_all(&targets, hc, tls).await;
        for (b, ok) in backends.iter().zip(verdicts) {
            self.check_result(b, ok);
        }
    }

    /// Takes a reload's settings. Without a `health_check` nothing would ever mark a
    /// backend up again, so dropping the checks clears the verdicts they left.
    fn set_spec(&self, upstream: Arc<Upstream>) {
        let old = {
            let mut spec = self.spec.write().unwrap_or_else(PoisonError::into_inner);
            self.generation.fetch_add(1, Ordering::AcqRel);
            std::mem::replace(&mut *spec, upstream.clone())
        };
        self.back.resize(upstream.max_pending);
        if old.health_check.is_some() && upstream.health_check.is_none() {
            for b in self.backends() {
                b.fails.store(0, Ordering::Relaxed);
                b.check_fails.store(0, Ordering::Relaxed);
                b.passes.store(0, Ordering::Relaxed);
                if !b.up.swap(true, Ordering::AcqRel) {
                    tracing::info!(upstream = %self.name, backend = %b.identity, "backend up (health checks removed)");
                }
            }
        }
    }

    fn mark_down(&self, b: &BackendState, why: &str) {
        b.passes.store(0, Ordering::Relaxed);
        if b.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(upstream = %self.name, backend = %b.identity, why, "backend down");
        }
    }

    /// Looks names up again and rebuilds the member list; literal addresses need no
    /// lookup. A failed lookup keeps the entry's previous addresses. Dropped if a reload
    /// changed the spec while the lookups ran (the reload's own refresh applies it).
    pub async fn refresh(&self) {
        let (spec, generation) = self.versioned_spec();
        let entries: Vec<(String, u32)> = match &spec.kind {
            UpstreamKind::Backends(list) => {
                list.iter().map(|b| (b.addr.clone(), b.weight)).collect()
            }
            UpstreamKind::BuiltinEcho => self
                .builtin
                .get()
                .map(|a| vec![(a.to_string(), 1)])
                .unwrap_or_default(),
        };
        let mut fresh = Vec::with_capacity(entries.len());
        for (entry, weight) in entries {
            let addrs = self.resolve_entry(&entry).await;
            fresh.push((entry, weight, addrs));
        }
        self.rebuild(&fresh, generation);
    }

    async fn resolve_entry(&self, entry: &str) -> Vec<SocketAddr> {
        let Some(parsed) = Entry::parse(entry) else {
            return Vec::new();
        };
        let found = resolve::resolve(self.options.resolver.as_ref(), &parsed).await;
        let Ok(mut resolved) = self.resolved.lock() else {
            return Vec::new();
        };
        match found {
            Ok(addrs) => {
                let old = resolved.insert(entry.to_owned(), addrs.clone());
                if matches!(parsed, Entry::Name { .. }) && old.as_ref() != Some(&addrs) {
                    tracing::info!(upstream = %self.name, entry, ?addrs, "backend addresses changed");
                }
                addrs
            }
            Err(e) => {
                let kept = resolved.get(entry).cloned().unwrap_or_default();
                tracing::warn!(upstream = %self.name, entry, error = %e, kept = kept.len(), "backend lookup failed; keeping the previous addresses");
                kept
            }
        }
    }

    /// Replaces the member list, reusing the state of backends that stay, unless the spec
    /// is newer than `generation`. Rebuilds run one at a time, under the members lock, so
    /// none works from a list another is replacing.
    fn rebuild(&self, fresh: &[(String, u32, Vec<SocketAddr>)], generation: u64) {
        let mut slot = self.members.write().unwrap_or_else(PoisonError::into_inner);
        // A spec written after this check is followed by its own refresh, which waits
        // for this lock.
        if self.generation.load(Ordering::Acquire) != generation {
            tracing::debug!(upstream = %self.name, "refresh from a replaced spec dropped");
            return;
        }
        let old = slot.clone();
        // Backends a reload or DNS adds to a pool that had some ramp up (slow start).
        let ramp_from = if old.backends.is_empty() {
            NOT_RAMPING
        } else {
            self.now_ms()
        };
        let mut by_addr: BTreeMap<SocketAddr, Arc<BackendState>> = BTreeMap::new();
        for (entry, weight, addrs) in fresh {
            for addr in addrs {
                if by_addr.contains_key(addr) {
                    continue; // two entries resolving to one address: the first wins
                }
                let state = match old.backends.iter().find(|b| b.addr == *addr) {
                    Some(b) if b.entry == *entry => {
                        b.weight.store(*weight, Ordering::Relaxed);
                        b.clone()
                    }
                    _ => {
                        let fresh = BackendState::new(*addr, entry, *weight);
                        fresh.ramp_from_ms.store(ramp_from, Ordering::Relaxed);
                        Arc::new(fresh)
                    }
                };
                by_addr.insert(*addr, state);
            }
        }
        let mut backends: Vec<Arc<BackendState>> = by_addr.into_values().collect();
        backends.sort_by(|a, b| a.identity.as_bytes().cmp(b.identity.as_bytes()));
        let keys = backends.iter().map(|b| (b.seed, b.weight())).collect();
        let members = Arc::new(Members { backends, keys });
        self.apply_drains(&members);
        let added = members.backends.len() > old.backends.len();
        *slot = members;
        if added {
            self.back.tell();
        }
    }

    fn apply_drains(&self, members: &Members) {
        let Ok(drained) = self.drained.lock() else {
            return;
        };
        for b in &members.backends {
            let on = drained.contains(&b.identity) || drained.contains(&b.entry);
            b.draining.store(on, Ordering::Release);
        }
    }

    /// Drains (or undrains) the backends that `addr` names, by identity (`10.0.0.7:9001`)
    /// or by configured entry (`chat-2.internal:9001`, every address of it). Returns the
    /// backends named; empty when none is.
    pub fn set_drain(&self, addr: &str, on: bool) -> Vec<Arc<BackendState>> {
        let addr = normalize(addr);
        let members = self.members();
        let named: Vec<Arc<BackendState>> = members
            .backends
            .iter()
            .filter(|b| b.identity == addr || b.entry == addr)
            .cloned()
            .collect();
        if named.is_empty() {
            return named;
        }
        if let Ok(mut drained) = self.drained.lock() {
            if on {
                drained.insert(addr.clone());
            } else {
                drained.remove(&addr);
                for b in &named {
                    drained.remove(&b.identity);
                }
            }
        }
        self.apply_drains(&members);
        for b in &named {
            tracing::info!(upstream = %self.name, backend = %b.identity, draining = b.is_draining(), "backend drain changed");
        }
        named
    }

    pub fn snapshot(&self) -> UpstreamSnapshot {
        let now = self.now_ms();
        UpstreamSnapshot {
            upstream: self.name.clone(),
            backends: self
                .members()
                .backends
                .iter()
                .map(|b| BackendSnapshot {
                    addr: b.identity.clone(),
                    entry: b.entry.clone(),
                    weight: b.weight(),
                    up: !b.is_out(now),
                    draining: b.is_draining(),
                    active: b.active(),
                    connect_errors: b.connect_errors.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// What a probe task needs of its pool.
struct Probe {
    upstream: String,
    epoch: Instant,
    connect_timeout: Duration,
    back: Arc<queue::Queues>,
}

impl Probe {
    /// Probes a suspect backend with TCP connects after back-offs from [`PROBE_FIRST`],
    /// growing by a quarter up to [`PROBE_MAX`], until one connects (the backend is back:
    /// in again if it was ejected, ramped under `slow_start`, and the handshakes waiting
    /// for it are told), a real connection succeeded meanwhile, or the backend left the
    /// pool (this task holds the last reference).
    async fn run(self, b: Arc<BackendState>) {
        let mut backoff = PROBE_FIRST;
        loop {
            tokio::time::sleep(backoff).await;
            let gone = Arc::strong_count(&b) == 1;
            if gone || !b.suspect.load(Ordering::Acquire) {
                b.probing.store(false, Ordering::Release);
                // A suspicion between the check and the store found `probing` set and
                // started no task: carry on for it.
                if gone
                    || !b.suspect.load(Ordering::Acquire)
                    || b.probing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                backoff = PROBE_FIRST;
                continue;
            }
            let wait = self.connect_timeout.min(Duration::from_secs(1));
            let reached = matches!(
                tokio::time::timeout(wait, tokio::net::TcpStream::connect(b.addr)).await,
                Ok(Ok(_))
            );
            if !reached {
                backoff = (backoff + backoff / 4).min(PROBE_MAX);
                continue;
            }
            b.fails.store(0, Ordering::Relaxed);
            if b.ejected.load(Ordering::Acquire) {
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                b.ramp_from_ms.store(now, Ordering::Relaxed);
                b.ejected.store(false, Ordering::Release);
            }
            b.suspect.store(false, Ordering::Release);
            tracing::info!(upstream = %self.upstream, backend = %b.identity, "backend back (a probe connected)");
            self.back.tell();
            backoff = PROBE_FIRST;
        }
    }
}

/// `[::1]:80` and `::1:80`-style spellings of one address compare equal.
fn normalize(addr: &str) -> String {
    addr.parse::<SocketAddr>()
        .map_or_else(|_| addr.to_owned(), |a| a.to_string())
}

// === choosing ===

/// A key's backends in rendezvous order; each call to [`Candidates::next`] leases the
/// next eligible one (up, not draining, under the load bound if any).
pub struct Candidates {
    members: Arc<Members>,
    order: Vec<usize>,
    tried: Vec<bool>,
    bounded_load: Option<f64>,
    now_ms: u64,
}

impl Candidates {
    /// The next backend to try; `None` when no eligible backend is left.
    #[allow(clippy::should_implement_trait)] // not an Iterator: each item is a lease
    pub fn next(&mut self) -> Option<Lease> {
        let eligible: Vec<usize> = self
            .order
            .iter()
            .copied()
            .filter(|&i| !self.tried[i] && self.members.backends[i].eligible(self.now_ms))
            .collect();
        let pick = match self.bounded_load {
            Some(c) => eligible
                .iter()
                .copied()
                .find(|&i| !self.over_bound(i, c))
                // The bound always leaves room somewhere (c ≥ 1), but failures may have
                // used it up: then the rendezvous order alone decides.
                .or(eligible.first().copied()),
            None => eligible.first().copied(),
        }?;
        self.tried[pick] = true;
        Some(Lease::new(self.members.backends[pick].clone()))
    }

    /// Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam), weighted:
    /// over the eligible backends, with `T` their active connections and `W` their
    /// weights, backend `b` may hold at most `ceil(c × (T + 1) × w_b / W)` including the
    /// new one. The caps add up to at least `T + 1`, so some backend always has room.
    fn over_bound(&self, i: usize, c: f64) -> bool {
        let (mut total, mut weights) = (0u64, 0u64);
        for b in &self.members.backends {
            if b.eligible(self.now_ms) {
                total += b.active();
                weights += u64::from(b.weight());
            }
        }
        let b = &self.members.backends[i];
        if weights == 0 {
            return false;
        }
        let cap = (c * (total + 1) as f64 * f64::from(b.weight()) / weights as f64).ceil();
        b.active() as f64 >= cap
    }
}

#[cfg(test)]
mod tests;
