//! The HTTP/1.1 driver of the upgrade (hyper's server): reads the one request of a
//! connection within its deadline, asks [`admit`](super::admit::admit) for the decision,
//! completes the upstream handshake, and answers 101, the proxy's refusal, or the
//! upstream's own answer relayed; each refusal is one response and one log line.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, request};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::admit::{Admission, EarlyPermit, Limiters, admit};
use super::facts::{ConnInfo, Facts, request_id};
use super::session::{Established, RelayPhase, run_relay};
use crate::admission::client_ip::ip_text;
use crate::admission::pending::HandshakeSlot;
use crate::config::Config;
use crate::ids;
use crate::observe::access_log::TlsInfo;
use crate::observe::access_log::{Record, now_rfc3339};
use crate::outcome::Refusal;
use crate::relay::Settings;
use crate::shared::Shared;
use crate::upstream::{self, Connected, Failure, Forwarded};

pub(super) mod plain;

/// Largest request head hyper will buffer (hyper's floor is 8 KiB); beyond → 431.
const MAX_HEAD: usize = 16 * 1024;

/// What the client gets: the proxy's own answer, an upstream's refusal of an upgrade, or
/// an upstream's answer to a plain request (`http: proxy`).
pub(super) type Body = Either<Full<Bytes>, Either<upstream::RefusalBody, plain::Relayed>>;

/// A connection's `max_pending_handshakes` slot, shown in `wsgate_handshakes_pending`
/// while held: from accept until its handshake phase ends, or until its first plain
/// request (`http: proxy`) is admitted — a kept-alive connection between requests, or
/// waiting on a long poll, is not a handshake in progress.
pub struct InHandshake {
    _slot: Option<HandshakeSlot>,
    gauge: Gauge,
}

impl InHandshake {
    pub fn new(slot: Option<HandshakeSlot>, gauge: Gauge) -> InHandshake {
        gauge.inc();
        InHandshake { _slot: slot, gauge }
    }
}

impl Drop for InHandshake {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A connection as the listener hands it over: accepted, past any PROXY header and TLS
/// handshake, judged against the caps that apply at accept.
pub struct Accepted {
    pub pending: InHandshake,
    pub shared: Arc<Shared>,
    /// The config of this connection for its whole life: a reload affects new ones only.
    pub config: Arc<Config>,
    pub listener: Arc<str>,
    /// The TCP peer, or the client a PROXY header named.
    pub peer: SocketAddr,
    pub started: Instant,
    /// `limits.max_connections` was exceeded at accept.
    pub over_capacity: bool,
    pub early_permit: EarlyPermit,
    pub tls: Option<TlsInfo>,
}

/// Per-connection state shared between the hyper service and the connection task.
pub(super) struct Conn {
    pub(super) info: ConnInfo,
    config: Arc<Config>,
    over_capacity: bool,
    /// The request head has arrived: `handshake_timeout` no longer applies.
    head_seen: AtomicBool,
    established: Mutex<Option<Box<Established>>>,
    /// The per-IP count taken at accept, until admission takes it over (and given back
    /// by a plain request, for the requests that follow on the connection).
    early_permit: Mutex<EarlyPermit>,
    /// Plain HTTP exchanges in progress (`http: proxy`): the head deadline waits.
    exchanges: AtomicUsize,
    /// When the exchange in progress must be over (`http_timeout`), client's reading
    /// included: a client that stops reading its answer is cut then.
    exchange_until: Mutex<Option<Instant>>,
    /// The connection was cut because its exchange outlived `http_timeout`.
    cut: AtomicBool,
    /// When the last plain exchange ended, while no new head has arrived: the connection
    /// is kept alive and waits for its next request within `handshake_timeout`.
    idle_since: Mutex<Option<Instant>>,
    /// Requests handed to the service so far.
    served: AtomicU32,
    /// The `max_pending_handshakes` slot, until the handshake phase ends or a plain
    /// request is admitted.
    pending: Mutex<Option<InHandshake>>,
}

impl Conn {
    fn new(a: Accepted) -> Conn {
        let info = ConnInfo {
            shared: a.shared,
            listener: a.listener,
            peer: a.peer,
            conn_id: ids::next(),
            started: a.started,
            tls: a.tls,
            http: "1.1",
        };
        let mut conn = Conn::for_stream(info, a.config, a.over_capacity, a.early_permit);
        conn.pending = Mutex::new(Some(a.pending));
        // Until hyper hands the head over, its own answers are held back (`OwnRefusals`).
        conn.head_seen = AtomicBool::new(false);
        conn
    }

