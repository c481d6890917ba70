//! Active health checks: one probe per backend per `interval`, all of a pool's backends
//! probed concurrently, each within `timeout`. A probe is a TCP connect (no `path`) or an
//! HTTP/1.1 `GET path` that must answer 2xx (over TLS when the upstream uses TLS). Only
//! produces verdicts; the hysteresis lives in [`super::pool::Pool`].

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::http1::{self, Field};
use super::pool::{BackendState, Pool};
use super::{UpstreamStream, open};
use crate::config::{HealthCheck, UpstreamTls};

/// Probes every backend of `pool` once and records the verdicts.
pub(crate) async fn check_all(pool: &Pool, hc: &HealthCheck, tls: Option<&UpstreamTls>) {
    let backends = pool.backends();
    let probes = backends.iter().map(|b| async move {
        let ok = tokio::time::timeout(hc.timeout, probe(b, hc.path.as_deref(), tls))
            .await
            .unwrap_or(false);
        (b, ok)
    });
    for (b, ok) in futures_util::future::join_all(probes).await {
        pool.check_result(b, ok);
    }
}

async fn probe(b: &BackendState, path: Option<&str>, tls: Option<&UpstreamTls>) -> bool {
    let Some(path) = path else {
        return TcpStream::connect(b.addr).await.is_ok();
    };
    match open(b.addr, &b.host, tls).await {
        Ok(stream) => http_get(stream, path, &b.entry).await,
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
