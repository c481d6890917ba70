//! The relay's deadlines: proxy pings to each peer and their pong timeouts (SPEC §4), idle,
//! fragment and slow-consumer (`send_timeout`) timeouts, token expiry and drain. Pure
//! bookkeeping over injected `Instant`s: given the time and what the pumps know, it says
//! what is due and when to look next. The session owns the one timer and acts on the
//! answer; nothing here touches a socket or a timer.
//!
//! Periodic checks are re-armed lazily: each is a time at which to *look* (is a ping due?
//! has the connection been idle?), moved only when it is looked at, so traffic never
//! touches the timer wheel.

use std::time::Duration;

use tokio::time::Instant;

use super::Settings;
use crate::outcome::{Ending, Side};

/// What the pumps know that decides a deadline, gathered at each look.
#[derive(Clone, Copy, Debug, Default)]
pub struct Facts {
    /// A close is under way and its wait ends then: only the stall and throttle deadlines
    /// still count.
    pub close_by: Option<Instant>,
    /// Writes to the client stalled then.
    pub client_stalled: Option<Instant>,
    /// Writes to the upstream stalled then.
    pub upstream_stalled: Option<Instant>,
    /// Nothing is read from the client before then (`on_exceed: throttle`).
    pub throttled_until: Option<Instant>,
    /// The proxy's ping to the client went out then; `None` unless its pong is awaited.
    pub client_ping_out: Option<Instant>,
    /// The same towards the upstream.
    pub upstream_ping_out: Option<Instant>,
    /// A pong to the proxy's ping is awaited from the client (sent or still queued).
    pub client_pong_awaited: bool,
    /// The same from the upstream.
    pub upstream_pong_awaited: bool,
    /// Bytes last went to the client; `None` unless the proxy pings the client.
    pub client_last_write: Option<Instant>,
    /// Bytes last went to the upstream; `None` unless the proxy pings the upstream.
    pub upstream_last_write: Option<Instant>,
    /// The client's open fragmented message began then.
    pub fragment_since: Option<Instant>,
}

/// What a look at the deadlines found due, in the order the session acts on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Writes to the client stalled past `send_timeout`: it is cut off.
    pub slow_client: bool,
    /// The same for the upstream (acted on after the client).
    pub slow_upstream: bool,
    /// The client's throttle is over.
    pub unthrottle: bool,
    /// Nothing went to the client for `ping_interval`: ping it.
    pub ping_client: bool,
    /// Nothing went to the upstream for `upstream_ping_interval`: ping it.
    pub ping_upstream: bool,
    /// A deadline that ends the connection (after any pings above).
    pub ending: Option<Ending>,
}

/// One connection's deadlines and intervals (zero = off, for each interval).
#[derive(Debug)]
pub struct Deadlines {
    send_timeout: Span,
    fragment_timeout: Span,
    idle_timeout: Span,
    ping_interval: Span,
    pong_timeout: Span,
    upstream_ping_interval: Span,
    /// The ends most connections never have; boxed, so one without them carries a word.
    ends: Option<Box<Ends>>,
    /// When to look whether the client needs a ping; `None` while a pong is awaited.
    ping_check: Option<Instant>,
    /// The same for the upstream.
    upstream_ping_check: Option<Instant>,
    /// When to look whether the connection is idle; `None` when idle timeouts are off.
    idle_check: Option<Instant>,
    /// When a data frame last passed either way (kept only while `idle_check` is armed).
    last_data: Instant,
}

