//! The built-in echo upstream (`upstreams.NAME.builtin: echo`), so the default config
//! serves a working endpoint on a fresh clone. It listens on an ephemeral loopback port
//! and is reached through the ordinary upstream path: real TCP, a real handshake.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tungstenite::protocol::WebSocketConfig;

/// Largest message the demo echoes; the gateway's own limits apply in front of it.
const MAX_MESSAGE: usize = 64 << 20;

/// Binds 127.0.0.1:0 and serves echo connections in the background.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "built-in echo: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(addr)
}

async fn echo(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}
