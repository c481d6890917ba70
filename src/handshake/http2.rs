//! The HTTP/2 driver (SPEC §3 "WebSocket over HTTP/2", RFC 8441): the `h2` crate's server
//! on one client connection, each stream judged as a connection of its own would be on
//! HTTP/1.1. An extended CONNECT with `:protocol: websocket` is rewritten into the HTTP/1.1
//! upgrade it stands for, so the same admission, upstream handshake and log lines apply;
//! the upstream's 101 becomes the client's 200, and the stream's relay runs in a task of
//! its own that reads and writes the stream itself ([`stream::StreamIo`]: no task or
//! channel between the relay and h2). Other requests follow the route's `http` setting.
//!
//! Per connection, not per stream: keepalive (one HTTP/2 PING every `ping_interval`, a
//! connection silent past `pong_timeout` ends with all its streams), GOAWAY when a drain
//! begins, and closing once no stream has been open for `handshake_timeout`. Flow-control
//! windows are `buffer_size` per stream, so a stream holds at most that much per
//! direction, and the connection window leaves room for every stream's.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Ping, RecvStream};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version, request};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::admit::EarlyPermit;
use super::facts::{ConnInfo, Facts, request_id};
use super::http1::plain::ExchangeDeadline;
use super::http1::{Accepted, Body, Conn, InHandshake};
use super::session::{RelayPhase, run_relay};
use crate::admission::client_ip::IpKey;
use crate::config::Config;
use crate::observe::access_log::TlsInfo;
use crate::outcome::Refusal;
use crate::shared::Shared;

mod stream;

use stream::{RecvBody, StreamIo, send_answer};

/// Streams one connection may have open at once (SPEC §3).
pub const MAX_STREAMS: u32 = 100;

/// Largest header list a client may send (as on HTTP/1.1, the head's bound); it also
/// bounds what HPACK may expand to.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// After GOAWAY, how long a connection with no stream left may stay open for the client
/// to close it.
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The largest flow-control window HTTP/2 allows.
const MAX_WINDOW: u64 = (1 << 31) - 1;

/// What the streams of one connection share.
struct H2Conn {
    shared: Arc<Shared>,
    config: Arc<Config>,
    listener: Arc<str>,
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    /// `max_connections` was exceeded at accept: for the connection's first stream.
    over_capacity: bool,
    /// A stream arrived already.
    streams_seen: AtomicBool,
    /// The connection's own per-IP place, while no stream holds it: taken at accept, taken
    /// over by the next stream, taken again when the last stream ends; so a connection
    /// counts as one connection while idle and each stream counts as one, as on HTTP/1.1.
    early: Mutex<Option<EarlyPermit>>,
    /// What the connection counts under per IP (`None` behind a trusted proxy, whose
    /// clients are known from each request).
    ip_key: Option<IpKey>,
    /// Answers being sent (refusals, plain exchanges) and when each must be done: a body
    /// is polled only while the client's window lets it, so their bounds are enforced
    /// here, by cutting the connection.
    answers: Mutex<Vec<Due>>,
    next_due: AtomicU64,
    answers_changed: Notify,
    /// The `max_pending_handshakes` slot, until the first stream arrives.
    pending: Mutex<Option<InHandshake>>,
    /// Streams being answered or relayed.
    open: AtomicUsize,
    /// When the last stream ended (or the connection began), while none is open.
    idle_since: Mutex<Instant>,
    /// The last open stream ended: the idle bound starts.
    went_idle: Notify,
}

