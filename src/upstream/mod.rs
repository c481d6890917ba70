//! Connecting to a route's upstream and completing its WebSocket handshake *before* the
//! client gets its 101 (SPEC §3), so upstream refusals reach the client as HTTP.
//!
//! Owns the connect loop (the key's backend, then failover in rendezvous order before any
//! 101), the forwarded request headers, and the checks on the upstream's 101. Pools,
//! hashing, health, DNS, sticky keys, the HTTP/1.1 wire and the backend stream live in
//! the submodules, whose dependencies go one way: `pool` → `health` → `stream`,
//! `http1`; `pool` → `hash`, `resolve`, `idle`; `plain` (plain HTTP requests on `http:
//! proxy` routes) → `pool`, `idle`, `stream`; `hash`, `resolve`, `http1`, `idle` and
//! `stream` are leaves within `upstream`.

pub mod hash;
mod health;
pub mod http1;
mod idle;
pub mod plain;
pub mod pool;
pub mod resolve;
pub mod sticky;
mod stream;

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, request};
use tokio::io::AsyncWriteExt;

use crate::admission::client_ip::ip_text;
use crate::config::Upstream;
use crate::http_util::has_token;
use crate::outcome::Refusal;
use http1::Field;
use pool::{Lease, Pool};
pub use stream::UpstreamStream;
use stream::open;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1, and the
/// non-standard `Proxy-Connection` old clients send), besides those the `Connection`
/// header names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

// Built at compile time: `from_static` at run time validates the name on every call.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers the proxy sets itself (`X-Forwarded-For`, `-Proto`, `-Host`, `X-Request-Id`):
/// a client's copies are dropped so they cannot be forged, and so is every other
/// `X-Forwarded-*` (`-Port`, `-Prefix`, ...), which upstreams read as the proxy's word too.
fn is_proxy_set(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-forwarded-") || name == X_REQUEST_ID
}

/// Facts about the client connection that go into the upstream request.
pub struct Forwarded<'a> {
    pub client_ip: std::net::IpAddr,
    pub tls: bool,
    pub conn_id: &'a str,
}

/// An upstream WebSocket ready to relay.
pub struct Connected {
    pub stream: UpstreamStream,
    /// Bytes the upstream sent right after its 101 (already read by the HTTP layer).
    pub early: Bytes,
    pub backend: String,
    /// The 101 to give the client: the upstream's headers minus hop-by-hop ones.
    pub response_headers: HeaderMap,
    /// Negotiated `Sec-WebSocket-Extensions` ("" when none).
    pub extensions: String,
    /// Counts this connection on its backend; hold it for the whole relay.
    pub lease: Lease,
}

/// Why the upstream handshake failed.
pub enum Failure {
    /// A refusal of the proxy's own (502/504): the backend (empty when none was tried)
    /// and, when one failed, what went wrong with it (the OS error, the TLS alert, the
    /// broken answer), for the access log's `upstream_error`.
    Proxy(Refusal, String, Option<String>),
    /// The upstream answered with a status other than 101: relayed as it is.
    Status(Response<RefusalBody>, String),
}

/// The body of an upstream's refusal, read from the backend as the client takes it.
pub type RefusalBody = http1::RefusalBody<UpstreamStream>;

/// Backends tried per client handshake: the key's own, then the next ones in its
/// rendezvous order (each with the full `connect_timeout`), before the client gets a
/// 502/504. Three bounds the wait at 3 × `connect_timeout` while riding out one or two
/// dead backends that health checks have not caught yet.
pub const MAX_ATTEMPTS: usize = 3;

/// What the upstream request says beyond the client's own headers.
pub struct Target<'a> {
    pub upstream: &'a Upstream,
    /// Host as the client sent it (port included), for `X-Forwarded-Host`.
    pub host: &'a str,
    /// Path and query to send upstream.
    pub path: &'a str,
    /// The client's subprotocol offers that may reach the upstream, comma-joined.
    pub protocols: Option<&'a str>,
}

