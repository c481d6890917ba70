//! The admin listener (SPEC §7), bound to loopback by default:
//! - `GET /healthz` → 200 while the process runs;
//! - `GET /readyz` → 200 once the listeners are bound, 503 when shutting down.
//!
//! `/metrics` arrives with the observability work; until then it answers 404.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves the admin endpoints until the process ends.
pub fn spawn(listener: TcpListener, ready: Arc<AtomicBool>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let ready = ready.clone();
                    async move { Ok::<_, Infallible>(route(&req, &ready)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn route(req: &Request<Incoming>, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if ready.load(Ordering::Acquire) => (StatusCode::OK, "ready\n"),
        (&Method::GET, "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