    /// One request's state with nothing of HTTP/1.1's connection around it: a stream of
    /// an HTTP/2 connection (whose driver holds the handshake slot).
    pub(super) fn for_stream(
        info: ConnInfo,
        config: Arc<Config>,
        over_capacity: bool,
        early_permit: EarlyPermit,
    ) -> Conn {
        Conn {
            info,
            config,
            over_capacity,
            head_seen: AtomicBool::new(true),
            established: Mutex::new(None),
            early_permit: Mutex::new(early_permit),
            exchanges: AtomicUsize::new(0),
            exchange_until: Mutex::new(None),
            cut: AtomicBool::new(false),
            idle_since: Mutex::new(None),
            served: AtomicU32::new(0),
            pending: Mutex::new(None),
        }
    }

    /// What an admitted upgrade left for its relay.
    pub(super) fn take_established(&self) -> Option<Box<Established>> {
        self.established.lock().ok()?.take()
    }

    /// Gives the `max_pending_handshakes` slot back.
    pub(super) fn release_pending(&self) {
        let place = self.pending.lock().ok().and_then(|mut p| p.take());
        drop(place);
    }

    /// A plain request gives the per-IP count back to the connection.
    pub(super) fn keep_permit(&self, permit: EarlyPermit) {
        if let Ok(mut slot) = self.early_permit.lock() {
            *slot = permit;
        }
    }

    pub(super) fn exchange_started(&self, until: Instant) {
        if let Ok(mut u) = self.exchange_until.lock() {
            *u = Some(until);
        }
        self.exchanges.fetch_add(1, Ordering::AcqRel);
    }

    /// When the exchange in progress must be over.
    fn exchange_until(&self) -> Option<Instant> {
        *self.exchange_until.lock().ok()?
    }

    /// The exchange outlived its bound and is being cut (its log line says
    /// `slow_consumer`).
    pub(super) fn mark_cut(&self) {
        self.cut.store(true, Ordering::Release);
    }

    /// This connection was cut for an exchange past `http_timeout`.
    pub(super) fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    pub(super) fn exchange_ended(&self) {
        if let Ok(mut idle) = self.idle_since.lock() {
            *idle = Some(Instant::now());
        }
        self.exchanges.fetch_sub(1, Ordering::AcqRel);
    }

    /// When a kept-alive connection's wait for its next head ends, if it is waiting.
    fn idle_until(&self) -> Option<Instant> {
        let since = (*self.idle_since.lock().ok()?)?;
        Some(since + self.config.limits.handshake_timeout)
    }
}

/// The HTTP upgrade over a plain or TLS client stream accepted as `accepted` says;
/// returns the relay phase, in its own allocation, when the upgrade succeeded. The
/// handshake's state (hyper's connection, its buffers, the timers) is freed before the
/// relay starts. `deadline` bounds the wait for the request head.
pub async fn serve<S>(accepted: Accepted, stream: S, deadline: Instant) -> Option<RelayPhase>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn::new(accepted));
    let handshaken = handshake(&conn, stream, deadline).await;
    conn.release_pending();
    let (client, early, est) = handshaken?;
    Some(Box::pin(run_relay(&conn.info, client, early, est)))
}