impl Deadlines {
    /// The deadlines of a connection that starts relaying at `now`.
    pub fn new(settings: &Settings, now: Instant) -> Deadlines {
        let every = |d: Duration| (!d.is_zero()).then(|| now + d);
        Deadlines {
            send_timeout: Span::of(settings.send_timeout),
            fragment_timeout: Span::of(settings.fragment_timeout),
            idle_timeout: Span::of(settings.idle_timeout),
            ping_interval: Span::of(settings.ping_interval),
            pong_timeout: Span::of(settings.pong_timeout),
            upstream_ping_interval: Span::of(settings.upstream_ping_interval),
            ends: Ends::new(settings, now),
            ping_check: every(settings.ping_interval),
            upstream_ping_check: every(settings.upstream_ping_interval),
            idle_check: every(settings.idle_timeout),
            last_data: now,
        }
    }

    /// A drain or an admin close asks for the connection to close at `at` with its ending
    /// (or no longer, when `None`).
    pub fn set_drain(&mut self, at: Option<(Instant, Ending)>) {
        match (self.ends.as_deref_mut(), at) {
            (Some(ends), at) => ends.drain_at = at,
            (None, None) => {}
            (None, Some(at)) => {
                self.ends = Some(Box::new(Ends {
                    drain_at: Some(at),
                    ..Ends::default()
                }))
            }
        }
    }

    /// Whether data frames need timing (the idle timeout is on); spares a clock read per
    /// wake when it is not.
    pub fn times_data(&self) -> bool {
        self.idle_check.is_some()
    }

    /// A data frame passed at `now`. Only remembered: the idle check moves when it is
    /// looked at, not now.
    pub fn on_data(&mut self, now: Instant) {
        self.last_data = now;
    }

    /// The client answered the proxy's ping at `now`: the next ping is due one interval on.
    pub fn on_client_pong(&mut self, now: Instant) {
        self.ping_check = Some(now + self.ping_interval.get());
    }

    /// The upstream answered the proxy's ping at `now`.
    pub fn on_upstream_pong(&mut self, now: Instant) {
        self.upstream_ping_check = Some(now + self.upstream_ping_interval.get());
    }

    /// What is due at `now`. Checks that are not due yet move to their real due time (lazy
    /// re-arming); a ping found due, or an ending, is reported once.
    pub fn due(&mut self, now: Instant, facts: &Facts) -> Due {
        let limit = self.send_timeout.get();
        let expired = |since: Option<Instant>| since.is_some_and(|s| s + limit <= now);
        let mut due = Due {
            slow_client: expired(facts.client_stalled),
            slow_upstream: expired(facts.upstream_stalled),
            unthrottle: facts.throttled_until.is_some_and(|t| t <= now),
            ..Due::default()
        };
        // A slow consumer is cut off at once, which starts the close: the rest waits.
        if facts.close_by.is_some() || due.slow_client || due.slow_upstream {
            return due;
        }
        if let Some(ends) = self.ends.as_deref_mut()
            && let Some(ending) = ends.due(now)
        {
            due.ending = Some(ending);
            return due;
        }
        let pong_overdue =
            |out: Option<Instant>| out.is_some_and(|s| s + self.pong_timeout.get() <= now);
        if pong_overdue(facts.client_ping_out) {
            due.ending = Some(Ending::DeadPeer(Side::Client));
            return due;
        }
        if pong_overdue(facts.upstream_ping_out) {
            due.ending = Some(Ending::DeadPeer(Side::Upstream));
            return due;
        }
        if self.ping_check.is_some_and(|t| t <= now) {
            (self.ping_check, due.ping_client) = ping_look(
                now,
                self.ping_interval.get(),
                facts.client_pong_awaited,
                facts.client_last_write,
            );
        }
        if self.upstream_ping_check.is_some_and(|t| t <= now) {
            (self.upstream_ping_check, due.ping_upstream) = ping_look(
                now,
                self.upstream_ping_interval.get(),
                facts.upstream_pong_awaited,
                facts.upstream_last_write,
            );
        }
        if self.idle_check.is_some_and(|t| t <= now) {
            let idle_at = self.last_data + self.idle_timeout.get();
            if idle_at <= now {
                self.idle_check = None;
                due.ending = Some(Ending::Idle);
                return due;
            }
            self.idle_check = Some(idle_at);
        }
        if self.fragment_due(facts).is_some_and(|t| t <= now) {
            due.ending = Some(Ending::FragmentTimeout);
        }
        due
    }

