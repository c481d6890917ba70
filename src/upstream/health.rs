//! Active health checks: one probe per backend per `interval`, all of a pool's backends
//! probed concurrently, each within `timeout`. A probe is a TCP connect (no `path`) or an
//! HTTP/1.1 `GET path` that must answer 2xx (over TLS when the upstream uses TLS).
//!
//! A pure checker: it knows nothing of pools. It takes the [`Target`]s to probe and
//! returns one verdict each; the pool records them and keeps the hysteresis.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::http1::{self, Field};
use super::stream::{UpstreamStream, open};
use crate::config::{HealthCheck, UpstreamTls};

/// What a probe needs to know of a backend.
pub(crate) struct Target<'a> {
    /// Where to connect.
    pub addr: SocketAddr,
    /// SNI towards the backend (over TLS).
    pub host: &'a str,
    /// The configured entry (`chat-2.internal:9001`): the probe's `Host` header.
    pub entry: &'a str,
}

/// Probes every target once, concurrently, each within `hc.timeout`; returns the verdicts
/// (`true`: healthy) in the targets' order.
pub(crate) async fn check_all(
    targets: &[Target<'_>],
    hc: &HealthCheck,
    tls: Option<&UpstreamTls>,
) -> Vec<bool> {
    let probes = targets.iter().map(|t| async move {
        tokio::time::timeout(hc.timeout, probe(t, hc.path.as_deref(), tls))
            .await
            .unwrap_or(false)
    });
    futures_util::future::join_all(probes).await
}

async fn probe(t: &Target<'_>, path: Option<&str>, tls: Option<&UpstreamTls>) -> bool {
    let Some(path) = path else {
        return TcpStream::connect(t.addr).await.is_ok();
    };
    match open(t.addr, t.host, tls).await {
        Ok(stream) => http_get(stream, path, t.entry).await,
        Err(_) => false,
    }
}

/// `GET path` with `Host: entry`; true on a 2xx status (the body is not read).
async fn http_get(mut stream: UpstreamStream, path: &str, host: &str) -> bool {
    let headers = [
        ("host", Field::Text(host)),
        ("user-agent", Field::Valid(b"wsgate-health-check")),
        ("connection", Field::Valid(b"close")),
    ];
    let Ok(head) = http1::get_head(path, headers, 64 + host.len()) else {
        return false;
    };
    let mut buf = BytesMut::new();
    let answer = async {
        stream.write_all(&head).await?;
        stream.flush().await?;
        http1::read_head(&mut stream, &mut buf).await
    };
    answer.await.is_ok_and(|a| a.status.is_success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server answering each connection by its request line: `GET /health` gets 200,
    /// anything else 503. Returns its address and what it was sent.
    async fn server() -> std::io::Result<(std::net::SocketAddr, tokio::sync::mpsc::Receiver<String>)>
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let answer: &[u8] = if head.starts_with("GET /health ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
                let _ = tx.send(head).await;
            }
        });
        Ok((addr, rx))
    }

    #[tokio::test]
    async fn http_probes_need_a_2xx_for_their_path() -> std::io::Result<()> {
        let (addr, mut sent) = server().await?;
        let stream = UpstreamStream::Plain(TcpStream::connect(addr).await?);
        assert!(http_get(stream, "/health", "backend-1:9001").await);
        let head = sent.recv().await.unwrap_or_default();
        assert!(head.starts_with("GET /health HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nhost: backend-1:9001\r\n"), "{head}");
        let stream = UpstreamStream::Plain(TcpStream::connect(addr).await?);
        assert!(!http_get(stream, "/other", "backend-1:9001").await);
        // A host that would split the head is never sent.
        let stream = UpstreamStream::Plain(TcpStream::connect(addr).await?);
        assert!(!http_get(stream, "/health", "a\r\nx: y").await);
        Ok(())
    }
}