/// Connects and upgrades to the key's backend, failing over (before any 101) to the next
/// backends in rendezvous order when a connect or handshake fails. With `max_pending`,
/// each attempt first waits (in arrival order) to be let ahead — at most `max_pending`
/// are — and connects (TCP, TLS) while the handshakes in flight finish, then waits for
/// one of the backend's `max_pending` places, which it holds only from its request to
/// the answer. Connecting, and request to answer, have the upstream's `connect_timeout`
/// between them. Only connect and TLS failures count against a backend's health
/// (passive ejection); every failure counts in its `connect_errors`.
///
/// With `max_pending` set, the handshake may wait up to `queue_timeout` in all: for a
/// place, and — when no backend of the key could be reached (or none is eligible) — for
/// a backend to come back, then it starts over from the key's own backend. A backend
/// restart shorter than `queue_timeout` is then a wait, not an error. Past
/// `queue_timeout` the client gets 503 `queue_timeout` (never a failover: the key's
/// backend is where it belongs).
pub async fn connect(
    req: &request::Parts,
    target: &Target<'_>,
    fwd: &Forwarded<'_>,
    pool: &Pool,
    key: &[u8],
) -> Result<Connected, Failure> {
    let upstream = target.upstream;
    let queue_until = tokio::time::Instant::now() + upstream.queue_timeout;
    let ticket = pool.ticket();
    let queue_timeout = |backend: &str| {
        let refusal = Refusal::QueueTimeout {
            retry_after_secs: retry_after(upstream.queue_timeout),
        };
        Failure::Proxy(refusal, backend.to_owned(), None)
    };
    // Each round after the first needs a backend to have come back, and all end at
    // `queue_until`; the count is a backstop.
    for _ in 0..MAX_ROUNDS {
        let generation = pool.back_generation();
        let queue = Queued {
            pool,
            ticket: &ticket,
            until: queue_until,
        };
        let last = match try_backends(req, target, fwd, key, &queue).await {
            Round::Done(result) => return result,
            Round::QueueTimeout(backend) => return Err(queue_timeout(&backend)),
            Round::Unreachable(last) => last,
        };
        if upstream.max_pending == 0 {
            return Err(last);
        }
        // A backend coming back is told at once when it was suspect (probed); one that
        // failed fewer times than `unhealthy_after` is not probed, so look again soon.
        let now = tokio::time::Instant::now();
        if now >= queue_until {
            return Err(queue_timeout(""));
        }
        let _ = pool
            .wait_back(&ticket, key, generation, queue_until.min(now + LOOK_AGAIN))
            .await;
    }
    Err(queue_timeout(""))
}

/// Rounds of [`connect`] before it gives up anyway (a backstop: `queue_until` ends them).
const MAX_ROUNDS: usize = 4096;

/// While the key's backends cannot be reached, how often a queued handshake tries again
/// when no backend was told to be back.
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(250);

/// How one round of trying the key's backends ended.
enum Round {
    /// Connected, or a failure that is the client's answer.
    Done(Result<Connected, Failure>),
    /// Waited for a place past `queue_timeout` (at this backend).
    QueueTimeout(String),
    /// No backend could be reached, or none was eligible: the last failure.
    Unreachable(Failure),
}

/// A handshake's standing in its upstream's queues.
struct Queued<'a> {
    pool: &'a Pool,
    ticket: &'a pool::queue::Ticket,
    /// When `queue_timeout` ends it.
    until: tokio::time::Instant,
}

async fn try_backends(
    req: &request::Parts,
    target: &Target<'_>,
    fwd: &Forwarded<'_>,
    key: &[u8],
    queue: &Queued<'_>,
) -> Round {
    let upstream = target.upstream;
    let pool = queue.pool;
    let mut candidates = pool.candidates(key, upstream.bounded_load);
    let mut last = Failure::Proxy(Refusal::NoBackend, String::new(), None);
    let mut reached = false;
    for _ in 0..MAX_ATTEMPTS {
        let Some(lease) = candidates.next() else {
            break;
        };
        let backend = lease.backend().clone();
        let ahead = match pool.wait_ahead(&backend, queue.ticket, queue.until).await {
            Ok(ahead) => ahead,
            // Waited past `queue_timeout`, or the backend's queue is full: 503 at once.
            Err(_) => return Round::QueueTimeout(backend.identity.clone()),
        };
        // Set once TCP (and TLS) is up and the request goes out. A failure before is the
        // backend's, and passive health counts it; a failure after (no answer, a close
        // without one, a broken 101, a timeout) may be this request's doing, so it never
        // counts towards ejection: else a few bad requests could take every backend out.
        let sent = AtomicBool::new(false);
        let failure = match handshake(req, target, fwd, lease, &sent, (queue, ahead)).await {
            Ok(connected) => {
                pool.connect_succeeded(&backend);
                return Round::Done(Ok(connected));
            }
            // The backend answered: it is reachable, and its answer is the client's.
            Err(f @ Failure::Status(..)) => {
                pool.connect_succeeded(&backend);
                return Round::Done(Err(f));
            }
            // Our own request could not be built: no other backend would take it either.
            Err(f @ Failure::Proxy(Refusal::BadUpgrade, ..)) => return Round::Done(Err(f)),
            // Connected, then waited for a place past `queue_timeout`.
            Err(Failure::Proxy(Refusal::QueueTimeout { .. }, b, _)) => {
                return Round::QueueTimeout(b);
            }
            Err(f) => f,
        };
        if let Failure::Proxy(_, _, Some(error)) = &failure {
            warn_backend_failure(&upstream.name, &backend.identity, error);
        }
        let sent = sent.load(Ordering::Acquire);
        if sent {
            pool.exchange_failed(&backend);
            // Reached: whatever went wrong is not the backend being away.
            reached = true;
        } else {
            pool.connect_failed(&backend);
        }
        tracing::debug!(upstream = %upstream.name, backend = %backend.identity, sent, "backend failed; trying the key's next backend");
        last = failure;
    }
    if reached {
        Round::Done(Err(last))
    } else {
        Round::Unreachable(last)
    }
}

