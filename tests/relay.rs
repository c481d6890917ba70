//! Frames relayed end to end through wsgate: echo of every length class, fragmentation
//! with interleaved control frames, and close frames relayed unchanged both ways.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const LIMITS: &str = "max_frame_size: 32MiB, max_message_size: 32MiB";

async fn next_message(ws: &mut Client) -> Message {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn text_and_binary_echo_at_every_length_boundary() {
    let gw = gateway_with_echo(LIMITS).await;
    let mut ws = connect(&gw.url("/echo")).await;
    for len in [0usize, 125, 126, 65535, 65536, 1 << 20, 16 << 20] {
        let bin: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        ws.send(Message::binary(bin.clone()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            next_message(&mut ws).await.into_data().as_ref(),
            bin.as_slice(),
            "binary {len}"
        );
        let text = "é".repeat(len / 2);
        ws.send(Message::text(text.clone()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            next_message(&mut ws).await.to_text().ok(),
            Some(text.as_str()),
            "text {len}"
        );
    }
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["c2u"]["messages"], 14);
    assert_eq!(line["u2c"]["messages"], 14);
    assert_eq!(line["status"], 101);
    assert_eq!(line["close"]["by"], "client");
}

#[tokio::test]
async fn fragmented_message_with_interleaved_pings_is_relayed_frame_by_frame() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config_for(backend, "")).await;
    let (mut client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    let frames = [
        client_frame(0x01, b"hel"),
        client_frame(0x89, b"ping-1"),
        client_frame(0x00, b"lo "),
        client_frame(0x8A, b"unsolicited pong"),
        client_frame(0x80, b"world"),
    ];
    for f in &frames {
        client.write_all(f).await.unwrap_or_else(|e| panic!("{e}"));
    }
    // Same frames, same order, same masks: the relay does not reframe.
    let expected: Vec<(u8, &[u8])> = vec![
        (0x01, b"hel"),
        (0x89, b"ping-1"),
        (0x00, b"lo "),
        (0x8A, b"unsolicited pong"),
        (0x80, b"world"),
    ];
    for (b0, payload) in expected {
        assert_eq!(read_frame(&mut up).await, Some((b0, payload.to_vec())));
    }
    // And the other way: upstream fragments with a ping in between.
    for f in [
        server_frame(0x02, b"ab"),
        server_frame(0x89, b"up-ping"),
        server_frame(0x80, b"cd"),
    ] {
        up.write_all(&f).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(read_frame(&mut client).await, Some((0x02, b"ab".to_vec())));
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x89, b"up-ping".to_vec()))
    );
    assert_eq!(read_frame(&mut client).await, Some((0x80, b"cd".to_vec())));
}

#[tokio::test]
async fn client_close_code_and_reason_reach_the_upstream_and_back() {
    let (backend, mut accepted) = ws_backend().await;
    let gw = spawn_gateway(&config_for(backend, "")).await;
    let mut ws = connect(&gw.url("/chat")).await;
    let mut up = next_accepted(&mut accepted).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4321),
        reason: "bye now".into(),
    })))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    match next_message_backend(&mut up).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4321);
            assert_eq!(f.reason.as_str(), "bye now");
        }
        other => panic!("backend got {other:?}"),
    }
    // Polling the backend again flushes tungstenite's automatic close reply.
    tokio::spawn(async move { while let Some(Ok(_)) = up.next().await {} });
    match next_message(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 4321),
        other => panic!("client got {other:?}"),
    }
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], 4321);
    assert_eq!(line["close"]["reason"], "bye now");
    assert_eq!(line["close"]["by"], "client");
    assert_eq!(line["proxy_reason"], serde_json::Value::Null);
}

#[tokio::test]
async fn upstream_close_reaches_the_client() {
    let (backend, mut accepted) = ws_backend().await;
    let gw = spawn_gateway(&config_for(backend, "")).await;
    let mut ws = connect(&gw.url("/chat")).await;
    let mut up = next_accepted(&mut accepted).await;
    up.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Again,
        reason: "later".into(),
    })))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    match next_message(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1013);
            assert_eq!(f.reason.as_str(), "later");
        }
        other => panic!("client got {other:?}"),
    }
    // The client's automatic reply goes back to the backend, completing the handshake.
    let _ = tokio::time::timeout(PATIENCE, ws.next()).await;
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], 1013);
    assert_eq!(line["close"]["by"], "upstream");
}

