//! The relay of one upgraded connection (SPEC §4, §5): two [`pump::Pump`]s, one per
//! direction, driven by a single task that owns both sockets, plus the close handshake.
//!
//! The session decides what each event means for the *other* peer (which close code it
//! gets, SPEC §5) and when the connection is over; pumps move bytes. Nothing here spawns
//! tasks or keeps a timer armed while the connection is healthy: the one timer exists only
//! while a write is stalled or a close is in progress.
//!
//! When to ping, time out or close is [`deadlines`]' business. A relay that fails (a panic
//! in its poll, or a pump that finds its state inconsistent) still ends as a connection:
//! 1011 to each side that can take a close frame (SPEC §5), recorded in its [`Report`].

pub mod deadlines;
pub mod frame;
pub mod inflate;
pub mod limits;
pub mod pool;
pub mod pump;

use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use deadlines::{Deadlines, Facts};
use frame::{ControlFrame, Dir, Rules};
use limits::MessageGate;
use pump::{Event, PING_LEN, Pump};

use crate::config::{Keepalive, Limits, MessageRate};
use crate::observe::metrics::{Flow, RouteMetrics, StallDirection, StalledConnection};
pub use crate::observe::report::{CloseInfo, Report, Rtt, Stats};
pub use crate::ops::registry::Control;
pub use crate::outcome::By;
use crate::outcome::{CloseFrame, Ending, Side, code};

/// How long the proxy waits for a peer to answer a close (its own or a relayed one), and
/// for the TCP close after it, before dropping the socket (SPEC §5).
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Per-connection relay settings, resolved from the route's limits and the handshake.
#[derive(Clone, Debug)]
pub struct Settings {
    pub buffer_size: usize,
    pub send_timeout: Duration,
    pub max_frame_size: u64,
    pub max_message_size: u64,
    /// Most frames in one fragmented client message; `u32::MAX` = unbounded.
    pub max_fragments: u32,
    /// `Sec-WebSocket-Extensions` as accepted by the upstream ("" when none).
    pub extensions: String,
    /// `deflate: inspect`: when permessage-deflate was negotiated, client messages are
    /// inflated (and dropped) to judge `max_message_size` and UTF-8.
    pub inspect_deflate: bool,
    /// Client→upstream message budget; `None` = unlimited.
    pub messages: Option<MessageRate>,
    /// Zero = off, for each of these.
    pub fragment_timeout: Duration,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub upstream_ping_interval: Duration,
    /// `close_on_expiry`: the token's `exp` (+ leeway); the connection closes 4001 then.
    pub expires_at: Option<Instant>,
    /// `max_connection_age`, jittered ±10 % per connection; zero = off. Counted from the
    /// relay's start; the connection closes 1001 `max age` then.
    pub max_age: Duration,
    /// Where drains (1012) and admin closes (4003) ask this connection to close.
    pub control: Option<Arc<Control>>,
    /// The route's counters, fed as the relay goes.
    pub metrics: Option<Arc<RouteMetrics>>,
    /// After the close handshake, read the client until it closes too, so no unread byte
    /// turns a TCP close into a reset. Off for an HTTP/2 stream: its END_STREAM and what
    /// precedes it are sent before the RST_STREAM that dropping it queues, and browsers
    /// do not end their side first.
    pub linger_client: bool,
}

impl Settings {
    /// A route's limits and the process's keepalive, for one connection.
    pub fn new(limits: &Limits, keepalive: &Keepalive, extensions: String) -> Settings {
        Settings {
            buffer_size: limits.buffer_size,
            send_timeout: limits.send_timeout,
            max_frame_size: limits.max_frame_size,
            max_message_size: limits.max_message_size,
            max_fragments: limits.max_fragments,
            extensions,
            inspect_deflate: false,
            messages: Some(limits.messages),
            fragment_timeout: limits.fragment_timeout,
            idle_timeout: limits.idle_timeout,
            ping_interval: keepalive.ping_interval,
            pong_timeout: keepalive.pong_timeout,
            upstream_ping_interval: keepalive.upstream_ping_interval,
            expires_at: None,
            max_age: jittered_age(limits.max_connection_age),
            control: None,
            metrics: None,
            linger_client: true,
        }
    }

    /// Byte-level relaying only: no budget, no pings, no timeouts but `send_timeout`
    /// (for tests and the fuzzer, which explore bytes, not time).
    pub fn without_timers(
        buffer_size: usize,
        send_timeout: Duration,
        max_frame_size: u64,
        max_message_size: u64,
    ) -> Settings {
        Settings {
            buffer_size,
            send_timeout,
            max_frame_size,
            max_message_size,
            max_fragments: u32::MAX,
            extensions: String::new(),
            inspect_deflate: false,
            messages: None,
            fragment_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            ping_interval: Duration::ZERO,
            pong_timeout: Duration::from_secs(10),
            upstream_ping_interval: Duration::ZERO,
            expires_at: None,
            max_age: Duration::ZERO,
            control: None,
            metrics: None,
            linger_client: true,
        }
    }
}

/// `max_connection_age` ± 10 %, uniformly: connections opened together (after a storm)
/// do not all reach their age together.
fn jittered_age(age: Duration) -> Duration {
    age.mul_f64(0.9 + 0.2 * crate::ids::jitter())
}

/// Relays frames between `client` and `upstream` until both sides are closed.
/// `client_early`/`upstream_early` are bytes already read past each handshake.
///
/// The future is the session itself (no async block around it, which would keep a second
/// copy of the session beside the one being polled): a long-lived idle connection's state
/// is this value. It is `Unpin`, so a caller can keep it in a plain struct.
pub fn relay<C, U>(
    client: C,
    client_early: bytes::Bytes,
    upstream: U,
    upstream_early: bytes::Bytes,
    settings: &Settings,
) -> impl Future<Output = Report> + Unpin + use<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    Relay {
        session: Some(Session::start(
            client,
            client_early,
            upstream,
            upstream_early,
            settings,
        )),
        panicked: false,
    }
}

