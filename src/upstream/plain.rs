//! Plain HTTP requests relayed to a backend (SPEC §3 "HTTP alongside WebSockets"):
//! hyper's HTTP/1.1 client over the same backend streams as upgrades (TCP, then TLS when
//! the upstream has `tls`), with a bounded pool of kept-alive connections per backend.
//! Bodies stream both ways: nothing here holds one whole.
//!
//! The backend is the one the sticky key picks, as for an upgrade (so a socket.io
//! session's polls and its upgrade meet on one backend); a backend that cannot be reached
//! is failed over in rendezvous order, but a request that went out is never sent twice.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version, request};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::idle::Sender;
pub use super::idle::{BoxError, ClientBodyError, RequestBody};
use super::pool::{BackendState, Lease, Pool};
use super::stream::open;
use super::{Failure, Forwarded, MAX_ATTEMPTS, Target, X_REQUEST_ID, is_proxy_set};
use crate::admission::client_ip::ip_text;
use crate::outcome::Refusal;

/// The connection a response came on, and the backend's count of it: hand it back with
/// [`Checkin::done`] once the response body has been read to its end, so the next request
/// can reuse it; dropped otherwise (the connection closes).
pub struct Checkin {
    sender: Option<Sender>,
    backend: Arc<BackendState>,
    _lease: Lease,
}

impl Checkin {
    /// The response was read to its end: the connection is idle again.
    pub fn done(mut self) {
        if let Some(sender) = self.sender.take() {
            self.backend.idle_http.put(sender);
        }
    }
}

/// A backend's answer to a plain request.
pub struct Answer {
    pub response: Response<Incoming>,
    pub backend: String,
    pub checkin: Checkin,
}

/// Sends `body` with the head `req` (as admission left it) to the key's backend and
/// waits for the answer's head. Connecting is bounded by the upstream's
/// `connect_timeout` per backend; the caller bounds the whole exchange.
///
/// With `max_pending` a request takes one of the backend's places, in arrival order with
/// the upgrades, and holds it from connecting (or taking a kept-alive connection) until
/// the answer's head, at most `connect_timeout` after sending (a long poll must not keep
/// it): the backend never has more than `max_pending` requests and upgrade handshakes
/// starting from this process (as HAProxy's `maxconn` counts every request). Past `queue_timeout`, or with the backend's queue full: 503 `queue_timeout`.
pub async fn send(
    req: &request::Parts,
    body: RequestBody,
    target: &Target<'_>,
    fwd: &Forwarded<'_>,
    pool: &Pool,
    key: &[u8],
) -> Result<Answer, Failure> {
    let upstream = target.upstream;
    let mut request = upstream_request(req, body, target, fwd)
        .map_err(|_| Failure::Proxy(Refusal::BadUpgrade, String::new(), None))?;
    let mut candidates = pool.candidates(key, upstream.bounded_load);
    let mut last = Failure::Proxy(Refusal::NoBackend, String::new(), None);
    let ticket = pool.ticket();
    let queue_until = tokio::time::Instant::now() + upstream.queue_timeout;
    for _ in 0..MAX_ATTEMPTS {
        let Some(lease) = candidates.next() else {
            break;
        };
        let backend = lease.backend().clone();
        let identity = backend.identity.clone();
        let queue_timeout = || {
            let retry_after_secs = super::retry_after(upstream.queue_timeout);
            let refusal = Refusal::QueueTimeout { retry_after_secs };
            Failure::Proxy(refusal, identity.clone(), None)
        };
        let Ok(ahead) = pool.wait_ahead(&backend, &ticket, queue_until).await else {
            return Err(queue_timeout());
        };
        let Some(place) = pool.wait_place(ahead, &ticket, queue_until).await else {
            return Err(queue_timeout());
        };
        let mut place = Some(place);
        // A kept-alive connection first; one the backend closed meanwhile gives the request
        // back unsent, and a fresh connection takes it.
        let mut reused = backend.idle_http.take();
        loop {
            let fresh = reused.is_none();
            let mut sender = match reused.take() {
                Some(s) => s,
                None => {
                    let tls = upstream.tls.as_ref();
                    let connect = connect(&backend, tls);
                    match tokio::time::timeout(upstream.connect_timeout, connect).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(backend = %identity, error = %e, "upstream connect failed");
                            pool.connect_failed(&backend);
                            let error = format!("connect: {e}");
                            super::warn_backend_failure(&upstream.name, &identity, &error);
                            last = Failure::Proxy(
                                Refusal::UpstreamConnect,
                                identity.clone(),
                                Some(error),
                            );
                            break;
                        }
                        Err(_) => {
                            pool.connect_failed(&backend);
                            let error = "connect: no connection within connect_timeout".to_owned();
                            super::warn_backend_failure(&upstream.name, &identity, &error);
                            last = Failure::Proxy(
                                Refusal::UpstreamTimeout,
                                identity.clone(),
                                Some(error),
                            );
                            break;
                        }
                    }
                }
            };
            if !fresh && sender.ready().await.is_err() {
                reused = backend.idle_http.take();
                continue;
            }
            match answer_head(sender.try_send_request(request), &mut place, upstream).await {
                Ok(response) => {
                    pool.connect_succeeded(&backend);
                    return Ok(Answer {
                        response,
                        backend: identity,
                        checkin: Checkin {
                            sender: Some(sender),
                            backend,
                            _lease: lease,
                        },
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        request = unsent;
                        reused = backend.idle_http.take();
                    }
                    // The client's body failed (too large, aborted): not the backend's
                    // failure, so no warning and no count against it.
                    _ if from_client_body(e.error()) => {
                        tracing::debug!(backend = %identity, error = %e.error(), "client request body failed");
                        return Err(Failure::Proxy(Refusal::BadUpgrade, identity, None));
                    }
                    _ => {
                        tracing::debug!(backend = %identity, error = %e.error(), "upstream exchange failed");
                        pool.exchange_failed(&backend);
                        let error = format!("request: {}", e.error());
                        super::warn_backend_failure(&upstream.name, &identity, &error);
                        return Err(Failure::Proxy(
                            Refusal::UpstreamConnect,
                            identity,
                            Some(error),
                        ));
                    }
                },
            }
        }
    }
    Err(last)
}

