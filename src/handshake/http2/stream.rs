//! One HTTP/2 stream as the rest of the gateway sees it, driven on the `h2` crate directly:
//! [`StreamIo`] is a WebSocket stream's byte pipe for the relay (it reads the client's DATA
//! and writes its own, no task or channel between), [`RecvBody`] a plain request's body
//! for the upstream side, and [`send_answer`] sends a response that is not a WebSocket.
//!
//! Flow control: what is read is released to the client's window as it is taken (so a
//! stream holds at most its window, `buffer_size`, unread), and a write waits for send
//! capacity before it is handed to h2 (which holds at most `max_send_buffer_size` per
//! stream beyond the write in flight), as hyper's HTTP/2 upgrade path did.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A WebSocket stream as the relay's client side. Kept small: it is part of every relay
/// task (the task's size class is what an idle stream costs).
pub(super) struct StreamIo {
    recv: RecvStream,
    send: SendStream<Bytes>,
    /// What was read from h2 and not yet taken by the relay.
    pending: Bytes,
}

impl StreamIo {
    pub(super) fn new(recv: RecvStream, send: SendStream<Bytes>) -> StreamIo {
        StreamIo {
            recv,
            send,
            pending: Bytes::new(),
        }
    }
}

/// A reset of the client's (NO_ERROR or CANCEL) ends its side like a close; any other
/// error fails the read.
fn read_error(e: h2::Error) -> io::Result<()> {
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
        Some(Reason::STREAM_CLOSED) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
        _ => Err(to_io(e)),
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Waits until the stream may send (h2 raises the claim to what is buffered inside
/// `send_data`; claiming one byte only when there is something to send never pins the
/// connection's window for an idle stream).
fn poll_send_capacity<B: Buf>(
    send: &mut SendStream<B>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while send.capacity() == 0 {
        send.reserve_capacity(1);
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(0)) => {}
            Some(Ok(_)) => break,
            Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
    Poll::Ready(Ok(()))
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) if data.is_empty() => {
                    if this.recv.is_end_stream() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(read_error(e)),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        if this.pending.is_empty() {
            // An empty slice would still hold h2's read buffer.
            this.pending = Bytes::new();
        }
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        ready!(poll_send_capacity(&mut this.send, cx))?;
        // A copy of its own: a frame h2 still holds must pin only its own bytes. (A write
        // buffer shared by the thread's streams let a stalled client's tiny frames each pin
        // a 1 KiB chunk interleaved with other streams' writes: up to 1 KiB per queued
        // frame instead of its size.)
        let data = Bytes::copy_from_slice(buf);
        this.send.send_data(data, false).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Handed to h2 is as far as a stream's write goes; the connection sends it.
        Poll::Ready(Ok(()))
    }

    /// END_STREAM, behind what is still buffered. A stream already ended or reset has
    /// nothing left to end (h2 refuses a second END_STREAM): not an error here.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// A plain request's body (`http: proxy`): DATA as it comes, each released to the
/// client's window as the upstream side takes it, then trailers.
pub(super) struct RecvBody {
    /// `None`: no body (a WebSocket's stream is the relay's).
    recv: Option<RecvStream>,
    length: Option<u64>,
    data_done: bool,
}

impl RecvBody {
    pub(super) fn new(recv: RecvStream, headers: &HeaderMap) -> RecvBody {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        RecvBody {
            recv: Some(recv),
            length,
            data_done: false,
        }
    }

    pub(super) fn empty() -> RecvBody {
        RecvBody {
            recv: None,
            length: Some(0),
            data_done: true,
        }
    }
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let Some(recv) = this.recv.as_mut() else {
            return Poll::Ready(None);
        };
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().is_none_or(RecvStream::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// The head of a response as HTTP/2 carries it: no connection-specific fields (RFC 9113
/// §8.2.2), a `Date` as HTTP/1.1 answers have.
pub(super) fn h2_head(mut head: http::response::Parts) -> Response<()> {
    let h = &mut head.headers;
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(name);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
    if !h.contains_key(header::DATE)
        && let Ok(date) =
            HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
    {
        h.insert(header::DATE, date);
    }
    head.version = Version::HTTP_2;
    Response::from_parts(head, ())
}

/// Sends an answer that is not a WebSocket: its head, then its body as the client's window
/// lets it, then END_STREAM or trailers. A body that fails resets the stream; a client
/// that resets it ends the sending.
pub(super) async fn send_answer<B>(mut respond: h2::server::SendResponse<Bytes>, resp: Response<B>)
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    let (head, mut body) = resp.into_parts();
    let mut head = h2_head(head);
    if body.is_end_stream() {
        if respond.send_response(head, true).is_err() {
            respond.send_reset(Reason::INTERNAL_ERROR);
        }
        return;
    }
    if let Some(len) = body.size_hint().exact() {
        head.headers_mut()
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
    let Ok(mut tx) = respond.send_response(head, false) else {
        respond.send_reset(Reason::INTERNAL_ERROR);
        return;
    };
    loop {
        let frame = poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            body_frame(&mut body, cx).map(Some)
        })
        .await;
        let Some(frame) = frame else {
            // The client reset the stream.
            return;
        };
        match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(())) => {
                tx.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if !data.is_empty()
                        && poll_fn(|cx| poll_send_capacity(&mut tx, cx)).await.is_err()
                    {
                        return;
                    }
                    if tx.send_data(data, eos).is_err() || eos {
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.reserve_capacity(0);
                        let _ = tx.send_trailers(trailers);
                        return;
                    }
                }
            },
        }
    }
}

/// The body's next frame, its error reduced to "failed" (it is logged where it happens).
fn body_frame<B>(body: &mut B, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ()>>>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    Pin::new(body)
        .poll_frame(cx)
        .map(|f| f.map(|r| r.map_err(|_| ())))
}
