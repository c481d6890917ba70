//! Keys published at a `jwks_url` (SPEC §2 `auth.jwt.keys`): the key set handshakes read
//! (an `ArcSwap`, never a lock and never the network), whether it was fetched once (for
//! `/readyz`), and the unknown-`kid` trigger, limited to one refetch per
//! [`KID_MISS_EVERY`]. Fetching itself (HTTPS, the schedule, metrics) is the gateway's
//! background task; nothing here does I/O.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::Notify;

use super::jwks::JwtKeys;

/// Tokens naming a `kid` no key set has trigger a refetch at most this often (SPEC §2), so
/// a flood of made-up `kid`s cannot make wsgate hammer the identity provider.
pub const KID_MISS_EVERY: Duration = Duration::from_secs(30);

/// One `jwks_url` entry: where the keys are, how often they are fetched, and the set in
/// service. Routes naming the same URL (with the same `refresh` and `ca`) share one.
pub struct RemoteKeys {
    /// The URL as configured (an `https` URI with a host), for requests and logs.
    pub uri: http::Uri,
    /// The period of scheduled fetches.
    pub refresh: Duration,
    /// The `ca` file as configured, when set (identity for sharing, and logs).
    pub ca: Option<String>,
    /// Server verification: the `ca` bundle, or the bundled webpki roots.
    pub tls: Arc<rustls::ClientConfig>,
    keys: ArcSwap<JwtKeys>,
    fetched: AtomicBool,
    kid_miss: RefetchLimit,
    /// Wakes the fetcher for an allowed kid-miss refetch (a permit is kept if it is busy).
    wake: Notify,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("uri", &self.uri)
            .field("refresh", &self.refresh)
            .field("ca", &self.ca)
            .field("fetched", &self.is_fetched())
            .field("keys", &**self.keys.load())
            .finish()
    }
}

impl RemoteKeys {
    /// A source with no keys yet (nothing verifies against it until the first fetch).
    pub fn new(
        uri: http::Uri,
        refresh: Duration,
        ca: Option<String>,
        tls: Arc<rustls::ClientConfig>,
    ) -> RemoteKeys {
        RemoteKeys {
            uri,
            refresh,
            ca,
            tls,
            keys: ArcSwap::from_pointee(JwtKeys::new()),
            fetched: AtomicBool::new(false),
            kid_miss: RefetchLimit::new(KID_MISS_EVERY),
            wake: Notify::new(),
        }
    }

    /// Whether `other` fetches the same thing the same way (then one source serves both).
    pub fn same_source(&self, other: &RemoteKeys) -> bool {
        self.uri == other.uri && self.refresh == other.refresh && self.ca == other.ca
    }

    /// The key set in service.
    pub fn keys(&self) -> Guard<Arc<JwtKeys>> {
        self.keys.load()
    }

    /// Puts a freshly fetched set in service; the source counts as fetched from now on.
    pub fn store(&self, keys: JwtKeys) {
        self.keys.store(Arc::new(keys));
        self.fetched.store(true, Ordering::Release);
    }

    /// Whether a fetch has succeeded once (`/readyz` waits for it).
    pub fn is_fetched(&self) -> bool {
        self.fetched.load(Ordering::Acquire)
    }

    /// Takes over what `old` (the same URL in the configuration a reload replaces) has:
    /// its keys, its fetched state and its kid-miss window, so a reload neither
    /// refuses tokens, nor turns `/readyz` 503, nor reopens the window.
    pub fn carry_over(&self, old: &RemoteKeys) {
        if self.uri != old.uri {
            return;
        }
        if old.is_fetched() {
            self.store(JwtKeys::clone(&old.keys()));
        }
        self.kid_miss.copy_from(&old.kid_miss);
    }

    /// A token named a `kid` that no key set has: asks the fetcher for a refetch unless
    /// one was asked within [`KID_MISS_EVERY`] of `now`. Returns whether it asked.
    pub fn kid_missed(&self, now: Instant) -> bool {
        let asked = self.kid_miss.allow(now);
        if asked {
            self.wake.notify_one();
        }
        asked
    }

