//! A stream with bytes read ahead in front of it (those past a PROXY header).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream with bytes already read in front of it (those past a PROXY header).
/// The stream stays inline in the relay session for the connection's life, so the prefix,
/// gone after the first reads, is boxed: an empty one costs a word, not four.
pub struct Prefixed<S> {
    prefix: Option<Box<Prefix>>,
    inner: S,
}

/// Bytes still to be read before the stream's own; `at` of them already were.
struct Prefix {
    bytes: Vec<u8>,
    at: usize,
}

impl<S> Prefixed<S> {
    pub(super) fn new(inner: S, prefix: Vec<u8>) -> Prefixed<S> {
        Prefixed {
            prefix: (!prefix.is_empty()).then(|| {
                Box::new(Prefix {
                    bytes: prefix,
                    at: 0,
                })
            }),
            inner,
        }
    }

    /// Puts `front` before what is left of the prefix (bytes read to look ahead).
    pub(super) fn with_front(mut self, mut front: Vec<u8>) -> Prefixed<S> {
        if let Some(p) = self.prefix.take() {
            front.extend_from_slice(&p.bytes[p.at..]);
        }
        Prefixed::new(self.inner, front)
    }

    pub(super) fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(p) = this.prefix.as_mut() {
            let n = (p.bytes.len() - p.at).min(buf.remaining());
            buf.put_slice(&p.bytes[p.at..p.at + n]);
            p.at += n;
            if p.at == p.bytes.len() {
                // Free it: the prefix lives as long as the connection otherwise.
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
