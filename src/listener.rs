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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, request};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::handshake::{self, Rejection};
use crate::observe::access_log::{Counts, Record, now_rfc3339};
use crate::relay::{self, Settings};
use crate::tls::TlsInfo;
use crate::upstream::{self, Connected, Failure, Forwarded, UpstreamStream};
use crate::{Shared, ids};

/// Largest request head hyper will buffer (hyper's floor is 8 KiB); beyond → 431.
const MAX_HEAD: usize = 16 * 1024;

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Body = Either<Full<Bytes>, Incoming>;

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

/// Accepts until `shutdown` flips, spawning one task per connection.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    name: Arc<str>,
    tls: Option<Arc<TlsSlot>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve(
                    shared.clone(),
                    name.clone(),
                    stream,
                    peer,
                    tls.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Request facts kept for the access log.
#[derive(Default)]
struct RequestInfo {
    host: Option<String>,
    path: Option<String>,
    origin: Option<String>,
    user_agent: Option<String>,
    route: Option<String>,
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
            path: parts.uri.path_and_query().map(|p| p.as_str().to_owned()),
            origin: text(header::ORIGIN),
            user_agent: text(header::USER_AGENT),
            route: None,
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
}

/// Per-connection state shared between the hyper service and the connection task.
struct Conn {
    shared: Arc<Shared>,
    listener: Arc<str>,
    peer: SocketAddr,
    conn_id: String,
    started: Instant,
    over_capacity: bool,
    tls: Option<TlsInfo>,
    /// The request head has arrived: `handshake_timeout` no longer applies.
    head_seen: AtomicBool,
    established: Mutex<Option<Box<Established>>>,
}

/// Counts a connection towards `max_connections` for as long as it lives.
struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(
    shared: Arc<Shared>,
    listener: Arc<str>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<TlsSlot>>,
) {
    let _ = stream.set_nodelay(true);
    let active = shared.active.fetch_add(1, Ordering::Relaxed) + 1;
    let _guard = ActiveGuard(&shared.active);
    let started = Instant::now();
    // One deadline covers the TLS handshake and the request head (slowloris guard).
    let deadline = started + shared.config.limits.handshake_timeout;
    let conn = |tls: Option<TlsInfo>| {
        Arc::new(Conn {
            over_capacity: active > shared.config.limits.max_connections,
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
    match tls.and_then(|slot| slot.get()) {
        None => serve_http(conn(None), stream, deadline).await,
        Some(config) => {
            let accepted = tokio::time::timeout_at(
                deadline,
                tokio_rustls::TlsAcceptor::from(config).accept(stream),
            );
            let stream = match Box::pin(accepted).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return crate::tls::log_handshake_failure(peer, &e),
                Err(_) => return crate::tls::log_handshake_failure(peer, &"timed out"),
            };
            let info = tls_info(stream.get_ref().1);
            serve_http(conn(Some(info)), stream, deadline).await
        }
    }
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

/// The HTTP upgrade, then the relay, over a plain or TLS client stream.
async fn serve_http<S>(conn: Arc<Conn>, stream: S, deadline: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The handshake (hyper's connection, its buffers, the timers) lives in its own
    // allocation, freed before the relay starts: a long-lived connection keeps only the
    // relay's small state.
    if let Some((client, early, est)) = Box::pin(handshake(&conn, stream, deadline)).await {
        run_relay(&conn, client, early, est).await;
    }
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
    let mut http = http.serve_connection(TokioIo::new(stream), Service(conn.clone()));
    let deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(deadline);
    let mut deadline_live = true;
    let served = loop {
        tokio::select! {
            r = poll_fn(|cx| http.poll_without_shutdown(cx)) => break Some(r),
            _ = &mut deadline, if deadline_live => {
                if conn.head_seen.load(Ordering::Acquire) {
                    deadline_live = false;
                } else {
                    break None;
                }
            }
        }
    };
    match served {
        None => {
            let parts = http.into_parts();
            let partial_head = !parts.read_buf.is_empty();
            if partial_head {
                let mut io = parts.io.into_inner();
                let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(REQUEST_TIMEOUT))
                    .await;
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
                let status = if e.is_parse_too_large() { 431 } else { 400 };
                conn.log_reject(&RequestInfo::default(), Rejection::BadUpgrade, status, None);
            } else {
                tracing::debug!(conn_id = %conn.conn_id, error = %e, "connection ended during the handshake");
            }
            None
        }
        Some(Ok(())) => {
            let est = conn.established.lock().ok().and_then(|mut e| e.take())?;
            let parts = http.into_parts();
            Some((parts.io.into_inner(), parts.read_buf, *est))
        }
    }
}

/// Sent when the head did not arrive within `handshake_timeout` (a slowloris guard).
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 18\r\nconnection: close\r\n\r\nhandshake_timeout\n";

async fn run_relay<S>(conn: &Conn, client: S, client_early: Bytes, est: Established)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Established {
        upstream,
        upstream_early,
        backend,
        settings,
        info,
    } = est;
    // The settings are only read at the start; they must not live on in this task.
    let relayed = relay::relay(client, client_early, upstream, upstream_early, &settings);
    drop(settings);
    let report = relayed.await;
    let mut record = conn.record("ws_close", &info, 101, Some(&backend));
    Record::set_report(&mut record, &report);
    conn.shared.access.log(&record);
}

impl Conn {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        self.head_seen.store(true, Ordering::Release);
        let (parts, _body) = req.into_parts();
        let mut info = RequestInfo::from_parts(&parts);
        let config = &self.shared.config;
        if self.over_capacity {
            return self.refuse(&info, Rejection::Capacity, None);
        }
        let admitted = match handshake::admit(&parts, &config.routes) {
            Ok(a) => a,
            Err(r) => {
                let host = info.host.as_deref().unwrap_or("");
                let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
                info.route = handshake::find_route(&config.routes, host, parts.uri.path())
                    .map(|r| r.name.clone());
                return self.refuse(&info, r, None);
            }
        };
        info.route = Some(admitted.route.name.clone());
        let fwd = Forwarded {
            client_ip: self.peer.ip(),
            tls: self.tls.is_some(),
            conn_id: &self.conn_id,
        };
        match upstream::connect(&parts, &admitted, &fwd, self.shared.echo_addr).await {
            Ok(up) => {
                let Connected {
                    stream,
                    early,
                    backend,
                    response_headers,
                    extensions,
                } = up;
                let config = &self.shared.config;
                let settings = Settings::new(&admitted.route.limits, &config.keepalive, extensions);
                if let Ok(mut slot) = self.established.lock() {
                    *slot = Some(Box::new(Established {
                        upstream: stream,
                        upstream_early: early,
                        backend,
                        settings,
                        info,
                    }));
                }
                switching_protocols(response_headers)
            }
            Err(Failure::Proxy(r, backend)) => self.refuse(&info, r, Some(&backend)),
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
            listener: &self.listener,
            route: info.route.as_deref(),
            client_ip: self.peer.ip().to_string(),
            client_port: self.peer.port(),
            tls: self.tls.as_ref(),
            host: info.host.as_deref(),
            path: info.path.as_deref(),
            origin: info.origin.as_deref(),
            user_agent: info.user_agent.as_deref(),
            upstream: backend,
            status,
            duration_ms: self.started.elapsed().as_millis() as u64,
            c2u: Counts::default(),
            u2c: Counts::default(),
            close: None,
            proxy_reason: None,
            pings: 0,
            rtt_ms: None,
            rate_limited: 0,
        }
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
