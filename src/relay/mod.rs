//! The relay of one upgraded connection (SPEC §4, §5): two [`pump::Pump`]s, one per
//! direction, driven by a single task that owns both sockets, plus the close handshake.
//!
//! The session decides what each event means for the *other* peer (which close code it
//! gets, SPEC §5) and when the connection is over; pumps move bytes. Nothing here spawns
//! tasks or keeps a timer armed while the connection is healthy: the one timer exists only
//! while a write is stalled or a close is in progress.

pub mod frame;
pub mod limits;
pub mod pool;
pub mod pump;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use frame::{ControlFrame, Dir, Rules};
use limits::MessageGate;
use pump::{Event, PING_LEN, Pump};

use crate::config::{Keepalive, Limits, MessageRate};
use crate::observe::metrics::{Flow, RouteMetrics};
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
    /// `Sec-WebSocket-Extensions` as accepted by the upstream ("" when none).
    pub extensions: String,
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
    /// Where drains ask this connection to close (1012).
    pub control: Option<Arc<Control>>,
    /// The route's counters, fed as the relay goes.
    pub metrics: Option<Arc<RouteMetrics>>,
}

impl Settings {
    /// A route's limits and the process's keepalive, for one connection.
    pub fn new(limits: &Limits, keepalive: &Keepalive, extensions: String) -> Settings {
        Settings {
            buffer_size: limits.buffer_size,
            send_timeout: limits.send_timeout,
            max_frame_size: limits.max_frame_size,
            max_message_size: limits.max_message_size,
            extensions,
            messages: Some(limits.messages),
            fragment_timeout: limits.fragment_timeout,
            idle_timeout: limits.idle_timeout,
            ping_interval: keepalive.ping_interval,
            pong_timeout: keepalive.pong_timeout,
            upstream_ping_interval: keepalive.upstream_ping_interval,
            expires_at: None,
            control: None,
            metrics: None,
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
            extensions: String::new(),
            messages: None,
            fragment_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            ping_interval: Duration::ZERO,
            pong_timeout: Duration::from_secs(10),
            upstream_ping_interval: Duration::ZERO,
            expires_at: None,
            control: None,
            metrics: None,
        }
    }
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
    Relay(Some(Session::start(
        client,
        client_early,
        upstream,
        upstream_early,
        settings,
    )))
}

/// A session until it ends; then (sockets dropped) its report.
struct Relay<C, U>(Option<Session<C, U>>);

impl<C, U> Future for Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Report;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Report> {
        let Some(session) = self.0.as_mut() else {
            return Poll::Pending;
        };
        std::task::ready!(session.poll(cx));
        let Some(mut session) = self.0.take() else {
            return Poll::Pending;
        };
        session.c2u.release();
        session.u2c.release();
        session.report.c2u = session.c2u.stats;
        session.report.u2c = session.u2c.stats;
        Poll::Ready(session.report)
    }
}

