//! Refusals per client address and second (SPEC §3 "Admission before work"): the first
//! [`LOGGED_PER_SECOND`] refusals of an address in a second are logged one by one, the
//! rest are counted and summarised in one `ws_reject` line with `"count": N` per reason
//! once the second is over. An address refused far beyond its handshake rate is cut with
//! a reset rather than answered; the tally says how many refusals it drew this second.
//!
//! Addresses are the keys the per-IP limits count by (IPv6 by its prefix), so a client
//! cannot spread its refusals over the addresses of its own network.
//!
//! Memory is bounded: entries live at most two seconds (the sweep drops the finished
//! ones), and the table holds at most [`MAX_ADDRESSES`]; refusals from addresses beyond it
//! are answered as usual but not logged one by one (one operational warning a second says
//! how many), and a sweep writes at most [`MAX_SUMMARIES`] lines.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::outcome::Refusal;

/// Refusals of one address logged line by line in one second; the rest are summarised.
pub const LOGGED_PER_SECOND: u32 = 10;

/// Addresses tracked at once. One entry is about 100 bytes: a few MiB at most.
pub const MAX_ADDRESSES: usize = 32 * 1024;

const SHARDS: usize = 16;

/// Summary lines one sweep writes at most (the access log's queue holds 16,384 lines);
/// the rest are only counted, in the sweep's warning.
pub const MAX_SUMMARIES: usize = 2048;

/// Distinct reasons summarised per address and second; further ones share the last slot.
const REASON_SLOTS: usize = 4;

/// One address's refusals in one second.
#[derive(Default)]
struct Tally {
    refusals: u32,
    listener: Option<Arc<str>>,
    /// The listener is a TLS one: its refusals at accept get no answer (status 0).
    tls: bool,
    /// Refusals counted but not logged, per reason and status actually sent.
    unlogged: [Option<(Refusal, u16, u64)>; REASON_SLOTS],
}

impl Tally {
    fn count_unlogged(&mut self, refusal: Refusal, status: u16) {
        let free = self.unlogged.iter().position(|s| {
            s.as_ref()
                .is_none_or(|(r, st, _)| same_reason(r, &refusal) && *st == status)
        });
        let slot = &mut self.unlogged[free.unwrap_or(REASON_SLOTS - 1)];
        match slot {
            Some((_, _, n)) => *n += 1,
            None => *slot = Some((refusal, status, 1)),
        }
    }
}

fn same_reason(a: &Refusal, b: &Refusal) -> bool {
    a.reason() == b.reason()
}

/// How a refusal is to be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noted {
    /// This is the address's n-th refusal in the current second (1-based); 0 when the
    /// table was full and the address is not tracked (never a reason to reset it).
    pub nth: u32,
    /// Log it as its own line; otherwise it is in a summary to come (or, untracked, only
    /// counted).
    pub log: bool,
    /// Past the address's reset threshold this second: cut with a reset, not answered
    /// (counted with status 0).
    pub reset: bool,
}

/// A refusal as the tally counts it.
#[derive(Debug, Clone, Copy)]
pub struct Refusing {
    pub refusal: Refusal,
    /// The status it is answered with unless reset (0: none).
    pub status: u16,
    /// Refusals of the address in a second beyond which it is reset (`u32::MAX`: never).
    pub reset_after: u32,
}

/// Whole seconds on the monotonic clock since the first call: the tally's time. Read
/// under the shard's lock, so a refusal and the sweep agree on which second it is in.
pub fn this_second() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

/// A summary line to write: `count` refusals for `reason` from `client_ip`.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The address as the limits key it (IPv6 masked to its prefix).
    pub client_ip: IpAddr,
    pub listener: Arc<str>,
    /// The listener is a TLS one.
    pub tls: bool,
    pub refusal: Refusal,
    /// The status these refusals were answered with (0: none, e.g. closed before TLS).
    pub status: u16,
    pub count: u64,
}

/// One shard: (address, second) → its tally.
type Shard = HashMap<(IpAddr, u64), Tally>;

/// The per-address, per-second refusal counts.
pub struct Refusals {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Refusals of addresses the full table could not take, since the last sweep.
    untracked: AtomicU64,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            untracked: AtomicU64::new(0),
        }
    }
}

impl Refusals {
    /// Counts one refusal of `ip` (a limits key) now.
    pub fn note(&self, ip: IpAddr, listener: &Arc<str>, tls: bool, r: Refusing) -> Noted {
        self.note_at(ip, None, listener, tls, r)
    }

