//! Revocation (SPEC §7 `/revoke`, `/connections/close`): which subjects and token ids the
//! handshake refuses (403 `revoked`), for how long, and closing live connections with
//! 4003. What the admin API and admission see is the [`RevocationStore`] trait; this
//! process's store is [`InMemory`]. A fleet store (SPEC §10: entries in Redis, orders
//! published to every instance) implements the same trait: its writes are async (they may
//! reach a server), while [`RevocationStore::is_revoked`] answers from local state and never
//! waits, since the handshake asks it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::registry::{Registry, Selector};
use crate::outcome::Ending;

/// Most entries a store holds: a typo'd script looping over `/revoke` must not grow the
/// process without bound. Expired entries are purged before the bound is judged.
pub const MAX_ENTRIES: usize = 100_000;
/// Longest subject or token id a store takes (bytes): with [`MAX_ENTRIES`], at most
/// ~100 MB of keys. The admin API refuses longer ones (400).
pub const MAX_KEY_LEN: usize = 1024;
/// Expired entries are purged at most this long after they expire (on the next revocation
/// or handshake), so an empty store is empty again and handshakes skip its lookups.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// What a revocation names: a subject (JWT `sub`) or a token id (JWT `jti`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Subject(String),
    TokenId(String),
}

impl Target {
    /// The live connections it covers.
    pub fn selector(&self) -> Selector {
        match self {
            Target::Subject(s) => Selector::Subject(s.clone()),
            Target::TokenId(j) => Selector::TokenId(j.clone()),
        }
    }
}

/// A store's answer that can fail (a fleet store's server may be unreachable).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the revocation store holds {MAX_ENTRIES} entries: lift some (DELETE /revoke) or let them expire"
    )]
    Full,
    #[error("the revocation store is unavailable: {0}")]
    Unavailable(String),
}

/// The store behind `/revoke` and `/connections/close`.
pub trait RevocationStore: Send + Sync {
    /// Refuses new handshakes of `target` for `ttl` (a longer existing entry is kept) and
    /// closes its live connections with 4003; returns how many this process closed.
    fn revoke(&self, target: Target, ttl: Duration) -> StoreFuture<'_, usize>;

    /// Lifts a revocation; whether there was one.
    fn lift(&self, target: Target) -> StoreFuture<'_, bool>;

    /// Closes the live connections `selector` picks (`code` to the client, 1001 to the
    /// upstream); returns how many this process closed.
    fn close(&self, selector: Selector, code: u16) -> StoreFuture<'_, usize>;

    /// Whether a handshake with this subject or token id is refused. Local, never waits.
    fn is_revoked(&self, subject: Option<&str>, jti: Option<&str>) -> bool;
}

/// One process's revocations: two maps (subjects, token ids) to their expiry, read under a
/// read lock by handshakes that carry a token, and not even that while the store is empty.
pub struct InMemory {
    registry: Arc<Registry>,
    subjects: RwLock<HashMap<Box<str>, Instant>>,
    token_ids: RwLock<HashMap<Box<str>, Instant>>,
    /// Entries in both maps (expired ones included until purged): the handshake's fast path.
    len: AtomicUsize,
    /// When the store was made: [`next_purge`](Self::next_purge) counts from it.
    epoch: Instant,
    /// Milliseconds after `epoch` when expired entries are next purged.
    next_purge: AtomicU64,
}

impl InMemory {
    /// A store that closes connections listed in `registry`.
    pub fn new(registry: Arc<Registry>) -> InMemory {
        InMemory {
            registry,
            subjects: RwLock::new(HashMap::new()),
            token_ids: RwLock::new(HashMap::new()),
            len: AtomicUsize::new(0),
            epoch: Instant::now(),
            next_purge: AtomicU64::new(millis(PURGE_EVERY)),
        }
    }