struct Session<C, U> {
    client: C,
    upstream: U,
    c2u: Pump,
    u2c: Pump,
    send_timeout: Duration,
    fragment_timeout: Duration,
    idle_timeout: Duration,
    ping_interval: Duration,
    pong_timeout: Duration,
    upstream_ping_interval: Duration,
    // Periodic checks are re-armed lazily: each is a time at which to *look* (is a ping
    // due? has the connection been idle?), moved only when the timer fires, so traffic
    // never touches the timer wheel.
    /// `close_on_expiry`: the token's expiry.
    expires_at: Option<Instant>,
    control: Option<Arc<Control>>,
    /// When a drain wants this connection closed.
    drain_at: Option<Instant>,
    metrics: Option<Arc<RouteMetrics>>,
    /// What `metrics` has been told so far.
    flushed: Flow,
    ping_check: Option<Instant>,
    upstream_ping_check: Option<Instant>,
    idle_check: Option<Instant>,
    last_data: Instant,
    /// The connection's one timer, armed at the earliest deadline; created on first use.
    timer: Option<(Pin<Box<Sleep>>, Instant)>,
    close_deadline: Option<Instant>,
    client_dead: bool,
    upstream_dead: bool,
    lingering: bool,
    shut_client: bool,
    shut_upstream: bool,
    mask_state: u64,
    report: Report,
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
        let mut c2u = Pump::new(rules(Dir::ClientToUpstream), settings.buffer_size);
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
        let every = |d: Duration| (!d.is_zero()).then(|| now + d);
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
            send_timeout: settings.send_timeout,
            fragment_timeout: settings.fragment_timeout,
            idle_timeout: settings.idle_timeout,
            ping_interval: settings.ping_interval,
            pong_timeout: settings.pong_timeout,
            upstream_ping_interval: settings.upstream_ping_interval,
            expires_at: settings.expires_at,
            control: settings.control.clone(),
            drain_at: None,
            metrics: settings.metrics.clone(),
            flushed: Flow::default(),
            ping_check: every(settings.ping_interval),
            upstream_ping_check: every(settings.upstream_ping_interval),
            idle_check: every(settings.idle_timeout),
            last_data: now,
            timer: None,
            close_deadline: None,
            client_dead: false,
            upstream_dead: false,
            lingering: false,
            shut_client: false,
            shut_upstream: false,
            mask_state: mask_seed(),
            report: Report::default(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Every wake looks again: a later drain (shutdown after a slow backend drain) may
        // ask for an earlier close, and an undrain may call it off.
        if self.close_deadline.is_none()
            && let Some(control) = &self.control
        {
            self.drain_at = control.poll_drain(cx);
        }
        let done = self.poll_session(cx);
        self.flush_metrics();
        done
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

    fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.lingering {
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
                if self.idle_check.is_some() {
                    self.last_data = Instant::now();
                }
            }
            if self.finished() {
                self.lingering = true;
                self.start_close_wait();
                continue;
            }
            if self.poll_timer(cx).is_ready() {
                let now = Instant::now();
                if self.close_deadline.is_some_and(|d| d <= now) {
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
        let client_done = self.client_dead
            || ((self.c2u.src_eof || self.c2u.src_close.is_some()) && self.u2c.dst_finished());
        let upstream_done = self.upstream_dead
            || ((self.u2c.src_eof || self.u2c.src_close.is_some()) && self.c2u.dst_finished());
        client_done && upstream_done
    }

    // === events from the client side (c2u pump) ===

    fn on_client_event(&mut self, event: Event) {
        match event {
            Event::CloseReceived => {
                if let Some((code, reason)) = &self.c2u.src_close {
                    record(&mut self.report, *code, reason, By::Client);
                }
                self.start_close_wait();
            }
            Event::Violation(v) => self.client_violation(Ending::ClientViolation(v.breach())),
            Event::SrcEnded(_) if self.c2u.src_close.is_some() => {}
            Event::SrcEnded(_) => self.client_gone(Ending::Vanished(Side::Client)),
            Event::DstFailed(_) => self.upstream_gone(Ending::Vanished(Side::Upstream)),
            Event::PongReceived => {
                let now = Instant::now();
                if let Some(sent) = self.u2c.ping_sent_at.take() {
                    let rtt = now.saturating_duration_since(sent);
                    self.report.rtt.record(rtt);
                    if let Some(m) = &self.metrics {
                        m.ping_answered(rtt);
                    }
                }
                self.ping_check = Some(now + self.ping_interval);
            }
            Event::RateLimited => self.client_violation(Ending::RateLimit),
        }
    }

    // === events from the upstream side (u2c pump) ===

    fn on_upstream_event(&mut self, event: Event) {
        match event {
            Event::CloseReceived => {
                if let Some((code, reason)) = &self.u2c.src_close {
                    record(&mut self.report, *code, reason, By::Upstream);
                }
                self.start_close_wait();
            }
            Event::Violation(v) => self.proxy_close(Ending::UpstreamViolation(v.breach())),
            Event::SrcEnded(_) if self.u2c.src_close.is_some() => {}
            Event::SrcEnded(_) => self.upstream_gone(Ending::Vanished(Side::Upstream)),
            Event::DstFailed(_) => self.client_gone(Ending::Vanished(Side::Client)),
            Event::PongReceived => {
                self.c2u.ping_sent_at = None;
                self.upstream_ping_check = Some(Instant::now() + self.upstream_ping_interval);
            }
            // Only the client side has a message budget.
            Event::RateLimited => {}
        }
    }

    /// The client broke a rule: 1001 to the upstream at once, and the client's close code
    /// in place of the upstream's close reply, so replies to what the client sent before
    /// the offending frame still reach it first (as they would from the upstream itself).
    fn client_violation(&mut self, ending: Ending) {
        let to_client = ending.to_client().unwrap_or(CloseFrame::INTERNAL);
        let to_upstream = ending.to_upstream().unwrap_or(CloseFrame::INTERNAL);
        self.proxy_ended(ending, to_client.code, to_client.reason);
        let frame = ControlFrame::close(to_client.code, to_client.reason, None);
        let mask = self.next_mask();
        self.c2u.send_close(ControlFrame::close(
            to_upstream.code,
            to_upstream.reason,
            Some(mask),
        ));
        if self.upstream_dead || self.u2c.src_eof || self.u2c.src_close.is_some() {
            self.u2c.send_close(frame);
        } else {
            self.u2c.close_reply = Some(Box::new(frame));
        }
        self.start_close_wait();
    }

    /// The proxy ends the connection itself: each side gets the ending's close frame
    /// (SPEC §5) at its next frame boundary.
    fn proxy_close(&mut self, ending: Ending) {
        let to_client = ending.to_client().unwrap_or(CloseFrame::INTERNAL);
        let to_upstream = ending.to_upstream().unwrap_or(CloseFrame::INTERNAL);
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
    /// consumer): the upstream gets the ending's close (SPEC §5).
    fn client_gone(&mut self, ending: Ending) {
        self.client_dead = true;
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
            let to_upstream = ending.to_upstream().unwrap_or(CloseFrame::INTERNAL);
            let mask = self.next_mask();
            self.c2u.send_close(ControlFrame::close(
                to_upstream.code,
                to_upstream.reason,
                Some(mask),
            ));
        } else {
            // Mid-frame, no close frame can be well-formed: cut the upstream too.
            self.c2u.abandon_dst();
            self.upstream_dead = true;
        }
        self.start_close_wait();
    }

    /// The upstream's TCP is gone (or cut off): the ending's code to the client (SPEC §5),
    /// or, if the client had already sent its close, the closing handshake is completed
    /// with its code.
    fn upstream_gone(&mut self, ending: Ending) {
        self.upstream_dead = true;
        self.c2u.abandon_dst();
        let by = if ending.proxy_reason().is_some() {
            By::Proxy
        } else {
            By::Upstream
        };
        let proxy_reason = ending.proxy_reason();
        let code = match &self.c2u.src_close {
            Some((code::NO_STATUS, _)) => code::NORMAL,
            Some((code, _)) => *code,
            None => ending.to_client().unwrap_or(CloseFrame::INTERNAL).code,
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
            self.client_dead = true;
        }
        self.start_close_wait();
    }

    /// The timer fired: find what is due. Periodic checks that are not due yet move to
    /// their real due time (lazy re-arming).
    fn on_timer(&mut self, now: Instant) {
        self.on_stall_timeout(now);
        if self.c2u.throttled_until.is_some_and(|t| t <= now) {
            self.c2u.throttled_until = None;
        }
        if self.close_deadline.is_some() {
            return;
        }
        if self.drain_at.is_some_and(|t| t <= now) {
            self.proxy_close(Ending::Drain);
            return;
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            self.expires_at = None;
            self.proxy_close(Ending::TokenExpired);
            return;
        }
        let pong_due = |sent: Option<Instant>, waiting: bool| {
            waiting && sent.is_some_and(|s| s + self.pong_timeout <= now)
        };
        if pong_due(self.u2c.ping_sent_at, self.c2u.expect_pong.is_some()) {
            self.client_gone(Ending::DeadPeer(Side::Client));
            return;
        }
        if pong_due(self.c2u.ping_sent_at, self.u2c.expect_pong.is_some()) {
            self.upstream_gone(Ending::DeadPeer(Side::Upstream));
            return;
        }
        if self.ping_check.is_some_and(|t| t <= now) {
            self.ping_check = self.ping_client(now);
        }
        if self.upstream_ping_check.is_some_and(|t| t <= now) {
            self.upstream_ping_check = self.ping_upstream(now);
        }
        if self.idle_check.is_some_and(|t| t <= now) {
            let due = self.last_data + self.idle_timeout;
            if due <= now {
                self.idle_check = None;
                self.proxy_close(Ending::Idle);
                return;
            }
            self.idle_check = Some(due);
        }
        if self.fragment_due().is_some_and(|t| t <= now) {
            self.c2u.fragment_since = None;
            self.client_violation(Ending::FragmentTimeout);
        }
    }

    /// Pings the client if nothing was sent to it for `ping_interval`; returns when to look
    /// again (`None` while a pong is awaited).
    fn ping_client(&mut self, now: Instant) -> Option<Instant> {
        if self.c2u.expect_pong.is_some() {
            return None;
        }
        let due = self.u2c.last_write.unwrap_or(now) + self.ping_interval;
        if due > now {
            return Some(due);
        }
        let payload = self.next_ping_payload();
        if self.u2c.send_ping(payload, None) {
            self.c2u.expect_pong = Some(payload);
            self.report.pings += 1;
            if let Some(m) = &self.metrics {
                m.ping_sent();
            }
        }
        None
    }

    /// The same towards the upstream (masked, as a client must).
    fn ping_upstream(&mut self, now: Instant) -> Option<Instant> {
        if self.u2c.expect_pong.is_some() {
            return None;
        }
        let due = self.c2u.last_write.unwrap_or(now) + self.upstream_ping_interval;
        if due > now {
            return Some(due);
        }
        let payload = self.next_ping_payload();
        let mask = self.next_mask();
        if self.c2u.send_ping(payload, Some(mask)) {
            self.u2c.expect_pong = Some(payload);
        }
        None
    }

    fn fragment_due(&self) -> Option<Instant> {
        self.c2u
            .fragment_since
            .map(|s| s + self.fragment_timeout)
            .filter(|_| !self.fragment_timeout.is_zero())
    }

    /// Payloads that tell the proxy's pings from the peers': 8 random-looking bytes.
    fn next_ping_payload(&mut self) -> [u8; PING_LEN] {
        let a = self.next_mask();
        let b = self.next_mask();
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }

    /// A write stalled past `send_timeout`: that peer is a slow consumer and is cut off.
    fn on_stall_timeout(&mut self, now: Instant) {
        let limit = self.send_timeout;
        let expired = |since: Option<Instant>| since.is_some_and(|s| s + limit <= now);
        if expired(self.u2c.stalled_since) && !self.client_dead {
            self.client_gone(Ending::SlowConsumer(Side::Client));
        }
        if expired(self.c2u.stalled_since) && !self.upstream_dead {
            self.upstream_gone(Ending::SlowConsumer(Side::Upstream));
        }
    }

    fn start_close_wait(&mut self) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Instant::now() + CLOSE_WAIT);
        }
    }

    /// The earliest deadline of the session. Runs on every wake, so it folds the few
    /// deadlines that are set instead of collecting all of them.
    fn next_due(&self) -> Option<Instant> {
        let stall = |since: Option<Instant>| since.map(|s| s + self.send_timeout);
        let mut due = earliest(self.close_deadline, self.c2u.throttled_until);
        due = earliest(due, stall(self.c2u.stalled_since));
        due = earliest(due, stall(self.u2c.stalled_since));
        if self.close_deadline.is_some() {
            return due;
        }
        due = earliest(due, self.expires_at);
        due = earliest(due, self.drain_at);
        due = earliest(due, self.ping_check);
        due = earliest(due, self.upstream_ping_check);
        due = earliest(due, self.idle_check);
        due = earliest(due, self.fragment_due());
        let pong = |sent: Option<Instant>, waiting: bool| {
            sent.filter(|_| waiting).map(|s| s + self.pong_timeout)
        };
        due = earliest(
            due,
            pong(self.u2c.ping_sent_at, self.c2u.expect_pong.is_some()),
        );
        earliest(
            due,
            pong(self.c2u.ping_sent_at, self.u2c.expect_pong.is_some()),
        )
    }

    /// Polls the one timer, armed at [`Session::next_due`] (re-armed only when that moves).
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let due = self.next_due();
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

    /// After both close frames: half-close our side and read until each peer closes, so
    /// no unread byte turns the close into a reset (SPEC §5).
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // A peer that already sent its FIN has nothing left to read: dropping the socket
        // closes cleanly, and the shutdown(2) would be a wasted system call. A shutdown
        // that cannot complete (a TLS close_notify towards a peer that reads nothing) must
        // not outlast the close wait, so it never returns early.
        if !self.shut_client && !self.client_dead && !self.c2u.src_eof {
            self.shut_client = Pin::new(&mut self.client).poll_shutdown(cx).is_ready();
        } else {
            self.shut_client = true;
        }
        if !self.shut_upstream && !self.upstream_dead && !self.u2c.src_eof {
            self.shut_upstream = Pin::new(&mut self.upstream).poll_shutdown(cx).is_ready();
        } else {
            self.shut_upstream = true;
        }
        let client = if self.client_dead {
            Poll::Ready(())
        } else {
            self.c2u.poll_drain(cx, &mut self.client)
        };
        let upstream = if self.upstream_dead {
            Poll::Ready(())
        } else {
            self.u2c.poll_drain(cx, &mut self.upstream)
        };
        let shut = self.shut_client && self.shut_upstream;
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

/// Keeps the first close of the connection: that is the one that ended it.
fn record(report: &mut Report, code: u16, reason: &str, by: By) {
    if report.close.is_none() {
        report.close = Some(CloseInfo {
            code,
            reason: reason.to_owned(),
            by,
        });
    }
}

/// A per-session seed from the process's random hasher keys and a counter.
fn mask_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
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

    fn settings() -> Settings {
        Settings::without_timers(1024, Duration::from_millis(200), 1 << 20, 1 << 20)
    }

    async fn send(s: &mut DuplexStream, bytes: &[u8]) {
        s.write_all(bytes).await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_whose_flush_never_completes_is_a_slow_consumer() {
        let (_client, client_relay) = duplex(1 << 16);
        let (upstream_relay, mut upstream) = duplex(1 << 16);
        let session = tokio::spawn(relay(
            StuckFlush(client_relay),
            Bytes::new(),
            upstream_relay,
            Bytes::new(),
            &settings(),
        ));
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
