//! Client connections: bind to a chosen 127.0.0.x source address before connecting (so
//! the ephemeral-port range of one address never limits how many connections a scenario
//! opens), optional TLS that accepts any certificate (the TLS runs measure cost, not
//! trust), the HTTP upgrade, and a bounded frame reader.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::ws::{self, Header, Rng};

/// A byte stream a scenario drives: plain TCP or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub tls: Option<TlsConnector>,
    /// TLS sessions are resumed (tickets kept in memory) instead of full every time.
    pub resume: bool,
}

impl Target {
    pub fn new(addr: SocketAddr, path: &str, tls: bool, resume: bool) -> Result<Target> {
        Ok(Target {
            addr,
            host: "localhost".to_string(),
            path: path.to_string(),
            tls: if tls {
                Some(tls_connector(resume)?)
            } else {
                None
            },
            resume: tls && resume,
        })
    }
}

/// Source addresses: `127.<role>.x.y`, `per_addr` connections on each, so that each role
/// of each scenario has its own range and per-address limits see distinct clients.
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    pub role: u8,
    pub per_addr: u32,
}

impl Sources {
    /// The source address of connection `i`.
    pub fn addr(&self, i: u32) -> Ipv4Addr {
        let n = i / self.per_addr.max(1);
        // 250 hosts per /24 (x.y.z.1 ..= x.y.z.250), 250 /24s per role.
        let host = (n % 250) as u8 + 1;
        let net = ((n / 250) % 250) as u8;
        Ipv4Addr::new(127, self.role, net, host)
    }
}

/// Failed attempts of a scenario: how many, and the first one's error (for the JSON).
#[derive(Default)]
pub struct Failures {
    count: std::sync::atomic::AtomicU64,
    first: std::sync::Mutex<Option<String>>,
}

impl Failures {
    pub fn record(&self, e: &anyhow::Error) {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut slot) = self.first.lock() {
            slot.get_or_insert_with(|| format!("{e:#}"));
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn first(&self) -> Option<String> {
        self.first.lock().ok().and_then(|e| e.clone())
    }
}

/// A TCP connection from `src` (port chosen by the kernel) to `dst`, Nagle off.
pub async fn tcp_connect(src: Ipv4Addr, dst: SocketAddr) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4().context("socket")?;
    sock.bind(SocketAddr::new(src.into(), 0))
        .with_context(|| format!("bind {src}"))?;
    let stream = sock
        .connect(dst)
        .await
        .with_context(|| format!("connect {src} -> {dst}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    Ok(stream)
}

/// An upgraded WebSocket connection and the bytes read past the 101.
pub struct WsConn {
    pub io: Stream,
    pub early: Vec<u8>,
}

/// Why an upgrade did not succeed: a refusal by the proxy (a status other than 101, or the
/// connection closed or reset before it) or an error on our side.
#[derive(Debug)]
pub enum Refused {
    Status(u16),
    Closed,
    Timeout,
    Other(anyhow::Error),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Status(s) => write!(f, "refused with HTTP {s}"),
            Refused::Closed => write!(f, "closed before the 101"),
            Refused::Timeout => write!(f, "no 101 in time"),
            Refused::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// Connects, runs TLS if the target has it, and upgrades, all within `timeout`.
pub async fn ws_connect(
    target: &Target,
    src: Ipv4Addr,
    rng: &mut Rng,
    timeout: Duration,
) -> Result<WsConn, Refused> {
    match tokio::time::timeout(timeout, ws_connect_inner(target, src, rng)).await {
        Ok(r) => r,
        Err(_) => Err(Refused::Timeout),
    }
}

async fn ws_connect_inner(
    target: &Target,
    src: Ipv4Addr,
    rng: &mut Rng,
) -> Result<WsConn, Refused> {
    let tcp = match tcp_connect(src, target.addr).await {
        Ok(t) => t,
        Err(e) => return Err(classify(e)),
    };
    let mut io = match &target.tls {
        None => Stream::Plain(tcp),
        Some(connector) => {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| Refused::Other(anyhow!("server name {}: {e}", target.host)))?;
            match connector.connect(name, tcp).await {
                Ok(s) => Stream::Tls(Box::new(s)),
                Err(e) => return Err(classify(anyhow::Error::from(e).context("TLS"))),
            }
        }
    };
    let req = ws::upgrade_request(&target.host, &target.path, rng);
    io.write_all(&req)
        .await
        .map_err(|e| classify(anyhow::Error::from(e)))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| classify(anyhow::Error::from(e)))?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = ws::head_end(&buf) {
            let code = ws::status_code(&buf[..end]).unwrap_or(0);
            if code != 101 {
                return Err(Refused::Status(code));
            }
            let early = buf.split_off(end);
            return Ok(WsConn { io, early });
        }
        if buf.len() > ws::MAX_HEAD {
            return Err(Refused::Other(anyhow!(
                "response head over {} bytes",
                ws::MAX_HEAD
            )));
        }
    }
}

