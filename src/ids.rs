//! Connection ids: ULID-shaped (26 Crockford base32 characters, time-ordered), unique
//! within the process because the low bits are a counter, not chance.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many ids were handed out (one per accepted connection).
pub fn issued() -> u64 {
    COUNTER.load(Ordering::Relaxed)
}

/// A new id: 48 bits of milliseconds, 16 random bits per process, 64 bits of counter.
pub fn next() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let value = (u128::from(ms & 0xFFFF_FFFF_FFFF) << 80)
        | (u128::from(process_salt()) << 64)
        | u128::from(n);
    encode(value)
}

/// A uniform value in [0, 1), different for every call: jitter (retry hints, connection
/// ages), never secrets.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::LazyLock;
    static STATE: LazyLock<RandomState> = LazyLock::new(RandomState::new);
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let bits = STATE.hash_one(n) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

fn process_salt() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::OnceLock;
    static SALT: OnceLock<u16> = OnceLock::new();
    *SALT.get_or_init(|| RandomState::new().hash_one(std::process::id()) as u16)
}

fn encode(mut v: u128) -> String {
    let mut out = [0u8; 26];
    for slot in out.iter_mut().rev() {
        *slot = CROCKFORD[(v & 31) as usize];
        v >>= 5;
    }
    out.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_ulid_shaped() {
        let a = next();
        let b = next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 26);
        assert!(a.bytes().all(|c| CROCKFORD.contains(&c)));
    }
}
