//! Where connections come in (SPEC §2 `listeners`, §3 "Admission before work", §8):
//! binding with SO_REUSEPORT, the accept loop with its judgement at accept (`accept`),
//! the PROXY protocol header, and the TLS handshake (with the listener's certificates,
//! swapped by reloads). Each admitted connection becomes one task: its handshake phase
//! ([`crate::handshake::serve`]), then its relay phase, in that same task, so ending the
//! task ends both sockets and frees every resource in one place.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admission::ip_limit::IpPermit;
use crate::admission::pending::HandshakeSlot;
use crate::admission::proxy_protocol::{self, MAX_HEADER, Parse};
use crate::config::Listener;
use crate::handshake::admit::admit_at_accept;
use crate::handshake::{self, EarlyPermit, InHandshake, RelayPhase};
use crate::observe::access_log::TlsInfo;
use crate::observe::metrics::{AcceptRefusals, Metrics};
use crate::shared::Shared;

mod accept;
mod streams;
pub use streams::Prefixed;

/// A listener's current TLS configuration; certificate reloads swap it (lock-free, like the
/// config), and connections already established keep the one they started with. There is
/// no state in which a TLS listener has no configuration, so none in which it could fall
/// back to plaintext.
pub struct TlsSlot(ArcSwap<rustls::ServerConfig>);

impl TlsSlot {
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsSlot {
        TlsSlot(ArcSwap::new(config))
    }

    fn get(&self) -> Arc<rustls::ServerConfig> {
        self.0.load_full()
    }

    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        self.0.store(config);
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

/// Whether some socket already listens on `addr` (port not 0): a bind without
/// SO_REUSEPORT then fails, although [`bind_reuseport`] would succeed next to another
/// process's SO_REUSEPORT socket and silently share the port with it. SO_REUSEADDR is set
/// so that connections left in TIME_WAIT do not count.
pub fn listened_on(addr: SocketAddr) -> bool {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    );
    probe
        .and_then(|s| {
            s.set_reuse_address(true)?;
            s.bind(&addr.into())
        })
        .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
}

/// Why a listener is not bound next to another process already listening on its address
/// (at start-up without `--takeover`, and on reload).
pub fn taken_message(name: &str, addr: SocketAddr) -> String {
    format!(
        "`{name}`: another process already listens on {addr} (most likely another wsgate: both would share the port, each getting part of the connections and of the /metrics scrapes). Stop it first, or pass --takeover for a zero-downtime restart (then SIGTERM the old process)"
    )
}

/// A listener accepting connections; dropping it closes the socket (established
/// connections are not affected).
pub struct Running {
    pub name: Arc<str>,
    /// The configured address (port 0 stays 0 here) and the bound one.
    pub bind: SocketAddr,
    pub addr: SocketAddr,
    pub proxy_protocol: bool,
    pub http2: bool,
    pub tls: Option<Arc<TlsSlot>>,
    _stop: watch::Sender<()>,
}

impl Running {
    /// Starts accepting on `tcp` for the listener `l`; fails when the socket cannot be put
    /// under the runtime (then nothing listens on it).
    pub fn launch(
        shared: &Arc<Shared>,
        l: &Listener,
        tcp: TcpListener,
        addr: SocketAddr,
    ) -> std::io::Result<Running> {
        let (stop, stopped) = watch::channel(());
        let tls = l
            .tls
            .as_ref()
            .map(|t| Arc::new(TlsSlot::new(t.server.clone())));
        let name: Arc<str> = l.name.as_str().into();
        let scheme = if tls.is_some() { "wss://" } else { "ws://" };
        let endpoint = Endpoint {
            listener: name.clone(),
            tls: tls.clone(),
            proxy_protocol: l.proxy_protocol,
            http2: l.http2,
            refusals: shared.metrics.accept_refusals(&name),
        };
        let socket = tcp.into_std().and_then(accept::register)?;
        tracing::info!(listener = %name, %addr, "listening ({scheme})");
        tokio::spawn(accept::accept_loop(
            Arc::downgrade(shared),
            socket,
            endpoint,
            stopped,
        ));
        Ok(Running {
            name,
            bind: l.bind,
            addr,
            proxy_protocol: l.proxy_protocol,
            http2: l.http2,
            tls,
            _stop: stop,
        })
    }