/// Serves an HTTP/2 connection until it ends; its WebSocket streams are relayed in tasks of
/// their own, so nothing is left for the caller's relay phase. `deadline` bounds the wait
/// for the first stream.
pub async fn serve<S>(accepted: Accepted, stream: S, deadline: Instant) -> Option<RelayPhase>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        pending,
        shared,
        config,
        listener,
        peer,
        started,
        over_capacity,
        early_permit,
        tls,
    } = accepted;
    let ip_key = match &early_permit {
        EarlyPermit::Held(p) | EarlyPermit::Kept(p) => Some(p.key()),
        EarlyPermit::NotTaken | EarlyPermit::OverCap => None,
    };
    let h2 = Arc::new(H2Conn {
        shared,
        config,
        listener,
        peer,
        tls,
        over_capacity,
        streams_seen: AtomicBool::new(false),
        early: Mutex::new(Some(early_permit)),
        ip_key,
        answers: Mutex::new(Vec::new()),
        next_due: AtomicU64::new(0),
        answers_changed: Notify::new(),
        pending: Mutex::new(Some(pending)),
        open: AtomicUsize::new(0),
        idle_since: Mutex::new(started),
        went_idle: Notify::new(),
    });
    let heard = Arc::new(AtomicU64::new(0));
    let stream = Heard {
        inner: stream,
        heard: heard.clone(),
    };
    let handshake = builder(&h2.config).handshake::<_, Bytes>(stream);
    let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(peer = %h2.peer, error = %e, "HTTP/2 handshake failed");
            return None;
        }
        Err(_) => return None,
    };
    let mut ping_pong = conn.ping_pong();
    let keepalive = h2.config.keepalive;
    let keepalive_on = !keepalive.ping_interval.is_zero() && ping_pong.is_some();
    // The next PING, or, while one is unanswered, the end of its `pong_timeout`.
    let ping_at = tokio::time::sleep_until(Instant::now() + keepalive.ping_interval);
    tokio::pin!(ping_at);
    let mut awaiting_pong = false;
    // What had been read from the client when the PING went out: a client whose frames
    // keep coming is alive, its acknowledgement only queued behind what it (or we) sent.
    let mut heard_at_ping = 0;
    let mut draining = h2.shared.registry.drain_started();
    // Armed while no stream is open: the wait for the next stream, then, once GOAWAY is
    // out, the grace the client has to close before the connection is dropped.
    let idle = tokio::time::sleep_until(deadline);
    tokio::pin!(idle);
    let mut closing = false;
    // Armed at the earliest answer's bound while answers are being sent.
    let due = tokio::time::sleep_until(deadline);
    tokio::pin!(due);
    let mut due_armed = false;
    loop {
        let no_stream = h2.open.load(Ordering::Acquire) == 0;
        // Biased, the connection first: it is what every frame of every stream wakes.
        tokio::select! {
            biased;
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    if connect_with_body(&req) {
                        // Not a WebSocket (RFC 8441 streams carry DATA, not a body); as
                        // hyper's HTTP/2 server did, the connection ends.
                        let mut respond = respond;
                        respond.send_reset(h2::Reason::INTERNAL_ERROR);
                        tracing::debug!(peer = %h2.peer, "HTTP/2 CONNECT with a body; closing");
                        return None;
                    }
                    let (open, over_capacity) = StreamOpen::new(&h2);
                    tokio::spawn(answer(h2.clone(), open, over_capacity, req, respond));
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %h2.peer, error = %e, "HTTP/2 connection ended");
                    return None;
                }
                None => return None,
            },
            pong = poll_fn(|cx| poll_pong(ping_pong.as_mut(), cx)), if awaiting_pong => {
                if pong.is_err() {
                    return None;
                }
                awaiting_pong = false;
                ping_at.as_mut().reset(Instant::now() + keepalive.ping_interval);
            }
            () = &mut ping_at, if keepalive_on => {
                let now_heard = heard.load(Ordering::Relaxed);
                if awaiting_pong && now_heard != heard_at_ping {
                    heard_at_ping = now_heard;
                    ping_at.as_mut().reset(Instant::now() + keepalive.pong_timeout);
                    continue;
                }
                if awaiting_pong {
                    tracing::debug!(peer = %h2.peer, "HTTP/2 PING not answered within pong_timeout; closing");
                    return None;
                }
                let sent = ping_pong.as_mut().map(|p| p.send_ping(Ping::opaque()));
                if !matches!(sent, Some(Ok(()))) {
                    return None;
                }
                awaiting_pong = true;
                heard_at_ping = now_heard;
                ping_at.as_mut().reset(Instant::now() + keepalive.pong_timeout);
            }
            () = h2.answers_changed.notified() => {
                due_armed = match h2.earliest_due() {
                    Some(at) => {
                        due.as_mut().reset(at);
                        true
                    }
                    None => false,
                };
            }
            () = &mut due, if due_armed => {
                if h2.cut_overdue(Instant::now()) {
                    // As on HTTP/1.1: a client that does not read its answer in time
                    // loses the connection (and its streams, all on the same flow).
                    tracing::debug!(peer = %h2.peer, "HTTP/2 answer not read in time; closing");
                    return None;
                }
                due_armed = match h2.earliest_due() {
                    Some(at) => {
                        due.as_mut().reset(at);
                        true
                    }
                    None => false,
                };
            }
            () = h2.went_idle.notified() => {
                let since = h2.idle_since.lock().map(|s| *s).unwrap_or_else(|_| Instant::now());
                let wait = if closing { GOAWAY_GRACE } else { h2.config.limits.handshake_timeout };
                idle.as_mut().reset(since + wait);
            }
            () = &mut idle, if no_stream => {
                if h2.open.load(Ordering::Acquire) > 0 {
                    continue;
                }
                if closing {
                    // GOAWAY went out and the client still holds the connection.
                    return None;
                }
                // GOAWAY: the client opens a new connection for what it sends next.
                conn.graceful_shutdown();
                closing = true;
                idle.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
            true = async { draining.wait_for(|d| *d).await.is_ok() }, if !closing => {
                conn.graceful_shutdown();
                closing = true;
                idle.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
        }
    }
}