/// `Retry-After` for a queue timeout: spread uniformly over 1 ..= `queue_timeout` seconds
/// (at least 1 ..= 2), so the refused clients do not all come back in the same second.
pub fn retry_after(queue_timeout: std::time::Duration) -> u64 {
    let window = queue_timeout.as_secs().max(2);
    1 + ((crate::ids::jitter() * window as f64) as u64).min(window - 1)
}

/// One attempt on one backend: connect (TCP, TLS) while only let ahead, then wait for a
/// place, then request → 101 holding it. `connect_timeout` bounds connecting plus
/// request → answer (the wait for the place is `queue_timeout`'s). A wait for the place
/// past `queue_timeout` is a `Refusal::QueueTimeout`.
async fn handshake(
    req: &request::Parts,
    target: &Target<'_>,
    fwd: &Forwarded<'_>,
    lease: Lease,
    sent: &AtomicBool,
    (queue, ahead): (&Queued<'_>, pool::Turn),
) -> Result<Connected, Failure> {
    let b = lease.backend().clone();
    let backend = b.identity.as_str();
    let fail = |r: Refusal, error: String| Failure::Proxy(r, backend.to_owned(), Some(error));
    let connect_timeout = target.upstream.connect_timeout;
    let timed_out = || {
        fail(
            Refusal::UpstreamTimeout,
            format!(
                "no 101 within connect_timeout ({})",
                crate::config::units::fmt_duration(connect_timeout)
            ),
        )
    };
    let head = request_head(req, target, fwd).map_err(|why| {
        tracing::debug!(backend, why, "upstream request cannot be built");
        Failure::Proxy(Refusal::BadUpgrade, backend.to_owned(), None)
    })?;
    let tls = target.upstream.tls.as_ref();
    let started = tokio::time::Instant::now();
    let opened = tokio::time::timeout(connect_timeout, open(b.addr, &b.host, tls)).await;
    let mut stream = opened.map_err(|_| timed_out())?.map_err(|e| {
        tracing::debug!(backend, error = %e, "upstream connect failed");
        fail(Refusal::UpstreamConnect, format!("connect: {e}"))
    })?;
    let left = connect_timeout.saturating_sub(started.elapsed());
    let Some(turn) = queue
        .pool
        .wait_place(ahead, queue.ticket, queue.until)
        .await
    else {
        let refusal = Refusal::QueueTimeout {
            retry_after_secs: retry_after(target.upstream.queue_timeout),
        };
        return Err(Failure::Proxy(refusal, backend.to_owned(), None));
    };
    let mut buf = BytesMut::new();
    // While it waited for its place the backend may have closed the connection (it was
    // restarted, an idle timeout): found before anything is sent, it is made again.
    if closed_meanwhile(&mut stream, &mut buf).await {
        let opened = tokio::time::timeout(left, open(b.addr, &b.host, tls)).await;
        stream = opened.map_err(|_| timed_out())?.map_err(|e| {
            tracing::debug!(backend, error = %e, "upstream connect failed");
            fail(Refusal::UpstreamConnect, format!("connect: {e}"))
        })?;
    }
    sent.store(true, Ordering::Release);
    let mut flight = InFlight {
        stream: Some(stream),
        turn: Some(turn),
        until: tokio::time::Instant::now() + left,
    };
    let answer = match &mut flight.stream {
        Some(stream) => {
            let answer = async {
                stream.write_all(&head).await?;
                stream.flush().await?;
                http1::read_head(stream, &mut buf).await
            };
            tokio::time::timeout(left, answer).await
        }
        None => return Err(timed_out()),
    };
    // The place is held until the answer is handled, as before the client could leave.
    let (Some(stream), _turn) = flight.land() else {
        return Err(timed_out());
    };
    let answer = answer.map_err(|_| timed_out())?.map_err(|e| {
        tracing::debug!(backend, error = %e, "upstream handshake failed");
        fail(Refusal::UpstreamConnect, format!("upgrade request: {e}"))
    })?;
    if answer.status != StatusCode::SWITCHING_PROTOCOLS {
        let refusal = http1::refusal(answer, stream, buf).map_err(|e| {
            tracing::debug!(backend, error = %e, "upstream refusal cannot be relayed");
            fail(
                Refusal::UpstreamConnect,
                format!("refusal not relayable: {e}"),
            )
        })?;
        return Err(Failure::Status(refusal, backend.to_owned()));
    }
    let extensions = check_101(req, target, &answer.headers).map_err(|why| {
        tracing::warn!(backend, why, "upstream sent an invalid 101");
        fail(Refusal::UpstreamConnect, format!("invalid 101: {why}"))
    })?;
    Ok(Connected {
        stream,
        early: buf.freeze(),
        backend: backend.to_owned(),
        response_headers: end_to_end(&answer.headers),
        extensions,
        lease,
    })
}

/// An upgrade request with the backend, and its `max_pending` place. Dropped before it
/// landed (the client went away meanwhile), it hands both to a task that waits for the
/// backend's answer head (or `until`) before closing and giving the place back: the
/// backend is still working on that request, so the next one would make `max_pending` + 1.
struct InFlight {
    stream: Option<UpstreamStream>,
    turn: Option<pool::Turn>,
    until: tokio::time::Instant,
}

impl InFlight {
    /// The answer (or a failure) is in: the connection, and the place to give back.
    fn land(mut self) -> (Option<UpstreamStream>, Option<pool::Turn>) {
        (self.stream.take(), self.turn.take())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let turn = self.turn.take();
        let until = self.until;
        runtime.spawn(async move {
            let mut buf = BytesMut::new();
            let _ = tokio::time::timeout_at(until, http1::read_head(&mut stream, &mut buf)).await;
            drop(turn);
        });
    }
}

/// Whether the peer closed `stream` (or it failed) before anything was sent on it: one
/// read, without waiting. Bytes a backend sent unasked are kept in `buf` (they will be
/// read as its answer).
async fn closed_meanwhile(stream: &mut UpstreamStream, buf: &mut BytesMut) -> bool {
    use std::pin::Pin;
    use std::task::Poll;
    use tokio::io::{AsyncRead, ReadBuf};
    let mut probe = [0u8; 256];
    // One poll, no timer: a timer (even an elapsed one) costs a wake-up of its own.
    let read = std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut probe);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(r) => Poll::Ready(Some(r.map(|()| rb.filled().len()))),
        }
    })
    .await;
    match read {
        None => false,
        Some(Ok(0) | Err(_)) => true,
        Some(Ok(n)) => {
            buf.extend_from_slice(&probe[..n]);
            false
        }
    }
}