/// A backend that answers the upgrade with its 101 and `first` in one write, so the
/// gateway's handshake reads both: (address, the upgraded stream once accepted).
async fn backend_sending_with_its_101(
    first: Vec<u8>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Option<TcpStream>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.ok()?;
        let head = read_head(&mut s).await;
        let key = header_value(&head, "sec-websocket-key")?;
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        out.extend(first);
        s.write_all(&out).await.ok()?;
        Some(s)
    });
    (addr, task)
}

/// More than one relay buffer read with the upstream's 101 (a welcome message on a route
/// with a small `buffer_size`) is relayed, and the connection goes on.
#[tokio::test]
async fn a_welcome_message_read_with_the_101_reaches_the_client_on_a_small_buffer() {
    let welcome = vec![b'w'; 4000];
    let (backend, accepted) = backend_sending_with_its_101(server_frame(0x82, &welcome)).await;
    let gw = spawn_gateway(&config_for(backend, "buffer_size: 1KiB")).await;
    let (mut client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut up = tokio::time::timeout(PATIENCE, accepted)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .unwrap_or_else(|| panic!("no backend"));
    assert_eq!(read_frame(&mut client).await, Some((0x82, welcome)));
    send_server_close(&mut up, 1000).await;
    assert_eq!(read_close_code(&mut client).await, Some(1000));
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    drop(up);
    assert!(closes_tcp(&mut client).await);
}

/// The same from the client: a frame pipelined behind the upgrade request, larger than
/// the route's buffer, reaches the upstream.
#[tokio::test]
async fn a_frame_pipelined_behind_the_request_reaches_the_upstream_on_a_small_buffer() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config_for(backend, "buffer_size: 1KiB")).await;
    let addr = gw.addr();
    let mut client = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let payload = vec![b'p'; 4000];
    let mut bytes = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes();
    bytes.extend(client_frame(0x82, &payload));
    client
        .write_all(&bytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    assert_eq!(read_frame(&mut up).await, Some((0x82, payload)));
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
}

async fn next_message_backend(ws: &mut Backend) -> Message {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Durations far past what nanoseconds in a u64 hold (~584,000 years, the most a config
/// can say) on every timer: no overflow panic, pings and their pongs still work, the
/// connection relays and its `ws_close` line counts what passed.
#[tokio::test]
async fn the_largest_configurable_durations_neither_panic_nor_fire() {
    const HUGE: &str = "5124095576030h";
    let (backend, mut accepted) = raw_backend().await;
    let limits = format!(
        "idle_timeout: {HUGE}, max_connection_age: {HUGE}, fragment_timeout: {HUGE}, send_timeout: {HUGE}"
    );
    let keepalive = format!(
        "keepalive: {{ ping_interval: 100ms, pong_timeout: {HUGE}, upstream_ping_interval: {HUGE} }}\n"
    );
    let gw = spawn_gateway(&(config_for(backend, &limits) + &keepalive)).await;
    let (mut client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    for _ in 0..2 {
        let (b0, payload) = tokio::time::timeout(PATIENCE, read_frame(&mut client))
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no ping"));
        assert_eq!(b0, 0x89);
        send_raw(&mut client, &client_frame(0x8A, &payload)).await;
    }
    send_raw(&mut client, &client_frame(0x01, b"ab")).await;
    send_raw(&mut client, &client_frame(0x80, b"cd")).await;
    assert_eq!(read_frame(&mut up).await, Some((0x01, b"ab".to_vec())));
    assert_eq!(read_frame(&mut up).await, Some((0x80, b"cd".to_vec())));
    send_raw(&mut up, &server_frame(0x82, b"xyz")).await;
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], 1000, "{line}");
    assert_eq!(line["proxy_reason"], serde_json::Value::Null, "{line}");
    assert_eq!(line["pings"], 2, "{line}");
    // Two 2-byte data frames and a 2-byte close, each with a 6-byte masked header.
    assert_eq!(line["c2u"]["frames"], 3, "{line}");
    assert_eq!(line["c2u"]["messages"], 1, "{line}");
    assert_eq!(line["c2u"]["bytes"], 24, "{line}");
    assert_eq!(line["u2c"]["frames"], 2, "{line}");
    assert_eq!(line["u2c"]["bytes"], 9, "{line}");
}

async fn send_raw(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap_or_else(|e| panic!("{e}"));
}
