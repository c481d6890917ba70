//! The registry of relayed connections: what `/connections` lists, and the handle through
//! which drains (shutdown, removed routes, drained backends) ask a relay to close.
//!
//! A connection registers when its relay starts and leaves when its task ends (RAII). The
//! lock is taken twice per connection and once per drain or admin request, never per
//! frame. A drain does not arm timers of its own: it writes each chosen connection's close
//! time into its [`Control`] and wakes it; the relay's one timer does the rest.
//!
//! Each close remembers its [`DrainKind`]: an undrained backend calls off only the closes
//! its admin drain scheduled, never those of a removed route or of shutdown. An admin
//! close (`/connections/close`, `/revoke`) is a close of its own, at once, with
//! [`Ending::Revoked`] instead of a drain's 1012, and nothing calls it off.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::Context;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::task::AtomicWaker;
use serde::Serialize;
use tokio::time::Instant;

use crate::outcome::Ending;

/// All drain times are milliseconds after this instant (so they fit in one atomic).
static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

/// Why a drain closes a connection, which decides whether anything may call it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainKind {
    /// An admin drain of the connection's backend: undraining the backend calls it off.
    Backend,
    /// Its route was removed by a reload, or the process is shutting down: nothing calls
    /// it off, and a backend drain can only bring it forward.
    Final,
}

/// A relay's mailbox for "close with 1012 at this time", and what the registry lists about
/// its connection: one allocation per connection, shared by the registry and the relay.
#[derive(Debug)]
pub struct Control {
    /// Close times per [`DrainKind`], kept apart so an undrain cannot cancel a final
    /// close: 0 = none; otherwise 1 + milliseconds after [`EPOCH`].
    backend_at: AtomicU64,
    final_at: AtomicU64,
    /// An admin close: the code the client gets (0 = none); the first one wins.
    revoked: AtomicU32,
    waker: AtomicWaker,
    pub entry: Entry,
}

impl Control {
    pub fn new(entry: Entry) -> Control {
        Control {
            backend_at: AtomicU64::new(0),
            final_at: AtomicU64::new(0),
            revoked: AtomicU32::new(0),
            waker: AtomicWaker::new(),
            entry,
        }
    }

    /// Asks for a drain close at `at` (an earlier request of the same kind wins) and wakes
    /// the relay.
    pub fn drain_at(&self, at: Instant, kind: DrainKind) {
        let ms = at
            .into_std()
            .saturating_duration_since(*EPOCH)
            .as_millis()
            .min(u128::from(u64::MAX - 1)) as u64
            + 1;
        let _ = self
            .slot(kind)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (old == 0 || ms < old).then_some(ms)
            });
        self.waker.wake();
    }

    /// Calls off a backend drain's close (an undrained backend) and wakes the relay; a
    /// final close stays.
    pub fn cancel_drain(&self) {
        self.backend_at.store(0, Ordering::Release);
        self.waker.wake();
    }

    /// Asks for an admin close at once: `code` to the client (SPEC §5 4003 `revoked`
    /// row), 1001 to the upstream. The first request wins; nothing calls it off.
    pub fn revoke(&self, code: u16) {
        let _ =
            self.revoked
                .compare_exchange(0, u32::from(code), Ordering::AcqRel, Ordering::Acquire);
        self.waker.wake();
    }

    /// Registers the relay's waker; returns when it must close and with which ending, if
    /// a drain or an admin close asked.
    pub fn poll_drain(&self, cx: &Context<'_>) -> Option<(Instant, Ending)> {
        self.waker.register(cx.waker());
        if let Ok(code @ 1..) = u16::try_from(self.revoked.load(Ordering::Acquire)) {
            // Due already: the epoch is in the past.
            return Some((Instant::from_std(*EPOCH), Ending::Revoked { code }));
        }
        let at = |slot: &AtomicU64| match slot.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Instant::from_std(*EPOCH + Duration::from_millis(ms - 1))),
        };
        let at = match (at(&self.backend_at), at(&self.final_at)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(|at| (at, Ending::Drain))
    }

    fn slot(&self, kind: DrainKind) -> &AtomicU64 {
        match kind {
            DrainKind::Backend => &self.backend_at,
            DrainKind::Final => &self.final_at,
        }
    }
}