    /// Whether a purge is due at `now`; true for one caller per [`PURGE_EVERY`].
    fn purge_due(&self, now: Instant) -> bool {
        let at = millis(now.saturating_duration_since(self.epoch));
        let due = self.next_purge.load(Ordering::Acquire);
        at >= due
            && self
                .next_purge
                .compare_exchange(
                    due,
                    at.saturating_add(millis(PURGE_EVERY)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    fn map<'a>(&'a self, target: &'a Target) -> (&'a RwLock<HashMap<Box<str>, Instant>>, &'a str) {
        match target {
            Target::Subject(s) => (&self.subjects, s),
            Target::TokenId(j) => (&self.token_ids, j),
        }
    }

    fn insert(&self, target: &Target, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let until = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        if self.purge_due(now) {
            self.purge(now);
        }
        let (map, key) = self.map(target);
        let known = || {
            let map = map.read().unwrap_or_else(PoisonError::into_inner);
            map.contains_key(key)
        };
        if self.len.load(Ordering::Acquire) >= MAX_ENTRIES && !known() {
            self.purge(now);
            if self.len.load(Ordering::Acquire) >= MAX_ENTRIES {
                return Err(StoreError::Full);
            }
        }
        let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(key) {
            Some(at) => *at = (*at).max(until),
            None => {
                map.insert(key.into(), until);
                self.len.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Makes the store hold exactly `entries` (target, time left), at most
    /// [`MAX_ENTRIES`]: a fleet instance's view after it (re)joined, when revocations may
    /// have been added or lifted while it was away. Closes nothing.
    pub fn replace_all(&self, entries: impl IntoIterator<Item = (Target, Duration)>) {
        let now = Instant::now();
        let mut subjects = self
            .subjects
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut token_ids = self
            .token_ids
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        subjects.clear();
        token_ids.clear();
        for (target, ttl) in entries.into_iter().take(MAX_ENTRIES) {
            let Some(until) = now.checked_add(ttl) else {
                continue;
            };
            let (map, key) = match target {
                Target::Subject(s) => (&mut *subjects, s),
                Target::TokenId(j) => (&mut *token_ids, j),
            };
            if key.len() <= MAX_KEY_LEN {
                map.insert(key.into_boxed_str(), until);
            }
        }
        self.len
            .store(subjects.len() + token_ids.len(), Ordering::Release);
    }

    /// Drops expired entries (the caller holds no lock).
    fn purge(&self, now: Instant) {
        for map in [&self.subjects, &self.token_ids] {
            let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, until| *until > now);
            map.shrink_to_fit();
            self.len.fetch_sub(before - map.len(), Ordering::AcqRel);
        }
    }

    fn remove(&self, target: &Target) -> bool {
        let (map, key) = self.map(target);
        let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
        let Some(until) = map.remove(key) else {
            return false;
        };
        self.len.fetch_sub(1, Ordering::AcqRel);
        until > Instant::now()
    }

    fn holds(map: &RwLock<HashMap<Box<str>, Instant>>, key: Option<&str>, now: Instant) -> bool {
        let Some(key) = key else {
            return false;
        };
        let map = map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(key).is_some_and(|until| *until > now)
    }
}

impl RevocationStore for InMemory {
    fn revoke(&self, target: Target, ttl: Duration) -> StoreFuture<'_, usize> {
        let done = self.insert(&target, ttl).map(|()| {
            self.registry
                .revoke(&target.selector(), Ending::REVOKED_CODE)
        });
        Box::pin(std::future::ready(done))
    }

    fn lift(&self, target: Target) -> StoreFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(self.remove(&target))))
    }

    fn close(&self, selector: Selector, code: u16) -> StoreFuture<'_, usize> {
        Box::pin(std::future::ready(Ok(self
            .registry
            .revoke(&selector, code))))
    }

    fn is_revoked(&self, subject: Option<&str>, jti: Option<&str>) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let now = Instant::now();
        if self.purge_due(now) {
            self.purge(now);
        }
        Self::holds(&self.subjects, subject, now) || Self::holds(&self.token_ids, jti, now)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now<T>(f: StoreFuture<'_, T>) -> Result<T, StoreError> {
        futures_util::FutureExt::now_or_never(f).unwrap_or(Err(StoreError::Full))
    }

    #[tokio::test(start_paused = true)]
    async fn a_revocation_refuses_its_subject_or_token_id_until_it_expires() {
        let store = InMemory::new(Registry::new());
        assert!(!store.is_revoked(Some("alice"), Some("t1")));
        let hour = Duration::from_secs(3600);
        assert_eq!(
            now(store.revoke(Target::Subject("alice".into()), hour)).ok(),
            Some(0)
        );
        assert_eq!(
            now(store.revoke(Target::TokenId("t2".into()), hour / 2)).ok(),
            Some(0)
        );
        assert!(store.is_revoked(Some("alice"), None));
        assert!(store.is_revoked(None, Some("t2")));
        assert!(!store.is_revoked(Some("bob"), Some("t1")));
        // The subject's name is not a token id, nor the other way round.
        assert!(!store.is_revoked(Some("t2"), Some("alice")));
        tokio::time::advance(hour / 2).await;
        assert!(!store.is_revoked(None, Some("t2")), "expired");
        assert!(store.is_revoked(Some("alice"), None));
        assert_eq!(
            now(store.lift(Target::Subject("alice".into()))).ok(),
            Some(true)
        );
        assert!(!store.is_revoked(Some("alice"), None));
        assert_eq!(
            now(store.lift(Target::Subject("alice".into()))).ok(),
            Some(false)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_revocation_does_not_shorten_a_longer_one() {
        let store = InMemory::new(Registry::new());
        let t = || Target::Subject("a".into());
        let _ = now(store.revoke(t(), Duration::from_secs(60)));
        let _ = now(store.revoke(t(), Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.is_revoked(Some("a"), None));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_purged_regularly_not_only_when_full() {
        let store = InMemory::new(Registry::new());
        let len = || store.len.load(Ordering::Acquire);
        let second = Duration::from_secs(1);
        assert!(store.insert(&Target::Subject("a".into()), second).is_ok());
        assert!(store.insert(&Target::TokenId("t".into()), second).is_ok());
        tokio::time::advance(PURGE_EVERY).await;
        // On the next revocation.
        assert!(store.insert(&Target::Subject("b".into()), second).is_ok());
        assert_eq!(len(), 1, "the expired two are gone");
        // On a handshake, with no revocation since: the store is empty again, and the
        // handshake's fast path (no lookup) is back.
        tokio::time::advance(PURGE_EVERY).await;
        assert!(!store.is_revoked(Some("b"), None));
        assert_eq!(len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_is_bounded_and_expired_entries_make_room() {
        let store = InMemory::new(Registry::new());
        for i in 0..MAX_ENTRIES {
            let r = store.insert(&Target::TokenId(i.to_string()), Duration::from_secs(1));
            assert!(r.is_ok(), "{i}");
        }
        let more = || store.insert(&Target::Subject("x".into()), Duration::from_secs(1));
        assert!(matches!(more(), Err(StoreError::Full)));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(more().is_ok());
        assert_eq!(store.len.load(Ordering::Acquire), 1);
    }
}