/// Serves the one HTTP request of the connection. Returns the client socket, any bytes
/// read past the head, and what the relay needs, when the upgrade succeeded.
async fn handshake<S>(
    conn: &Arc<Conn>,
    stream: S,
    deadline: Instant,
) -> Option<(S, Bytes, Established)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    // Keep-alive stays on: every response of ours says `Connection: close`, and hyper would
    // otherwise append `close` to the 101 as well.
    http.header_read_timeout(None).max_buf_size(MAX_HEAD);
    let stream = OwnRefusals::new(stream, conn.clone());
    let mut http = http.serve_connection(TokioIo::new(stream), Service(conn.clone()));
    let deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(deadline);
    let mut answering = false;
    let served = loop {
        tokio::select! {
            r = poll_fn(|cx| http.poll_without_shutdown(cx)) => break Some(r),
            _ = &mut deadline => {
                if conn.exchanges.load(Ordering::Acquire) > 0 {
                    // A plain exchange must be over by its `http_timeout`, the client's
                    // reading included: one that stopped reading would otherwise hold
                    // this connection, a backend connection and its counts for ever
                    // (its answer body is not even polled while the socket is full).
                    let now = Instant::now();
                    match conn.exchange_until() {
                        Some(until) if now >= until => {
                            conn.cut.store(true, Ordering::Release);
                            tracing::debug!(conn_id = %conn.info.conn_id, "plain exchange past http_timeout; closing");
                            return None;
                        }
                        Some(until) => deadline.as_mut().reset(until),
                        None => deadline.as_mut().reset(now + conn.config.limits.handshake_timeout),
                    }
                    continue;
                }
                if let Some(until) = conn.idle_until() {
                    // Kept alive after a plain exchange: the next head within the bound.
                    if Instant::now() < until {
                        deadline.as_mut().reset(until);
                        continue;
                    }
                    tracing::debug!(conn_id = %conn.info.conn_id, "kept-alive connection idle; closing");
                    return None;
                }
                if answering {
                    // The answer (an upstream's refusal body, relayed) never finished.
                    tracing::debug!(conn_id = %conn.info.conn_id, "response not sent in time; closing");
                    return None;
                }
                if !conn.head_seen.load(Ordering::Acquire) {
                    break None;
                }
                // The head is in: what is left (upstream connects with failover, then
                // the answer) gets its own bound, so a trickling body cannot hold the task.
                answering = true;
                deadline.as_mut().reset(Instant::now() + answer_budget(&conn.config));
            }
        }
    };
    match served {
        None => {
            let parts = http.into_parts();
            let partial_head = !parts.read_buf.is_empty();
            if partial_head {
                let answer = Refusal::HandshakeTimeout.raw_response();
                answer_and_close(parts.io.into_inner().into_inner(), &answer).await;
            }
            let status = if partial_head { 408 } else { 0 };
            conn.log_reject(&Facts::default(), Refusal::HandshakeTimeout, status, None);
            None
        }
        Some(Err(e)) => {
            if e.is_parse() || e.is_parse_too_large() {
                let refusal = if e.is_parse_too_large() {
                    Refusal::HeadTooLarge
                } else {
                    Refusal::BadUpgrade
                };
                // After a first request, hyper's own answer went out already.
                if conn.served.load(Ordering::Acquire) == 0 {
                    let io = http.into_parts().io.into_inner().into_inner();
                    answer_and_close(io, &refusal.raw_response()).await;
                }
                let status = refusal.status().as_u16();
                conn.log_reject(&Facts::default(), refusal, status, None);
            } else {
                tracing::debug!(conn_id = %conn.info.conn_id, error = %e, "connection ended during the handshake");
            }
            None
        }
        Some(Ok(())) => {
            let est = conn.established.lock().ok().and_then(|mut e| e.take())?;
            let parts = http.into_parts();
            Some((parts.io.into_inner().into_inner(), parts.read_buf, *est))
        }
    }
}

/// Sends an answer of the proxy's own to a request hyper never handed over, then closes
/// so that it is not lost to a reset: half-close, and read what the client still sends
/// (the rest of a head too large, say) until it closes. Within a second and 64 KiB; past
/// either, the socket is just dropped.
async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, answer: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(answer).await?;
        io.flush().await?;
        io.shutdown().await?;
        let mut sink = [0u8; 512];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match io.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Time allowed after the request head for the rest of the handshake: up to three
/// upstream attempts, then writing the answer (a relayed refusal body included).
fn answer_budget(config: &Config) -> Duration {
    let connect = config
        .upstreams
        .values()
        .map(|u| u.connect_timeout)
        .max()
        .unwrap_or_default();
    let queued = config
        .upstreams
        .values()
        .filter(|u| u.max_pending > 0)
        .map(|u| u.queue_timeout)
        .max()
        .unwrap_or_default();
    connect * 3 + queued + config.limits.handshake_timeout
}

