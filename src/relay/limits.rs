//! The per-connection message budget of SPEC §2 `limits.messages`: governor's GCRA buckets
//! (no background task, one atomic word each), timed by tokio's clock so that paused-time
//! tests and the relay agree on "now".
//!
//! Data messages are counted once, at their first frame. Client control frames are not
//! messages, but they get a bucket of the same size so a ping flood is capped too.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::{MessageRate, OnExceed};

/// governor's clock, reading tokio's time.
#[derive(Clone, Debug)]
pub struct TokioClock {
    base: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(Instant::now().saturating_duration_since(self.base))
    }
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// What the budget says about the next frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// `on_exceed: close`.
    Close,
    /// `on_exceed: throttle`: read nothing more until then.
    WaitUntil(Instant),
}

pub struct MessageGate {
    messages: Bucket,
    control: Bucket,
    clock: TokioClock,
    on_exceed: OnExceed,
}

impl MessageGate {
    pub fn new(rate: &MessageRate) -> MessageGate {
        let clock = TokioClock {
            base: Instant::now(),
        };
        let quota = quota(rate);
        MessageGate {
            messages: RateLimiter::direct_with_clock(quota, clock.clone()),
            control: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            on_exceed: rate.on_exceed,
        }
    }

    /// A data message starts.
    pub fn message(&self) -> Verdict {
        self.judge(&self.messages)
    }

    /// A control frame from the client.
    pub fn control(&self) -> Verdict {
        self.judge(&self.control)
    }

    fn judge(&self, bucket: &Bucket) -> Verdict {
        match bucket.check() {
            Ok(()) => Verdict::Pass,
            Err(_) if self.on_exceed == OnExceed::Close => Verdict::Close,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Verdict::WaitUntil(Instant::now() + wait.max(Duration::from_millis(1)))
            }
        }
    }
}

/// `rate` per `per` with `burst`; a period too short for governor saturates to the
/// fastest quota it can express.
fn quota(rate: &MessageRate) -> Quota {
    // Validation bounds the span; the clamp keeps governor's arithmetic from overflowing
    // whatever a caller passes.
    let period =
        (rate.per / rate.rate.get()).min(crate::config::MAX_REFILL_SPAN / rate.burst.get());
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(rate.burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(on_exceed: OnExceed) -> MessageRate {
        MessageRate {
            rate: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            per: Duration::from_secs(1),
            burst: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            on_exceed,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_at_the_rate() {
        let gate = MessageGate::new(&rate(OnExceed::Close));
        for _ in 0..3 {
            assert_eq!(gate.message(), Verdict::Pass);
        }
        assert_eq!(gate.message(), Verdict::Close);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(gate.message(), Verdict::Pass);
        assert_eq!(gate.message(), Verdict::Close);
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_says_when_the_next_token_is_free() {
        let gate = MessageGate::new(&rate(OnExceed::Throttle));
        for _ in 0..3 {
            assert_eq!(gate.message(), Verdict::Pass);
        }
        let Verdict::WaitUntil(at) = gate.message() else {
            panic!("expected a wait")
        };
        let wait = at - Instant::now();
        assert!(
            wait <= Duration::from_millis(101) && wait >= Duration::from_millis(1),
            "{wait:?}"
        );
        // Control frames have their own bucket.
        assert_eq!(gate.control(), Verdict::Pass);
    }
}