/// The client's transport, counting what is read from it: proof of life while a PING's
/// acknowledgement is late (it waits behind everything sent before it, both ways).
struct Heard<S> {
    inner: S,
    heard: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.heard.fetch_add(n as u64, Ordering::Relaxed);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The PING's answer, when one is awaited.
fn poll_pong(pp: Option<&mut h2::PingPong>, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
    match pp {
        Some(pp) => pp.poll_pong(cx).map_ok(|_| ()),
        None => Poll::Pending,
    }
}

/// A CONNECT that announces a body.
fn connect_with_body(req: &Request<RecvStream>) -> bool {
    req.method() == Method::CONNECT
        && req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The server side of HTTP/2 as SPEC §3 sets it.
fn builder(config: &Config) -> h2::server::Builder {
    let buffer = config.limits.buffer_size as u64;
    let stream_window = buffer.clamp(1, MAX_WINDOW) as u32;
    let conn_window = (buffer * u64::from(MAX_STREAMS)).clamp(65_535, MAX_WINDOW) as u32;
    let mut b = h2::server::Builder::new();
    b.enable_connect_protocol()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(stream_window)
        .initial_connection_window_size(conn_window)
        .max_send_buffer_size(config.limits.buffer_size.max(1))
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

/// One stream: refused, relayed as plain HTTP, or admitted as a WebSocket whose relay is
/// started once the 200 is out.
async fn answer(
    h2: Arc<H2Conn>,
    open: StreamOpen,
    over_capacity: bool,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (mut parts, recv) = req.into_parts();
    let normalized = normalize(&mut parts);
    let early = h2.early.lock().ok().and_then(|mut e| e.take());
    // A stream is judged under the config of its own time: an HTTP/2 connection may
    // live for hours, across reloads.
    let config = h2.shared.config.load_full();
    let conn = Arc::new(Conn::for_stream(
        ConnInfo {
            shared: h2.shared.clone(),
            listener: h2.listener.clone(),
            conn_id: crate::ids::next(),
            peer: h2.peer,
            started: Instant::now(),
            tls: h2.tls.clone(),
            http: "2",
        },
        config.clone(),
        over_capacity,
        early.unwrap_or(EarlyPermit::NotTaken),
    ));
    // The bound of an answer that is not a WebSocket: its exchange's, or the time a
    // refusal gets to be sent.
    let answer_by = Instant::now() + config.limits.handshake_timeout;
    if let Err(refusal) = &normalized {
        let refusal = *refusal;
        let mut facts = Facts::from_parts(&parts);
        facts.request_id = request_id(&parts.headers);
        let resp = open.track(conn.refuse(&facts, refusal, None), &conn, answer_by);
        return send_answer(respond, resp).await;
    }
    // A WebSocket's stream is the relay's, not a body: it stays here.
    let (body, ws_recv) = match normalized {
        Ok(true) => (RecvBody::empty(), Some(recv)),
        _ => (RecvBody::new(recv, &parts.headers), None),
    };
    // The request's own stream is answered below; a client reset meanwhile ends the work.
    let handled = conn.clone().handle(Request::from_parts(parts, body));
    let resp = tokio::select! {
        biased;
        resp = handled => resp,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(conn_id = %conn.info.conn_id, "HTTP/2 stream reset before its answer");
            return;
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let by = resp
            .extensions()
            .get::<ExchangeDeadline>()
            .map_or(answer_by, |d| d.0);
        return send_answer(respond, open.track(resp, &conn, by)).await;
    }
    let Some(est) = conn.take_established() else {
        let resp = Refusal::UpstreamConnect
            .response()
            .map(http_body_util::Either::Left);
        return send_answer(respond, open.track(resp, &conn, answer_by)).await;
    };
    let (mut head, _) = resp.into_parts();
    head.status = StatusCode::OK;
    for name in [header::SEC_WEBSOCKET_ACCEPT, header::CONTENT_LENGTH] {
        head.headers.remove(name);
    }
    let send = match respond.send_response(stream::h2_head(head), false) {
        Ok(send) => send,
        Err(e) => {
            // The client reset the stream before it had its 200.
            tracing::debug!(conn_id = %conn.info.conn_id, error = %e, "HTTP/2 stream gone before its relay");
            return;
        }
    };
    let Some(recv) = ws_recv else {
        return;
    };
    let mut est = *est;
    est.settings.linger_client = false;
    let io = StreamIo::new(recv, send);
    let relaying = run_relay(&conn.info, io, Bytes::new(), est);
    drop(conn);
    // A task of its own, sized for the relay alone (this one holds the handshake's state).
    tokio::spawn(StreamRelay {
        relaying,
        _open: open,
    });
}

/// A WebSocket stream's relay, its stream counted open until it ends.
struct StreamRelay<R> {
    relaying: R,
    _open: StreamOpen,
}

impl<R: Future<Output = ()> + Unpin> Future for StreamRelay<R> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.relaying).poll(cx)
    }
}