    /// The earliest deadline, when the session's timer must fire. Runs on every wake, so
    /// it folds the few deadlines that are set instead of collecting all of them.
    #[inline(always)]
    pub fn next_due(&self, facts: &Facts) -> Option<Instant> {
        let stall = |since: Option<Instant>| since.map(|s| s + self.send_timeout.get());
        let mut due = earliest(facts.close_by, facts.throttled_until);
        due = earliest(due, stall(facts.client_stalled));
        due = earliest(due, stall(facts.upstream_stalled));
        if facts.close_by.is_some() {
            return due;
        }
        if let Some(ends) = self.ends.as_deref() {
            due = earliest(due, ends.expires_at);
            due = earliest(due, ends.max_age_at);
            due = earliest(due, ends.drain_at.map(|(t, _)| t));
        }
        due = earliest(due, self.ping_check);
        due = earliest(due, self.upstream_ping_check);
        due = earliest(due, self.idle_check);
        due = earliest(due, self.fragment_due(facts));
        let pong = |out: Option<Instant>| out.map(|s| s + self.pong_timeout.get());
        due = earliest(due, pong(facts.client_ping_out));
        earliest(due, pong(facts.upstream_ping_out))
    }

    #[inline(always)]
    fn fragment_due(&self, facts: &Facts) -> Option<Instant> {
        facts
            .fragment_since
            .map(|s| s + self.fragment_timeout.get())
            .filter(|_| !self.fragment_timeout.is_zero())
    }
}

/// A look at a peer's ping check: ping now if nothing was written to it for `interval`
/// (and no pong is awaited), else look again when that will be. Returns the next look
/// (`None` once a ping is due or awaited: the pong re-arms it) and whether to ping.
fn ping_look(
    now: Instant,
    interval: Duration,
    pong_awaited: bool,
    last_write: Option<Instant>,
) -> (Option<Instant>, bool) {
    if pong_awaited {
        return (None, false);
    }
    let due = last_write.unwrap_or(now) + interval;
    if due > now {
        (Some(due), false)
    } else {
        (None, true)
    }
}

/// Deadlines that end the connection whatever it does, when set.
#[derive(Debug, Default)]
struct Ends {
    /// `close_on_expiry`: the token's expiry; cleared once acted on.
    expires_at: Option<Instant>,
    /// `max_connection_age` (jittered): the connection's end; cleared once acted on.
    max_age_at: Option<Instant>,
    /// When a drain (1012) or an admin close (4003) wants this connection closed, and
    /// which of the two.
    drain_at: Option<(Instant, Ending)>,
}

impl Ends {
    fn new(settings: &Settings, now: Instant) -> Option<Box<Ends>> {
        let ends = Ends {
            expires_at: settings.expires_at,
            max_age_at: (!settings.max_age.is_zero()).then(|| now + settings.max_age),
            drain_at: None,
        };
        (ends.expires_at.is_some() || ends.max_age_at.is_some()).then(|| Box::new(ends))
    }

    /// The ending due at `now`, if any (drain first, then age, then expiry); age and
    /// expiry are reported once.
    fn due(&mut self, now: Instant) -> Option<Ending> {
        if let Some((t, ending)) = self.drain_at
            && t <= now
        {
            return Some(ending);
        }
        if self.max_age_at.is_some_and(|t| t <= now) {
            self.max_age_at = None;
            return Some(Ending::MaxAge);
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            self.expires_at = None;
            return Some(Ending::TokenExpired);
        }
        None
    }
}

/// An interval as nanoseconds: six per connection, 8 bytes each rather than a
/// `Duration`'s 16 (2^64 ns is 584 years, so nothing configurable is cut).
#[derive(Clone, Copy, Debug)]
struct Span(u64);

