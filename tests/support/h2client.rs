//! An HTTP/2 client for WebSockets over HTTP/2 (RFC 8441), on the `h2` crate: h2c with
//! prior knowledge or TLS with ALPN `h2`, extended CONNECT, and a stream as a byte stream
//! that tokio-tungstenite runs a WebSocket over.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{PATIENCE, insecure_tls};

/// A WebSocket over one HTTP/2 stream.
pub type H2Ws = WebSocketStream<H2Io>;

/// One HTTP/2 stream as a byte stream: DATA frames in, DATA frames out, END_STREAM on
/// shutdown. Reading gives the window back as the bytes are taken.
pub struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buf: Bytes,
}

fn io_error(e: h2::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// The client's half of a connection and the task driving it (its end is the
/// connection's: `Err` on a protocol error or GOAWAY with an error).
pub struct H2Conn {
    pub send: SendRequest<Bytes>,
    /// Kept so the connection lives as long as this value.
    pub _driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

/// h2c with prior knowledge.
pub async fn connect_h2c(addr: std::net::SocketAddr) -> H2Conn {
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    handshake(tcp).await
}

/// TLS with ALPN `h2` (the certificate is not verified: tests use self-signed ones).
pub async fn connect_h2_tls(addr: std::net::SocketAddr) -> H2Conn {
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let config = insecure_tls(&[b"h2"]);
    let name =
        rustls::pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS: {e}"));
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the listener must choose h2 by ALPN"
    );
    handshake(tls).await
}

async fn handshake<S>(io: S) -> H2Conn
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Windows as browsers set them (Chrome: 15 MiB for the connection): one stream the
    // application does not read must not take the whole connection's window.
    let handshake = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(15 << 20)
        .handshake(io);
    let (send, conn) = tokio::time::timeout(PATIENCE, handshake)
        .await
        .unwrap_or_else(|_| panic!("h2 handshake timed out"))
        .unwrap_or_else(|e| panic!("h2 handshake: {e}"));
    let driver = tokio::spawn(conn);
    let send = tokio::time::timeout(PATIENCE, send.ready())
        .await
        .unwrap_or_else(|_| panic!("h2 not ready in time"))
        .unwrap_or_else(|e| panic!("h2 ready: {e}"));
    H2Conn {
        send,
        _driver: driver,
    }
}

/// What an extended CONNECT got: the WebSocket, or the refusal's status and body.
pub enum Opened {
    Ws(Box<H2Ws>),
    Refused(StatusCode, String),
}

impl Opened {
    pub fn ws(self) -> H2Ws {
        match self {
            Opened::Ws(ws) => *ws,
            Opened::Refused(status, body) => panic!("refused {status}: {body}"),
        }
    }
}

/// The extended CONNECT for `path` on `conn` with `headers`; `protocol` is normally
/// `Some("websocket")`.
pub async fn extended_connect(
    conn: &mut H2Conn,
    path: &str,
    protocol: Option<&'static str>,
    headers: &[(&str, &str)],
) -> Result<Opened, h2::Error> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://localhost{path}"))
        .header("sec-websocket-version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(()).unwrap_or_else(|e| panic!("{e}"));
    if let Some(p) = protocol {
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static(p));
    }
    let ready = tokio::time::timeout(PATIENCE, conn.send.clone().ready())
        .await
        .unwrap_or_else(|_| panic!("h2 not ready in time"))?;
    conn.send = ready;
    let (resp, send) = conn.send.send_request(req, false)?;
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .unwrap_or_else(|_| panic!("no answer to the CONNECT in time"))?;
    let status = resp.status();
    let mut recv = resp.into_body();
    if status != StatusCode::OK {
        let mut body = Vec::new();
        while let Some(Ok(chunk)) = tokio::time::timeout(PATIENCE, recv.data())
            .await
            .ok()
            .flatten()
        {
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        return Ok(Opened::Refused(
            status,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    let io = H2Io {
        send,
        recv,
        buf: Bytes::new(),
    };
    let ws = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    Ok(Opened::Ws(Box::new(ws)))
}

/// Sends the extended CONNECT (`:protocol` websocket) for `path` without waiting for the
/// answer: for tests that act on the stream before reading it, or instead.
pub async fn send_ws_connect(
    conn: &mut H2Conn,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://localhost{path}"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let ready = tokio::time::timeout(PATIENCE, conn.send.clone().ready())
        .await
        .unwrap_or_else(|_| panic!("not ready"))
        .unwrap_or_else(|e| panic!("{e}"));
    conn.send = ready;
    conn.send
        .send_request(req, false)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A WebSocket over HTTP/2 to `path` that must be admitted.
pub async fn open_ws(conn: &mut H2Conn, path: &str) -> H2Ws {
    extended_connect(conn, path, Some("websocket"), &[])
        .await
        .unwrap_or_else(|e| panic!("CONNECT {path}: {e}"))
        .ws()
}