/// How long a backend's failures stay out of stderr after one was written there (the
/// access log's `upstream_error` has every one).
const BACKEND_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes a backend's failure to stderr, at most once per [`BACKEND_WARN_EVERY`] per
/// backend, so the first failure of a backend is always seen and a dead one does not
/// flood the log.
pub fn warn_backend_failure(upstream: &str, backend: &str, error: &str) {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    use std::time::Instant;
    static LAST: LazyLock<Mutex<HashMap<String, Instant>>> = LazyLock::new(Default::default);
    let Ok(mut last) = LAST.lock() else {
        return;
    };
    let now = Instant::now();
    if last
        .get(backend)
        .is_some_and(|t| now.duration_since(*t) < BACKEND_WARN_EVERY)
    {
        return;
    }
    // Bounded: backends come from the config (and DNS, at most 256 per name).
    if last.len() >= 4096 {
        last.retain(|_, t| now.duration_since(*t) < BACKEND_WARN_EVERY);
    }
    last.insert(backend.to_owned(), now);
    tracing::warn!(
        upstream,
        backend,
        error,
        "backend failed (its later failures within 10 s are only in the access log's upstream_error)"
    );
}

/// The request head sent upstream, in one piece: the client's end-to-end headers, minus
/// the ones the proxy sets, plus the upgrade and `X-Forwarded-*` headers (SPEC §3).
fn request_head(
    req: &request::Parts,
    target: &Target<'_>,
    fwd: &Forwarded<'_>,
) -> Result<Vec<u8>, &'static str> {
    let client_bytes: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let named = connection_named(&req.headers);
    // `Host` first, always: the host the route was chosen by (the `Host` header or an
    // absolute-form target's authority), even when the client sent no `Host` line.
    let host = [("host", Field::Text(target.host))];
    let client = req
        .headers
        .iter()
        .filter(|&(name, _)| {
            let ours = is_proxy_set(name)
                || name == header::HOST
                || name == header::SEC_WEBSOCKET_PROTOCOL;
            !ours && !is_hop_by_hop(name, &named)
        })
        .map(|(name, value)| (name.as_str(), Field::Valid(value.as_bytes())));
    let protocols = target
        .protocols
        .map(|p| ("sec-websocket-protocol", Field::Text(p)));
    let client_ip = ip_text(fwd.client_ip);
    let proto: &[u8] = if fwd.tls { b"https" } else { b"http" };
    let own = [
        ("connection", Field::Valid(b"Upgrade")),
        ("upgrade", Field::Valid(b"websocket")),
        ("x-forwarded-for", Field::Text(&client_ip)),
        ("x-forwarded-proto", Field::Valid(proto)),
        ("x-forwarded-host", Field::Text(target.host)),
        ("x-request-id", Field::Text(fwd.conn_id)),
    ];
    let headers = host.into_iter().chain(client).chain(protocols).chain(own);
    http1::get_head(target.path, headers, 192 + client_bytes)
}