impl Span {
    fn of(d: Duration) -> Span {
        Span(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    #[inline(always)]
    fn get(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    fn is_zero(self) -> bool {
        self.0 == 0
    }
}

#[inline(always)]
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn settings() -> Settings {
        let mut s = Settings::without_timers(1024, 10 * S, 1 << 20, 1 << 20);
        s.pong_timeout = 5 * S;
        s
    }

    fn with(f: impl FnOnce(&mut Settings)) -> Settings {
        let mut s = settings();
        f(&mut s);
        s
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_is_due_only_after_ping_interval_without_writes_to_the_client() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.ping_interval = 20 * S), t0);
        let mut facts = Facts {
            client_last_write: Some(t0),
            ..Facts::default()
        };
        assert_eq!(d.next_due(&facts), Some(t0 + 20 * S));
        // A write at 15 s: the look at 20 s finds nothing due and moves to 35 s.
        facts.client_last_write = Some(t0 + 15 * S);
        tokio::time::advance(20 * S).await;
        assert_eq!(d.due(Instant::now(), &facts), Due::default());
        assert_eq!(d.next_due(&facts), Some(t0 + 35 * S));
        tokio::time::advance(15 * S).await;
        let due = d.due(Instant::now(), &facts);
        assert!(due.ping_client && !due.ping_upstream, "{due:?}");
        // Until the pong, no further ping is looked for.
        assert_eq!(d.next_due(&facts), None);
        d.on_client_pong(t0 + 36 * S);
        assert_eq!(d.next_due(&facts), Some(t0 + 56 * S));
    }