impl Conn {
    pub(super) async fn handle<B: plain::ClientBody>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Response<Body> {
        let started = Instant::now();
        self.head_seen.store(true, Ordering::Release);
        self.served.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut idle) = self.idle_since.lock() {
            *idle = None;
        }
        let (parts, body) = req.into_parts();
        let mut facts = Facts::from_parts(&parts);
        facts.request_id = request_id(&parts.headers);
        let decided = self.decide(&mut facts, &parts);
        let admission = match decided {
            Ok(a) => a,
            Err(refusal) => {
                if let Refusal::Token { error } = refusal {
                    tracing::debug!(conn_id = %self.info.conn_id, error, "token refused");
                }
                return self.refuse(&facts, refusal, None);
            }
        };
        if admission.upgrade.plain {
            return plain::proxy(self.clone(), facts, admission, body, started).await;
        }
        drop(body);
        // The fleet's caps and rate (SPEC §10): one round trip, at most 50 ms, after every
        // per-process check passed.
        let fleet_permit = match &self.info.shared.fleet {
            Some(fleet) => {
                let ip = permit_ip(&admission, &self.config);
                match fleet.admit(ip, admission.subject.as_ref()).await {
                    Ok(p) => p,
                    Err(refusal) => return self.refuse(&facts, refusal, None),
                }
            }
            None => None,
        };
        let Admission {
            upgrade,
            upstream_parts,
            permit,
            subject_permit,
            jti,
            client_ip,
            sticky_key,
            expires_at,
            answer_bearer,
            subject: _,
        } = admission;
        let route = upgrade.route;
        let fwd = Forwarded {
            client_ip,
            tls: self.info.tls.is_some(),
            conn_id: &self.info.conn_id,
        };
        let Some(pool) = self.info.shared.pools.get(&route.upstream.name) else {
            return self.refuse(&facts, Refusal::NoBackend, None);
        };
        if route.upstream.max_pending > 0 {
            // It may wait in the backend's queue up to `queue_timeout`: admitted, it is
            // no longer a handshake in progress for `max_pending_handshakes`, which would
            // otherwise let one dead upstream hold every slot and stall the listeners.
            self.release_pending();
        }
        match upstream::connect(&upstream_parts, &upgrade.target(), &fwd, &pool, &sticky_key).await
        {
            Ok(up) => {
                let Connected {
                    stream,
                    early,
                    backend,
                    mut response_headers,
                    extensions,
                    lease,
                } = up;
                let mut settings = Settings::new(&route.limits, &self.config.keepalive, extensions);
                settings.expires_at = expires_at;
                settings.inspect_deflate = route.deflate == crate::config::Deflate::Inspect;
                if answer_bearer && !response_headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
                    response_headers.insert(
                        header::SEC_WEBSOCKET_PROTOCOL,
                        HeaderValue::from_static("bearer"),
                    );
                }
                if let Ok(mut slot) = self.established.lock() {
                    *slot = Some(Box::new(Established {
                        upstream: stream,
                        upstream_early: early,
                        backend,
                        settings,
                        info: facts,
                        jti,
                        _permit: permit,
                        _subject_permit: subject_permit,
                        _fleet_permit: fleet_permit,
                        _lease: lease,
                    }));
                }
                switching_protocols(response_headers)
            }
            Err(Failure::Proxy(r, backend, error)) => {
                let backend = Some(backend.as_str()).filter(|b| !b.is_empty());
                self.log_reject_with(&facts, r, r.status().as_u16(), backend, error.as_deref());
                self.answer(&facts, r)
            }
            Err(Failure::Status(resp, backend)) => {
                let status = resp.status().as_u16();
                self.log_reject(
                    &facts,
                    Refusal::UpstreamStatus(status),
                    status,
                    Some(&backend),
                );
                let (mut head, body) = resp.into_parts();
                head.headers = upstream::end_to_end(&head.headers);
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Response::from_parts(head, Either::Right(Either::Left(body)))
            }
        }
    }

    /// The admission decision, with this connection's view of the process state.
    fn decide<'c>(
        &'c self,
        facts: &mut Facts,
        parts: &request::Parts,
    ) -> Result<Admission<'c>, Refusal> {
        let rate = self.info.shared.handshake_rate.load();
        let limiters = Limiters {
            draining: self.info.shared.registry.past_drain_window(),
            over_capacity: self.over_capacity,
            per_ip: &self.info.shared.per_ip,
            per_subject: &self.info.shared.per_subject,
            handshake_rate: &rate,
            revocations: &*self.info.shared.revocations,
        };
        let mut early = self.early_permit.lock();
        // Poisoned (a panic while it was held): refuse rather than count afresh.
        let mut fallback = EarlyPermit::OverCap;
        let early = match early.as_deref_mut() {
            Ok(e) => e,
            Err(_) => &mut fallback,
        };
        admit(
            facts,
            parts,
            self.info.peer.ip(),
            &self.config,
            &limiters,
            early,
        )
    }

    pub(super) fn refuse(&self, info: &Facts, r: Refusal, backend: Option<&str>) -> Response<Body> {
        self.log_reject(info, r, r.status().as_u16(), backend);
        self.answer(info, r)
    }

    /// The refusal's answer: the reason word, then what to change when there is a hint.
    fn answer(&self, info: &Facts, r: Refusal) -> Response<Body> {
        match super::hints::hint(r, info, &self.config) {
            Some(hint) => r.response_with_hint::<Full<Bytes>>(&hint).map(Either::Left),
            None => r.response::<Full<Bytes>>().map(Either::Left),
        }
    }

    fn log_reject(&self, info: &Facts, r: Refusal, status: u16, backend: Option<&str>) {
        self.log_reject_with(info, r, status, backend, None);
    }

    /// [`Self::log_reject`] with what went wrong with the backend (`upstream_error`).
    fn log_reject_with(
        &self,
        info: &Facts,
        r: Refusal,
        status: u16,
        backend: Option<&str>,
        upstream_error: Option<&str>,
    ) {
        let shared = &self.info.shared;
        shared.metrics.rejected(info.route.as_deref(), r.reason());
        let client = info.client_ip.unwrap_or(self.info.peer.ip());
        let refused = super::refused::Refused {
            client,
            listener: &self.info.listener,
            tls: self.info.tls.is_some(),
            refusing: super::Refusing {
                refusal: r,
                status,
                reset_after: u32::MAX,
            },
        };
        if !super::refused::note(shared, refused).log {
            return;
        }
        let mut record = self.record("ws_reject", info, status, backend);
        record.proxy_reason = Some(r.reason());
        record.upstream_error = upstream_error;
        self.info.shared.access.log(&record);
    }

    pub(super) fn record<'a>(
        &'a self,
        event: &'static str,
        info: &'a Facts,
        status: u16,
        backend: Option<&'a str>,
    ) -> Record<'a> {
        Record {
            ts: now_rfc3339(),
            event,
            conn_id: Some(&self.info.conn_id),
            request_id: info.request_id.as_deref(),
            listener: &self.info.listener,
            route: info.route.as_deref(),
            client_ip: ip_text(info.client_ip.unwrap_or(self.info.peer.ip())),
            client_port: self.info.peer.port(),
            tls: self.info.tls.as_ref(),
            host: info.host.as_deref(),
            path: info.path.as_deref(),
            origin: info.origin.as_deref(),
            user_agent: info.user_agent.as_deref(),
            subject: info.subject.as_deref(),
            upstream: backend,
            sticky: info.sticky,
            status,
            duration_ms: self.info.started.elapsed().as_millis() as u64,
            http: Some(self.info.http),
            ..Record::default()
        }
    }
}