    /// [`note`](Self::note) in a given second (tests); `None` reads the clock under the lock.
    fn note_at(
        &self,
        ip: IpAddr,
        second: Option<u64>,
        listener: &Arc<str>,
        tls: bool,
        r: Refusing,
    ) -> Noted {
        let mut shard = self.shard(ip);
        let second = second.unwrap_or_else(this_second);
        let full = shard.len() >= MAX_ADDRESSES / SHARDS;
        let tally = match shard.entry((ip, second)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return Noted {
                    nth: 0,
                    log: false,
                    reset: false,
                };
            }
            Entry::Vacant(e) => e.insert(Tally::default()),
        };
        tally.refusals = tally.refusals.saturating_add(1);
        let log = tally.refusals <= LOGGED_PER_SECOND;
        let reset = tally.refusals > r.reset_after;
        if !log {
            if tally.listener.is_none() {
                tally.listener = Some(listener.clone());
                tally.tls = tls;
            }
            let status = if reset { 0 } else { r.status };
            tally.count_unlogged(r.refusal, status);
        }
        Noted {
            nth: tally.refusals,
            log,
            reset,
        }
    }

    /// Takes every finished second's summaries (at most [`MAX_SUMMARIES`]), and how many
    /// refusals were neither logged nor summarised (no room in the table or in the sweep).
    pub fn sweep(&self) -> (Vec<Summary>, u64) {
        self.sweep_before(None)
    }

    /// [`sweep`](Self::sweep) of the seconds before `now_second` (`None`: the clock's).
    fn sweep_before(&self, now_second: Option<u64>) -> (Vec<Summary>, u64) {
        let mut out = Vec::new();
        let mut unwritten = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let now_second = now_second.unwrap_or_else(this_second);
            shard.retain(|&(ip, second), tally| {
                if second >= now_second {
                    return true;
                }
                let Some(listener) = &tally.listener else {
                    return false;
                };
                for (refusal, status, count) in tally.unlogged.iter().flatten() {
                    if out.len() >= MAX_SUMMARIES {
                        unwritten += count;
                        continue;
                    }
                    out.push(Summary {
                        client_ip: ip,
                        listener: listener.clone(),
                        tls: tally.tls,
                        refusal: *refusal,
                        status: *status,
                        count: *count,
                    });
                }
                false
            });
            if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
                shard.shrink_to_fit();
            }
        }
        (out, unwritten + self.untracked.swap(0, Ordering::Relaxed))
    }

    /// Addresses tracked now (for tests and memory checks).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(ip) % SHARDS as u64) as usize;
        lock(&self.shards[i])
    }
}

/// The critical sections never panic; a poisoned lock still holds consistent counts.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn refusing(refusal: Refusal, status: u16) -> Refusing {
        Refusing {
            refusal,
            status,
            reset_after: u32::MAX,
        }
    }

    fn rate() -> Refusal {
        Refusal::IpRate {
            retry_after_secs: 1,
        }
    }

    #[test]
    fn the_first_ten_are_logged_the_rest_summarised_per_reason() {
        let r = Refusals::default();
        let l: Arc<str> = "public".into();
        let logged = (0..25)
            .map(|i| {
                let refusal = if i % 2 == 0 { rate() } else { Refusal::IpCap };
                r.note_at(
                    ip(1),
                    Some(7),
                    &l,
                    false,
                    refusing(refusal, refusal.status().as_u16()),
                )
            })
            .filter(|n| n.log)
            .count();
        assert_eq!(logged, 10);
        assert!(
            r.note_at(ip(2), Some(7), &l, false, refusing(Refusal::IpCap, 429))
                .log,
            "other addresses unaffected"
        );
        let (none, _) = r.sweep_before(Some(7));
        assert!(none.is_empty(), "the current second is not over");
        let (mut sums, untracked) = r.sweep_before(Some(8));
        assert_eq!(untracked, 0);
        sums.sort_by_key(|s| s.refusal.reason());
        let got: Vec<_> = sums.iter().map(|s| (s.refusal.reason(), s.count)).collect();
        assert_eq!(got, [("ip_cap", 7), ("ip_rate", 8)]);
        assert!(r.is_empty(), "finished seconds are dropped");
    }

    #[test]
    fn a_new_second_starts_a_new_count() {
        let r = Refusals::default();
        let l: Arc<str> = "public".into();
        for _ in 0..12 {
            r.note_at(ip(1), Some(1), &l, false, refusing(rate(), 429));
        }
        let n = r.note_at(ip(1), Some(2), &l, false, refusing(rate(), 429));
        assert_eq!(
            n,
            Noted {
                nth: 1,
                log: true,
                reset: false
            }
        );
        let (sums, _) = r.sweep_before(Some(2));
        assert_eq!(sums.len(), 1);
        assert_eq!(sums[0].count, 2);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn more_reasons_than_slots_share_the_last() {
        let mut t = Tally::default();
        t.count_unlogged(rate(), 429);
        t.count_unlogged(Refusal::IpCap, 429);
        t.count_unlogged(Refusal::Capacity, 503);
        t.count_unlogged(Refusal::Draining, 503);
        t.count_unlogged(Refusal::HandshakeTimeout, 0);
        t.count_unlogged(Refusal::HandshakeTimeout, 408);
        let total: u64 = t.unlogged.iter().flatten().map(|(_, _, n)| n).sum();
        assert_eq!(total, 6);
    }

    #[test]
    fn the_table_is_bounded() {
        let r = Refusals::default();
        let l: Arc<str> = "public".into();
        let mut untracked = 0;
        for n in 0..(MAX_ADDRESSES as u32 + 5_000) {
            let a = IpAddr::V4(Ipv4Addr::from(n));
            let noted = r.note_at(a, Some(1), &l, false, refusing(Refusal::IpCap, 429));
            if noted.nth == 0 {
                assert!(!noted.log);
                untracked += 1;
            }
        }
        assert!(r.len() <= MAX_ADDRESSES);
        assert!(untracked >= 5_000);
        let (_, counted) = r.sweep_before(Some(2));
        assert_eq!(counted, untracked);
        assert!(r.is_empty());
    }
}