/// What the registry knows about one connection. The names are shared with every other
/// connection of the same route, upstream and backend ([`Registry::name`]).
#[derive(Debug)]
pub struct Entry {
    pub conn_id: Box<str>,
    pub route: Arc<str>,
    pub upstream: Arc<str>,
    pub backend: Arc<str>,
    pub client_ip: IpAddr,
    /// The token's subject (JWT `sub`), for `/connections/close?subject=` and `/revoke`.
    pub subject: Option<Box<str>>,
    /// The token's id (JWT `jti`), for `/revoke?jti=`.
    pub jti: Option<Box<str>>,
    /// Unix milliseconds of the upgrade.
    pub since_ms: u64,
    /// How the client speaks: `http/1.1`, or `h2` for a stream of an HTTP/2 connection.
    pub protocol: &'static str,
}

/// Which live connections an admin close picks (SPEC §7 `/connections/close`, `/revoke`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Subject(String),
    TokenId(String),
    Ip(IpAddr),
    Route(String),
    ConnId(String),
}

impl Selector {
    pub fn matches(&self, e: &Entry) -> bool {
        match self {
            Selector::Subject(s) => e.subject.as_deref() == Some(s.as_str()),
            Selector::TokenId(j) => e.jti.as_deref() == Some(j.as_str()),
            Selector::Ip(ip) => e.client_ip == *ip,
            Selector::Route(r) => *e.route == **r,
            Selector::ConnId(id) => *e.conn_id == **id,
        }
    }
}

/// The live connections.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    /// One pointer per connection: the table's slack costs 8 bytes a slot, not an entry.
    live: Mutex<HashMap<u64, Arc<Control>>>,
    /// Route, upstream and backend names in use (they come from the config: few).
    names: Mutex<HashSet<Arc<str>>>,
    /// Set once a process-wide drain began: its end, so late upgrades drain too.
    draining_until: Mutex<Option<Instant>>,
    /// Turns true when a process-wide drain begins: HTTP/2 connections send GOAWAY then.
    drain_started: tokio::sync::watch::Sender<bool>,
}

