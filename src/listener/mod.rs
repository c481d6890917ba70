//! Accepting connections and taking each one through its life: the HTTP/1.1 upgrade
//! (hyper), admission, the upstream handshake, the relay, and the access-log line.
//!
//! One task per accepted connection does all of it (TLS handshake included, never in the
//! accept loop); the relay runs in that same task, so ending the task ends both sockets
//! and frees every resource in one place.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, request};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admission::client_ip::{self, IpKey, ip_text};
use crate::admission::ip_limit::IpPermit;
use crate::admission::token;
use crate::config::{Config, Listener, RouteAdmission};
use crate::handshake::{self, Rejection};
use crate::observe::access_log::{Record, now_rfc3339};
use crate::ops::registry::{Entry, unix_ms};
use crate::relay::{self, Settings};
use crate::tls::TlsInfo;
use crate::upstream::pool::Lease;
use crate::upstream::{self, Connected, Failure, Forwarded, UpstreamStream, sticky};
use crate::{Shared, ids};

mod streams;
use streams::OwnRefusals;
pub use streams::Prefixed;

/// Largest request head hyper will buffer (hyper's floor is 8 KiB); beyond → 431.
const MAX_HEAD: usize = 16 * 1024;

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Body = Either<Full<Bytes>, upstream::RefusalBody>;

/// A listener's current TLS configuration; certificate reloads swap it, and connections
/// already established keep the one they started with.
pub struct TlsSlot(RwLock<Arc<rustls::ServerConfig>>);

impl TlsSlot {
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsSlot {
        TlsSlot(RwLock::new(config))
    }

    fn get(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.0.read().ok().map(|c| c.clone())
    }

    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = config;
        }
    }
}

/// Listen backlog: the kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// Binds with SO_REUSEPORT (and SO_REUSEADDR), so a new wsgate process, or a reload moving
/// a listener, can bind the same address before the old socket closes (SPEC §8).
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Binds one configured listener.
pub fn bind(l: &Listener) -> Result<(TcpListener, SocketAddr), crate::StartError> {
    bind_reuseport(l.bind).map_err(|source| crate::StartError::Bind {
        name: l.name.clone(),
        addr: l.bind,
        source,
    })
}

/// A listener accepting connections; dropping it closes the socket (established
/// connections are not affected).
pub struct Running {
    pub name: Arc<str>,
    /// The configured address (port 0 stays 0 here) and the bound one.
    pub bind: SocketAddr,
    pub addr: SocketAddr,
    pub proxy_protocol: bool,
    pub tls: Option<Arc<TlsSlot>>,
    _stop: watch::Sender<()>,
}

impl Running {
    /// Starts accepting on `tcp` for the listener `l`.
    pub fn launch(
        shared: &Arc<Shared>,
        l: &Listener,
        tcp: TcpListener,
        addr: SocketAddr,
    ) -> Running {
        let (stop, stopped) = watch::channel(());
        let tls = l
            .tls
            .as_ref()
            .map(|t| Arc::new(TlsSlot::new(t.server.clone())));
        let name: Arc<str> = l.name.as_str().into();
        let scheme = if tls.is_some() { "wss://" } else { "ws://" };
        tracing::info!(listener = %name, %addr, "listening ({scheme})");
        let accepted = Accepted {
            listener: name.clone(),
            tls: tls.clone(),
            proxy_protocol: l.proxy_protocol,
        };
        tokio::spawn(accept_loop(Arc::downgrade(shared), tcp, accepted, stopped));
        Running {
            name,
            bind: l.bind,
            addr,
            proxy_protocol: l.proxy_protocol,
            tls,
            _stop: stop,
        }
    }

    /// Whether `l` can be served by this socket as it is (else it must be re-bound).
    pub fn serves(&self, l: &Listener) -> bool {
        *self.name == *l.name
            && (self.bind == l.bind || self.addr == l.bind)
            && self.proxy_protocol == l.proxy_protocol
            && self.tls.is_some() == l.tls.is_some()
    }
}