/// A session until it ends; then (sockets dropped) its report.
struct Relay<C, U> {
    session: Option<Session<C, U>>,
    /// The session panicked once and is closing with 1011; a second panic drops it.
    panicked: bool,
}

impl<C, U> Future for Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Report;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Report> {
        let this = &mut *self;
        let Some(session) = this.session.as_mut() else {
            return Poll::Pending;
        };
        // A panic in the session (a bug in the relay, or in a stream it drives) must not
        // end the connection unreported: the first one ends it with 1011 (SPEC §5) and
        // polls again to send those frames; a second one just drops both sockets.
        let polled = match panic::catch_unwind(AssertUnwindSafe(|| session.poll(cx))) {
            Err(_) if !this.panicked => {
                this.panicked = true;
                panic::catch_unwind(AssertUnwindSafe(|| {
                    session.fail("panic");
                    session.poll(cx)
                }))
            }
            polled => polled,
        };
        if let Ok(Poll::Pending) = polled {
            return Poll::Pending;
        }
        match this.session.take() {
            Some(session) => Poll::Ready(session.finish()),
            None => Poll::Pending,
        }
    }
}

/// Where a connection is in its life. The close logic is the transitions between these
/// (and each side's [`SideState`]); the close handshake itself is followed frame by frame
/// by the pumps (`src_close`, `dst_close_sent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Frames flow; the periodic checks (pings, idle, expiry, drain) are armed.
    Relaying,
    /// A close is under way (a close frame sent or relayed, a rule broken, a side gone):
    /// the close handshake has until `until` ([`CLOSE_WAIT`]); periodic checks are off.
    Closing { until: Instant },
    /// Both close handshakes are over (or their sides gone): each socket's write half is
    /// shut and it is read until EOF, or until `until`, then dropped (SPEC §5).
    Lingering { until: Instant },
}

impl Phase {
    /// When the close wait ends, once a close is under way.
    fn close_by(self) -> Option<Instant> {
        match self {
            Phase::Relaying => None,
            Phase::Closing { until } | Phase::Lingering { until } => Some(until),
        }
    }
}

/// One peer's TCP connection as the session sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SideState {
    /// In use: read from, and written to until a close frame went out.
    Open,
    /// Lingering: our write half is shut (or the peer's FIN already came, so no shutdown
    /// is needed); read until EOF.
    Shut,
    /// Gone, or cut off by the proxy: never read or written again.
    Dead,
}

struct Session<C, U> {
    client: C,
    upstream: U,
    c2u: Pump,
    u2c: Pump,
    phase: Phase,
    client_state: SideState,
    upstream_state: SideState,
    deadlines: Deadlines,
    control: Option<Arc<Control>>,
    metrics: Option<Arc<RouteMetrics>>,
    /// What `metrics` has been told so far.
    flushed: Flow,
    /// What `metrics` knows of each direction's stalls (`u2c`, `c2u`).
    stalls_seen: [StallsSeen; 2],
    /// The connection's one timer, armed at the earliest deadline; created on first use.
    timer: Option<(Pin<Box<Sleep>>, Instant)>,
    mask_state: u64,
    /// What the report says beyond the pumps' counts (which the pumps keep).
    report: Ended,
    /// The relay failed once and is closing with 1011; a second failure ends it at once.
    failed: bool,
    /// Give up: drop both sockets now (a second failure, or one after both closes).
    aborted: bool,
    /// [`Settings::linger_client`].
    linger_client: bool,
}