    #[test]
    fn no_ping_while_a_pong_is_awaited() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.upstream_ping_interval = 20 * S), t0);
        let facts = Facts {
            upstream_last_write: Some(t0),
            upstream_pong_awaited: true,
            ..Facts::default()
        };
        assert_eq!(d.due(t0 + 20 * S, &facts), Due::default());
        assert_eq!(d.next_due(&facts), None);
    }

    #[test]
    fn an_overdue_pong_is_a_dead_peer() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.ping_interval = 20 * S), t0);
        let facts = Facts {
            client_ping_out: Some(t0 + 20 * S),
            client_pong_awaited: true,
            ..Facts::default()
        };
        d.due(t0 + 20 * S, &facts);
        assert_eq!(d.next_due(&facts), Some(t0 + 25 * S));
        assert_eq!(d.due(t0 + 24 * S, &facts).ending, None);
        assert_eq!(
            d.due(t0 + 25 * S, &facts).ending,
            Some(Ending::DeadPeer(Side::Client))
        );
        let upstream = Facts {
            upstream_ping_out: Some(t0),
            ..Facts::default()
        };
        assert_eq!(
            d.due(t0 + 5 * S, &upstream).ending,
            Some(Ending::DeadPeer(Side::Upstream))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn data_resets_the_idle_timeout_without_moving_the_timer() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.idle_timeout = 30 * S), t0);
        let facts = Facts::default();
        assert!(d.times_data());
        tokio::time::advance(20 * S).await;
        d.on_data(Instant::now());
        // Lazy re-arming: the traffic did not move the look.
        assert_eq!(d.next_due(&facts), Some(t0 + 30 * S));
        tokio::time::advance(10 * S).await;
        assert_eq!(d.due(Instant::now(), &facts), Due::default());
        assert_eq!(d.next_due(&facts), Some(t0 + 50 * S));
        tokio::time::advance(20 * S).await;
        assert_eq!(d.due(Instant::now(), &facts).ending, Some(Ending::Idle));
        assert_eq!(d.next_due(&facts), None, "reported once");
    }

    #[test]
    fn idle_off_times_no_data() {
        let d = Deadlines::new(&settings(), Instant::now());
        assert!(!d.times_data());
    }

    #[test]
    fn an_unfinished_fragmented_message_times_out() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.fragment_timeout = 10 * S), t0);
        let facts = Facts {
            fragment_since: Some(t0 + 5 * S),
            ..Facts::default()
        };
        assert_eq!(d.next_due(&facts), Some(t0 + 15 * S));
        assert_eq!(d.due(t0 + 14 * S, &facts).ending, None);
        assert_eq!(
            d.due(t0 + 15 * S, &facts).ending,
            Some(Ending::FragmentTimeout)
        );
        assert_eq!(d.next_due(&Facts::default()), None);
    }

    #[test]
    fn token_expiry_ends_the_connection_once() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.expires_at = Some(t0 + 60 * S)), t0);
        let facts = Facts::default();
        assert_eq!(d.next_due(&facts), Some(t0 + 60 * S));
        assert_eq!(
            d.due(t0 + 60 * S, &facts).ending,
            Some(Ending::TokenExpired)
        );
        assert_eq!(d.next_due(&facts), None);
    }

    #[test]
    fn a_drain_comes_before_expiry_and_can_be_called_off() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.expires_at = Some(t0 + S)), t0);
        d.set_drain(Some((t0 + S, Ending::Drain)));
        let facts = Facts::default();
        assert_eq!(d.due(t0 + S, &facts).ending, Some(Ending::Drain));
        d.set_drain(Some((t0, Ending::REVOKED)));
        assert_eq!(d.next_due(&facts), Some(t0));
        assert_eq!(d.due(t0 + S, &facts).ending, Some(Ending::REVOKED));
        d.set_drain(None);
        assert_eq!(d.due(t0 + S, &facts).ending, Some(Ending::TokenExpired));
    }

    #[test]
    fn a_drain_reaches_a_connection_without_other_ends_and_an_undrain_calls_it_off() {
        // No expiry, no max age: the ends are boxed only when a drain asks for one.
        let t0 = Instant::now();
        let mut d = Deadlines::new(&settings(), t0);
        let facts = Facts::default();
        d.set_drain(None);
        assert_eq!(d.next_due(&facts), None);
        d.set_drain(Some((t0 + S, Ending::Drain)));
        assert_eq!(d.next_due(&facts), Some(t0 + S));
        assert_eq!(d.due(t0, &facts).ending, None);
        d.set_drain(None);
        assert_eq!(d.next_due(&facts), None);
        assert_eq!(d.due(t0 + 2 * S, &facts).ending, None);
        d.set_drain(Some((t0 + S, Ending::REVOKED)));
        assert_eq!(d.due(t0 + 2 * S, &facts).ending, Some(Ending::REVOKED));
    }

    #[test]
    fn a_stalled_write_past_send_timeout_is_a_slow_consumer() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(&with(|s| s.expires_at = Some(t0 + 10 * S)), t0);
        let facts = Facts {
            upstream_stalled: Some(t0),
            ..Facts::default()
        };
        assert_eq!(d.next_due(&facts), Some(t0 + 10 * S));
        let due = d.due(t0 + 10 * S, &facts);
        // Cutting the upstream off starts the close; the expiry is not acted on with it.
        assert!(due.slow_upstream && !due.slow_client, "{due:?}");
        assert_eq!(due.ending, None);
    }

    #[test]
    fn during_a_close_only_stalls_throttles_and_the_close_wait_count() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(
            &with(|s| {
                s.ping_interval = S;
                s.idle_timeout = S;
                s.expires_at = Some(t0);
            }),
            t0,
        );
        let facts = Facts {
            close_by: Some(t0 + 5 * S),
            throttled_until: Some(t0 + 2 * S),
            ..Facts::default()
        };
        assert_eq!(d.next_due(&facts), Some(t0 + 2 * S));
        let due = d.due(t0 + 3 * S, &facts);
        assert_eq!(
            due,
            Due {
                unthrottle: true,
                ..Due::default()
            }
        );
    }
}