/// Accepts until the listener's [`Running`] is dropped, spawning one task per connection.
async fn accept_loop(
    shared: Weak<Shared>,
    listener: TcpListener,
    accepted: Accepted,
    mut stopped: watch::Receiver<()>,
) {
    loop {
        let next = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => return serve_backlog(&shared, listener, &accepted),
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match next {
            Ok((stream, peer)) => {
                tokio::spawn(ConnTask::new(shared, accepted.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(listener = %accepted.listener, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves what the kernel already accepted into the backlog before the socket closes:
/// closing a listener resets those connections, which would turn a zero-downtime restart
/// into refused clients. Asks the kernel directly (tokio's cached readiness may not know
/// of a connection that has just arrived), until its queue is empty.
fn serve_backlog(shared: &Weak<Shared>, listener: TcpListener, accepted: &Accepted) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let Ok(listener) = listener.into_std() else {
        return;
    };
    for _ in 0..BACKLOG {
        let Ok((stream, peer)) = listener.accept() else {
            return;
        };
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            tokio::spawn(ConnTask::new(
                shared.clone(),
                accepted.clone(),
                stream,
                peer,
            ));
        }
    }
}

/// Request facts kept for the access log.
#[derive(Default)]
struct RequestInfo {
    host: Option<String>,
    /// Path and query, token query values redacted once the route is known.
    path: Option<String>,
    origin: Option<String>,
    user_agent: Option<String>,
    route: Option<String>,
    /// The real client (PROXY header or trusted `X-Forwarded-For`), when not the peer.
    client_ip: Option<std::net::IpAddr>,
    /// The token's `sub` claim.
    subject: Option<String>,
    /// The client's own `X-Request-Id`, when syntactically valid.
    request_id: Option<String>,
    /// The route's upstream name.
    upstream: Option<String>,
    /// The sticky key's kind and whether it fell back to the client IP.
    sticky: Option<sticky::KeyLog>,
}

impl RequestInfo {
    fn from_parts(parts: &request::Parts) -> RequestInfo {
        let text = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        RequestInfo {
            host: text(header::HOST),
            origin: text(header::ORIGIN),
            user_agent: text(header::USER_AGENT),
            // The query is left out until the route says which of its values are secret.
            path: Some(parts.uri.path().to_owned()),
            ..RequestInfo::default()
        }
    }

    /// Names the route and logs the path with the query, its token parameters redacted.
    /// Called again when the final route differs from the first guess, so the redaction
    /// always follows the route that applies.
    fn route_known(&mut self, route: &crate::config::Route, uri: &http::Uri) {
        self.route = Some(route.name.clone());
        self.upstream = Some(route.upstream.name.clone());
        if let Some(full) = uri.path_and_query() {
            let names = route.admission.secret_query_names();
            self.path = Some(crate::http_util::redact_query(full.as_str(), &names).into_owned());
        }
    }
}

/// What the handshake leaves for the relay. Nothing here may borrow hyper's read buffers
/// (header values do): they would pin 8 KiB per connection for its whole life.
struct Established {
    upstream: UpstreamStream,
    upstream_early: Bytes,
    backend: String,
    settings: Settings,
    info: RequestInfo,
    /// Counts the connection against its client's per-IP cap until the task ends.
    _permit: IpPermit,
    /// Counts the connection on its backend (bounded load, metrics) until the task ends.
    _lease: Lease,
}

/// Per-connection state shared between the hyper service and the connection task.
struct Conn {
    shared: Arc<Shared>,
    config: Arc<Config>,
    listener: Arc<str>,
    peer: SocketAddr,
    conn_id: String,
    started: Instant,
    over_capacity: bool,
    tls: Option<TlsInfo>,
    /// The request head has arrived: `handshake_timeout` no longer applies.
    head_seen: AtomicBool,
    established: Mutex<Option<Box<Established>>>,
    /// Taken at accept when the peer is the client (not a trusted proxy): handshakes in
    /// progress count against the per-IP cap too. `None` with `ip_capped` = over the cap.
    early_permit: Mutex<Option<IpPermit>>,
    ip_capped: bool,
}

/// Counts a connection towards `max_connections` for as long as it lives.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's task. Its own state is a few words: each phase lives in its own
/// allocation, the handshake's freed when the relay's begins, so what an idle connection
/// keeps is the task header, this, and the relay phase.
struct ConnTask {
    phase: Phase,
    _active: ActiveGuard,
}

enum Phase {
    /// PROXY header, TLS, the HTTP upgrade and the upstream handshake ([`serve`]).
    Handshake(Pin<Box<dyn Future<Output = Option<RelayPhase>> + Send>>),
    Relay(RelayPhase),
}

impl ConnTask {
    fn new(shared: Arc<Shared>, accepted: Accepted, stream: TcpStream, peer: SocketAddr) -> Self {
        let active = shared.active.fetch_add(1, Ordering::Relaxed) + 1;
        ConnTask {
            phase: Phase::Handshake(Box::pin(serve(
                shared.clone(),
                accepted,
                stream,
                peer,
                active,
            ))),
            _active: ActiveGuard(shared),
        }
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        loop {
            match &mut self.phase {
                Phase::Handshake(handshake) => match std::task::ready!(handshake.as_mut().poll(cx))
                {
                    Some(relay) => self.phase = Phase::Relay(relay),
                    None => return std::task::Poll::Ready(()),
                },
                Phase::Relay(relay) => return relay.as_mut().poll(cx),
            }
        }
    }
}

/// What the accept loop knows about a new connection's listener.
#[derive(Clone)]
struct Accepted {
    listener: Arc<str>,
    tls: Option<Arc<TlsSlot>>,
    proxy_protocol: bool,
}

/// A connection up to its upgrade; returns the relay phase when there is one. `active`
/// counts this connection.
async fn serve(
    shared: Arc<Shared>,
    accepted: Accepted,
    stream: TcpStream,
    peer: SocketAddr,
    active: u64,
) -> Option<RelayPhase> {
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    // The config of this connection for its whole life: a reload affects new ones only.
    let config = shared.config.load_full();
    // One deadline covers the PROXY header, the TLS handshake and the request head
    // (slowloris guard).
    let deadline = started + config.limits.handshake_timeout;
    let Accepted {
        listener,
        tls,
        proxy_protocol,
    } = accepted;
    let (stream, peer) = if proxy_protocol {
        match Box::pin(tokio::time::timeout_at(
            deadline,
            read_proxy_header(stream, peer),
        ))
        .await
        {
            Ok(Ok(found)) => found,
            Ok(Err(why)) => {
                log_proxy_header_failure(peer, why);
                return None;
            }
            Err(_) => {
                log_proxy_header_failure(peer, "none within handshake_timeout");
                return None;
            }
        }
    } else {
        (Prefixed::new(stream, Vec::new()), peer)
    };
    // The per-IP cap counts from accept whenever the peer is the client; behind a trusted
    // proxy the client is only known from the request head.
    let limits = &config.limits;
    // The route is not known yet: count against the highest cap any route allows; the
    // route's own cap is checked at the head.
    let widest_cap = config
        .routes
        .iter()
        .map(|r| r.limits.max_connections_per_ip)
        .fold(limits.max_connections_per_ip, |a, b| a.max(b));
    let early_permit = (!config.trusted_proxies.contains(peer.ip()))
        .then(|| IpKey::new(peer.ip(), limits.ipv6_prefix))
        .map(|key| shared.per_ip.try_acquire(key, widest_cap));
    let ip_capped = matches!(early_permit, Some(None));
    let early_permit = Mutex::new(early_permit.flatten());
    let conn = |tls: Option<TlsInfo>| {
        Arc::new(Conn {
            early_permit,
            ip_capped,
            over_capacity: active > limits.max_connections,
            config: config.clone(),
            shared: shared.clone(),
            listener: listener.clone(),
            peer,
            conn_id: ids::next(),
            started,
            tls,
            head_seen: AtomicBool::new(false),
            established: Mutex::new(None),
        })
    };
    // The TLS path is boxed, as is the relay phase: a plain connection never carries the
    // size of a TLS session (this future is moved into its task's allocation whole).
    match tls.and_then(|slot| slot.get()) {
        None => serve_http(conn(None), stream, deadline).await,
        Some(config) => Box::pin(serve_tls(config, stream, peer, deadline, conn)).await,
    }
}

/// A connection's relay phase: the session and what its log line needs, nothing else.
type RelayPhase = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The TLS handshake (within the handshake deadline), then HTTP over TLS; returns the
/// relay phase once upgraded.
async fn serve_tls(
    config: Arc<rustls::ServerConfig>,
    stream: Prefixed<TcpStream>,
    peer: SocketAddr,
    deadline: Instant,
    conn: impl FnOnce(Option<TlsInfo>) -> Arc<Conn>,
) -> Option<RelayPhase> {
    let accepted = tokio::time::timeout_at(
        deadline,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    );
    let stream = match accepted.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            crate::tls::log_handshake_failure(peer, &e);
            return None;
        }
        Err(_) => {
            crate::tls::log_handshake_failure(peer, &"timed out");
            return None;
        }
    };
    let info = tls_info(stream.get_ref().1);
    serve_http(conn(Some(info)), stream, deadline).await
}

fn tls_info(session: &rustls::ServerConnection) -> TlsInfo {
    TlsInfo {
        version: crate::tls::version_label(session.protocol_version()),
        sni: session.server_name().map(str::to_owned),
        client_subject: session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::subject_of),
    }
}

/// Connections refused for a bad or missing PROXY header since start (for metrics).
pub static PROXY_HEADER_FAILURES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Counts a refused PROXY header and logs it within the shared warning budget (a scanner
/// reaching the listener directly must not flood stderr).
fn log_proxy_header_failure(peer: SocketAddr, why: &str) {
    let total = PROXY_HEADER_FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
    if crate::observe::warn_budget() {
        tracing::warn!(%peer, why, failures_total = total, "connection refused: bad PROXY protocol header");
    }
}

/// Reads the PROXY v1/v2 header a load balancer puts in front of the client's bytes.
/// Returns the stream (with any bytes read past the header kept for the next layer) and
/// the client address it names (the balancer's own health checks name none: then the peer).
async fn read_proxy_header(
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(Prefixed<TcpStream>, SocketAddr), &'static str> {
    use crate::admission::proxy_protocol::{self, MAX_HEADER, Parse};
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(256);
    loop {
        match proxy_protocol::parse(&buf) {
            Parse::Header { len, client } => {
                let rest = buf.split_off(len);
                return Ok((Prefixed::new(stream, rest), client.unwrap_or(peer)));
            }
            Parse::Invalid => return Err("malformed"),
            Parse::Incomplete if buf.len() >= MAX_HEADER => return Err("too long"),
            Parse::Incomplete => {}
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("connection closed before the header");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The HTTP upgrade over a plain or TLS client stream; returns the relay phase, in its own
/// allocation, when the upgrade succeeded. The handshake's state (hyper's connection, its
/// buffers, the timers) is freed before the relay starts.
async fn serve_http<S>(conn: Arc<Conn>, stream: S, deadline: Instant) -> Option<RelayPhase>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, early, est) = handshake(&conn, stream, deadline).await?;
    Some(Box::pin(run_relay(conn, client, early, est)))
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
                if answering {
                    // The answer (an upstream's refusal body, relayed) never finished.
                    tracing::debug!(conn_id = %conn.conn_id, "response not sent in time; closing");
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
                answer_and_close(parts.io.into_inner().into_inner(), REQUEST_TIMEOUT).await;
            }
            let status = if partial_head { 408 } else { 0 };
            conn.log_reject(
                &RequestInfo::default(),
                Rejection::HandshakeTimeout,
                status,
                None,
            );
            None
        }
        Some(Err(e)) => {
            if e.is_parse() || e.is_parse_too_large() {
                let (status, answer) = if e.is_parse_too_large() {
                    (431, HEAD_TOO_LARGE)
                } else {
                    (400, BAD_REQUEST)
                };
                answer_and_close(http.into_parts().io.into_inner().into_inner(), answer).await;
                conn.log_reject(&RequestInfo::default(), Rejection::BadUpgrade, status, None);
            } else {
                tracing::debug!(conn_id = %conn.conn_id, error = %e, "connection ended during the handshake");
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
    connect * 3 + config.limits.handshake_timeout
}

/// Sent for a head hyper could not parse.
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad_upgrade\n";

/// Sent for a head over `MAX_HEAD`.
const HEAD_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad_upgrade\n";

/// Sent when the head did not arrive within `handshake_timeout` (a slowloris guard).
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 18\r\nconnection: close\r\n\r\nhandshake_timeout\n";

/// The relay and its access-log line. Built eagerly, as a plain struct (no async block,
/// which would keep a second copy of the relay session beside the one being polled): the
/// long-lived state is the relay session and the log facts, nothing else.
fn run_relay<S>(
    conn: Arc<Conn>,
    client: S,
    client_early: Bytes,
    est: Established,
) -> Relaying<impl Future<Output = relay::Report> + Unpin + Send>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Established {
        upstream,
        upstream_early,
        backend,
        mut settings,
        info,
        _permit,
        _lease,
    } = est;
    let route = info.route.as_deref().unwrap_or("");
    let metrics = conn.shared.metrics.route(route);
    let active = metrics.opened();
    let registry = &conn.shared.registry;
    let control = Arc::new(relay::Control::new(Entry {
        conn_id: conn.conn_id.as_str().into(),
        route: registry.name(route),
        upstream: registry.name(info.upstream.as_deref().unwrap_or("")),
        backend: registry.name(&backend),
        client_ip: info.client_ip.unwrap_or(conn.peer.ip()),
        since_ms: unix_ms(),
    }));
    let registration = registry.register(control.clone());
    // A reload that removed this route while the upgrade was in flight scanned the
    // registry before this connection was in it: drain it like the others.
    let config = conn.shared.config.load();
    if !config.routes.iter().any(|r| r.name == route) {
        registry.drain_one(&control, config.drain.spread);
    }
    settings.control = Some(control);
    settings.metrics = Some(metrics);
    let relay = relay::relay(client, client_early, upstream, upstream_early, &settings);
    Relaying {
        relay: Some(relay),
        tail: Some(RelayTail {
            log: LogFacts::new(&conn, &info, &backend),
            active,
            registration,
            _permit,
            _lease,
        }),
    }
}

/// The relay session, then (sockets closed) the connection's bookkeeping.
struct Relaying<R> {
    relay: Option<R>,
    tail: Option<RelayTail>,
}

/// What a finished relay reports to: the registry, the route's metrics, the access log.
struct RelayTail {
    log: LogFacts,
    active: crate::observe::metrics::ActiveConnection,
    registration: crate::ops::registry::Registration,
    /// Counts the connection against its client's per-IP cap until the log line is out.
    _permit: IpPermit,
    /// Counts it on its backend (bounded load, `wsgate_backend_connections`).
    _lease: Lease,
}

/// A relay cut before it finished (the runtime shutting down at `drain.timeout`) still
/// gets its `ws_close` line: closed by the proxy, no close frame, reason `drain`.
impl<R> Drop for Relaying<R> {
    fn drop(&mut self) {
        if let Some(tail) = self.tail.take() {
            let report = relay::Report {
                close: Some(relay::CloseInfo {
                    code: 1006,
                    reason: String::new(),
                    by: relay::By::Proxy,
                }),
                proxy_reason: Some("drain"),
                ..relay::Report::default()
            };
            tail.finish(&report);
        }
    }
}

impl<R: Future<Output = relay::Report> + Unpin> Future for Relaying<R> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = &mut *self;
        let Some(relay) = this.relay.as_mut() else {
            return std::task::Poll::Ready(());
        };
        let report = std::task::ready!(Pin::new(relay).poll(cx));
        this.relay = None;
        if let Some(tail) = this.tail.take() {
            tail.finish(&report);
        }
        std::task::Poll::Ready(())
    }
}

impl RelayTail {
    fn finish(self, report: &relay::Report) {
        let RelayTail {
            log,
            active,
            registration,
            _permit,
            _lease,
        } = self;
        drop(registration);
        active.closed(report);
        let mut record = log.record("ws_close", 101);
        Record::set_report(&mut record, report);
        log.shared.access.log(&record);
        drop(_permit);
        drop(_lease);
    }
}

/// The strings of a `ws_close` line, in [`LogFacts::text`] order.
#[derive(Clone, Copy)]
enum Text {
    ConnId,
    RequestId,
    Route,
    Host,
    Path,
    Origin,
    UserAgent,
    Subject,
    Backend,
}

const TEXTS: usize = Text::Backend as usize + 1;

/// What a relayed connection's `ws_close` line needs, frozen at the upgrade (the request,
/// the connection, the backend). Every string sits in one allocation: an idle connection
/// would otherwise keep a dozen small ones, each rounded up by the allocator, plus the
/// handshake's whole [`Conn`].
struct LogFacts {
    shared: Arc<Shared>,
    listener: Arc<str>,
    /// The [`Text`] strings, back to back.
    text: Box<str>,
    /// Where each [`Text`] string ends in `text`.
    ends: [u32; TEXTS],
    /// Bit `i` set: [`Text`] `i` is present (an absent one is empty).
    present: u16,
    client_ip: std::net::IpAddr,
    client_port: u16,
    started: Instant,
    tls: Option<Box<TlsInfo>>,
    sticky: Option<sticky::KeyLog>,
}

impl LogFacts {
    fn new(conn: &Conn, info: &RequestInfo, backend: &str) -> LogFacts {
        let texts: [Option<&str>; TEXTS] = [
            Some(&conn.conn_id),
            info.request_id.as_deref(),
            info.route.as_deref(),
            info.host.as_deref(),
            info.path.as_deref(),
            info.origin.as_deref(),
            info.user_agent.as_deref(),
            info.subject.as_deref(),
            Some(backend),
        ];
        let mut text = String::with_capacity(texts.iter().flatten().map(|t| t.len()).sum());
        let mut ends = [0; TEXTS];
        let mut present = 0;
        for (i, t) in texts.iter().enumerate() {
            if let Some(t) = t {
                text.push_str(t);
                present |= 1 << i;
            }
            // Request heads are at most MAX_HEAD bytes and names come from the config.
            ends[i] = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        LogFacts {
            shared: conn.shared.clone(),
            listener: conn.listener.clone(),
            text: text.into_boxed_str(),
            ends,
            present,
            client_ip: info.client_ip.unwrap_or(conn.peer.ip()),
            client_port: conn.peer.port(),
            started: conn.started,
            tls: conn.tls.clone().map(Box::new),
            sticky: info.sticky,
        }
    }

    fn get(&self, t: Text) -> Option<&str> {
        let i = t as usize;
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize)
    }

    fn record(&self, event: &'static str, status: u16) -> Record<'_> {
        Record {
            ts: now_rfc3339(),
            event,
            conn_id: self.get(Text::ConnId).unwrap_or_default(),
            request_id: self.get(Text::RequestId),
            listener: &self.listener,
            route: self.get(Text::Route),
            client_ip: ip_text(self.client_ip),
            client_port: self.client_port,
            tls: self.tls.as_deref(),
            host: self.get(Text::Host),
            path: self.get(Text::Path),
            origin: self.get(Text::Origin),
            user_agent: self.get(Text::UserAgent),
            subject: self.get(Text::Subject),
            upstream: self.get(Text::Backend),
            status,
            duration_ms: self.started.elapsed().as_millis() as u64,
            sticky: self.sticky,
            ..Record::default()
        }
    }
}

/// A client's `X-Request-Id`, kept for the log when it is short and plain (the proxy's own
/// id still goes upstream): at most 128 bytes of letters, digits and `-_.:/+=`.
fn request_id(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.:/+=".contains(c);
    (!v.is_empty() && v.len() <= 128 && v.chars().all(plain)).then(|| v.to_owned())
}

impl Conn {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        self.head_seen.store(true, Ordering::Release);
        let (parts, _body) = req.into_parts();
        let mut info = RequestInfo::from_parts(&parts);
        let config = &*self.config;
        let client_ip =
            client_ip::client_ip(self.peer.ip(), &parts.headers, &config.trusted_proxies);
        info.client_ip = Some(client_ip);
        info.request_id = request_id(&parts.headers);
        // Named before any refusal, so refusals are logged and counted per route.
        if let Some(route) = handshake::route_of(&parts, &config.routes) {
            info.route_known(route, &parts.uri);
        }
        if self.shared.registry.past_drain_window() {
            return self.refuse(&info, Rejection::Draining, None);
        }
        if self.over_capacity {
            return self.refuse(&info, Rejection::Capacity, None);
        }
        let key = IpKey::new(client_ip, config.limits.ipv6_prefix);
        if let Err(refusal) = self.shared.handshake_rate.load().admit(key) {
            return self.refuse(&info, refusal.into(), None);
        }
        let mut admitted = match handshake::admit(&parts, &config.routes) {
            Ok(a) => a,
            Err(r) => return self.refuse(&info, r, None),
        };
        let route = admitted.route;
        if info.route.as_deref() != Some(route.name.as_str()) {
            info.route_known(route, &parts.uri);
        }
        let policy = &route.admission;
        if let Err(refusal) = policy.origins.check_headers(&parts.headers) {
            return self.refuse(&info, refusal.into(), None);
        }
        let sticky_claim = match &route.upstream.sticky {
            crate::config::StickyKey::Claim(name) => Some(name.as_str()),
            _ => None,
        };
        let pass = match authorize(policy, &parts, sticky_claim) {
            Ok(pass) => pass,
            Err(refusal) => {
                if let crate::admission::Refusal::Token { error } = refusal {
                    tracing::debug!(conn_id = %self.conn_id, error, "token refused");
                }
                return self.refuse(&info, refusal.into(), None);
            }
        };
        info.subject = pass.subject.clone();
        let early = self.early_permit.lock().ok().and_then(|mut p| p.take());
        let cap = route.limits.max_connections_per_ip;
        let permit = match early {
            // Counted since accept: only the route's own (possibly lower) cap is left to check.
            Some(p) if p.key() == key && self.shared.per_ip.count(key) <= cap => p,
            Some(_) => return self.refuse(&info, Rejection::IpCap, None),
            None if self.ip_capped => return self.refuse(&info, Rejection::IpCap, None),
            None => match self.shared.per_ip.admit(key, cap) {
                Ok(p) => p,
                Err(refusal) => return self.refuse(&info, refusal.into(), None),
            },
        };
        let upstream_parts = match pass.upstream_parts(&parts, &mut admitted) {
            Ok(p) => p,
            Err(r) => return self.refuse(&info, r, None),
        };
        let fwd = Forwarded {
            client_ip,
            tls: self.tls.is_some(),
            conn_id: &self.conn_id,
        };
        let key = sticky::key(
            &route.upstream.sticky,
            &parts,
            pass.sticky_claim.as_deref(),
            client_ip,
        );
        info.sticky = Some(key.log);
        let Some(pool) = self.shared.pools.get(&route.upstream.name) else {
            return self.refuse(&info, Rejection::NoBackend, None);
        };
        match upstream::connect(&upstream_parts, &admitted, &fwd, &pool, &key.bytes).await {
            Ok(up) => {
                let Connected {
                    stream,
                    early,
                    backend,
                    mut response_headers,
                    extensions,
                    lease,
                } = up;
                let mut settings = Settings::new(&route.limits, &config.keepalive, extensions);
                settings.expires_at = pass.expires_at;
                if pass.answer_bearer
                    && !response_headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL)
                {
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
                        info,
                        _permit: permit,
                        _lease: lease,
                    }));
                }
                switching_protocols(response_headers)
            }
            Err(Failure::Proxy(r, backend)) => {
                self.refuse(&info, r, Some(backend.as_str()).filter(|b| !b.is_empty()))
            }
            Err(Failure::Status(resp, backend)) => {
                let status = resp.status().as_u16();
                self.log_reject(
                    &info,
                    Rejection::UpstreamStatus(status),
                    status,
                    Some(&backend),
                );
                let (mut head, body) = resp.into_parts();
                head.headers = upstream::end_to_end(&head.headers);
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Response::from_parts(head, Either::Right(body))
            }
        }
    }

    fn refuse(&self, info: &RequestInfo, r: Rejection, backend: Option<&str>) -> Response<Body> {
        self.log_reject(info, r, r.status().as_u16(), backend);
        r.response::<Full<Bytes>>().map(Either::Left)
    }

    fn log_reject(&self, info: &RequestInfo, r: Rejection, status: u16, backend: Option<&str>) {
        self.shared
            .metrics
            .rejected(info.route.as_deref(), r.reason());
        let mut record = self.record("ws_reject", info, status, backend);
        record.proxy_reason = Some(r.reason());
        self.shared.access.log(&record);
    }

    fn record<'a>(
        &'a self,
        event: &'static str,
        info: &'a RequestInfo,
        status: u16,
        backend: Option<&'a str>,
    ) -> Record<'a> {
        Record {
            ts: now_rfc3339(),
            event,
            conn_id: &self.conn_id,
            request_id: info.request_id.as_deref(),
            listener: &self.listener,
            route: info.route.as_deref(),
            client_ip: ip_text(info.client_ip.unwrap_or(self.peer.ip())),
            client_port: self.peer.port(),
            tls: self.tls.as_ref(),
            host: info.host.as_deref(),
            path: info.path.as_deref(),
            origin: info.origin.as_deref(),
            user_agent: info.user_agent.as_deref(),
            subject: info.subject.as_deref(),
            upstream: backend,
            sticky: info.sticky,
            status,
            duration_ms: self.started.elapsed().as_millis() as u64,
            ..Record::default()
        }
    }
}