impl<C, U> Session<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    fn start(
        client: C,
        client_early: bytes::Bytes,
        upstream: U,
        upstream_early: bytes::Bytes,
        settings: &Settings,
    ) -> Self {
        let rules = |dir| {
            Rules::new(
                dir,
                settings.max_frame_size,
                settings.max_message_size,
                &settings.extensions,
            )
        };
        let c2u_rules = rules(Dir::ClientToUpstream).with_max_fragments(settings.max_fragments);
        let mut c2u = Pump::new(c2u_rules, settings.buffer_size);
        if settings.inspect_deflate
            && let Some(reset_per_message) = inflate::negotiated(&settings.extensions)
        {
            c2u.inspect_deflate(reset_per_message);
        }
        let mut u2c = Pump::new(rules(Dir::UpstreamToClient), settings.buffer_size);
        // Seeded, then dropped: the early bytes may pin the HTTP layer's whole read buffer.
        c2u.seed(&client_early);
        u2c.seed(&upstream_early);
        drop((client_early, upstream_early));
        let now = Instant::now();
        if let Some(rate) = &settings.messages {
            c2u.set_gate(MessageGate::new(rate));
        }
        if !settings.fragment_timeout.is_zero() {
            c2u.track_fragments();
        }
        if !settings.ping_interval.is_zero() {
            u2c.track_writes();
        }
        if !settings.upstream_ping_interval.is_zero() {
            c2u.track_writes();
        }
        Session {
            client,
            upstream,
            c2u,
            u2c,
            phase: Phase::Relaying,
            client_state: SideState::Open,
            upstream_state: SideState::Open,
            deadlines: Deadlines::new(settings, now),
            control: settings.control.clone(),
            metrics: settings.metrics.clone(),
            flushed: Flow::default(),
            stalls_seen: Default::default(),
            timer: None,
            mask_state: mask_seed(),
            report: Ended::default(),
            failed: false,
            aborted: false,
            linger_client: settings.linger_client,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Every wake looks again: a later drain (shutdown after a slow backend drain) may
        // ask for an earlier close, and an undrain may call it off.
        if self.phase == Phase::Relaying
            && let Some(control) = &self.control
        {
            self.deadlines.set_drain(control.poll_drain(cx));
        }
        let done = self.poll_session(cx);
        self.flush_metrics();
        self.flush_stalls();
        done
    }

    /// The report, with the counts; the buffers go back to the pool and (with `self`) the
    /// sockets are dropped. A stall still open ends here: its time counts up to now.
    fn finish(mut self) -> Report {
        self.c2u.end_stall();
        self.u2c.end_stall();
        self.flush_stalls();
        self.c2u.release();
        self.u2c.release();
        let Ended {
            close,
            proxy_reason,
            pings,
            rtt,
        } = std::mem::take(&mut self.report);
        Report {
            close: close.map(|c| *c),
            proxy_reason,
            c2u: self.c2u.stats,
            u2c: self.u2c.stats,
            pings,
            rtt: rtt.rtt(),
        }
    }

    /// Tells the route's counters what was relayed since the last wake.
    fn flush_metrics(&mut self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let now = Flow {
            c2u_messages: self.c2u.stats.messages,
            c2u_bytes: self.c2u.stats.bytes,
            u2c_messages: self.u2c.stats.messages,
            u2c_bytes: self.u2c.stats.bytes,
        };
        if now != self.flushed {
            metrics.add_flow(&now, &self.flushed);
            self.flushed = now;
        }
    }

    /// Tells the route's stall metrics which directions are blocked now, and how long the
    /// stalls that ended since the last wake lasted. Reads no clock: the pumps timed them.
    fn flush_stalls(&mut self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let pumps = [
            (StallDirection::U2c, &self.u2c),
            (StallDirection::C2u, &self.c2u),
        ];
        for ((dir, pump), seen) in pumps.into_iter().zip(&mut self.stalls_seen) {
            let ended = pump.stats.stalls.nanos;
            if ended != seen.reported {
                let time = Duration::from_nanos(ended.saturating_sub(seen.reported));
                metrics.stalled_for(dir, time);
                seen.reported = ended;
            }
            match (pump.stalled_since.is_some(), seen.stalled.is_some()) {
                (true, false) => seen.stalled = Some(metrics.stall_started(dir)),
                (false, true) => seen.stalled = None,
                _ => {}
            }
        }
    }

    fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.aborted {
                return Poll::Ready(());
            }
            if let Phase::Lingering { .. } = self.phase {
                return self.poll_linger(cx);
            }
            let mut progress = false;
            if let Poll::Ready(event) = self.c2u.poll(cx, &mut self.client, &mut self.upstream) {
                self.on_client_event(event);
                progress = true;
            }
            if let Poll::Ready(event) = self.u2c.poll(cx, &mut self.upstream, &mut self.client) {
                self.on_upstream_event(event);
                progress = true;
            }
            if self.c2u.saw_data || self.u2c.saw_data {
                self.c2u.saw_data = false;
                self.u2c.saw_data = false;
                if self.deadlines.times_data() {
                    self.deadlines.on_data(Instant::now());
                }
            }
            if self.finished() {
                self.linger();
                continue;
            }
            if self.poll_timer(cx).is_ready() {
                let now = Instant::now();
                if self.phase.close_by().is_some_and(|d| d <= now) {
                    return Poll::Ready(());
                }
                self.on_timer(now);
                progress = true;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Both peers have sent and received their close (or are gone).
    fn finished(&self) -> bool {
        let client_done = self.client_state == SideState::Dead
            || ((self.c2u.src_eof || self.c2u.src_close.is_some()) && self.u2c.dst_finished());
        let upstream_done = self.upstream_state == SideState::Dead
            || ((self.u2c.src_eof || self.u2c.src_close.is_some()) && self.c2u.dst_finished());
        client_done && upstream_done
    }

    // === phase transitions ===

    /// Relaying → Closing: the close handshake has [`CLOSE_WAIT`] from now. A close
    /// already under way keeps its deadline.
    fn start_close_wait(&mut self) {
        if self.phase == Phase::Relaying {
            self.phase = Phase::Closing {
                until: Instant::now() + CLOSE_WAIT,
            };
        }
    }

    /// → Lingering, within the close wait under way (or a fresh one).
    fn linger(&mut self) {
        let until = self
            .phase
            .close_by()
            .unwrap_or_else(|| Instant::now() + CLOSE_WAIT);
        self.phase = Phase::Lingering { until };
    }

    // === events from the client side (c2u pump) ===

    fn on_client_event(&mut self, event: Event) {
        match event {
            Event::CloseReceived => {
                if let Some((code, reason)) = self.c2u.src_close.as_deref() {
                    record(&mut self.report, *code, reason, By::Client);
                }
                self.start_close_wait();
            }
            Event::Violation(v) => {
                if self.c2u.cut_mid_frame {
                    // The upstream got part of a frame: only its TCP close can follow.
                    self.upstream_state = SideState::Dead;
                }
                self.end(v.ending(Side::Client))
            }
            Event::SrcEnded(_) if self.c2u.src_close.is_some() => {}
            Event::SrcEnded(_) => self.end(Ending::Vanished(Side::Client)),
            Event::DstFailed(_) => self.end(Ending::Vanished(Side::Upstream)),
            Event::PongReceived => {
                let now = Instant::now();
                if let Some(sent) = self.u2c.ping_sent_at.take() {
                    let rtt = now.saturating_duration_since(sent);
                    self.report.rtt.record(rtt);
                    if let Some(m) = &self.metrics {
                        m.ping_answered(rtt);
                    }
                }
                self.deadlines.on_client_pong(now);
            }
            Event::RateLimited => self.end(Ending::RateLimit),
            Event::Broken(why) => self.fail(why),
        }
    }

    // === events from the upstream side (u2c pump) ===

    fn on_upstream_event(&mut self, event: Event) {
        match event {
            Event::CloseReceived => {
                if let Some((code, reason)) = self.u2c.src_close.as_deref() {
                    record(&mut self.report, *code, reason, By::Upstream);
                }
                self.start_close_wait();
            }
            Event::Violation(v) => self.end(v.ending(Side::Upstream)),
            Event::SrcEnded(_) if self.u2c.src_close.is_some() => {}
            Event::SrcEnded(_) => self.end(Ending::Vanished(Side::Upstream)),
            Event::DstFailed(_) => self.end(Ending::Vanished(Side::Client)),
            Event::PongReceived => {
                self.c2u.ping_sent_at = None;
                self.deadlines.on_upstream_pong(Instant::now());
            }
            // Only the client side has a message budget.
            Event::RateLimited => {}
            Event::Broken(why) => self.fail(why),
        }
    }

    // === endings (SPEC §5) ===

    /// The proxy ends the connection: the ending's SPEC §5 row says what each side gets,
    /// and which of the three ways below delivers it.
    fn end(&mut self, ending: Ending) {
        match ending {
            Ending::ClientViolation(_)
            | Ending::FragmentTimeout
            | Ending::RateLimit
            | Ending::TooManyFragments => self.client_violation(ending),
            Ending::DeadPeer(Side::Client)
            | Ending::Vanished(Side::Client)
            | Ending::SlowConsumer(Side::Client) => self.client_gone(ending),
            Ending::DeadPeer(Side::Upstream)
            | Ending::Vanished(Side::Upstream)
            | Ending::SlowConsumer(Side::Upstream) => self.upstream_gone(ending),
            Ending::UpstreamViolation(_)
            | Ending::TokenExpired
            | Ending::MaxAge
            | Ending::Idle
            | Ending::Drain
            | Ending::Revoked { .. }
            | Ending::Internal => self.proxy_close(ending),
        }
    }

    /// The relay failed (it panicked, or a pump found its own state inconsistent): SPEC
    /// §5 "internal error". Recorded as the proxy's 1011 whatever was recorded before, and
    /// 1011 goes to each side that can still take a close frame, at its next frame
    /// boundary; the close wait under way (or a fresh one) bounds the rest.
    fn fail(&mut self, why: &'static str) {
        // A pump that found itself inconsistent says so on every poll: the second time (or
        // once both closes are done and nothing is left to tell a peer) the connection is
        // dropped instead of spinning on it.
        if self.failed || matches!(self.phase, Phase::Lingering { .. }) {
            self.aborted = true;
            return;
        }
        self.failed = true;
        tracing::error!(why, "relay failed: closing the connection with 1011");
        let frame = CloseFrame::INTERNAL;
        self.report.close = Some(Box::new(CloseInfo {
            code: frame.code,
            reason: frame.reason.to_owned(),
            by: By::Proxy,
        }));
        self.report.proxy_reason = Ending::Internal.proxy_reason();
        self.proxy_close(Ending::Internal);
    }

    /// The client broke a rule: 1001 to the upstream at once, and the client's close code
    /// in place of the upstream's close reply, so replies to what the client sent before
    /// the offending frame still reach it first (as they would from the upstream itself).
    fn client_violation(&mut self, ending: Ending) {
        let (Some(to_client), Some(to_upstream)) = (ending.to_client(), ending.to_upstream())
        else {
            return self.fail("a client violation without a close frame for each side");
        };
        self.proxy_ended(ending, to_client.code, to_client.reason);
        let frame = ControlFrame::close(to_client.code, to_client.reason, None);
        let mask = self.next_mask();
        self.c2u.send_close(ControlFrame::close(
            to_upstream.code,
            to_upstream.reason,
            Some(mask),
        ));
        if self.upstream_state == SideState::Dead
            || self.u2c.src_eof
            || self.u2c.src_close.is_some()
        {
            self.u2c.send_close(frame);
        } else {
            self.u2c.close_reply = Some(Box::new(frame));
        }
        self.start_close_wait();
    }

    /// The proxy ends the connection itself: each side gets the ending's close frame
    /// (SPEC §5) at its next frame boundary.
    fn proxy_close(&mut self, ending: Ending) {
        let (Some(to_client), Some(to_upstream)) = (ending.to_client(), ending.to_upstream())
        else {
            return self.fail("a proxy close without a close frame for each side");
        };
        self.proxy_ended(ending, to_client.code, to_client.reason);
        self.u2c
            .send_close(ControlFrame::close(to_client.code, to_client.reason, None));
        let mask = self.next_mask();
        self.c2u.send_close(ControlFrame::close(
            to_upstream.code,
            to_upstream.reason,
            Some(mask),
        ));
        self.start_close_wait();
    }

    /// Records the proxy's own ending: what the client observes and the reason word.
    fn proxy_ended(&mut self, ending: Ending, client_code: u16, reason: &str) {
        record(&mut self.report, client_code, reason, By::Proxy);
        if let Some(r) = ending.proxy_reason() {
            self.report.proxy_reason.get_or_insert(r);
        }
    }

    /// The client's TCP is gone (`Vanished`) or cut off by the proxy (a dead peer, a slow
    /// consumer): the client is Dead, and the upstream gets the ending's close (SPEC §5).
    fn client_gone(&mut self, ending: Ending) {
        let Some(to_upstream) = ending.to_upstream() else {
            return self.fail("a client gone without a close frame for the upstream");
        };
        self.client_state = SideState::Dead;
        self.u2c.abandon_dst();
        let by = if ending.proxy_reason().is_some() {
            By::Proxy
        } else {
            By::Client
        };
        record(&mut self.report, code::ABNORMAL, "", by);
        if let Some(r) = ending.proxy_reason() {
            self.report.proxy_reason.get_or_insert(r);
        }
        if self.c2u.at_boundary() {
            let mask = self.next_mask();
            self.c2u.send_close(ControlFrame::close(
                to_upstream.code,
                to_upstream.reason,
                Some(mask),
            ));
        } else {
            // Mid-frame, no close frame can be well-formed: cut the upstream too.
            self.c2u.abandon_dst();
            self.upstream_state = SideState::Dead;
        }
        self.start_close_wait();
    }

    /// The upstream's TCP is gone (or cut off): the upstream is Dead, and the client gets
    /// the ending's code (SPEC §5), or, if the client had already sent its close, the
    /// closing handshake is completed with its code.
    fn upstream_gone(&mut self, ending: Ending) {
        let Some(to_client) = ending.to_client() else {
            return self.fail("an upstream gone without a close frame for the client");
        };
        self.upstream_state = SideState::Dead;
        self.c2u.abandon_dst();
        let by = if ending.proxy_reason().is_some() {
            By::Proxy
        } else {
            By::Upstream
        };
        let proxy_reason = ending.proxy_reason();
        let code = match self.c2u.src_close.as_deref() {
            Some((code::NO_STATUS, _)) => code::NORMAL,
            Some((code, _)) => *code,
            None => to_client.code,
        };
        // The log names the code the client observes: ours when a close frame can still
        // reach it, 1006 when it can only see the TCP close.
        let observed = if self.u2c.at_boundary() {
            code
        } else {
            code::ABNORMAL
        };
        record(&mut self.report, observed, "", by);
        if let Some(r) = proxy_reason {
            self.report.proxy_reason.get_or_insert(r);
        }
        if self.u2c.at_boundary() {
            let reply = self.u2c.close_reply.take();
            self.u2c
                .send_close(reply.map_or_else(|| ControlFrame::close(code, "", None), |b| *b));
        } else {
            self.u2c.abandon_dst();
            self.client_state = SideState::Dead;
        }
        self.start_close_wait();
    }

    // === deadlines ===

    /// What the deadlines depend on, as the pumps know it now.
    #[inline(always)]
    fn facts(&self) -> Facts {
        Facts {
            close_by: self.phase.close_by(),
            client_stalled: self.u2c.stalled_since,
            upstream_stalled: self.c2u.stalled_since,
            throttled_until: self.c2u.throttled_until,
            client_ping_out: self
                .u2c
                .ping_sent_at
                .filter(|_| self.c2u.expect_pong.is_some()),
            upstream_ping_out: self
                .c2u
                .ping_sent_at
                .filter(|_| self.u2c.expect_pong.is_some()),
            client_pong_awaited: self.c2u.expect_pong.is_some(),
            upstream_pong_awaited: self.u2c.expect_pong.is_some(),
            client_last_write: self.u2c.last_write,
            upstream_last_write: self.c2u.last_write,
            fragment_since: self.c2u.fragment_since,
        }
    }

    /// The timer fired: act on what the deadlines say is due, in their order.
    fn on_timer(&mut self, now: Instant) {
        let due = self.deadlines.due(now, &self.facts());
        // A write stalled past `send_timeout`: that peer is a slow consumer and is cut off.
        if due.slow_client && self.client_state != SideState::Dead {
            self.end(Ending::SlowConsumer(Side::Client));
        }
        if due.slow_upstream && self.upstream_state != SideState::Dead {
            self.end(Ending::SlowConsumer(Side::Upstream));
        }
        if due.unthrottle {
            self.c2u.throttled_until = None;
        }
        if due.ping_client {
            self.ping_client();
        }
        if due.ping_upstream {
            self.ping_upstream();
        }
        if let Some(ending) = due.ending {
            if ending == Ending::FragmentTimeout {
                self.c2u.fragment_since = None;
            }
            self.end(ending);
        }
    }

    /// Queues a ping to the client; its pong will be consumed.
    fn ping_client(&mut self) {
        let payload = self.next_ping_payload();
        if self.u2c.send_ping(payload, None) {
            self.c2u.expect_pong = Some(payload);
            self.report.pings += 1;
            if let Some(m) = &self.metrics {
                m.ping_sent();
            }
        }
    }

    /// The same towards the upstream (masked, as a client must).
    fn ping_upstream(&mut self) {
        let payload = self.next_ping_payload();
        let mask = self.next_mask();
        if self.c2u.send_ping(payload, Some(mask)) {
            self.u2c.expect_pong = Some(payload);
        }
    }

    /// Payloads that tell the proxy's pings from the peers': 8 random-looking bytes.
    fn next_ping_payload(&mut self) -> [u8; PING_LEN] {
        let a = self.next_mask();
        let b = self.next_mask();
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }

    /// Polls the one timer, armed at [`Deadlines::next_due`] (re-armed only when that
    /// moves).
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let due = self.deadlines.next_due(&self.facts());
        let Some(due) = due else {
            return Poll::Pending;
        };
        let timer = match &mut self.timer {
            Some((sleep, at)) => {
                if *at != due {
                    sleep.as_mut().reset(due);
                    *at = due;
                }
                sleep
            }
            None => {
                &mut self
                    .timer
                    .insert((Box::pin(tokio::time::sleep_until(due)), due))
                    .0
            }
        };
        timer.as_mut().poll(cx)
    }

    // === lingering ===

    /// After both close frames: half-close our side and read until each peer closes, so
    /// no unread byte turns the close into a reset (SPEC §5).
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.client_state = shut_down(self.client_state, self.c2u.src_eof, &mut self.client, cx);
        self.upstream_state = shut_down(
            self.upstream_state,
            self.u2c.src_eof,
            &mut self.upstream,
            cx,
        );
        let done_with_client = self.client_state == SideState::Dead
            || (!self.linger_client && self.client_state == SideState::Shut);
        let client = if done_with_client {
            Poll::Ready(())
        } else {
            self.c2u.poll_drain(cx, &mut self.client)
        };
        let upstream = if self.upstream_state == SideState::Dead {
            Poll::Ready(())
        } else {
            self.u2c.poll_drain(cx, &mut self.upstream)
        };
        let shut = self.client_state != SideState::Open && self.upstream_state != SideState::Open;
        if shut && client.is_ready() && upstream.is_ready() {
            return Poll::Ready(());
        }
        if self.poll_timer(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// A fresh masking key for frames the proxy sends upstream (RFC 6455 §5.3). splitmix64:
    /// the key only has to be unpredictable to scripts in a browser, which never see it.
    fn next_mask(&mut self) -> [u8; 4] {
        self.mask_state = self.mask_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.mask_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let bytes = (z ^ (z >> 31)).to_le_bytes();
        [bytes[0], bytes[1], bytes[2], bytes[3]]
    }
}

/// One direction's stalls as the route's metrics know them.
#[derive(Debug, Default)]
struct StallsSeen {
    /// Counts the connection in `wsgate_connections_stalled` while its pump is stalled;
    /// dropped with the session on every exit path (panics and aborted tasks included).
    stalled: Option<StalledConnection>,
    /// Stall time (ns) already added to `wsgate_stall_seconds_total`.
    reported: u64,
}

/// Lingering, an Open side becomes Shut: its write half is shut down, unless the peer
/// already sent its FIN (nothing left to read, so dropping the socket closes cleanly and
/// the shutdown(2) would be a wasted system call). A shutdown that cannot complete (a TLS
/// close_notify towards a peer that reads nothing) leaves it Open, and the close wait ends
/// it.
fn shut_down<S: AsyncWrite + Unpin>(
    state: SideState,
    src_eof: bool,
    socket: &mut S,
    cx: &mut Context<'_>,
) -> SideState {
    match state {
        SideState::Open if !src_eof => {
            if Pin::new(socket).poll_shutdown(cx).is_ready() {
                SideState::Shut
            } else {
                SideState::Open
            }
        }
        SideState::Open => SideState::Shut,
        settled => settled,
    }
}

/// Keeps the first close of the connection: that is the one that ended it.
/// A session's [`Report`] but for the counts: the pumps keep those until the end, so an
/// idle session does not carry a second, zeroed copy of them.
#[derive(Debug, Default)]
struct Ended {
    /// Boxed: set once, at the end; an idle session carries a word for it.
    close: Option<Box<CloseInfo>>,
    proxy_reason: Option<crate::outcome::ProxyReason>,
    pings: u64,
    rtt: RttNanos,
}

/// [`Rtt`] in nanoseconds: 32 bytes in every session rather than 56.
#[derive(Debug, Default)]
struct RttNanos {
    count: u64,
    min: u64,
    max: u64,
    total: u64,
}

impl RttNanos {
    fn record(&mut self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        self.min = if self.count == 0 {
            ns
        } else {
            self.min.min(ns)
        };
        self.max = self.max.max(ns);
        self.total = self.total.saturating_add(ns);
        self.count += 1;
    }

    fn rtt(&self) -> Rtt {
        Rtt {
            count: self.count,
            min: Duration::from_nanos(self.min),
            max: Duration::from_nanos(self.max),
            total: Duration::from_nanos(self.total),
        }
    }
}

fn record(report: &mut Ended, code: u16, reason: &str, by: By) {
    if report.close.is_none() {
        report.close = Some(Box::new(CloseInfo {
            code,
            reason: reason.to_owned(),
            by,
        }));
    }
}

/// A per-session seed from the process's random hasher keys and a counter.
fn mask_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf, duplex};
    use tokio::time::timeout;

    use super::frame::apply_mask;
    use super::*;

    /// Far beyond anything a passing test waits for; with paused time, a wait that can
    /// never end fails at once instead of hanging.
    const PATIENCE: Duration = Duration::from_secs(60);
    const KEY: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    /// What an idle connection's relay state weighs (SPEC §9 memory per idle connection):
    /// the session is most of the one allocation a relayed connection keeps (1,456 bytes
    /// before issue 21's trim, pumps 408 and deadlines 216). A bound, so growth is a choice.
    #[test]
    fn an_idle_session_stays_small() {
        use std::mem::size_of;
        type Plain = Session<tokio::net::TcpStream, tokio::net::TcpStream>;
        eprintln!(
            "session {} (pump {}, deadlines {}, phase {})",
            size_of::<Plain>(),
            size_of::<Pump>(),
            size_of::<Deadlines>(),
            size_of::<Phase>(),
        );
        assert!(size_of::<Pump>() <= 368, "pump: {}", size_of::<Pump>());
        assert!(size_of::<Deadlines>() <= 120);
        assert!(
            size_of::<Plain>() <= 1136,
            "session: {}",
            size_of::<Plain>()
        );
    }

    /// A frame's wire bytes, masked with `mask` (as a client sends it) when given.
    pub(super) fn frame(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![first_byte];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n < 65536 => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(k) = mask {
            out.extend_from_slice(&k);
        }
        let at = out.len();
        out.extend_from_slice(payload);
        if let Some(k) = mask {
            apply_mask(&mut out[at..], k, 0);
        }
        out
    }

    /// The next frame: first byte and unmasked payload; `None` at EOF or after `PATIENCE`.
    async fn read_frame(s: &mut DuplexStream) -> Option<(u8, Vec<u8>)> {
        let read = async {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let len = match h[1] & 0x7F {
                126 => usize::from(s.read_u16().await.ok()?),
                127 => usize::try_from(s.read_u64().await.ok()?).ok()?,
                n => usize::from(n),
            };
            // An unmasked frame keeps the zero mask, which changes nothing.
            let mut mask = [0u8; 4];
            if h[1] & 0x80 != 0 {
                s.read_exact(&mut mask).await.ok()?;
            }
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            apply_mask(&mut payload, mask, 0);
            Some((h[0], payload))
        };
        timeout(PATIENCE, read).await.ok().flatten()
    }

    /// A close with `code` and no reason, as `read_frame` returns it.
    fn close_frame(code: u16) -> (u8, Vec<u8>) {
        (0x88, code.to_be_bytes().to_vec())
    }

    /// Takes every write but never finishes a flush, like tokio-rustls towards a peer
    /// that stopped reading (the records wait in its own buffer).
    struct StuckFlush(DuplexStream);

    impl AsyncRead for StuckFlush {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for StuckFlush {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A pump that reports itself broken on every poll must end the connection, not spin
    /// inside one poll: on a one-thread runtime nothing else would ever run.
    #[test]
    fn a_pump_broken_for_good_ends_the_connection() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(async {
                let (_client, client_relay) = duplex(1 << 16);
                let (upstream_relay, _upstream) = duplex(1 << 16);
                let mut session = Session::start(
                    client_relay,
                    Bytes::new(),
                    upstream_relay,
                    Bytes::new(),
                    &settings(),
                );
                session.c2u.lose_buffer_for_test();
                let relay = Relay {
                    session: Some(session),
                    panicked: false,
                };
                let _ = tx.send(relay.await);
            });
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(report) => assert_internal(&report),
            Err(_) => panic!("no report within 10 s: the session spins inside one poll"),
        }
    }

    fn settings() -> Settings {
        Settings::without_timers(1024, Duration::from_millis(200), 1 << 20, 1 << 20)
    }

    /// Relays reads and writes until `budget` bytes were read, then panics in every read
    /// that finds more, as a bug in the stream or in the code it calls would.
    struct PanicsAfter {
        inner: DuplexStream,
        budget: usize,
    }

    impl AsyncRead for PanicsAfter {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.budget == 0 {
                let mut byte = [0u8; 1];
                let mut probe = ReadBuf::new(&mut byte);
                std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut probe))?;
                panic!("injected failure in the relay's read");
            }
            let mut limited = ReadBuf::new(buf.initialize_unfilled());
            let cap = limited.remaining().min(self.budget);
            let mut part = ReadBuf::new(&mut limited.initialize_unfilled()[..cap]);
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut part);
            let n = part.filled().len();
            self.budget -= n;
            buf.advance(n);
            polled
        }
    }

    impl AsyncWrite for PanicsAfter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The report of a relay that must end by itself.
    /// A relay between two streams with no early bytes, on its own task.
    fn spawn_relay<C, U>(client: C, upstream: U) -> tokio::task::JoinHandle<Report>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(relay(
            client,
            Bytes::new(),
            upstream,
            Bytes::new(),
            &settings(),
        ))
    }

    async fn ended(session: tokio::task::JoinHandle<Report>) -> Report {
        timeout(PATIENCE, session)
            .await
            .unwrap_or_else(|_| panic!("the relay did not end"))
            .unwrap_or_else(|e| panic!("the relay's task failed: {e}"))
    }

    fn assert_internal(report: &Report) {
        let close = report.close.clone();
        assert_eq!(
            close.map(|c| (c.code, c.reason, c.by)),
            Some((1011, "internal error".to_owned(), By::Proxy))
        );
        assert_eq!(report.proxy_reason.map(|r| r.as_str()), Some("internal"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_reading_the_client_ends_with_1011_to_the_upstream() {
        let hello = frame(0x82, b"hello", KEY);
        let (mut client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let failing = PanicsAfter {
            inner: client_relay,
            budget: hello.len(),
        };
        let session = spawn_relay(failing, upstream_relay);
        send(&mut client, &hello).await;
        assert_eq!(
            read_frame(&mut upstream).await,
            Some((0x82, b"hello".to_vec()))
        );
        send(&mut client, &frame(0x82, b"boom", KEY)).await;
        // The client's stream panics again at once: the upstream's 1011 still went out
        // first (a close to a destination is written before the source is read).
        assert_eq!(
            read_frame(&mut upstream).await,
            Some((
                0x88,
                [&1011u16.to_be_bytes()[..], b"internal error"].concat()
            ))
        );
        let report = ended(session).await;
        assert_internal(&report);
        assert_eq!(report.c2u.frames, 1, "counts so far are kept");
        assert_eq!(report.c2u.messages, 1);
        assert_eq!(read_frame(&mut upstream).await, None, "then the TCP close");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_reading_the_upstream_ends_with_1011_to_both_sides() {
        let (mut client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let failing = PanicsAfter {
            inner: upstream_relay,
            budget: 3,
        };
        let session = spawn_relay(client_relay, failing);
        // Three bytes of the upstream's frame pass; the read of the rest panics, so the
        // client is mid-frame: no close frame can reach it well-formed.
        send(&mut upstream, &frame(0x82, b"partial", None)).await;
        let internal = (
            0x88,
            [&1011u16.to_be_bytes()[..], b"internal error"].concat(),
        );
        assert_eq!(read_frame(&mut upstream).await, Some(internal.clone()));
        let report = ended(session).await;
        assert_internal(&report);
        let mut got = Vec::new();
        let read = timeout(PATIENCE, client.read_to_end(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "client got {read:?}");
        assert_eq!(
            got,
            frame(0x82, b"partial", None)[..3],
            "no frame after a cut one"
        );

        // At a frame boundary, the client gets its 1011 too.
        let (mut client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let whole = frame(0x82, b"whole", None);
        let failing = PanicsAfter {
            inner: upstream_relay,
            budget: whole.len(),
        };
        let session = spawn_relay(client_relay, failing);
        send(&mut upstream, &whole).await;
        assert_eq!(
            read_frame(&mut client).await,
            Some((0x82, b"whole".to_vec()))
        );
        send(&mut upstream, &frame(0x81, b"boom", None)).await;
        assert_eq!(read_frame(&mut client).await, Some(internal.clone()));
        assert_eq!(read_frame(&mut upstream).await, Some(internal));
        assert_internal(&ended(session).await);
    }

    async fn send(s: &mut DuplexStream, bytes: &[u8]) {
        s.write_all(bytes).await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_whose_flush_never_completes_is_a_slow_consumer() {
        let (_client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let session = spawn_relay(StuckFlush(client_relay), upstream_relay);
        send(&mut upstream, &frame(0x82, b"for a slow client", None)).await;
        // send_timeout after the flush stalled: the client is cut, the upstream gets 1001.
        assert_eq!(read_frame(&mut upstream).await, Some(close_frame(1001)));
        send(&mut upstream, &frame(0x88, &1001u16.to_be_bytes(), None)).await;
        drop(upstream);
        let report = timeout(PATIENCE, session)
            .await
            .unwrap_or_else(|_| panic!("the relay did not end"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            report.proxy_reason.map(|r| r.as_str()),
            Some("slow_consumer")
        );
    }

    /// A relay whose route counters are `metrics`' route `r`, with this `send_timeout`.
    fn spawn_metered_relay<C, U>(
        client: C,
        upstream: U,
        metrics: &crate::observe::metrics::Metrics,
        send_timeout: Duration,
    ) -> tokio::task::JoinHandle<Report>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut settings = settings();
        settings.send_timeout = send_timeout;
        settings.metrics = Some(metrics.route("r"));
        tokio::spawn(relay(
            client,
            Bytes::new(),
            upstream,
            Bytes::new(),
            &settings,
        ))
    }

    /// A relay whose client reads nothing (a 64-byte pipe) while the upstream sends a
    /// 1000-byte frame: its u2c direction stalls at once. Returns (client, upstream, relay).
    async fn stalled_relay(
        metrics: &crate::observe::metrics::Metrics,
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Report>,
    ) {
        let (client, client_relay) = duplex(64);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let session = spawn_metered_relay(
            client_relay,
            upstream_relay,
            metrics,
            Duration::from_secs(3600),
        );
        send(&mut upstream, &frame(0x82, &[1; 1000], None)).await;
        (client, upstream, session)
    }

    /// The value of the sample `series` (name and labels) in `metrics`' exposition.
    fn sample(metrics: &crate::observe::metrics::Metrics, series: &str) -> Option<f64> {
        let text = metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    const U2C_STALLED: &str = r#"wsgate_connections_stalled{route="r",direction="u2c"}"#;
    const U2C_SECONDS: &str = r#"wsgate_stall_seconds_total{route="r",direction="u2c"}"#;

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_counts_as_stalled_until_cut_and_its_stall_is_reported() {
        let metrics = crate::observe::metrics::Metrics::new();
        let (_client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let send_timeout = Duration::from_millis(500);
        let session = spawn_metered_relay(
            StuckFlush(client_relay),
            upstream_relay,
            &metrics,
            send_timeout,
        );
        send(&mut upstream, &frame(0x82, b"for a slow client", None)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sample(&metrics, U2C_STALLED), Some(1.0));
        assert_eq!(
            sample(&metrics, U2C_SECONDS),
            Some(0.0),
            "added when the stall ends"
        );
        assert_eq!(read_frame(&mut upstream).await, Some(close_frame(1001)));
        send(&mut upstream, &frame(0x88, &1001u16.to_be_bytes(), None)).await;
        drop(upstream);
        let report = ended(session).await;
        assert_eq!(
            report.proxy_reason.map(|r| r.as_str()),
            Some("slow_consumer")
        );
        // Cut at `send_timeout` (paused time: exactly then).
        assert_eq!(report.u2c.stalls.count, 1);
        assert_eq!(report.u2c.stalls.time(), send_timeout);
        assert_eq!(report.c2u.stalls, Default::default());
        assert_eq!(sample(&metrics, U2C_STALLED), Some(0.0));
        assert_eq!(sample(&metrics, U2C_SECONDS), Some(0.5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_vanishes_while_stalled_ends_its_stall() {
        let metrics = crate::observe::metrics::Metrics::new();
        let (client, mut upstream, session) = stalled_relay(&metrics).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(sample(&metrics, U2C_STALLED), Some(1.0));
        drop(client);
        assert_eq!(read_frame(&mut upstream).await, Some(close_frame(1001)));
        drop(upstream);
        let report = ended(session).await;
        assert_eq!(report.u2c.stalls.count, 1);
        assert_eq!(report.u2c.stalls.time(), Duration::from_millis(700));
        assert_eq!(sample(&metrics, U2C_STALLED), Some(0.0));
        assert_eq!(sample(&metrics, U2C_SECONDS), Some(0.7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_open_when_the_connection_ends_counts_up_to_the_end() {
        let metrics = crate::observe::metrics::Metrics::new();
        let (mut client, mut upstream, session) = stalled_relay(&metrics).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The client closes but never reads; the upstream's reply can never reach it, so
        // the close wait runs out with the stall still open.
        send(&mut client, &frame(0x88, &1000u16.to_be_bytes(), KEY)).await;
        assert_eq!(read_frame(&mut upstream).await, Some(close_frame(1000)));
        let report = ended(session).await;
        assert_eq!(report.u2c.stalls.count, 1);
        assert_eq!(
            report.u2c.stalls.time(),
            Duration::from_millis(700) + CLOSE_WAIT
        );
        assert_eq!(sample(&metrics, U2C_STALLED), Some(0.0));
        assert_eq!(sample(&metrics, U2C_SECONDS), Some(5.7));
        drop((client, upstream));
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_relay_stops_counting_as_stalled() {
        let metrics = crate::observe::metrics::Metrics::new();
        let (_client, _upstream, session) = stalled_relay(&metrics).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sample(&metrics, U2C_STALLED), Some(1.0));
        // The hard end of a drain: the task is dropped without a report.
        session.abort();
        assert!(matches!(session.await, Err(e) if e.is_cancelled()));
        assert_eq!(sample(&metrics, U2C_STALLED), Some(0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn handshake_bytes_beyond_one_buffer_reach_the_peer() {
        let from_upstream = [frame(0x82, &[1; 3000], None), frame(0x81, b"hi", None)].concat();
        let from_client = [frame(0x82, &[2; 5000], KEY), frame(0x81, b"yo", KEY)].concat();
        let (mut client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let session = tokio::spawn(relay(
            client_relay,
            Bytes::from(from_client.clone()),
            upstream_relay,
            Bytes::from(from_upstream.clone()),
            &settings(),
        ));
        let mut got = vec![0u8; from_upstream.len()];
        let read = timeout(PATIENCE, client.read_exact(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "client got {read:?}");
        assert_eq!(got, from_upstream);
        let mut got = vec![0u8; from_client.len()];
        let read = timeout(PATIENCE, upstream.read_exact(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "upstream got {read:?}");
        assert_eq!(got, from_client);
        // Both directions go on: the close handshake passes end to end.
        send(&mut upstream, &frame(0x88, &1000u16.to_be_bytes(), None)).await;
        assert_eq!(read_frame(&mut client).await, Some(close_frame(1000)));
        send(&mut client, &frame(0x88, &1000u16.to_be_bytes(), KEY)).await;
        assert_eq!(read_frame(&mut upstream).await, Some(close_frame(1000)));
        drop((client, upstream));
        let report = timeout(PATIENCE, session)
            .await
            .unwrap_or_else(|_| panic!("the relay did not end"))
            .unwrap_or_else(|e| panic!("{e}"));
        let close = report.close.unwrap_or_else(|| panic!("no close recorded"));
        assert_eq!((close.code, close.by), (1000, By::Upstream));
    }
}
