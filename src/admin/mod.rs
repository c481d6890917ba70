//! The admin listener (SPEC §7), bound to loopback by default:
//! - `GET /healthz` → 200 while the process runs;
//! - `GET /readyz` → 200 while listening and not draining, once every `jwks_url` has been
//!   fetched, else 503;
//! - `GET /metrics` → Prometheus metrics (OpenMetrics text);
//! - `GET /connections` → JSON: live connections per route and backend, and the oldest ones;
//! - `/upstreams...` → backend state, drain and undrain ([`crate::upstream::pool::admin`]);
//!   a drain with `close_within` closes the backend's connections with 1012, spread;
//! - `POST /connections/close?subject=S|ip=A|route=R|conn_id=I[&code=4003]` → closes the
//!   matching live connections (4003 `revoked` to the client, 1001 upstream);
//!   `{"closed": N}`;
//! - `POST /revoke?subject=S|jti=J[&for=1h]` → refuses that subject's or token id's new
//!   handshakes (403 `revoked`) for `for` and closes its live connections;
//!   `DELETE /revoke?subject=S|jti=J` lifts it.
//!
//! Every method but GET and HEAD changes state and passes the [`guard`] first (the admin
//! token, loopback without one, no `Origin`). The listener bounds itself: a request head
//! within [`HEAD_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections at once, of which one
//! address holds at most [`slots::PER_ADDRESS`] and some only loopback may take, and no
//! connection outlives a stalled write or [`slots::DEADLINE`] ([`slots`]).

mod guard;
mod orders;
mod slots;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::config::units::fmt_duration;
use crate::ops::registry::DrainKind;
use crate::ops::revocation::Target;
use crate::shared::Shared;
use crate::upstream::pool;
use guard::Guard;
pub use slots::MAX_CONNECTIONS;
use slots::{Busy, Slots, StallGuard};

/// How many of the longest-lived connections `/connections` lists.
const OLDEST: usize = 20;
/// A request head (the first, and each next one on a kept-alive connection) must arrive
/// within this (SPEC §7), or the connection is closed.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin request head: admin requests are a line and a few headers.
const MAX_HEAD: usize = 16 * 1024;

/// What the 65th connection gets, written without reading its request.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 27\r\nconnection: close\r\n\r\ntoo many admin connections\n";
/// What a connection from an address holding its share of slots already gets.
const BUSY_ADDRESS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 45\r\nconnection: close\r\n\r\ntoo many admin connections from this address\n";

/// Serves the admin endpoints until the gateway is dropped.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>) {
    let guard = shared.config.load().admin.as_ref().map(Guard::new);
    let Some(guard) = guard else {
        return;
    };
    let guard = Arc::new(guard);
    let shared = Arc::downgrade(&shared);
    let slots = Slots::new();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let slot = match slots.take(peer.ip()) {
                Ok(slot) => slot,
                Err(busy) => {
                    // The socket is fresh: its send buffer takes the whole answer at once.
                    let _ = stream.try_write(match busy {
                        Busy::Address => BUSY_ADDRESS,
                        Busy::Listener => BUSY,
                    });
                    continue;
                }
            };
            let shared = shared.clone();
            let guard = guard.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let shared = shared.upgrade();
                    let guard = guard.clone();
                    async move {
                        Ok::<_, Infallible>(match shared {
                            Some(shared) => serve(req, &shared, &guard).await,
                            None => text(StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
                        })
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(StallGuard::new(stream)), svc);
                let mut conn = std::pin::pin!(conn);
                if tokio::time::timeout(slots::DEADLINE, conn.as_mut())
                    .await
                    .is_err()
                {
                    // Past the deadline: the answer in progress may finish, nothing more.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(slots::WRITE_STALL, conn).await;
                }
                drop(slot);
            });
        }
    });
}

async fn serve(req: Request<Incoming>, shared: &Shared, guard: &Guard) -> Response<Full<Bytes>> {
    if let Err(denied) = guard.check(req.method(), req.headers()) {
        let mut resp = text(denied.status(), denied.body());
        if denied.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"wsgate-admin\""),
            );
        }
        return resp;
    }
    let query = req.uri().query();
    match req.uri().path() {
        "/connections/close" => match *req.method() {
            Method::POST => close(shared, query).await,
            _ => not_allowed("POST"),
        },
        "/revoke" => match *req.method() {
            Method::POST => revoke(shared, query).await,
            Method::DELETE => lift(shared, query).await,
            _ => not_allowed("POST, DELETE"),
        },
        _ => route(&req, shared),
    }
}

#[derive(Serialize)]
struct Closed {
    closed: usize,
}

async fn close(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let (selector, code) = match orders::close_order(query) {
        Ok(order) => order,
        Err(e) => return text_owned(StatusCode::BAD_REQUEST, e),
    };
    match shared.revocations.close(selector.clone(), code).await {
        Ok(closed) => {
            tracing::info!(?selector, code, closed, "admin: connections closed");
            json(&Closed { closed })
        }
        Err(e) => text_owned(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Serialize)]
struct Revoked<'a> {
    subject: Option<&'a str>,
    jti: Option<&'a str>,
    #[serde(rename = "for")]
    ttl: String,
    closed: usize,
}

async fn revoke(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let (target, ttl) = match orders::revoke_order(query) {
        Ok(order) => order,
        Err(e) => return text_owned(StatusCode::BAD_REQUEST, e),
    };
    match shared.revocations.revoke(target.clone(), ttl).await {
        Ok(closed) => {
            shared.metrics.revoked();
            tracing::info!(?target, ?ttl, closed, "admin: revoked");
            let (subject, jti) = named(&target);
            json(&Revoked {
                subject,
                jti,
                ttl: fmt_duration(ttl),
                closed,
            })
        }
        Err(e) => text_owned(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Serialize)]
struct Lifted<'a> {
    subject: Option<&'a str>,
    jti: Option<&'a str>,
    lifted: bool,
}

async fn lift(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let target = match orders::lift_order(query) {
        Ok(target) => target,
        Err(e) => return text_owned(StatusCode::BAD_REQUEST, e),
    };
    match shared.revocations.lift(target.clone()).await {
        Ok(lifted) => {
            tracing::info!(?target, lifted, "admin: revocation lifted");
            let (subject, jti) = named(&target);
            json(&Lifted {
                subject,
                jti,
                lifted,
            })
        }
        Err(e) => text_owned(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn named(target: &Target) -> (Option<&str>, Option<&str>) {
    match target {
        Target::Subject(s) => (Some(s), None),
        Target::TokenId(j) => (None, Some(j)),
    }
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
        "/readyz" if shared.is_ready() => text(StatusCode::OK, "ready\n"),
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

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    resp
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    body(StatusCode::OK, "application/json", bytes.into())
}

fn text(status: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    body(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(msg.as_bytes()),
    )
}

fn text_owned(status: StatusCode, mut msg: String) -> Response<Full<Bytes>> {
    msg.push('\n');
    body(status, "text/plain; charset=utf-8", msg.into())
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
