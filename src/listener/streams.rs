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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn the_prefix_and_a_front_are_read_before_the_stream_then_freed() {
        let (mut far, near) = duplex(64);
        far.write_all(b"stream")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(far);
        let mut s = Prefixed::new(near, b"prefix ".to_vec()).with_front(b"front ".to_vec());
        let mut small = [0u8; 4];
        let n = s.read(&mut small).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&small[..n], b"fron");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rest, b"t prefix stream");
        assert!(s.prefix.is_none(), "a read-out prefix is freed");
        // An empty prefix costs nothing: no box at all.
        let (_far, near) = duplex(64);
        assert!(Prefixed::new(near, Vec::new()).prefix.is_none());
    }
}
