//! The admin listener (SPEC §7), bound to loopback by default:
//! - `GET /healthz` → 200 while the process runs;
//! - `GET /readyz` → 200 while listening and not draining, else 503;
//! - `GET /metrics` → Prometheus metrics (OpenMetrics text);
//! - `GET /connections` → JSON: live connections per route and backend, and the oldest ones;
//! - `/upstreams...` → backend state, drain and undrain ([`crate::upstream::pool::admin`]);
//!   a drain with `close_within` closes the backend's connections with 1012, spread.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::ops::registry::DrainKind;
use crate::shared::Shared;
use crate::upstream::pool;

/// How many of the longest-lived connections `/connections` lists.
const OLDEST: usize = 20;

/// Serves the admin endpoints until the gateway is dropped.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) {
    let shared = Arc::downgrade(&shared);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let shared = shared.upgrade();
                    async move {
                        Ok::<_, Infallible>(match shared {
                            Some(shared) => route(&req, &shared),
                            None => text(StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let uri = req.uri();
    if let Some(reply) = pool::admin(req.method(), uri.path(), uri.query(), &shared.pools) {
        if let Some(order) = &reply.drain
            && let Some(window) = order.close_within
        {
            let closing = shared.registry.drain(
                |e| {
                    *e.upstream == *order.upstream
                        && order.backends.iter().any(|b| *b == *e.backend)
                },
                window,
                DrainKind::Backend,
            );
            tracing::info!(upstream = %order.upstream, backends = ?order.backends, connections = closing, ?window, "backend drain: closing its connections");
        }
        if let Some(order) = &reply.undrain {
            let kept = shared.registry.undrain(|e| {
                *e.upstream == *order.upstream && order.backends.iter().any(|b| *b == *e.backend)
            });
            tracing::info!(upstream = %order.upstream, backends = ?order.backends, connections = kept, "backend undrained");
        }
        return reply.into_response();
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => body(
            StatusCode::OK,
            crate::observe::metrics::CONTENT_TYPE,
            shared.metrics.encode().into(),
        ),
        "/connections" => body(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&shared.registry.view(OLDEST))
                .unwrap_or_default()
                .into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    body(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(msg.as_bytes()),
    )
}

fn body(status: StatusCode, content_type: &'static str, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