/// The header names listed in `Connection` (hop-by-hop for this request only), except
/// `Host` and the WebSocket handshake's own headers: `Connection: Upgrade, Host` must not
/// make the upstream request lose its `Host`, nor `Sec-WebSocket-Key` its key (`Upgrade`
/// and `Connection` are always the proxy's own).
fn connection_named(src: &HeaderMap) -> Vec<HeaderName> {
    src.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| n != header::HOST && !n.as_str().starts_with("sec-websocket-"))
        .collect()
}

fn is_hop_by_hop(name: &HeaderName, named: &[HeaderName]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || named.contains(name)
}

/// Copies headers except hop-by-hop ones and those the `Connection` header names.
pub fn end_to_end(src: &HeaderMap) -> HeaderMap {
    let named = connection_named(src);
    let mut out = HeaderMap::with_capacity(src.len());
    for (name, value) in src {
        if !is_hop_by_hop(name, &named) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Checks the upstream's 101 against what the client asked for (RFC 6455 §4.1) and
/// returns the negotiated extensions.
fn check_101(
    req: &request::Parts,
    target: &Target<'_>,
    h: &HeaderMap,
) -> Result<String, &'static str> {
    if !has_token(h, &header::UPGRADE, "websocket") || !has_token(h, &header::CONNECTION, "upgrade")
    {
        return Err("missing Upgrade/Connection");
    }
    let key = req
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let accept = tungstenite::handshake::derive_accept_key(key);
    if h.get(header::SEC_WEBSOCKET_ACCEPT)
        .map(HeaderValue::as_bytes)
        != Some(accept.as_bytes())
    {
        return Err("wrong Sec-WebSocket-Accept");
    }
    if let Some(chosen) = h.get(header::SEC_WEBSOCKET_PROTOCOL) {
        let chosen = chosen.to_str().map_err(|_| "bad subprotocol")?.trim();
        let offered = target.protocols.unwrap_or("");
        if !offered.split(',').any(|o| o.trim() == chosen) {
            return Err("subprotocol not offered");
        }
    }
    let offered: Vec<String> = req
        .headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|e| ext_name(e).to_ascii_lowercase())
        .collect();
    let mut accepted = Vec::new();
    for v in h.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let v = v.to_str().map_err(|_| "bad extensions")?;
        for ext in v.split(',').filter(|e| !e.trim().is_empty()) {
            if !offered
                .iter()
                .any(|o| o.eq_ignore_ascii_case(ext_name(ext)))
            {
                return Err("extension not offered");
            }
        }
        accepted.push(v.to_owned());
    }
    Ok(accepted.join(", "))
}

fn ext_name(ext: &str) -> &str {
    ext.split(';').next().unwrap_or("").trim()
}
