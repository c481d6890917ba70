//! Active health checks: one probe per backend per `interval`, all of a pool's backends
//! probed concurrently, each within `timeout`. A probe is a TCP connect (no `path`) or an
//! HTTP/1.1 `GET path` that must answer 2xx (over TLS when the upstream uses TLS). Only
//! produces verdicts; the hysteresis lives in [`super::pool::Pool`].

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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
async fn http_get(stream: UpstreamStream, path: &str, host: &str) -> bool {
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return false;
    };
    let mut req = Request::new(Empty::<Bytes>::new());
    let Ok(uri) = path.parse() else {
        return false;
    };
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(host) {
        h.insert(header::HOST, v);
    }
    h.insert(
        header::USER_AGENT,
        header::HeaderValue::from_static("wsgate-health-check"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    // The connection is driven here, not spawned: it ends with the probe.
    tokio::pin!(conn);
    tokio::select! {
        resp = sender.send_request(req) => resp.is_ok_and(|r| r.status().is_success()),
        _ = &mut conn => false,
    }
}