/// The client's address as the caps key it (IPv6 by prefix).
fn permit_ip(admission: &Admission<'_>, config: &Config) -> crate::admission::client_ip::IpKey {
    crate::admission::client_ip::IpKey::new(admission.client_ip, config.limits.ipv6_prefix)
}

/// The 101 for the client: the upstream's end-to-end headers plus the upgrade pair.
fn switching_protocols(headers: http::HeaderMap) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    resp
}

/// hyper service for the one request of a connection. Boxed futures keep it `Unpin`, which
/// `poll_without_shutdown` needs; one allocation per handshake, none per frame.
struct Service(Arc<Conn>);

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let conn = self.0.clone();
        Box::pin(async move { Ok(conn.handle(req).await) })
    }
}

/// hyper answers a head it cannot parse (400) or one over the size limit (431) itself,
/// before any request reaches the service, with an empty body; for an HTTP/2 preface it
/// closes without a word. Until the service has the request, this adapter drops hyper's
/// writes, so the handshake can send the proxy's own refusal instead (SPEC §3: every
/// refusal is a response naming its reason). It is removed before the relay starts.
pub(super) struct OwnRefusals<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S> OwnRefusals<S> {
    pub(super) fn new(inner: S, conn: Arc<Conn>) -> OwnRefusals<S> {
        OwnRefusals { inner, conn }
    }

    pub(super) fn into_inner(self) -> S {
        self.inner
    }

    fn passing(&self) -> bool {
        self.conn.head_seen.load(Ordering::Acquire)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OwnRefusals<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OwnRefusals<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !self.passing() {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if !self.passing() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
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
