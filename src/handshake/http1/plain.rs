//! Plain HTTP requests on `http: proxy` routes (SPEC §3 "HTTP alongside WebSockets"),
//! once [`admit`](crate::handshake::admit::admit) let them in: the body capped at
//! `max_request_body` while it streams (a `Content-Length` over it is refused before any
//! connect), the backend the sticky key picks, the whole exchange within `http_timeout`,
//! the answer streamed back, and one `"event":"http"` log line and one
//! `wsgate_http_requests_total` count per request, written when the answer's body ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header;
use http::{Response, request};
use http_body_util::{BodyExt, Either};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::super::admit::{Admission, EarlyPermit};
use super::super::facts::Facts;
use super::{Body, Conn};
use crate::admission::subject::SubjectPermit;
use crate::outcome::Refusal;
use crate::upstream::plain::{self, BoxError, Checkin, ClientBodyError};
use crate::upstream::{Failure, Forwarded};

/// Relays one admitted plain request and returns the answer for the client.
pub(super) async fn proxy<B: ClientBody>(
    conn: Arc<Conn>,
    facts: Facts,
    admission: Admission<'_>,
    body: B,
    started: Instant,
) -> Response<Body> {
    let Admission {
        upgrade,
        upstream_parts,
        permit,
        subject_permit,
        client_ip,
        sticky_key,
        ..
    } = admission;
    // The connection keeps its per-IP count for the requests that follow on it; it is
    // no longer a handshake in progress.
    conn.keep_permit(EarlyPermit::Kept(permit));
    conn.release_pending();
    let route = upgrade.route;
    let limits = &route.limits;
    let deadline = started + limits.http_timeout;
    let exchange = Exchange::start(conn.clone(), deadline);
    let mut line = Line {
        conn: conn.clone(),
        facts,
        status: 0,
        backend: None,
        started,
        deadline,
        up_bytes: Arc::new(AtomicU64::new(0)),
        down_bytes: 0,
        reason: None,
        upstream_error: None,
        _subject_permit: subject_permit,
        _exchange: exchange,
    };
    if declared_length(&upstream_parts).is_some_and(|n| n > limits.max_request_body) {
        return line.refuse(Refusal::BodyTooLarge);
    }
    let over = Arc::new(AtomicBool::new(false));
    // Whether the client's request body has been sent whole: until then the backend
    // connection is still busy with it, even after the answer ended.
    let body_done = Arc::new(AtomicBool::new(body.is_end_stream()));
    let capped = Capped {
        inner: body,
        left: limits.max_request_body,
        sent: line.up_bytes.clone(),
        over: over.clone(),
        done: body_done.clone(),
    };
    let Some(pool) = conn.info.shared.pools.get(&route.upstream.name) else {
        return line.refuse(Refusal::NoBackend);
    };
    let fwd = Forwarded {
        client_ip,
        tls: conn.info.tls.is_some(),
        conn_id: &conn.info.conn_id,
    };
    let target = upgrade.target();
    let sent = plain::send(
        &upstream_parts,
        capped.boxed_unsync(),
        &target,
        &fwd,
        &pool,
        &sticky_key,
    );
    let answer = match tokio::time::timeout_at(deadline, sent).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(Failure::Proxy(r, backend, error))) => {
            line.backend = Some(backend).filter(|b| !b.is_empty());
            // Past the cap, the exchange failed because of the client's body, whatever
            // the backend did meanwhile. A body the client aborted (or sent malformed) is
            // `bad_upgrade` (400), also without an `upstream_error`.
            if over.load(Ordering::Acquire) {
                return line.refuse(Refusal::BodyTooLarge);
            }
            line.upstream_error = error;
            return line.refuse(r);
        }
        Ok(Err(Failure::Status(..))) => return line.refuse(Refusal::UpstreamConnect),
        Err(_) => return line.refuse(Refusal::UpstreamTimeout),
    };
    let plain::Answer {
        response,
        backend,
        checkin,
    } = answer;
    line.backend = Some(backend);
    let (mut head, body) = response.into_parts();
    line.status = head.status.as_u16();
    head.headers = crate::upstream::end_to_end(&head.headers);
    let relayed = Relayed {
        inner: body,
        checkin: Some(checkin),
        request_done: body_done,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        complete: false,
        line: Some(Box::new(line)),
    };
    let mut resp = Response::from_parts(head, Either::Right(Either::Right(relayed)));
    resp.extensions_mut().insert(ExchangeDeadline(deadline));
    resp
}

/// When a plain exchange must be over, client's reading included (`http_timeout`): for a
/// driver that has to enforce it without polling the body (HTTP/2 polls a body only when
/// the client's window lets it).
#[derive(Clone, Copy)]
pub(in crate::handshake) struct ExchangeDeadline(pub(in crate::handshake) Instant);

