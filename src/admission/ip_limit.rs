//! The per-IP connection cap and the per-IP handshake rate (SPEC §2
//! `limits.max_connections_per_ip`, `handshakes_per_ip`). The process-wide
//! `max_connections` is counted by the listener (`Shared.active`), not here.
//!
//! Caps are RAII permits: taking one never waits, and the permit's `Drop` gives the slot
//! back exactly once, so moving the permit into the connection's task frees it on every
//! exit (normal end, error, panic, task abort). A permit is taken before the handshake is
//! read, so handshakes in progress count as well as established connections.
//!
//! Memory stays bounded by *live* connections: an IP's entry is removed the moment its
//! count reaches 0, so a scan from a million addresses leaves nothing behind. The rate
//! limiter's state is reclaimed by [`HandshakeRate::reclaim`], which the caller runs
//! periodically (every few seconds is plenty).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::client_ip::IpKey;

/// Shards of the per-IP table: enough that concurrent handshakes from different IPs
/// rarely contend on one lock.
const SHARDS: usize = 64;

/// A key connections are counted by: a client address, a subject.
pub trait CountKey: Eq + Hash + Clone + Send + Sync + 'static {}

impl<K: Eq + Hash + Clone + Send + Sync + 'static> CountKey for K {}

/// Concurrent connection counts per key (client IP, subject).
#[derive(Debug)]
pub struct ConnLimiter<K> {
    shards: Box<[Mutex<HashMap<K, u32>>]>,
    hasher: RandomState,
}

/// Per-IP concurrent connection counts.
pub type IpLimiter = ConnLimiter<IpKey>;

/// One connection's slot in a [`ConnLimiter`]; dropping it frees the slot.
#[must_use = "the slot is freed as soon as the permit is dropped"]
#[derive(Debug)]
pub struct ConnPermit<K: CountKey> {
    limiter: Arc<ConnLimiter<K>>,
    key: K,
}

/// One connection's slot in the per-IP table.
pub type IpPermit = ConnPermit<IpKey>;

impl<K: CountKey> ConnLimiter<K> {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(ConnLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        })
    }

    /// Takes one of `key`'s `cap` slots, or `None` when all are taken (429).
    /// `cap` is passed per call because routes may override it; the count is per key
    /// across all routes.
    pub fn try_acquire(self: &Arc<Self>, key: K, cap: u32) -> Option<ConnPermit<K>> {
        let mut shard = self.shard(&key);
        let count = shard.entry(key.clone()).or_insert(0);
        if *count >= cap {
            // Never leave a 0 entry behind (cap 0 refuses everyone).
            if *count == 0 {
                shard.remove(&key);
            }
            return None;
        }
        *count += 1;
        drop(shard);
        Some(ConnPermit {
            limiter: Arc::clone(self),
            key,
        })
    }

    /// Live connections counted for `key`.
    pub fn count(&self, key: K) -> u32 {
        self.shard(&key).get(&key).copied().unwrap_or(0)
    }

    /// Number of keys with at least one live connection (the table's size).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key holds a slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, HashMap<K, u32>> {
        let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        lock(&self.shards[i])
    }

    fn release(&self, key: &K) {
        let mut shard = self.shard(key);
        if let Some(count) = shard.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(key);
                // Give memory back after a burst: a HashMap never shrinks on its own.
                if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
                    shard.shrink_to_fit();
                }
            }
        }
    }
}

impl ConnLimiter<IpKey> {
    /// [`try_acquire`](Self::try_acquire) as a [`Refusal`](super::Refusal): 429 `ip_cap`.
    pub fn admit(self: &Arc<Self>, key: IpKey, cap: u32) -> Result<IpPermit, super::Refusal> {
        self.try_acquire(key, cap).ok_or(super::Refusal::IpCap)
    }
}

/// The critical sections only touch a map and never panic, so a poisoned lock still
/// holds consistent data; recovering keeps the permits' `Drop` infallible.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: CountKey> ConnPermit<K> {
    /// The key this permit counts against.
    pub fn key(&self) -> K {
        self.key.clone()
    }
}

impl<K: CountKey> Drop for ConnPermit<K> {
    fn drop(&mut self) {
        self.limiter.release(&self.key);
    }
}