/// Rewrites an HTTP/2 request into the HTTP/1.1 request it stands for: `Host` from
/// `:authority`, an origin-form target, cookies joined (RFC 9113 §8.2.3), and an extended
/// CONNECT for `websocket` as the upgrade (with a key of our own: RFC 8441 has none);
/// whether it is one.
fn normalize(parts: &mut request::Parts) -> Result<bool, Refusal> {
    let protocol = parts.extensions.get::<h2::ext::Protocol>();
    let websocket = match (&parts.method, protocol) {
        (&Method::CONNECT, Some(p)) if p.as_str().eq_ignore_ascii_case("websocket") => true,
        // A CONNECT tunnel, or another protocol: not what a WebSocket gateway relays.
        (&Method::CONNECT, _) | (_, Some(_)) => return Err(Refusal::BadUpgrade),
        _ => false,
    };
    parts.version = Version::HTTP_11;
    if let Some(authority) = parts.uri.authority() {
        match parts.headers.get(header::HOST) {
            // RFC 9113 §8.3.1: both present, they must agree (routes match `Host`).
            Some(host)
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
            {
                return Err(Refusal::BadUpgrade);
            }
            Some(_) => {}
            None => {
                let host =
                    HeaderValue::from_str(authority.as_str()).map_err(|_| Refusal::BadUpgrade)?;
                parts.headers.insert(header::HOST, host);
            }
        }
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|_| Refusal::BadUpgrade)?;
        parts.uri = target;
    }
    join_cookies(&mut parts.headers);
    if websocket {
        let h = &mut parts.headers;
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let key = tungstenite::handshake::client::generate_key();
        let key = HeaderValue::from_str(&key).map_err(|_| Refusal::BadUpgrade)?;
        h.insert(header::SEC_WEBSOCKET_KEY, key);
        parts.method = Method::GET;
    }
    Ok(websocket)
}

/// HTTP/2 may split `Cookie` into one header per pair; HTTP/1.1 wants one.
fn join_cookies(h: &mut http::HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in h.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// A stream counted open on its connection (the idle bound waits) and, beyond the
/// connection's first open stream, as a connection of its own for `max_connections`: while
/// `n` streams are open, the connection counts `max(n - 1, 0)` beyond its own count, so a
/// stream needs no flag of its own (its relay task stays one size class smaller).
struct StreamOpen {
    h2: Arc<H2Conn>,
}

impl StreamOpen {
    /// The stream, and whether `max_connections` is exceeded with it.
    fn new(h2: &Arc<H2Conn>) -> (StreamOpen, bool) {
        let before = h2.open.fetch_add(1, Ordering::AcqRel);
        // The connection is no longer a handshake in progress once a stream arrives.
        let slot = h2.pending.lock().ok().and_then(|mut p| p.take());
        drop(slot);
        let max = h2.config.limits.max_connections;
        let first_ever = !h2.streams_seen.swap(true, Ordering::AcqRel);
        let over_capacity = if before == 0 {
            // Rides on the connection's own count.
            if first_ever {
                h2.over_capacity
            } else {
                h2.shared.active.load(Ordering::Relaxed) > max
            }
        } else {
            h2.shared.active.fetch_add(1, Ordering::Relaxed) + 1 > max
        };
        (StreamOpen { h2: h2.clone() }, over_capacity)
    }

    /// The response, keeping the stream counted until its body is sent, which must be
    /// by `until` (else the connection is cut, `conn`'s log line saying why).
    fn track(self, inner: Response<Body>, conn: &Arc<Conn>, until: Instant) -> Response<Tracked> {
        let due = DueGuard::register(&self.h2, conn.clone(), until);
        inner.map(|inner| Tracked {
            inner,
            _open: Some(self),
            _due: Some(due),
        })
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        if self.h2.open.fetch_sub(1, Ordering::AcqRel) > 1 {
            // Another stream stays open: one fewer counts beyond the connection.
            self.h2.shared.active.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.h2.count_idle_connection();
            if let Ok(mut since) = self.h2.idle_since.lock() {
                *since = Instant::now();
            }
            self.h2.went_idle.notify_one();
        }
    }
}

/// A response body that keeps its stream counted open until it is sent (or dropped).
struct Tracked {
    inner: Body,
    _open: Option<StreamOpen>,
    _due: Option<DueGuard>,
}

/// An answer being sent and when it must be done.
struct Due {
    id: u64,
    until: Instant,
    /// The stream's request state: marked cut when the bound passes.
    conn: Arc<Conn>,
}

/// Lists an answer on its connection until it is sent or dropped.
struct DueGuard {
    h2: Arc<H2Conn>,
    id: u64,
}

impl DueGuard {
    fn register(h2: &Arc<H2Conn>, conn: Arc<Conn>, until: Instant) -> DueGuard {
        let id = h2.next_due.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut answers) = h2.answers.lock() {
            answers.push(Due { id, until, conn });
        }
        h2.answers_changed.notify_one();
        DueGuard { h2: h2.clone(), id }
    }
}