/// Resets and closes by the peer count as refusals; everything else is our error.
fn classify(e: anyhow::Error) -> Refused {
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | UnexpectedEof
                    | ConnectionRefused
            ) {
                return Refused::Closed;
            }
        }
    }
    Refused::Other(e)
}

/// Reads whole frames from a stream into a buffer that grows up to `max_payload` + header.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload: usize,
}

impl FrameReader {
    pub fn new(early: Vec<u8>, capacity: usize, max_payload: usize) -> FrameReader {
        let end = early.len();
        let mut buf = early;
        buf.resize(end.max(capacity), 0);
        FrameReader {
            buf,
            start: 0,
            end,
            max_payload,
        }
    }

    /// The next whole frame: its header and (unmasked, for server frames) payload.
    /// `Ok(None)` at a clean end of stream.
    pub async fn next<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
    ) -> Result<Option<(Header, &[u8])>> {
        loop {
            let avail = &self.buf[self.start..self.end];
            if let Some(h) = ws::parse_header(avail, self.max_payload)? {
                let total = h.len + h.payload_len;
                if avail.len() >= total {
                    let from = self.start;
                    self.start += total;
                    return Ok(Some((h, &self.buf[from + h.len..from + total])));
                }
                if self.buf.len() - self.start < total {
                    // Make room: move the partial frame to the front, grow if still short.
                    self.compact();
                    if self.buf.len() < total {
                        self.buf.resize(total, 0);
                    }
                }
            } else if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.buf.len() - self.end < 16 {
                self.compact();
            }
            if self.end == self.buf.len() {
                self.compact();
            }
            let n = io.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                if self.start == self.end {
                    return Ok(None);
                }
                bail!("stream ended inside a frame");
            }
            self.end += n;
        }
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }
}

/// A TLS connector that accepts any server certificate and never resumes sessions, so
/// every handshake is a full one; with `resume`, tickets are kept (in memory, shared by
/// every connection of the run) and each handshake after the first resumes. No ALPN: the
/// HTTP/1.1 scenarios.
pub fn tls_connector(resume: bool) -> Result<TlsConnector> {
    tls_connector_with(resume, &[])
}

/// [`tls_connector`] without resumption, offering the ALPN protocols `alpn` (`h2` for the
/// HTTP/2 scenarios).
pub fn tls_connector_alpn(alpn: &[&[u8]]) -> Result<TlsConnector> {
    tls_connector_with(false, alpn)
}

fn tls_connector_with(resume: bool, alpn: &[&[u8]]) -> Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(schemes)))
        .with_no_client_auth();
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(4096)
    } else {
        rustls::client::Resumption::disabled()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts whatever certificate the proxy shows (benchmark only).
#[derive(Debug)]
struct AnyCert(Vec<SignatureScheme>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}