/// Longest time a rate limit may take to refill a full burst (`per / rate × burst`). The
/// limiter keeps time in 64-bit nanoseconds (about 584 years), so a longer span would
/// overflow it; a year is beyond any real policy.
pub const MAX_REFILL_SPAN: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a rate's refill span against [`MAX_REFILL_SPAN`]; the error says what to fix.
pub fn check_refill_span(per: Duration, rate: u32, burst: u32) -> Result<(), String> {
    let period = per / rate.max(1);
    if period.saturating_mul(burst) > MAX_REFILL_SPAN {
        return Err(format!(
            "per / rate × burst (the time to refill a full burst) must be at most {}d; lower `per` or `burst`",
            MAX_REFILL_SPAN.as_secs() / 86_400
        ));
    }
    Ok(())
}

/// The `handshakes_per_ip` policy: `rate` handshakes per `per`, with bursts up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatePolicy {
    pub rate: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RatePolicy {
    /// The governor quota: one cell every `per / rate`, `burst` cells at once. Errors
    /// (for the config validator) say which value to fix.
    pub fn quota(self) -> Result<Quota, String> {
        let rate = NonZeroU32::new(self.rate).ok_or("rate must be at least 1")?;
        let burst = NonZeroU32::new(self.burst).ok_or("burst must be at least 1")?;
        check_refill_span(self.per, self.rate, self.burst)?;
        let period = self.per / rate.get();
        Quota::with_period(period)
            .map(|q| q.allow_burst(burst))
            .ok_or_else(|| "per / rate must be at least 1ns; lower `rate` or raise `per`".into())
    }
}

