//! The admin listener (SPEC §7), bound to loopback by default:
//! - `GET /healthz` → 200 while the process runs;
//! - `GET /readyz` → 200 once the listeners are bound, 503 when shutting down;
//! - `/upstreams...` → backend state, drain and undrain ([`crate::upstream::pool::admin`]).
//!
//! `/metrics` arrives with the observability work; until then it answers 404.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::upstream::pool::{self, Pools};

/// Serves the admin endpoints until the process ends.
pub fn spawn(listener: TcpListener, ready: Arc<AtomicBool>, pools: Weak<Pools>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let ready = ready.clone();
            let pools = pools.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let ready = ready.clone();
                    let pools = pools.clone();
                    async move { Ok::<_, Infallible>(route(&req, &ready, &pools)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn route(
    req: &Request<Incoming>,
    ready: &AtomicBool,
    pools: &Weak<Pools>,
) -> Response<Full<Bytes>> {
    let uri = req.uri();
    if let Some(pools) = pools.upgrade()
        && let Some(reply) = pool::admin(req.method(), uri.path(), uri.query(), &pools)
    {
        // A drain's `reply.drain` (close the drained backends' connections with 1012,
        // spread over `close_within`) is carried out by the connection registry.
        return reply.into_response();
    }
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