    /// Whether `l` can be served by this socket as it is (else it must be re-bound).
    pub fn serves(&self, l: &Listener) -> bool {
        *self.name == *l.name
            && (self.bind == l.bind || self.addr == l.bind)
            && self.proxy_protocol == l.proxy_protocol
            && self.http2 == l.http2
            && self.tls.is_some() == l.tls.is_some()
    }
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
    /// `active` already counts this connection; `early` is the per-IP count taken when it
    /// was judged at accept.
    fn new(
        shared: Arc<Shared>,
        endpoint: Endpoint,
        stream: TcpStream,
        peer: SocketAddr,
        active: u64,
        early: Option<IpPermit>,
        slot: Option<HandshakeSlot>,
    ) -> Self {
        // Given back by the handshake phase when it ends (or once a plain request of the
        // connection is admitted).
        let pending = InHandshake::new(slot, shared.metrics.handshakes_pending());
        let conn = Conn {
            shared: shared.clone(),
            endpoint,
            peer,
            active,
            early,
            pending,
        };
        ConnTask {
            phase: Phase::Handshake(Box::pin(serve(conn, stream))),
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
struct Endpoint {
    listener: Arc<str>,
    tls: Option<Arc<TlsSlot>>,
    proxy_protocol: bool,
    /// h2c with prior knowledge on a plain listener (TLS listeners offer `h2` by ALPN).
    http2: bool,
    refusals: AcceptRefusals,
}

/// An admitted connection as the accept loop hands it to its task.
struct Conn {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    peer: SocketAddr,
    /// Connections in any phase when this one was accepted (itself included).
    active: u64,
    /// The per-IP count taken when it was judged at accept; `None` when the client is
    /// known later (behind a PROXY header or a trusted proxy).
    early: Option<IpPermit>,
    /// Its `max_pending_handshakes` slot.
    pending: InHandshake,
}

/// A connection up to its upgrade; returns the relay phase when there is one.
async fn serve(conn: Conn, stream: TcpStream) -> Option<RelayPhase> {
    let Conn {
        shared,
        endpoint,
        peer,
        active,
        early,
        pending,
    } = conn;
    let _ = stream.set_nodelay(true);
    let started = Instant::now();
    // The config of this connection for its whole life: a reload affects new ones only.
    let config = shared.config.load_full();
    // One deadline covers the PROXY header, the TLS handshake and the request head
    // (slowloris guard).
    let deadline = started + config.limits.handshake_timeout;
    let Endpoint {
        listener,
        tls,
        proxy_protocol,
        http2,
        refusals,
    } = endpoint;
    let (stream, peer) = if proxy_protocol {
        // With `trusted_proxies` set, only those peers may name the client: anyone else
        // reaching the listener could claim any address (SPEC §2 `proxy_protocol`).
        let trusted = &config.trusted_proxies;
        if !trusted.is_empty() && !trusted.contains(peer.ip()) {
            log_proxy_header_failure(&shared, peer, "peer not in trusted_proxies");
            return None;
        }
        match Box::pin(tokio::time::timeout_at(
            deadline,
            read_proxy_header(stream, peer),
        ))
        .await
        {
            Ok(Ok(found)) => found,
            Ok(Err(why)) => {
                log_proxy_header_failure(&shared, peer, why);
                return None;
            }
            Err(_) => {
                log_proxy_header_failure(&shared, peer, "none within handshake_timeout");
                return None;
            }
        }
    } else {
        (Prefixed::new(stream, Vec::new()), peer)
    };
    let limits = &config.limits;
    let mut over_capacity = active > limits.max_connections;
    let early_permit = match early {
        Some(permit) => EarlyPermit::Held(permit),
        None if config.trusted_proxies.contains(peer.ip()) => EarlyPermit::NotTaken,
        // Named by a PROXY header: judged now, as early as the client is known.
        None => {
            let rate = shared.handshake_rate.load();
            let judged = admit_at_accept(peer.ip(), over_capacity, &config, &shared.per_ip, &rate);
            match judged {
                Ok(permit) => {
                    over_capacity = false;
                    EarlyPermit::Held(permit)
                }
                Err(refusal) => {
                    let refused = accept::RefusedAfterHeader {
                        shared: &shared,
                        config: &config,
                        listener: &listener,
                        peer,
                        tls: tls.is_some(),
                        refusals: &refusals,
                    };
                    refused.answer(refusal, stream).await;
                    return None;
                }
            }
        }
    };
    let accepted = |tls: Option<TlsInfo>| handshake::Accepted {
        pending,
        over_capacity,
        early_permit,
        config: config.clone(),
        shared: shared.clone(),
        listener: listener.clone(),
        peer,
        started,
        tls,
    };
    // The TLS path is boxed, as is the relay phase: a plain connection never carries the
    // size of a TLS session (this future is moved into its task's allocation whole).
    match tls {
        None if http2 => match sniff_h2(stream, deadline).await {
            Some((stream, true)) => handshake::serve_h2(accepted(None), stream, deadline).await,
            Some((stream, false)) => handshake::serve(accepted(None), stream, deadline).await,
            None => None,
        },
        None => handshake::serve(accepted(None), stream, deadline).await,
        Some(slot) => {
            let tls = TlsAccept {
                config: slot.get(),
                metrics: &shared.metrics,
                listener: &listener,
                peer,
                deadline,
            };
            Box::pin(serve_tls(tls, stream, accepted)).await
        }
    }
}

/// What the TLS handshake of one connection needs.
struct TlsAccept<'a> {
    config: Arc<rustls::ServerConfig>,
    metrics: &'a Metrics,
    listener: &'a str,
    peer: SocketAddr,
    deadline: Instant,
}

/// The TLS handshake (within the handshake deadline), then HTTP over TLS; returns the
/// relay phase once upgraded.
async fn serve_tls(
    tls: TlsAccept<'_>,
    stream: Prefixed<TcpStream>,
    accepted: impl FnOnce(Option<TlsInfo>) -> handshake::Accepted,
) -> Option<RelayPhase> {
    let TlsAccept {
        config,
        metrics,
        listener,
        peer,
        deadline,
    } = tls;
    let handshake = tokio::time::timeout_at(
        deadline,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    );
    let stream = match handshake.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            crate::tls::log_handshake_error(peer, &e, metrics.tls_handshake_failed());
            return None;
        }
        Err(_) => {
            crate::tls::log_handshake_failure(peer, &"timed out", metrics.tls_handshake_failed());
            return None;
        }
    };
    let info = tls_info(stream.get_ref().1);
    metrics.tls_handshake(listener, info.resumed);
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        return handshake::serve_h2(accepted(Some(info)), stream, deadline).await;
    }
    handshake::serve(accepted(Some(info)), stream, deadline).await
}

