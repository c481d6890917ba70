//! The echo backend every target relays to: raw tokio sockets and hand-rolled frame
//! handling, one task per connection on a single-threaded runtime, so that the backend
//! costs as little as possible on the core it shares with the load generator.
//!
//! Each read is parsed into whole frames; every data frame goes back unmasked with its
//! opcode and FIN bit (so fragments echo as fragments), pings get pongs, a close gets a
//! close and the connection ends. All echoes of one read leave in one write. A frame over
//! `--max-frame` or a head over 8 KiB ends the connection.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ws;

/// Serves until killed; prints one JSON line with the bound address once listening.
pub async fn run(bind: SocketAddr, max_frame: usize) -> Result<()> {
    let sock = tokio::net::TcpSocket::new_v4().context("socket")?;
    sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
    sock.bind(bind).with_context(|| format!("bind {bind}"))?;
    let listener: TcpListener = sock.listen(4096).context("listen")?;
    let local = listener.local_addr().context("local address")?;
    println!("{}", serde_json::json!({ "backend": local.to_string() }));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                eprintln!("backend: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            // A failing connection is the client's business; the backend carries on.
            let _ = serve(stream, max_frame).await;
        });
    }
}

async fn serve(mut stream: TcpStream, max_frame: usize) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 4096];
    let mut end = 0;
    let head_len = loop {
        if end == buf.len() {
            anyhow::bail!("request head over {} bytes", buf.len());
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
        if let Some(h) = ws::head_end(&buf[..end]) {
            break h;
        }
    };
    let key = ws::header(&buf[..head_len], "sec-websocket-key")
        .context("no Sec-WebSocket-Key")?
        .to_vec();
    stream.write_all(&ws::upgrade_response(&key)).await?;
    buf.copy_within(head_len..end, 0);
    end -= head_len;
    echo_loop(stream, buf, end, max_frame).await
}

/// Echoes frames until the peer closes. `buf[..end]` holds bytes already read.
pub(crate) async fn echo_loop(
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    mut end: usize,
    max: usize,
) -> Result<()> {
    // Idle connections keep only this small buffer; it grows for big frames and shrinks
    // back once they are gone.
    const SMALL: usize = 4096;
    let mut out = Vec::with_capacity(SMALL);
    loop {
        let mut start = 0;
        let mut closing = false;
        while let Some(h) = ws::parse_header(&buf[start..end], max)? {
            let total = h.len + h.payload_len;
            if end - start < total {
                if buf.len() < total {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                    buf.resize(total, 0);
                }
                break;
            }
            let payload = &mut buf[start + h.len..start + total];
            if let Some(m) = h.mask {
                ws::apply_mask(payload, m, 0);
            }
            match h.opcode {
                ws::OP_PING => ws::push_frame(&mut out, true, ws::OP_PONG, payload, None),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = payload.get(..2).unwrap_or(&[0x03, 0xE8]);
                    ws::push_frame(&mut out, true, ws::OP_CLOSE, code, None);
                    closing = true;
                }
                op => ws::push_frame(&mut out, h.fin, op, payload, None),
            }
            start += total;
            if closing {
                break;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
            if out.capacity() > 4 * SMALL {
                out.shrink_to(SMALL);
            }
        }
        if closing {
            stream.shutdown().await?;
            return Ok(());
        }
        buf.copy_within(start..end, 0);
        end -= start;
        if end == 0 && buf.len() > SMALL {
            buf.truncate(SMALL);
            buf.shrink_to_fit();
        }
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}