/// What admission learnt from the token (if the route wants one).
#[derive(Default)]
struct Pass {
    subject: Option<String>,
    /// `close_on_expiry`: when the live connection must end.
    expires_at: Option<Instant>,
    /// The client offered only `bearer, <token>`: answer `bearer`.
    answer_bearer: bool,
    /// Every place a token may be, when it must not reach the upstream (`strip_token`).
    strip: Vec<token::Stripped>,
    /// The bearer trick's entries are always taken out of the forwarded offers.
    subprotocols: Option<Vec<String>>,
    claims: Vec<(http::HeaderName, HeaderValue)>,
    /// Headers the proxy sets from claims: the client's copies never pass.
    claim_headers: Vec<http::HeaderName>,
    /// The upstream's `claim:NAME` sticky key, when the token has it.
    sticky_claim: Option<String>,
}

/// Checks the route's JWT and API key (SPEC §2 `auth`).
fn authorize(
    policy: &RouteAdmission,
    parts: &request::Parts,
    sticky_claim: Option<&str>,
) -> Result<Pass, crate::admission::Refusal> {
    let mut pass = Pass::default();
    let query = parts.uri.query();
    if let Some(jwt) = &policy.jwt {
        pass.claim_headers = jwt.forward_claims.iter().map(|(_, h)| h.clone()).collect();
        let authorized = jwt
            .verifier
            .check(&parts.headers, query, token::unix_now())?;
        pass.subject = authorized
            .claims
            .get("sub")
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        pass.sticky_claim = sticky_claim.and_then(|c| sticky::claim_text(&authorized.claims, c));
        for (claim, header) in &jwt.forward_claims {
            if let Some(value) = token::claim_header_value(&authorized.claims, claim) {
                pass.claims.push((header.clone(), value));
            }
        }
        if jwt.close_on_expiry
            && let Some(exp) = authorized.exp
        {
            // A signed `exp` centuries away must not overflow the clock: no expiry then.
            let left = Duration::from_secs(exp.saturating_sub(token::unix_now()));
            pass.expires_at = Instant::now()
                .checked_add(left)
                .and_then(|at| at.checked_add(jwt.verifier.leeway()));
        }
        if let token::Stripped::Subprotocol {
            remaining,
            answer_bearer,
        } = &authorized.stripped
        {
            pass.subprotocols = Some(remaining.clone());
            pass.answer_bearer = *answer_bearer;
        } else if jwt.subprotocol {
            // The token came from elsewhere: the offers still lose any bearer entries and
            // still meet the allowlist.
            pass.subprotocols = Some(token::offers_without_bearer(&parts.headers));
        }
        if jwt.strip_token {
            pass.strip = jwt.verifier.stripped_sources();
        }
    }
    if let Some(keys) = &policy.api_keys {
        keys.check(&parts.headers, query)?;
    }
    Ok(pass)
}

