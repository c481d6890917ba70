//! What a finished relayed connection reports (SPEC §6): plain records the relay fills and
//! the access log and metrics read, so neither side needs the other's internals.

use std::time::Duration;

use crate::outcome::{By, ProxyReason};

/// Frame, message and byte counts of one direction (SPEC §6 `c2u` / `u2c`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Times the message budget was exceeded (closed or throttled).
    pub rate_limited: u64,
    /// Waits on a destination whose socket was full (SPEC §6 `stalls`).
    pub stalls: Stalls,
}

/// How often and how long one direction's writes waited on a full peer (SPEC §6
/// `stalls`): a stall starts when a write (or flush) to the destination finds it full
/// while bytes are due, and ends when one makes progress, or when the destination is
/// given up or the connection ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stalls {
    pub count: u64,
    /// Time blocked, ended stalls only, in nanoseconds (a `Duration` would take a word
    /// more per direction; 2^64 ns is 584 years).
    pub nanos: u64,
}

impl Stalls {
    /// Total time blocked.
    pub fn time(&self) -> Duration {
        Duration::from_nanos(self.nanos)
    }

    /// Adds an ended stall's length.
    pub(crate) fn add(&mut self, blocked: Duration) {
        let nanos = u64::try_from(blocked.as_nanos()).unwrap_or(u64::MAX);
        self.nanos = self.nanos.saturating_add(nanos);
    }
}

/// Round-trip times of the proxy's pings to the client (SPEC §6 `rtt_ms`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rtt {
    pub count: u64,
    pub min: Duration,
    pub max: Duration,
    pub total: Duration,
}

impl Rtt {
    pub fn avg(&self) -> Duration {
        u32::try_from(self.count).map_or(Duration::ZERO, |n| {
            self.total.checked_div(n).unwrap_or_default()
        })
    }
}

/// The close that ended the connection. For proxy-initiated closes, `code` is what the
/// client was sent (1006 when it got no close frame at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
    pub by: By,
}

/// What the access log needs to know about a finished relay.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub close: Option<CloseInfo>,
    pub proxy_reason: Option<ProxyReason>,
    pub c2u: Stats,
    pub u2c: Stats,
    /// Proxy pings sent to the client.
    pub pings: u64,
    pub rtt: Rtt,
}