/// Keeps a connection listed until dropped.
pub struct Registration {
    registry: Weak<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade()
            && let Ok(mut live) = r.live.lock()
        {
            live.remove(&self.id);
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// The shared copy of a route, upstream or backend name, for an [`Entry`]: thousands of
    /// connections to one backend keep one string, not thousands.
    pub fn name(&self, name: &str) -> Arc<str> {
        let Ok(mut names) = self.names.lock() else {
            return name.into();
        };
        if let Some(known) = names.get(name) {
            return known.clone();
        }
        // A new name (first use, or after a reload): forget those no connection uses.
        names.retain(|n| Arc::strong_count(n) > 1);
        let name: Arc<str> = name.into();
        names.insert(name.clone());
        name
    }

    /// Lists a connection. During a process-wide drain it is scheduled to close at once
    /// (with jitter), since it was upgraded after the drain began.
    pub fn register(self: &Arc<Self>, control: Arc<Control>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Under the `live` lock, which `drain_all` takes to start a drain: either this
        // sees the drain, or the drain's scan sees this connection.
        if let Ok(mut live) = self.live.lock() {
            let late = self.draining_until.lock().ok().and_then(|d| *d);
            if let Some(until) = late {
                let left = until.saturating_duration_since(Instant::now());
                control.drain_at(Instant::now() + left.mul_f64(jitter(id)), DrainKind::Final);
            }
            live.insert(id, control);
        }
        Registration {
            registry: Arc::downgrade(self),
            id,
        }
    }

    /// Drains one connection at a random time within `spread` (one that registered on a
    /// route a reload removed while it was upgrading).
    pub fn drain_one(&self, control: &Control, spread: Duration) {
        control.drain_at(Instant::now() + spread.mul_f64(jitter(0)), DrainKind::Final);
    }

    /// A process-wide drain began and its spread window is over: too late to upgrade.
    pub fn past_drain_window(&self) -> bool {
        let until = self.draining_until.lock().ok().and_then(|d| *d);
        until.is_some_and(|u| Instant::now() >= u)
    }

    pub fn len(&self) -> usize {
        self.live.lock().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection `select` picks with 1012, spread evenly over `spread` with
    /// random jitter (slot i of n closes in [i/n, (i+1)/n) of the window), so clients do
    /// not reconnect in one wave. Returns how many were picked.
    pub fn drain(
        &self,
        select: impl Fn(&Entry) -> bool,
        spread: Duration,
        kind: DrainKind,
    ) -> usize {
        let picked: Vec<Arc<Control>> = match self.live.lock() {
            Ok(live) => live
                .values()
                .filter(|c| select(&c.entry))
                .cloned()
                .collect(),
            Err(_) => return 0,
        };
        let start = Instant::now();
        let n = picked.len();
        for (i, control) in picked.iter().enumerate() {
            let slot = (i as f64 + jitter(i as u64)) / n as f64;
            control.drain_at(start + spread.mul_f64(slot), kind);
        }
        n
    }

    /// Calls off the backend-drain closes of the connections `select` picks (a backend
    /// was undrained); closes for a removed route or shutdown stay. Returns how many were
    /// picked.
    pub fn undrain(&self, select: impl Fn(&Entry) -> bool) -> usize {
        let Ok(live) = self.live.lock() else {
            return 0;
        };
        let picked: Vec<&Arc<Control>> = live.values().filter(|c| select(&c.entry)).collect();
        for control in &picked {
            control.cancel_drain();
        }
        picked.len()
    }

    /// Closes every connection `select` picks at once with [`Ending::Revoked`] (`code` to
    /// the client). Returns how many were picked.
    pub fn revoke(&self, select: &Selector, code: u16) -> usize {
        let Ok(live) = self.live.lock() else {
            return 0;
        };
        let mut n = 0;
        for control in live.values().filter(|c| select.matches(&c.entry)) {
            control.revoke(code);
            n += 1;
        }
        n
    }

    /// Watches for the start of a process-wide drain.
    pub fn drain_started(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain_started.subscribe()
    }

    /// Drains everything, including connections upgraded from now on (shutdown).
    pub fn drain_all(&self, spread: Duration) -> usize {
        self.drain_started.send_replace(true);
        if let Ok(_live) = self.live.lock()
            && let Ok(mut d) = self.draining_until.lock()
        {
            d.get_or_insert(Instant::now() + spread);
        }
        self.drain(|_| true, spread, DrainKind::Final)
    }

    /// Counts per route and per backend, and the `oldest` longest-lived connections.
    pub fn view(&self, oldest: usize) -> View {
        let Ok(live) = self.live.lock() else {
            return View::default();
        };
        let mut view = View {
            total: live.len(),
            ..View::default()
        };
        for e in live.values().map(|c| &c.entry) {
            *view.routes.entry(e.route.to_string()).or_default() += 1;
            *view
                .backends
                .entry(format!("{}/{}", e.upstream, e.backend))
                .or_default() += 1;
        }
        let mut by_age: Vec<&Entry> = live.values().map(|c| &c.entry).collect();
        // Only the oldest few are sorted: the lock is held, and there may be many.
        if by_age.len() > oldest && oldest > 0 {
            by_age.select_nth_unstable_by_key(oldest - 1, |e| e.since_ms);
            by_age.truncate(oldest);
        }
        by_age.sort_by_key(|e| e.since_ms);
        let now = unix_ms();
        view.oldest = by_age
            .into_iter()
            .take(oldest)
            .map(|e| Oldest {
                conn_id: e.conn_id.to_string(),
                route: e.route.to_string(),
                upstream: e.upstream.to_string(),
                backend: e.backend.to_string(),
                client_ip: e.client_ip.to_string(),
                protocol: e.protocol,
                age_s: now.saturating_sub(e.since_ms) / 1000,
            })
            .collect();
        view
    }
}

/// The `/connections` document.
#[derive(Debug, Default, Serialize)]
pub struct View {
    pub total: usize,
    pub routes: std::collections::BTreeMap<String, usize>,
    /// Keyed `upstream/backend`.
    pub backends: std::collections::BTreeMap<String, usize>,
    pub oldest: Vec<Oldest>,
}

#[derive(Debug, Serialize)]
pub struct Oldest {
    pub conn_id: String,
    pub route: String,
    pub upstream: String,
    pub backend: String,
    pub client_ip: String,
    /// `http/1.1`, or `h2` for a WebSocket over HTTP/2 (RFC 8441).
    pub protocol: &'static str,
    pub age_s: u64,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A uniform value in [0, 1), different for every call.
fn jitter(salt: u64) -> f64 {
    static STATE: LazyLock<RandomState> = LazyLock::new(RandomState::new);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let bits = STATE.hash_one((n, salt)) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(route: &str) -> Arc<Control> {
        Arc::new(Control::new(Entry {
            conn_id: "c".into(),
            route: route.into(),
            upstream: "u".into(),
            backend: "b".into(),
            client_ip: IpAddr::from([127, 0, 0, 1]),
            subject: Some(format!("user-{route}").into()),
            jti: None,
            since_ms: unix_ms(),
            protocol: "http/1.1",
        }))
    }

    fn order(c: &Control) -> Option<(Instant, Ending)> {
        c.poll_drain(&Context::from_waker(std::task::Waker::noop()))
    }

    fn deadline(c: &Control) -> Option<Instant> {
        order(c).map(|(at, _)| at)
    }

    #[test]
    fn an_admin_close_is_due_at_once_and_outlives_an_undrain() {
        let registry = Registry::new();
        let a = control("a");
        let b = control("b");
        let _ra = registry.register(a.clone());
        let _rb = registry.register(b.clone());
        registry.drain(|_| true, Duration::from_secs(60), DrainKind::Backend);
        assert_eq!(
            registry.revoke(&Selector::Subject("user-a".into()), 4003),
            1
        );
        let now = Instant::now();
        assert!(matches!(order(&a), Some((at, Ending::Revoked { code: 4003 })) if at <= now));
        assert!(matches!(order(&b), Some((_, Ending::Drain))));
        registry.undrain(|_| true);
        a.revoke(4000);
        assert!(matches!(
            order(&a),
            Some((_, Ending::Revoked { code: 4003 }))
        ));
        assert_eq!(order(&b), None);
        assert_eq!(registry.revoke(&Selector::Route("b".into()), 4001), 1);
        assert_eq!(registry.revoke(&Selector::TokenId("x".into()), 4003), 0);
    }

    #[test]
    fn drain_spreads_closes_across_the_window() {
        let registry = Registry::new();
        let controls: Vec<Arc<Control>> = (0..100).map(|_| control("a")).collect();
        let _regs: Vec<Registration> = controls
            .iter()
            .map(|c| registry.register(c.clone()))
            .collect();
        let start = Instant::now();
        assert_eq!(
            registry.drain(|_| true, Duration::from_secs(10), DrainKind::Final),
            100
        );
        let mut offsets: Vec<Duration> = controls
            .iter()
            .map(|c| deadline(c).map(|d| d.saturating_duration_since(start)))
            .collect::<Option<_>>()
            .unwrap_or_default();
        assert_eq!(offsets.len(), 100);
        offsets.sort();
        // One close per tenth of a second on average: each decile holds about ten.
        for decile in 0..10 {
            let lo = Duration::from_secs(decile);
            let hi = Duration::from_secs(decile + 1);
            let n = offsets.iter().filter(|o| **o >= lo && **o < hi).count();
            assert!((8..=12).contains(&n), "decile {decile}: {n}");
        }
    }

    #[test]
    fn drain_picks_only_what_is_selected_and_leaving_unlists() {
        let registry = Registry::new();
        let a = control("a");
        let b = control("b");
        let ra = registry.register(a.clone());
        let _rb = registry.register(b.clone());
        assert_eq!(
            registry.drain(|e| &*e.route == "b", Duration::ZERO, DrainKind::Final),
            1
        );
        assert!(deadline(&a).is_none());
        assert!(deadline(&b).is_some());
        assert_eq!(registry.view(10).routes.get("a"), Some(&1));
        drop(ra);
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn undrain_calls_off_backend_drains_but_not_a_shutdown() {
        let registry = Registry::new();
        let c = control("a");
        let _r = registry.register(c.clone());
        registry.drain(|_| true, Duration::from_secs(60), DrainKind::Backend);
        assert!(deadline(&c).is_some());
        assert_eq!(registry.undrain(|e| &*e.route == "a"), 1);
        assert!(deadline(&c).is_none());
        registry.drain_all(Duration::from_secs(60));
        let at = deadline(&c);
        assert!(at.is_some());
        registry.undrain(|_| true);
        assert_eq!(deadline(&c), at);
    }

    /// A connection whose route a reload removed must close whatever the admin API does
    /// to its backend: an undrain neither cancels its close nor postpones it.
    #[test]
    fn a_removed_routes_close_survives_backend_drain_and_undrain() {
        let registry = Registry::new();
        let c = control("gone");
        let _r = registry.register(c.clone());
        let now = Instant::now();
        c.drain_at(now + Duration::from_secs(5), DrainKind::Final);
        let route_close = deadline(&c);
        registry.undrain(|_| true);
        assert_eq!(deadline(&c), route_close);
        // A later backend drain: a later close does not postpone it, an earlier one
        // brings it forward until the backend is undrained.
        c.drain_at(now + Duration::from_secs(9), DrainKind::Backend);
        assert_eq!(deadline(&c), route_close);
        c.drain_at(now + Duration::from_secs(1), DrainKind::Backend);
        let forward = deadline(&c).zip(route_close);
        assert!(forward.is_some_and(|(at, route)| at < route));
        registry.undrain(|_| true);
        assert_eq!(deadline(&c), route_close);
        // The same for a connection drained while it was upgrading.
        let late = control("gone");
        let _l = registry.register(late.clone());
        registry.drain_one(&late, Duration::from_secs(5));
        registry.undrain(|_| true);
        assert!(deadline(&late).is_some());
    }

    #[test]
    fn late_upgrades_during_a_drain_are_drained_too() {
        let registry = Registry::new();
        registry.drain_all(Duration::from_secs(1));
        let c = control("a");
        let _r = registry.register(c.clone());
        let at = deadline(&c);
        assert!(at.is_some_and(|t| t <= Instant::now() + Duration::from_secs(1)));
    }

    #[test]
    fn names_are_shared_while_in_use() {
        let registry = Registry::new();
        let a = registry.name("backend:1");
        let b = registry.name("backend:1");
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        // Unused names are forgotten when a new one arrives.
        let _c = registry.name("backend:2");
        assert_eq!(registry.names.lock().map(|n| n.len()).unwrap_or(0), 1);
    }

    #[test]
    fn an_earlier_drain_request_wins() {
        let c = control("a");
        let now = Instant::now();
        c.drain_at(now + Duration::from_secs(5), DrainKind::Final);
        c.drain_at(now + Duration::from_secs(1), DrainKind::Final);
        c.drain_at(now + Duration::from_secs(9), DrainKind::Final);
        let at = deadline(&c).map(|d| d.saturating_duration_since(now));
        assert!(
            at.is_some_and(|d| d >= Duration::from_millis(999) && d <= Duration::from_millis(1001))
        );
    }
}