/// Awaits `exchange` (the answer's head), holding `place` at most the upstream's
/// `connect_timeout` from now: a long poll (the backend answers when it has something, up
/// to `http_timeout`) must not keep a `max_pending` place, and with it the upgrades to its
/// backend, for its whole wait. The place bounds requests *starting*, as it bounds an
/// upgrade's request → 101 (which `connect_timeout` ends).
async fn answer_head<T>(
    exchange: impl std::future::Future<Output = T>,
    place: &mut Option<crate::upstream::pool::Turn>,
    upstream: &crate::config::Upstream,
) -> T {
    if place.is_none() {
        return exchange.await;
    }
    let exchange = std::pin::pin!(exchange);
    match futures_util::future::select(
        exchange,
        std::pin::pin!(tokio::time::sleep(upstream.connect_timeout)),
    )
    .await
    {
        futures_util::future::Either::Left((answer, _)) => answer,
        futures_util::future::Either::Right(((), exchange)) => {
            *place = None;
            exchange.await
        }
    }
}

/// Whether hyper's error came from the request body we gave it (the client's).
fn from_client_body(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<ClientBodyError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A new HTTP/1.1 client connection to `backend`, its task spawned.
async fn connect(
    backend: &BackendState,
    tls: Option<&crate::config::UpstreamTls>,
) -> Result<Sender, BoxError> {
    let stream = open(backend.addr, &backend.host, tls).await?;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    let identity = backend.identity.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(backend = %identity, error = %e, "upstream HTTP connection ended");
        }
    });
    Ok(sender)
}

/// The request as the backend gets it: the client's end-to-end headers (as admission
/// left them), without any the proxy sets, plus `Host` and the `X-Forwarded-*` and
/// `X-Request-Id` headers (SPEC §3), in origin form, as HTTP/1.1.
fn upstream_request(
    req: &request::Parts,
    body: RequestBody,
    target: &Target<'_>,
    fwd: &Forwarded<'_>,
) -> Result<Request<RequestBody>, http::Error> {
    let mut headers = super::end_to_end(&req.headers);
    let ours: Vec<_> = headers
        .keys()
        .filter(|n| is_proxy_set(n) || *n == header::HOST)
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
    headers.insert(header::HOST, HeaderValue::from_str(target.host)?);
    headers.insert(
        header::HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_str(&ip_text(fwd.client_ip))?,
    );
    headers.insert(
        header::HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if fwd.tls { "https" } else { "http" }),
    );
    headers.insert(
        header::HeaderName::from_static("x-forwarded-host"),
        HeaderValue::from_str(target.host)?,
    );
    headers.insert(X_REQUEST_ID, HeaderValue::from_str(fwd.conn_id)?);
    let uri: Uri = target.path.parse()?;
    let mut out = Request::new(body);
    *out.method_mut() = req.method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}