impl Pass {
    /// The request as the upstream must see it: claims set (client copies dropped), the
    /// token taken out when `strip_token`, the bearer entries out of the offers.
    fn upstream_parts(
        &self,
        parts: &request::Parts,
        admitted: &mut handshake::Admitted<'_>,
    ) -> Result<request::Parts, Rejection> {
        // Hop-by-hop headers go first: a client's `Connection: X-User-Id` must not take
        // out the claim headers set below.
        let mut headers = upstream::end_to_end(&parts.headers);
        for name in &self.claim_headers {
            headers.remove(name);
        }
        for (name, value) in &self.claims {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(offers) = &self.subprotocols {
            headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
            if let Ok(v) = HeaderValue::from_str(&offers.join(", "))
                && !offers.is_empty()
            {
                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
            }
            admitted.protocols =
                handshake::allowed_protocols(&headers, admitted.route.subprotocols.as_deref())?;
        }
        for strip in &self.strip {
            strip.apply_to_headers(&mut headers);
        }
        let query_names: Vec<&str> = self
            .strip
            .iter()
            .filter_map(|s| match s {
                token::Stripped::Query(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        if !query_names.is_empty()
            && let Some((path, query)) = admitted.upstream_target.split_once('?')
        {
            admitted.upstream_target = match crate::http_util::strip_query(query, &query_names) {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
        }
        let mut req = Request::new(());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = headers;
        Ok(req.into_parts().0)
    }
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
