//! The client half of HTTP/1.1 that the upstream WebSocket handshake needs, and no more:
//! the request head written in one piece, the answer's head parsed in place, and a
//! refusal's body decoded as it arrives (`Content-Length`, chunked, or up to the close)
//! so that it can be relayed to the client. A general client (hyper's) costs a spawned
//! connection task, a channel and an upgrade hand-off per handshake for the same job.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Largest answer head taken from a backend (the request-head limit's size): beyond, the
/// handshake fails as a bad answer.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines an answer may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read. The head of a 101 fits in one; what follows it in
/// the same read is the relay's first bytes.
const READ_SIZE: usize = 4096;
/// Longest chunk-size or trailer line in a chunked refusal body.
const MAX_LINE: usize = 4096;

/// One header line of a request head, by how far its value can be trusted.
#[derive(Clone, Copy, Debug)]
pub enum Field<'a> {
    /// Already a valid header value (a client's `HeaderValue`, a constant): written as it
    /// is.
    Valid(&'a [u8]),
    /// A value the proxy composed (from client text): checked as `HeaderValue` checks text
    /// (tab and visible ASCII or space only), so no CR or LF can split the head.
    Text(&'a str),
}

/// The head of a `GET target HTTP/1.1` request, in one piece: the request line, then
/// `headers` in order as `name: value` lines, then the blank line. `headers_size` is the
/// expected size of the header lines (the head is allocated once when it is right).
///
/// Fails, saying why, on a target that is empty or holds a space or control character,
/// or on a [`Field::Text`] value that is not a valid header value.
pub fn get_head<'a>(
    target: &str,
    headers: impl IntoIterator<Item = (&'a str, Field<'a>)>,
    headers_size: usize,
) -> Result<Vec<u8>, &'static str> {
    let target = target.as_bytes();
    if target.is_empty() || !target.iter().all(|&b| b > b' ' && b != 0x7f) {
        return Err("invalid request target");
    }
    let mut out = Vec::with_capacity(64 + target.len() + headers_size);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        let value = match value {
            Field::Valid(v) => v,
            Field::Text(t) => {
                let valid = t.bytes().all(|b| b == b'\t' || (b' '..0x7f).contains(&b));
                if !valid {
                    return Err("invalid header value");
                }
                t.as_bytes()
            }
        };
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// An answer's status line and headers.
pub struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads from `stream` until `buf` holds a whole final answer head (a 101, or any status
/// but another 1xx, which is skipped as hyper's client skips it), and returns it; `buf`
/// keeps what followed the head.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> io::Result<Head> {
    loop {
        if let Some(head) = parse_head(buf)? {
            let informational = head.status.is_informational();
            if head.status == StatusCode::SWITCHING_PROTOCOLS || !informational {
                return Ok(head);
            }
            continue;
        }
        if buf.len() >= MAX_HEAD {
            return Err(bad("answer head too large"));
        }
        buf.reserve(READ_SIZE);
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Parses one answer head off the front of `buf`, if it is all there. Header values are
/// slices of the head's own allocation, not copies.
fn parse_head(buf: &mut BytesMut) -> io::Result<Option<Head>> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut slots);
    let len = match answer.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(bad("malformed answer head")),
    };
    let code = answer.code.ok_or_else(|| bad("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| bad("bad status"))?;
    // Where each value sits in `buf`, to slice it out of the frozen head below.
    let base = buf.as_ptr() as usize;
    let span = |value: &[u8]| -> io::Result<Option<(usize, usize)>> {
        if value.is_empty() {
            return Ok(None);
        }
        let at = (value.as_ptr() as usize).checked_sub(base);
        match at.map(|at| (at, at + value.len())) {
            Some((at, to)) if to <= len => Ok(Some((at, to))),
            _ => Err(bad("header value outside the head")),
        }
    };
    let spans: Vec<Option<(usize, usize)>> = answer
        .headers
        .iter()
        .map(|h| span(h.value))
        .collect::<io::Result<_>>()?;
    let names: Vec<HeaderName> = answer
        .headers
        .iter()
        .map(|h| HeaderName::from_bytes(h.name.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| bad("bad header name"))?;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(names.len());
    for (name, span) in names.into_iter().zip(spans) {
        let value = match span {
            Some((from, to)) => HeaderValue::from_maybe_shared(head.slice(from..to))
                .map_err(|_| bad("bad header value"))?,
            None => HeaderValue::from_static(""),
        };
        headers.append(name, value);
    }
    Ok(Some(Head { status, headers }))
}

/// How a refusal's body ends (RFC 9112 §6.3, for an answer to a GET).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, up to the empty one.
    Trailer,
}

impl Framing {
    fn of(status: StatusCode, headers: &HeaderMap) -> io::Result<Framing> {
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(Framing::Done);
        }
        if let Some(last) = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
        {
            let last = last.to_str().map_err(|_| bad("bad transfer-encoding"))?;
            let chunked = last
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            return Ok(if chunked {
                Framing::Chunked(Chunked::Size)
            } else {
                Framing::Close
            });
        }
        let mut length = None;
        for value in headers.get_all(header::CONTENT_LENGTH) {
            // Digits only: `u64::from_str` would take `+5`.
            let digits = value.as_bytes().trim_ascii();
            let n = std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or_else(|| bad("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting content-length"));
            }
            length = Some(n);
        }
        Ok(match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        })
    }

    /// Takes the next piece of body data out of `buf`. `Ok(None)` with the framing not
    /// `Done` means more bytes are needed.
    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        loop {
            match *self {
                Framing::Done => return Ok(None),
                Framing::Close => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = take(left, buf.len());
                    *self = if n as u64 == left {
                        Framing::Done
                    } else {
                        Framing::Length(left - n as u64)
                    };
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Framing::Chunked(state) => match state.step(buf)? {
                    Step::Data(data) => {
                        *self = Framing::Chunked(state.after(data.len() as u64));
                        return Ok(Some(data));
                    }
                    Step::Next(next) => *self = next,
                    Step::More => return Ok(None),
                },
            }
        }
    }

    /// The stream ended: the body is complete only when it runs to the close.
    fn at_eof(&mut self) -> io::Result<()> {
        match self {
            Framing::Close | Framing::Done => {
                *self = Framing::Done;
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// `min(left, available)` without a lossy cast.
fn take(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |l| l.min(available))
}

enum Step {
    Data(Bytes),
    Next(Framing),
    More,
}

impl Chunked {
    fn step(self, buf: &mut BytesMut) -> io::Result<Step> {
        match self {
            Chunked::Size => {
                let Some(line) = line(buf)? else {
                    return Ok(Step::More);
                };
                let size = chunk_size(&line)?;
                Ok(Step::Next(Framing::Chunked(if size == 0 {
                    Chunked::Trailer
                } else {
                    Chunked::Data(size)
                })))
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                Ok(Step::Data(buf.split_to(take(left, buf.len())).freeze()))
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(bad("chunk data not followed by CRLF"));
                }
                let _ = buf.split_to(2);
                Ok(Step::Next(Framing::Chunked(Chunked::Size)))
            }
            Chunked::Trailer => match line(buf)? {
                None => Ok(Step::More),
                Some(l) if l.is_empty() => Ok(Step::Next(Framing::Done)),
                Some(_) => Ok(Step::Next(Framing::Chunked(Chunked::Trailer))),
            },
        }
    }

    /// The state once `taken` bytes of a chunk's data went out.
    fn after(self, taken: u64) -> Chunked {
        match self {
            Chunked::Data(left) if left > taken => Chunked::Data(left - taken),
            Chunked::Data(_) => Chunked::DataEnd,
            other => other,
        }
    }
}

/// One CRLF-terminated line off the front of `buf`, without its CRLF.
fn line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => {
            let line = buf.split_to(at);
            let _ = buf.split_to(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(bad("chunk line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional extensions (ignored).
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    if digits == 0 || digits > 15 || !(rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t')) {
        return Err(bad("bad chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| bad("bad chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))
}

/// A refusal's body, read from the backend as the client's side takes it: memory is one
/// read's worth at a time, whatever the body's length.
pub struct RefusalBody<S> {
    stream: S,
    buf: BytesMut,
    framing: Framing,
}

impl<S: AsyncRead + Unpin> RefusalBody<S> {
    /// The body after `head`, starting with the bytes already read past it.
    pub fn new(head: &Head, stream: S, buf: BytesMut) -> io::Result<Self> {
        Ok(RefusalBody {
            framing: Framing::of(head.status, &head.headers)?,
            stream,
            buf,
        })
    }

    /// Reads more of the body into `buf`; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let filled = self.buf.len();
        self.buf.resize(filled + READ_SIZE, 0);
        let mut read = ReadBuf::new(&mut self.buf[filled..]);
        let polled = Pin::new(&mut self.stream).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.buf.truncate(filled + n);
        ready!(polled)?;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + Unpin> Body for RefusalBody<S> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        loop {
            match this.framing.decode(&mut this.buf) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) if this.framing == Framing::Done => return Poll::Ready(None),
                Ok(None) => {}
            }
            match ready!(this.poll_fill(cx)) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(0) => {
                    if let Err(e) = this.framing.at_eof() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A refusal as the client gets it: the backend's status, headers and body.
pub fn refusal<S: AsyncRead + Unpin>(
    head: Head,
    stream: S,
    rest: BytesMut,
) -> io::Result<Response<RefusalBody<S>>> {
    let body = RefusalBody::new(&head, stream, rest)?;
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    // The body is re-framed for the client from its size hint: the backend's length is
    // not ours to repeat (it may even be overridden by a `Transfer-Encoding`).
    response.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(response)
}

#[cfg(test)]
mod tests;