    /// Resolves when a kid-miss refetch was asked (for the fetcher).
    pub async fn refetch_asked(&self) {
        self.wake.notified().await;
    }
}

/// At most one event per `every`: the first is allowed, the next only once `every` has
/// passed since the last allowed one. Time is the caller's, so tests need no clock.
#[derive(Debug)]
pub struct RefetchLimit {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl RefetchLimit {
    pub fn new(every: Duration) -> RefetchLimit {
        RefetchLimit {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether an event at `now` is allowed; an allowed event starts a new window.
    pub fn allow(&self, now: Instant) -> bool {
        // A poisoned lock refuses: a missed refetch is retried by the schedule, while a
        // limit that stopped limiting would let a flood through.
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        let open = last.is_none_or(|at| now.saturating_duration_since(at) >= self.every);
        if open {
            *last = Some(now);
        }
        open
    }

    fn copy_from(&self, other: &RefetchLimit) {
        let theirs = other.last.lock().map(|l| *l).unwrap_or(None);
        if let Ok(mut mine) = self.last.lock() {
            *mine = theirs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> RemoteKeys {
        let tls = crate::tls::client_config(None, None).unwrap_or_else(|e| panic!("{e}"));
        let uri = http::Uri::from_static("https://auth.example.com/jwks.json");
        RemoteKeys::new(uri, Duration::from_secs(300), None, tls)
    }

    #[test]
    fn one_refetch_per_window_however_many_misses() {
        let limit = RefetchLimit::new(KID_MISS_EVERY);
        let t0 = Instant::now();
        assert!(limit.allow(t0), "the first miss asks");
        let asked = (1..=1000)
            .filter(|i| limit.allow(t0 + Duration::from_millis(29 * i)))
            .count();
        assert_eq!(asked, 0, "a flood within 29 s asks nothing more");
        assert!(!limit.allow(t0 + KID_MISS_EVERY - Duration::from_millis(1)));
        assert!(
            limit.allow(t0 + KID_MISS_EVERY),
            "the window reopens after 30 s"
        );
        assert!(!limit.allow(t0 + KID_MISS_EVERY + Duration::from_secs(1)));
        assert!(limit.allow(t0 + 2 * KID_MISS_EVERY));
    }

    #[test]
    fn a_clock_going_backwards_does_not_open_the_window() {
        let limit = RefetchLimit::new(KID_MISS_EVERY);
        let t0 = Instant::now() + Duration::from_secs(60);
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0 - Duration::from_secs(59)));
    }

    #[tokio::test]
    async fn an_allowed_miss_wakes_the_fetcher_once() {
        let remote = source();
        let now = Instant::now();
        assert!(remote.kid_missed(now));
        assert!(!remote.kid_missed(now + Duration::from_secs(1)));
        // The permit was kept for a fetcher that was not waiting yet.
        tokio::time::timeout(Duration::from_secs(1), remote.refetch_asked())
            .await
            .unwrap_or_else(|_| panic!("the allowed miss woke nobody"));
        let again = tokio::time::timeout(Duration::from_millis(50), remote.refetch_asked()).await;
        assert!(again.is_err(), "the refused miss must not wake the fetcher");
    }

    #[test]
    fn a_fetch_makes_the_source_ready_and_a_reload_carries_it_over() {
        let old = source();
        assert!(!old.is_fetched());
        assert!(old.keys().is_empty());
        let mut keys = JwtKeys::new();
        let jwks = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#;
        keys.add_jwks(jwks).unwrap_or_else(|e| panic!("{e}"));
        old.store(keys);
        assert!(old.is_fetched());
        assert!(old.kid_missed(Instant::now()));

        let new = source();
        assert!(new.same_source(&old));
        new.carry_over(&old);
        assert!(new.is_fetched());
        assert!(new.keys().has_kid("k1"));
        assert!(
            !new.kid_missed(Instant::now()),
            "the kid-miss window survives a reload"
        );
    }
}