impl Drop for DueGuard {
    fn drop(&mut self) {
        if let Ok(mut answers) = self.h2.answers.lock() {
            answers.retain(|d| d.id != self.id);
        }
        self.h2.answers_changed.notify_one();
    }
}

impl H2Conn {
    fn earliest_due(&self) -> Option<Instant> {
        self.answers.lock().ok()?.iter().map(|d| d.until).min()
    }

    /// Marks every answer past its bound as cut; whether there was one.
    fn cut_overdue(&self, now: Instant) -> bool {
        let Ok(answers) = self.answers.lock() else {
            return false;
        };
        let mut any = false;
        for d in answers.iter().filter(|d| d.until <= now) {
            d.conn.mark_cut();
            any = true;
        }
        any
    }

    /// No stream is open: the connection itself counts per IP again (as an idle HTTP/1.1
    /// connection does), unless it still holds its place.
    fn count_idle_connection(&self) {
        let Some(key) = self.ip_key else {
            return;
        };
        let Ok(mut early) = self.early.lock() else {
            return;
        };
        if early.is_none()
            && let Some(p) = self.shared.per_ip.try_acquire(key, u32::MAX)
        {
            *early = Some(EarlyPermit::Kept(p));
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: Request<()>) -> request::Parts {
        req.into_parts().0
    }

    #[test]
    fn extended_connect_becomes_an_upgrade() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("https://chat.example.com/ws?room=1")
            .header("sec-websocket-version", "13")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        let mut p = parts(req);
        normalize(&mut p).unwrap();
        assert_eq!(p.method, Method::GET);
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.uri, "/ws?room=1");
        assert_eq!(p.headers[header::HOST], "chat.example.com");
        assert_eq!(p.headers[header::UPGRADE], "websocket");
        assert_eq!(p.headers[header::CONNECTION], "upgrade");
        assert_eq!(p.headers[header::SEC_WEBSOCKET_KEY].len(), 24);
        assert_eq!(p.headers[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn other_connects_are_refused() {
        let plain = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .unwrap();
        assert_eq!(
            normalize(&mut parts(plain)).unwrap_err(),
            Refusal::BadUpgrade
        );
        let mut other = Request::builder()
            .method(Method::CONNECT)
            .uri("https://example.com/x")
            .body(())
            .unwrap();
        other
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static("webtransport"));
        assert_eq!(
            normalize(&mut parts(other)).unwrap_err(),
            Refusal::BadUpgrade
        );
    }

    #[test]
    fn plain_requests_keep_their_method() {
        let req = Request::builder()
            .method(Method::POST)
            .version(Version::HTTP_2)
            .uri("https://app.example.com/socket.io/?EIO=4")
            .body(())
            .unwrap();
        let mut p = parts(req);
        normalize(&mut p).unwrap();
        assert_eq!(p.method, Method::POST);
        assert_eq!(p.uri, "/socket.io/?EIO=4");
        assert_eq!(p.headers[header::HOST], "app.example.com");
        assert!(!p.headers.contains_key(header::UPGRADE));
    }
}