/// The `Content-Length` a request declares, when it declares one that parses.
fn declared_length(parts: &request::Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A plain exchange in progress on the connection: while one is, the connection's
/// head deadline does not apply; when it ends, the connection is idle (kept alive).
struct Exchange(Arc<Conn>);

impl Exchange {
    fn start(conn: Arc<Conn>, until: Instant) -> Exchange {
        conn.exchange_started(until);
        Exchange(conn)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.0.exchange_ended();
    }
}

/// What the request's log line says, written once when the answer is done with.
struct Line {
    conn: Arc<Conn>,
    facts: Facts,
    status: u16,
    backend: Option<String>,
    started: Instant,
    /// When the exchange must be over (`http_timeout`).
    deadline: Instant,
    /// Request body bytes sent upstream.
    up_bytes: Arc<AtomicU64>,
    /// Answer body bytes sent to the client.
    down_bytes: u64,
    reason: Option<&'static str>,
    /// What went wrong with the backend, for `upstream_error`.
    upstream_error: Option<String>,
    _subject_permit: Option<SubjectPermit>,
    _exchange: Exchange,
}

impl Line {
    /// The proxy's own answer to an admitted request (413, 502, 503, 504), logged as an
    /// `http` line with its reason.
    fn refuse(mut self, r: Refusal) -> Response<Body> {
        self.status = r.status().as_u16();
        self.reason = Some(r.reason());
        let deadline = self.deadline;
        let mut resp = r
            .response::<http_body_util::Full<Bytes>>()
            .map(Either::Left);
        resp.extensions_mut().insert(ExchangeDeadline(deadline));
        resp
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let route = self.facts.route.as_deref().unwrap_or("");
        self.conn
            .info
            .shared
            .metrics
            .http_request(route, self.status);
        let mut record =
            self.conn
                .record("http", &self.facts, self.status, self.backend.as_deref());
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        record.c2u.bytes = self.up_bytes.load(Ordering::Relaxed);
        record.u2c.bytes = self.down_bytes;
        // Cut at `http_timeout` with the answer unread: the client was the slow side.
        if self.reason.is_none() && self.conn.was_cut() {
            self.reason = Some("slow_consumer");
        }
        record.proxy_reason = self.reason;
        record.upstream_error = self.upstream_error.as_deref();
        self.conn.info.shared.access.log(&record);
    }
}

/// A client's request body: hyper's over HTTP/1.1, the HTTP/2 stream's over HTTP/2.
pub(in crate::handshake) trait ClientBody:
    HttpBody<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

impl<B> ClientBody for B where
    B: HttpBody<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static
{
}

/// The client's request body as the backend gets it: counted, and cut (an error, which
/// aborts the upstream request) past `max_request_body`.
struct Capped<B> {
    inner: B,
    left: u64,
    sent: Arc<AtomicU64>,
    over: Arc<AtomicBool>,
    /// Set once the body has ended (sent whole).
    done: Arc<AtomicBool>,
}

impl<B: ClientBody> HttpBody for Capped<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None => {
                self.done.store(true, Ordering::Release);
                return Poll::Ready(None);
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(client_body(e.into())))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            if n > self.left {
                self.over.store(true, Ordering::Release);
                return Poll::Ready(Some(Err(client_body(
                    "request body over max_request_body".into(),
                ))));
            }
            self.left -= n;
            self.sent.fetch_add(n, Ordering::Relaxed);
        }
        if self.inner.is_end_stream() {
            self.done.store(true, Ordering::Release);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Marks an error as the client's body's, so that the upstream side does not take it
/// for a backend failure.
fn client_body(e: BoxError) -> BoxError {
    Box::new(ClientBodyError(e))
}

/// The backend's answer body as the client gets it: counted, bounded by the exchange's
/// deadline, and its connection handed back to the pool once read to the end.
pub(in crate::handshake) struct Relayed {
    inner: Incoming,
    checkin: Option<Checkin>,
    /// The request body was sent whole: only then may the backend connection be reused
    /// (a backend may answer before reading all of it).
    request_done: Arc<AtomicBool>,
    deadline: Pin<Box<Sleep>>,
    complete: bool,
    line: Option<Box<Line>>,
}

impl HttpBody for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.deadline.as_mut().poll(cx).is_ready() {
            if let Some(line) = this.line.as_mut() {
                line.reason = Some(Refusal::UpstreamTimeout.reason());
            }
            return Poll::Ready(Some(Err("http_timeout passed".into())));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.complete = true;
                if let Some(c) = this.checkin.take()
                    && this.request_done.load(Ordering::Acquire)
                {
                    c.done();
                }
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => {
                if let (Some(data), Some(line)) = (frame.data_ref(), this.line.as_mut()) {
                    line.down_bytes += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.complete || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if let Some(c) = self.checkin.take()
            && (self.complete || self.inner.is_end_stream())
            && self.request_done.load(Ordering::Acquire)
        {
            c.done();
        }
        // The checkin (if still here) is dropped before the line is written.
        drop(self.checkin.take());
        drop(self.line.take());
    }
}