/// Reads far enough into a plain connection to tell an HTTP/2 connection preface (h2c with
/// prior knowledge) from an HTTP/1.1 head; the bytes read stay in front of the stream.
/// `None` when the client sends nothing decisive before the deadline or goes away.
async fn sniff_h2(
    mut stream: Prefixed<TcpStream>,
    deadline: Instant,
) -> Option<(Prefixed<TcpStream>, bool)> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = Vec::with_capacity(PREFACE.len());
    let mut byte = [0u8; PREFACE.len()];
    while seen.len() < PREFACE.len() && PREFACE.starts_with(&seen) {
        let want = PREFACE.len() - seen.len();
        let read = tokio::time::timeout_at(deadline, stream.read(&mut byte[..want]));
        match read.await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&byte[..n]),
            _ => return None,
        }
    }
    let h2 = seen == PREFACE;
    Some((stream.with_front(seen), h2))
}

fn tls_info(session: &rustls::ServerConnection) -> TlsInfo {
    TlsInfo {
        version: crate::tls::version_label(session.protocol_version()),
        sni: session.server_name().map(str::to_owned),
        client_subject: session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::subject_of),
        resumed: session.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    }
}

/// Counts a refused PROXY header and logs it within the shared warning budget (a scanner
/// reaching the listener directly must not flood stderr).
fn log_proxy_header_failure(shared: &Shared, peer: SocketAddr, why: &str) {
    let total = shared.metrics.proxy_protocol_failed();
    if crate::log_budget::warn_budget() {
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