type Keyed<C> =
    RateLimiter<IpKey, DefaultKeyedStateStore<IpKey>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Per-IP handshake rate (governor's keyed GCRA limiter over a `DashMap`).
///
/// Memory: one entry per IP seen recently. Call [`reclaim`](Self::reclaim) periodically;
/// it drops every IP whose bucket is full again (indistinguishable from a new IP) and
/// shrinks the map.
pub struct HandshakeRate<C: Clock = DefaultClock> {
    limiter: Keyed<C>,
}

impl HandshakeRate {
    /// A limiter on the real monotonic clock.
    pub fn new(policy: RatePolicy) -> Result<Self, String> {
        Self::with_clock(policy, DefaultClock::default())
    }
}

impl<C: Clock> HandshakeRate<C> {
    /// A limiter on `clock` (tests use governor's `FakeRelativeClock`).
    pub fn with_clock(policy: RatePolicy, clock: C) -> Result<Self, String> {
        let quota = policy.quota()?;
        Ok(HandshakeRate {
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock),
        })
    }

    /// Counts one handshake from `key`; `Err(wait)` when over the rate.
    pub fn check(&self, key: IpKey) -> Result<(), Duration> {
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// [`check`](Self::check) as a [`Refusal`](super::Refusal): 429 `ip_rate` with a
    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn admit(&self, key: IpKey) -> Result<(), super::Refusal> {
        self.check(key).map_err(|wait| super::Refusal::IpRate {
            retry_after_secs: retry_after_secs(wait),
        })
    }

    /// Forgets IPs whose budget is full again and shrinks the table. Cheap enough to run
    /// every few seconds from a housekeeping task; never needed for correctness.
    pub fn reclaim(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// IPs currently tracked (may be approximate under concurrent use).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no IP is tracked.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1 (a 0 invites a hot loop).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(n: u32) -> IpKey {
        IpKey::from(Ipv4Addr::from(n))
    }

    #[test]
    fn cap_counts_and_releases() {
        let l = IpLimiter::new();
        let a = l.try_acquire(key(1), 2).expect("first");
        let b = l.try_acquire(key(1), 2).expect("second");
        assert!(l.try_acquire(key(1), 2).is_none());
        assert!(l.try_acquire(key(2), 2).is_some(), "other IPs unaffected");
        assert_eq!(l.count(key(1)), 2);
        drop(a);
        assert_eq!(l.count(key(1)), 1);
        let c = l.try_acquire(key(1), 2).expect("slot freed");
        drop((b, c));
        assert_eq!(l.count(key(1)), 0);
        assert!(l.is_empty());
    }

    #[test]
    fn cap_zero_refuses_and_leaves_no_entry() {
        let l = IpLimiter::new();
        assert!(l.try_acquire(key(1), 0).is_none());
        assert!(l.is_empty());
    }

    #[test]
    fn a_scan_of_100k_addresses_leaves_the_table_empty() {
        let l = IpLimiter::new();
        let permits: Vec<IpPermit> = (0..100_000u32)
            .map(|n| l.try_acquire(key(n), 1).expect("fresh ip"))
            .collect();
        assert_eq!(l.len(), 100_000);
        drop(permits);
        assert!(l.is_empty());
        let capacity: usize = l.shards.iter().map(|s| lock(s).capacity()).sum();
        assert!(capacity <= SHARDS * 64, "shards shrank back: {capacity}");
    }

    #[test]
    fn ipv6_clients_in_one_64_share_a_slot_count() {
        let l = IpLimiter::new();
        let k = |s: &str| IpKey::new(s.parse::<Ipv6Addr>().map(IpAddr::V6).expect("v6"), 64);
        let _a = l.try_acquire(k("2001:db8:0:1::1"), 1).expect("first");
        assert!(l.try_acquire(k("2001:db8:0:1::2"), 1).is_none());
        assert!(l.try_acquire(k("2001:db8:0:2::1"), 1).is_some());
    }

    #[test]
    fn permit_is_released_when_a_thread_panics() {
        let l = IpLimiter::new();
        let permit = l.try_acquire(key(7), 1).expect("slot");
        let result = std::thread::spawn(move || {
            let _held = permit;
            panic!("connection task failed");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(l.count(key(7)), 0);
        assert!(l.is_empty());
    }

    #[tokio::test]
    async fn permit_is_released_when_a_task_is_aborted() {
        let l = IpLimiter::new();
        let ip = l.try_acquire(key(9), 1).expect("slot");
        let task = tokio::spawn(async move {
            let _held = ip;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(l.count(key(9)), 1);
        task.abort();
        assert!(task.await.is_err_and(|e| e.is_cancelled()));
        assert!(l.is_empty());
    }

    #[test]
    fn concurrent_acquire_never_exceeds_cap_and_ends_at_zero() {
        let l = IpLimiter::new();
        let max_seen = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let l = Arc::clone(&l);
                let max_seen = Arc::clone(&max_seen);
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        if let Some(p) = l.try_acquire(key(i % 4), 3) {
                            let n = l.count(p.key()) as usize;
                            max_seen.fetch_max(n, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert!(max_seen.load(Ordering::Relaxed) <= 3);
        assert!(l.is_empty());
    }

    #[test]
    fn ip_cap_refusal() {
        let ips = IpLimiter::new();
        let _p = ips.admit(key(1), 1).expect("slot");
        assert_eq!(
            ips.admit(key(1), 1).err(),
            Some(super::super::Refusal::IpCap)
        );
    }

    fn policy(rate: u32, per_ms: u64, burst: u32) -> RatePolicy {
        RatePolicy {
            rate,
            per: Duration::from_millis(per_ms),
            burst,
        }
    }

    #[test]
    fn rate_allows_burst_then_refuses_with_retry_after() {
        let clock = FakeRelativeClock::default();
        let r = HandshakeRate::with_clock(policy(10, 1000, 3), clock.clone()).expect("quota");
        for _ in 0..3 {
            assert_eq!(r.check(key(1)), Ok(()));
        }
        let wait = r.check(key(1)).expect_err("over the burst");
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(
            r.admit(key(1)),
            Err(super::super::Refusal::IpRate {
                retry_after_secs: 1
            })
        );
        assert_eq!(r.check(key(2)), Ok(()), "other IPs unaffected");
        clock.advance(Duration::from_millis(100));
        assert_eq!(r.check(key(1)), Ok(()));
    }

    #[test]
    fn slow_rate_gives_retry_after_in_whole_seconds() {
        let clock = FakeRelativeClock::default();
        let r = HandshakeRate::with_clock(policy(1, 60_000, 1), clock.clone()).expect("quota");
        assert_eq!(r.check(key(1)), Ok(()));
        clock.advance(Duration::from_millis(500));
        assert_eq!(
            r.admit(key(1)),
            Err(super::super::Refusal::IpRate {
                retry_after_secs: 60
            })
        );
    }

    #[test]
    fn rate_state_is_reclaimed_after_a_scan() {
        let clock = FakeRelativeClock::default();
        let r = HandshakeRate::with_clock(policy(10, 1000, 20), clock.clone()).expect("quota");
        for n in 0..100_000u32 {
            assert_eq!(r.check(key(n)), Ok(()));
        }
        assert_eq!(r.len(), 100_000);
        r.reclaim();
        assert_eq!(r.len(), 100_000, "budgets not yet full again: kept");
        clock.advance(Duration::from_secs(3));
        r.reclaim();
        assert!(r.is_empty());
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn bad_quotas_are_config_errors() {
        assert!(policy(0, 1000, 1).quota().is_err());
        assert!(policy(1, 1000, 0).quota().is_err());
        assert!(policy(10, 0, 1).quota().is_err());
        assert!(policy(10, 1000, 20).quota().is_ok());
    }
}
