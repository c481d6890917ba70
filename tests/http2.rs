//! WebSockets over HTTP/2 (SPEC §2 `http2`, §3 "WebSocket over HTTP/2", RFC 8441), driven by
//! the `h2` crate's client: h2c with prior knowledge and TLS with ALPN `h2`, many streams on
//! one connection (each a connection for every cap and limit), flow control as
//! backpressure, drain as GOAWAY plus 1012, and bad input.

#[path = "support/h2client.rs"]
mod h2client;
mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use h2client::*;
use http::StatusCode;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// One listener (`plain` h2c, or TLS with a self-signed certificate), an admin listener,
/// one route to `backend`, and extra top-level YAML.
fn config(backend: std::net::SocketAddr, tls: bool, limits: &str, extra: &str) -> String {
    let listener = if tls {
        r#"{ name: public, bind: "127.0.0.1:0", tls: { self_signed: true } }"#
    } else {
        r#"{ name: public, bind: "127.0.0.1:0", http2: true }"#
    };
    format!(
        r#"
listeners: [{listener}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ {limits} }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 2s }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}
{extra}
"#
    )
}

async fn echo_round_trip(ws: &mut H2Ws, text: &str) {
    ws.send(Message::text(text.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let got = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .unwrap_or_else(|_| panic!("no echo of {text} in time"));
    match got {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
        other => panic!("expected the echo of {text}, got {other:?}"),
    }
}

/// The close code the client gets next, skipping data and pings.
async fn close_code(ws: &mut H2Ws) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => panic!("no close within {PATIENCE:?}"),
        }
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_carries_a_websocket_logged_as_http_2() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "", "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    let mut ws = open_ws(&mut conn, "/chat?room=1").await;
    // Known once the server's SETTINGS are in (they came before the 200).
    assert!(
        conn.send.is_extended_connect_protocol_enabled(),
        "SETTINGS_ENABLE_CONNECT_PROTOCOL must be advertised"
    );
    echo_round_trip(&mut ws, "hello over h2c").await;
    let (status, body) = admin_get(&gw, "/connections").await;
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(view["oldest"][0]["protocol"], "h2", "{view}");
    let bye = CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye".into(),
    };
    ws.close(Some(bye))
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    // The backend's answer comes back on the stream, then the stream ends.
    assert_eq!(close_code(&mut ws).await, Some(4000));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["http"], "2", "{line}");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["close"]["code"], 4000, "{line}");
    assert_eq!(line["close"]["by"], "client", "{line}");
    // Not held for the close wait (5 s) waiting for an END_STREAM clients do not send.
    assert!(line["duration_ms"].as_u64() < Some(4000), "{line}");
    assert_eq!(line["path"], "/chat?room=1", "{line}");
    assert_eq!(line["host"], "localhost", "{line}");
}

#[tokio::test]
async fn tls_alpn_h2_carries_websockets_and_http1_still_works_beside_it() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, true, "", "")).await;
    let mut conn = connect_h2_tls(gw.addr()).await;
    let mut a = open_ws(&mut conn, "/a").await;
    let mut b = open_ws(&mut conn, "/b").await;
    echo_round_trip(&mut a, "first stream").await;
    echo_round_trip(&mut b, "second stream").await;
    echo_round_trip(&mut a, "first again").await;
    a.close(None).await.unwrap_or_else(|e| panic!("close: {e}"));
    echo_round_trip(&mut b, "second outlives first").await;
    let line = gw
        .log_line(|l| l["event"] == "ws_close" && l["path"] == "/a")
        .await;
    assert_eq!(line["http"], "2", "{line}");
    assert_eq!(line["tls"]["version"], "1.3", "{line}");
}

#[tokio::test]
async fn streams_count_against_the_per_ip_cap_and_a_refused_stream_leaves_siblings_alone() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "max_connections_per_ip: 3", "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(open_ws(&mut conn, &format!("/s{i}")).await);
    }
    match extended_connect(&mut conn, "/s3", Some("websocket"), &[]).await {
        Ok(Opened::Refused(status, body)) => {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert!(body.contains("ip_cap"), "{body}");
        }
        Ok(Opened::Ws(_)) => panic!("a fourth stream passed a cap of 3"),
        Err(e) => panic!("CONNECT: {e}"),
    }
    for (i, ws) in open.iter_mut().enumerate() {
        echo_round_trip(ws, &format!("still here {i}")).await;
    }
    // One closes: its place is free for a new stream on the same connection.
    let mut first = open.remove(0);
    first.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    gw.log_line(|l| l["event"] == "ws_close" && l["path"] == "/s0")
        .await;
    let mut again = open_ws(&mut conn, "/s4").await;
    echo_round_trip(&mut again, "after a place was freed").await;
    let reject = gw.log_line(|l| l["event"] == "ws_reject").await;
    assert_eq!(reject["proxy_reason"], "ip_cap", "{reject}");
    assert_eq!(reject["http"], "2", "{reject}");
}

#[tokio::test]
async fn a_stream_over_its_message_rate_is_closed_1008_while_its_sibling_goes_on() {
    let backend = echo_backend().await;
    let limits = "messages: { rate: 5, per: 1m, burst: 5 }";
    let gw = spawn_gateway(&config(backend, false, limits, "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    let mut noisy = open_ws(&mut conn, "/noisy").await;
    let mut quiet = open_ws(&mut conn, "/quiet").await;
    for i in 0..20 {
        if noisy.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut noisy).await, Some(1008));
    echo_round_trip(&mut quiet, "unaffected").await;
    let line = gw
        .log_line(|l| l["event"] == "ws_close" && l["path"] == "/noisy")
        .await;
    assert_eq!(line["proxy_reason"], "rate_limit", "{line}");
}

#[tokio::test]
async fn drain_sends_goaway_and_1012_to_each_stream() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(
        backend,
        false,
        "",
        "drain: { spread: 300ms, timeout: 5s }",
    ))
    .await;
    let mut conn = connect_h2c(gw.addr()).await;
    let mut a = open_ws(&mut conn, "/a").await;
    let mut b = open_ws(&mut conn, "/b").await;
    let gw = std::sync::Arc::new(gw);
    let draining = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.gw.drain().await })
    };
    assert_eq!(close_code(&mut a).await, Some(1012));
    assert_eq!(close_code(&mut b).await, Some(1012));
    // GOAWAY: the connection takes no new stream.
    let refused = extended_connect(&mut conn, "/c", Some("websocket"), &[]).await;
    assert!(
        !matches!(refused, Ok(Opened::Ws(_))),
        "a stream opened after GOAWAY"
    );
    tokio::time::timeout(Duration::from_secs(8), draining)
        .await
        .unwrap_or_else(|_| panic!("drain did not end"))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn bad_connects_get_a_clear_400_and_nothing_stays_counted() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "max_connections_per_ip: 2", "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    for protocol in [None, Some("webtransport")] {
        match extended_connect(&mut conn, "/x", protocol, &[]).await {
            Ok(Opened::Refused(status, body)) => {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{protocol:?}");
                assert!(body.contains("bad_upgrade"), "{body}");
            }
            Ok(Opened::Ws(_)) => panic!("{protocol:?} was admitted"),
            // A CONNECT without `:protocol` needs an authority-form target the client
            // library may refuse to send; either way nothing is admitted.
            Err(e) if protocol.is_none() => eprintln!("client refused to send: {e}"),
            Err(e) => panic!("{protocol:?}: {e}"),
        }
    }
    // The cap of 2 is still whole: refusals held nothing.
    let mut a = open_ws(&mut conn, "/a").await;
    let mut b = open_ws(&mut conn, "/b").await;
    echo_round_trip(&mut a, "a").await;
    echo_round_trip(&mut b, "b").await;
}

/// Two routes: `/flood` to a backend the test drives, anything else to an echo backend.
fn two_route_config(
    driven: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    limits: &str,
) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0", http2: true }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ {limits} }}
upstreams:
  driven: {{ backends: [{{ addr: "{driven}" }}], connect_timeout: 2s }}
  echo: {{ backends: [{{ addr: "{echo}" }}], connect_timeout: 2s }}
routes:
  - {{ name: flood, match: {{ path_prefix: /flood }}, upstream: driven }}
  - {{ name: echo, match: {{ path_prefix: / }}, upstream: echo }}
"#
    )
}

#[tokio::test]
async fn a_stalled_stream_neither_stalls_its_siblings_nor_buffers_past_its_window() {
    let (driven, mut backends) = ws_backend().await;
    let echo = echo_backend().await;
    let limits = "buffer_size: 16KiB, send_timeout: 2s";
    let gw = spawn_gateway(&two_route_config(driven, echo, limits)).await;
    let mut conn = connect_h2c(gw.addr()).await;
    // The client never reads this one.
    let mut stalled = open_ws(&mut conn, "/flood").await;
    let mut upstream = next_accepted(&mut backends).await;
    let mut sibling = open_ws(&mut conn, "/echo").await;
    // The backend writes as fast as it is let.
    let flood = tokio::spawn(async move {
        let chunk = vec![b'x'; 16 * 1024];
        for _ in 0..4096 {
            if upstream.send(Message::binary(chunk.clone())).await.is_err() {
                break;
            }
        }
    });
    // The relay stops reading the backend (backpressure) instead of buffering for a
    // client that reads nothing: the stream's window is full.
    let stalled_now = [("route", "flood"), ("direction", "u2c")];
    await_metric(&gw, "wsgate_connections_stalled", &stalled_now, 1.0).await;
    // Meanwhile the sibling on the same connection goes on.
    for i in 0..5 {
        echo_round_trip(&mut sibling, &format!("sibling {i}")).await;
    }
    // The stalled stream is cut at send_timeout as a slow consumer.
    let line = gw
        .log_line(|l| l["event"] == "ws_close" && l["path"] == "/flood")
        .await;
    assert_eq!(line["proxy_reason"], "slow_consumer", "{line}");
    assert_eq!(line["http"], "2", "{line}");
    echo_round_trip(&mut sibling, "after the cut").await;
    // What the client gets of it: what its window held, then RST_STREAM (no close frame
    // can reach a client that reads nothing).
    let mut tail = 0;
    let ended = loop {
        match tokio::time::timeout(PATIENCE, stalled.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => tail += b.len(),
            Ok(Some(Ok(Message::Close(_)))) => break "close frame",
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break "reset",
            Err(_) => panic!("the stalled stream never ended"),
        }
    };
    assert_eq!(ended, "reset", "after {tail} bytes");
    assert!(
        tail <= 256 * 1024,
        "{tail} bytes were buffered for a stalled stream"
    );
    flood.abort();
}

// === Raw HTTP/2 frames, for what a well-behaved client library will not send ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix and the given first-byte flags (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field, new name; `indexed` adds it to the dynamic table.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str, indexed: bool) {
    if indexed {
        out.push(0x40);
    } else {
        out.push(0x00);
    }
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The header block of an extended CONNECT for a WebSocket on `path`.
fn connect_block(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", path),
        ("sec-websocket-version", "13"),
    ] {
        hpack_literal(&mut b, n, v, false);
    }
    b
}

/// A raw client: the preface and an empty SETTINGS, then the server's SETTINGS acked.
async fn raw_h2(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut hello = PREFACE.to_vec();
    hello.extend(h2_frame(SETTINGS, 0, 0, &[]));
    hello.extend(h2_frame(SETTINGS, ACK, 0, &[]));
    s.write_all(&hello).await.unwrap_or_else(|e| panic!("{e}"));
    s
}

/// The next frame from the server: (type, flags, stream, payload); `None` at EOF.
async fn read_h2_frame(s: &mut tokio::net::TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut head))
        .await
        .unwrap_or_else(|_| panic!("no frame within {PATIENCE:?}"))
        .ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

/// Reads frames until `pred` matches one (answering PINGs); panics at EOF.
async fn until_frame(
    s: &mut tokio::net::TcpStream,
    pred: impl Fn(u8, u8, u32, &[u8]) -> bool,
) -> (u8, u8, u32, Vec<u8>) {
    for _ in 0..10_000 {
        let Some((ty, flags, id, payload)) = read_h2_frame(s).await else {
            panic!("the server closed the connection first");
        };
        if pred(ty, flags, id, &payload) {
            return (ty, flags, id, payload);
        }
    }
    panic!("no matching frame in 10,000");
}

#[tokio::test]
async fn streams_past_the_concurrent_limit_are_refused_and_the_limit_is_advertised() {
    use tokio::io::AsyncWriteExt;
    // A backend that accepts and never answers: every admitted stream stays open.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let silent_addr = silent.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            kept.push(s);
        }
    });
    let limits =
        "max_connections_per_ip: 1000, handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 }";
    let gw = spawn_gateway(&config(silent_addr, false, limits, "")).await;
    let mut s = raw_h2(gw.addr()).await;
    let (_, _, _, settings) =
        until_frame(&mut s, |ty, flags, _, _| ty == SETTINGS && flags & ACK == 0).await;
    let advertised: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        advertised.contains(&(0x3, 100)),
        "MAX_CONCURRENT_STREAMS 100: {advertised:?}"
    );
    assert!(
        advertised.contains(&(0x8, 1)),
        "ENABLE_CONNECT_PROTOCOL: {advertised:?}"
    );
    let mut burst = Vec::new();
    for i in 0..101u32 {
        burst.extend(h2_frame(
            HEADERS,
            END_HEADERS,
            2 * i + 1,
            &connect_block("/held"),
        ));
    }
    s.write_all(&burst).await.unwrap_or_else(|e| panic!("{e}"));
    let (_, _, id, payload) =
        until_frame(&mut s, |ty, _, _, _| ty == RST_STREAM || ty == GOAWAY).await;
    assert_eq!(id, 201, "the 101st stream is the one refused");
    assert_eq!(payload, 7u32.to_be_bytes(), "REFUSED_STREAM");
    held.abort();
}

#[tokio::test]
async fn an_hpack_bomb_is_refused_without_expanding_it() {
    use tokio::io::AsyncWriteExt;
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "", "")).await;
    let mut s = raw_h2(gw.addr()).await;
    // One 4 KiB header into the dynamic table, then 4,000 one-byte references to it: a
    // 16 MiB header list from a 4 KiB block.
    let mut block = connect_block("/bomb");
    hpack_literal(&mut block, "x-bomb", &"b".repeat(4000), true);
    block.extend(std::iter::repeat_n(0x80 | 62, 4000));
    let mut frames = Vec::new();
    // Sent in 16 KiB HEADERS + CONTINUATION pieces (the default max frame size).
    let mut pieces = block.chunks(16 * 1024).peekable();
    let mut first = true;
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        let ty = if first { HEADERS } else { 0x9 };
        frames.extend(h2_frame(ty, if last { END_HEADERS } else { 0 }, 1, piece));
        first = false;
    }
    s.write_all(&frames).await.unwrap_or_else(|e| panic!("{e}"));
    // Refused: a 431 answer, a reset of the stream, or the connection closed; never a 200.
    loop {
        match read_h2_frame(&mut s).await {
            None => break,
            Some((HEADERS, _, 1, payload)) => {
                assert!(!payload.starts_with(&[0x88]), "the bomb was admitted (200)");
                break;
            }
            Some((RST_STREAM | GOAWAY, ..)) => break,
            Some(_) => continue,
        }
    }
    // The gateway is fine: a new connection carries a WebSocket.
    let mut conn = connect_h2c(gw.addr()).await;
    let mut ws = open_ws(&mut conn, "/after").await;
    echo_round_trip(&mut ws, "still serving").await;
}

#[tokio::test]
async fn one_http2_ping_per_connection_finds_a_dead_client_and_ends_all_its_streams() {
    use tokio::io::AsyncWriteExt;
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(
        backend,
        false,
        "",
        "keepalive: { ping_interval: 500ms, pong_timeout: 500ms }",
    ))
    .await;
    let mut s = raw_h2(gw.addr()).await;
    let mut two = h2_frame(HEADERS, END_HEADERS, 1, &connect_block("/one"));
    two.extend(h2_frame(HEADERS, END_HEADERS, 3, &connect_block("/two")));
    s.write_all(&two).await.unwrap_or_else(|e| panic!("{e}"));
    // From here on the client answers nothing: no PING ack, no pong.
    let mut pings = 0;
    let mut ended = false;
    for _ in 0..1000 {
        match read_h2_frame(&mut s).await {
            Some((PING, flags, _, _)) if flags & ACK == 0 => pings += 1,
            Some((GOAWAY, ..)) | None => {
                ended = true;
                break;
            }
            Some(_) => {}
        }
    }
    assert!(ended, "the silent connection was never closed");
    assert!(pings >= 1, "no HTTP/2 PING before the close");
    for path in ["/one", "/two"] {
        let line = gw
            .log_line(|l| l["event"] == "ws_close" && l["path"] == path)
            .await;
        assert_eq!(line["http"], "2", "{line}");
    }
}

// === A backend with a page, plain requests and WebSockets on one port (`http: proxy`) ===

/// The page a browser loads: it opens a WebSocket to its own origin, says hello, waits
/// for proxy pings, then closes with 4000 and reports what it saw.
const PAGE: &str = "<!doctype html><title>wsgate h2</title><p>page</p>";

/// A hyper HTTP/1.1 backend: `GET /page` answers [`PAGE`], `POST /echo` echoes its body, an
/// upgrade becomes an echoing WebSocket.
async fn page_backend() -> std::net::SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    type B = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;
    fn full(text: impl Into<bytes::Bytes>) -> B {
        Full::new(text.into()).map_err(|e| match e {}).boxed()
    }
    async fn answer(req: http::Request<hyper::body::Incoming>) -> http::Response<B> {
        if req.headers().contains_key(http::header::UPGRADE) {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
            tokio::spawn(async move {
                let Ok(up) = hyper::upgrade::on(req).await else {
                    return;
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            return http::Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        match req.uri().path() {
            "/echo" => http::Response::new(req.into_body().boxed()),
            "/page" => http::Response::builder()
                .header("content-type", "text/html")
                .body(full(PAGE))
                .unwrap_or_else(|e| panic!("{e}")),
            _ => http::Response::builder()
                .status(404)
                .body(full("not here"))
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| async {
                    Ok::<_, std::convert::Infallible>(answer(req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// A TLS listener (self-signed, so h2 by ALPN) with `http: proxy` in front of `backend`.
fn proxy_config(backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0", tls: {{ self_signed: true }} }}]
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 2s }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app, http: proxy }}
{extra}
"#
    )
}

#[tokio::test]
async fn plain_requests_over_h2_are_proxied_beside_a_websocket_on_the_same_connection() {
    let backend = page_backend().await;
    let gw = spawn_gateway(&proxy_config(backend, "")).await;
    let mut conn = connect_h2_tls(gw.addr()).await;
    let ready = conn
        .send
        .clone()
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/echo")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let (resp, mut body_tx) = ready
        .clone()
        .send_request(req, false)
        .unwrap_or_else(|e| panic!("{e}"));
    body_tx
        .send_data(bytes::Bytes::from_static(b"posted over h2"), true)
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .unwrap_or_else(|_| panic!("no answer"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .ok()
        .flatten()
    {
        let chunk = chunk.unwrap_or_else(|e| panic!("{e}"));
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"posted over h2");
    let mut ws = open_ws(&mut conn, "/ws").await;
    echo_round_trip(&mut ws, "beside the plain request").await;
    let line = gw.log_line(|l| l["event"] == "http").await;
    assert_eq!(line["http"], "2", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["c2u"]["bytes"], 14, "{line}");
}

// === Chromium over HTTP/2 ===

/// A free loopback port (bound, then released for a child process to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A WebDriver command to chromedriver; the JSON `value` of its answer.
async fn webdriver(
    port: u16,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let resp = raw_request(addr, req.as_bytes()).await;
    let json = resp
        .find('{')
        .and_then(|start| resp.rfind('}').map(|end| &resp[start..=end]))
        .unwrap_or_else(|| panic!("chromedriver {method} {path}: {resp}"));
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("chromedriver answer {json}: {e}"));
    v["value"].clone()
}

/// Debian's `chromium` and its `chromedriver`: a missing one fails the test, saying what
/// to install (`.ci/run` installs both).
fn browser_binaries() -> (String, String) {
    let find = |name: &str| {
        ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"]
            .iter()
            .map(|d| format!("{d}/{name}"))
            .find(|p| std::path::Path::new(p).exists())
    };
    match (find("chromium"), find("chromedriver")) {
        (Some(c), Some(d)) => (c, d),
        _ => panic!(
            "this test drives Debian's headless Chromium: install it with `apt-get install chromium chromium-driver` (.ci/run does)"
        ),
    }
}

/// Kills chromedriver (and with it the browser) however the test ends.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn chromium_loads_a_page_then_runs_its_websocket_over_http2() {
    let (chromium, chromedriver) = browser_binaries();
    let backend = page_backend().await;
    let gw = spawn_gateway(&proxy_config(
        backend,
        "keepalive: { ping_interval: 1s, pong_timeout: 5s }",
    ))
    .await;
    let port = free_port();
    let _driver = Driver(
        std::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {chromedriver}: {e}")),
    );
    let status = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    eventually("chromedriver listening", PATIENCE, async || {
        tokio::net::TcpStream::connect(status).await.map(drop)
    })
    .await;
    let profile = std::env::temp_dir().join(format!("wsgate-chromium-{}", std::process::id()));
    let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-proxy-server",
                     "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.display())]
        }
    }}});
    let session = webdriver(port, "POST", "/session", &caps).await;
    let id = session["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
        .to_owned();
    let page = format!("https://localhost:{}/page", gw.addr().port());
    webdriver(
        port,
        "POST",
        &format!("/session/{id}/url"),
        &serde_json::json!({ "url": page }),
    )
    .await;
    let script = r#"
        const done = arguments[arguments.length - 1];
        const seen = { echo: null, code: null, error: false };
        const ws = new WebSocket('wss://' + location.host + '/ws');
        ws.onopen = () => ws.send('hello from chromium');
        ws.onmessage = (e) => { seen.echo = e.data; setTimeout(() => ws.close(4000, 'bye'), 2500); };
        ws.onerror = () => { seen.error = true; };
        ws.onclose = (e) => { seen.code = e.code; done(seen); };
    "#;
    let seen = webdriver(
        port,
        "POST",
        &format!("/session/{id}/execute/async"),
        &serde_json::json!({ "script": script, "args": [] }),
    )
    .await;
    webdriver(
        port,
        "DELETE",
        &format!("/session/{id}"),
        &serde_json::json!({}),
    )
    .await;
    let _ = std::fs::remove_dir_all(&profile);
    assert_eq!(seen["echo"], "hello from chromium", "{seen}");
    assert_eq!(seen["error"], false, "{seen}");
    let page_line = gw
        .log_line(|l| l["event"] == "http" && l["path"] == "/page")
        .await;
    assert_eq!(page_line["http"], "2", "the page came over h2: {page_line}");
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(
        line["http"], "2",
        "the WebSocket came over h2 (RFC 8441): {line}"
    );
    assert_eq!(line["close"]["code"], 4000, "{line}");
    assert_eq!(line["close"]["by"], "client", "{line}");
    assert!(
        line["pings"].as_u64() >= Some(1),
        "proxy pings answered: {line}"
    );
    assert!(line["rtt_ms"]["max"].is_number(), "{line}");
    assert_eq!(line["u2c"]["messages"], 1, "{line}");
}

// === Refused streams leave nothing behind, measured on the binary ===

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// `n` extended CONNECTs for a protocol the gateway does not relay, 64 in flight; each
/// must be answered 400.
async fn refuse_streams(conn: &H2Conn, n: usize) {
    let send = conn.send.clone();
    let answers = futures_util::stream::iter(0..n)
        .map(|_| {
            let send = send.clone();
            async move {
                let mut req = http::Request::builder()
                    .method("CONNECT")
                    .uri("http://localhost/x")
                    .header("sec-websocket-version", "13")
                    .body(())
                    .unwrap_or_else(|e| panic!("{e}"));
                req.extensions_mut()
                    .insert(h2::ext::Protocol::from_static("webtransport"));
                let mut ready = send.ready().await.unwrap_or_else(|e| panic!("{e}"));
                let (resp, _) = ready
                    .send_request(req, true)
                    .unwrap_or_else(|e| panic!("{e}"));
                resp.await.map(|r| r.status())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let answers = tokio::time::timeout(Duration::from_secs(120), answers)
        .await
        .unwrap_or_else(|_| panic!("{n} refusals not answered in time"));
    for a in answers {
        assert_eq!(a.unwrap_or_else(|e| panic!("{e}")), StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn ten_thousand_refused_streams_leave_memory_flat() {
    let port = free_port();
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:{port}", http2: true }}]
upstreams:
  app: {{ backends: [{{ addr: "127.0.0.1:9" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}
"#
    );
    let path = std::env::temp_dir().join(format!("wsgate-h2-refused-{}.yaml", std::process::id()));
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("{e}"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let child = Driver(child);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    eventually("wsgate listening", PATIENCE, async || {
        tokio::net::TcpStream::connect(addr).await.map(drop)
    })
    .await;
    let conn = connect_h2c(addr).await;
    // Warm up: allocator arenas, the refusal tally, hyper's buffers.
    refuse_streams(&conn, 1_000).await;
    let before = rss_kib(child.0.id());
    refuse_streams(&conn, 10_000).await;
    let after = rss_kib(child.0.id());
    let _ = std::fs::remove_file(&path);
    eprintln!("RSS {before} KiB after 1,000 refused streams, {after} KiB after 10,000 more");
    assert!(
        after <= before + 1024,
        "RSS grew {} KiB over 10,000 refused streams ({before} → {after})",
        after.saturating_sub(before)
    );
}

#[tokio::test]
async fn a_connection_without_streams_gets_goaway_after_handshake_timeout_then_is_dropped() {
    let backend = echo_backend().await;
    // Keepalive off: nothing of HTTP/2's own would end a connection whose client ignores
    // the PING that follows GOAWAY.
    let gw = spawn_gateway(&config(
        backend,
        false,
        "handshake_timeout: 500ms",
        "keepalive: { ping_interval: 0s }",
    ))
    .await;
    let mut s = raw_h2(gw.addr()).await;
    // The client never opens a stream, and never closes: GOAWAY, then the connection is
    // dropped by the proxy.
    let mut goaway = false;
    let closed = loop {
        match read_h2_frame(&mut s).await {
            Some((GOAWAY, ..)) => goaway = true,
            Some(_) => {}
            None => break true,
        }
    };
    assert!(goaway && closed, "goaway {goaway}, closed {closed}");
    await_metric(&gw, "wsgate_handshakes_pending", &[], 0.0).await;
}

#[tokio::test]
async fn a_connection_with_a_live_stream_is_not_sent_goaway_when_handshake_timeout_passes() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "handshake_timeout: 300ms", "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    let mut first = open_ws(&mut conn, "/first").await;
    // Past handshake_timeout, with a stream open all along.
    tokio::time::sleep(Duration::from_millis(900)).await;
    echo_round_trip(&mut first, "still open").await;
    let mut second = open_ws(&mut conn, "/second").await;
    echo_round_trip(&mut second, "a new stream on the same connection").await;
}

#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_cut_and_frees_its_places() {
    use tokio::io::AsyncWriteExt;
    let backend = echo_backend().await;
    let limits = "max_connections: 50, handshake_timeout: 1s, handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 }";
    let gw = spawn_gateway(&config(backend, false, limits, "")).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // SETTINGS_INITIAL_WINDOW_SIZE 0: no response body can be sent to this client.
    let mut hello = PREFACE.to_vec();
    hello.extend(h2_frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]));
    for i in 0..60u32 {
        // Plain GETs on a route that refuses them: 60 answers with a body (426).
        let mut block = Vec::new();
        for (n, v) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "localhost"),
            (":path", "/x"),
        ] {
            hpack_literal(&mut block, n, v, false);
        }
        hello.extend(h2_frame(HEADERS, END_HEADERS | 0x1, 2 * i + 1, &block));
    }
    s.write_all(&hello).await.unwrap_or_else(|e| panic!("{e}"));
    // The answers' heads come, their bodies cannot: the connection is cut at their bound.
    let mut heads = 0;
    loop {
        match read_h2_frame(&mut s).await {
            Some((HEADERS, ..)) => heads += 1,
            Some((PING, flags, _, payload)) if flags & ACK == 0 => {
                let _ = s.write_all(&h2_frame(PING, ACK, 0, &payload)).await;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(heads > 0, "no answer head at all");
    // Nothing of it stays counted: a plain HTTP/1.1 client is served, not 503.
    let (_, head) = raw_upgrade(gw.addr(), "/ws", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[tokio::test]
async fn idle_http2_connections_count_against_the_per_ip_cap() {
    let backend = echo_backend().await;
    let limits =
        "max_connections_per_ip: 3, handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 }";
    let gw = spawn_gateway(&config(backend, false, limits, "")).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = connect_h2c(gw.addr()).await;
        // A refused stream: the connection gives up its place to it, then takes it back.
        let refused = extended_connect(&mut conn, "/x", Some("webtransport"), &[]).await;
        assert!(matches!(
            refused,
            Ok(Opened::Refused(StatusCode::BAD_REQUEST, _))
        ));
        held.push(conn);
    }
    // A fourth connection from the same address is refused at accept.
    let resp = raw_request(gw.addr(), PREFACE).await;
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp:?}");
    // A stream on a held connection takes that connection's place: still admitted.
    let mut ws = open_ws(&mut held[0], "/ok").await;
    echo_round_trip(&mut ws, "on a counted connection").await;
}

#[tokio::test]
async fn a_stream_is_judged_by_the_config_of_its_time_not_its_connection_s() {
    let backend = echo_backend().await;
    let yaml = |origins: &str| {
        format!(
            r#"
listeners: [{{ name: public, bind: "127.0.0.1:0", http2: true }}]
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app, origins: [{origins}] }}
"#
        )
    };
    let gw = spawn_gateway(&yaml("\"https://old.test\"")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    let origin = [("origin", "https://old.test")];
    let mut before = extended_connect(&mut conn, "/a", Some("websocket"), &origin)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .ws();
    let mut text = yaml("\"https://new.test\"");
    // Keep the bound port: the listener is the same one.
    text = text.replace("127.0.0.1:0", &gw.addr().to_string());
    let config = wsgate::config::Config::from_yaml_str_with_env(&text, "reload.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    gw.gw.reload(config).await;
    match extended_connect(&mut conn, "/b", Some("websocket"), &origin).await {
        Ok(Opened::Refused(status, _)) => assert_eq!(status, StatusCode::FORBIDDEN),
        Ok(Opened::Ws(_)) => panic!("a new stream was judged by the old config"),
        Err(e) => panic!("{e}"),
    }
    echo_round_trip(&mut before, "established streams keep their config").await;
}

#[tokio::test]
async fn host_and_authority_must_agree() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "", "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    match extended_connect(
        &mut conn,
        "/x",
        Some("websocket"),
        &[("host", "internal.example")],
    )
    .await
    {
        Ok(Opened::Refused(status, body)) => {
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body.contains("bad_upgrade"), "{body}");
        }
        Ok(Opened::Ws(_)) => panic!("Host overrode :authority"),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_connect_announcing_a_body_is_refused() {
    use tokio::io::AsyncWriteExt;
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "", "")).await;
    let mut s = raw_h2(gw.addr()).await;
    let mut block = connect_block("/with-body");
    hpack_literal(&mut block, "content-length", "5", false);
    s.write_all(&h2_frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Refused by the HTTP/2 layer (hyper resets the stream and ends the connection); never
    // a 200.
    let mut reset = false;
    loop {
        match read_h2_frame(&mut s).await {
            Some((HEADERS, _, 1, payload)) => {
                assert!(
                    !payload.starts_with(&[0x88]),
                    "a CONNECT with a body was admitted"
                );
            }
            Some((RST_STREAM, _, 1, _)) => reset = true,
            Some((GOAWAY, ..)) | None => break,
            Some(_) => {}
        }
    }
    eprintln!("stream reset before the end: {reset}");
    // Nothing of it stayed: a new connection carries a WebSocket.
    let mut conn = connect_h2c(gw.addr()).await;
    let mut ws = open_ws(&mut conn, "/after").await;
    echo_round_trip(&mut ws, "still serving").await;
}

// === Review of the h2-direct driver: volumes past every window, resets, counts ===

#[tokio::test]
async fn pipelined_streams_carry_far_more_than_every_window_both_ways() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&config(backend, false, "buffer_size: 4KiB", "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    let mut tasks = Vec::new();
    // 6 streams x 48 messages of ~10 KiB each way: ~2.9 MiB per direction, far past the
    // connection's window (100 x 4 KiB) and the client's own 65,535 per stream.
    for i in 0..6u8 {
        let ws = open_ws(&mut conn, &format!("/s{i}")).await;
        let (mut tx, mut rx) = ws.split();
        tasks.push(tokio::spawn(async move {
            let msg = move |n: u8| vec![i ^ n; 10 * 1024 + usize::from(n)];
            let writer = tokio::spawn(async move {
                for n in 0..48u8 {
                    tx.send(Message::binary(msg(n)))
                        .await
                        .unwrap_or_else(|e| panic!("send {i}/{n}: {e}"));
                }
                tx
            });
            for n in 0..48u8 {
                match tokio::time::timeout(PATIENCE, rx.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        assert_eq!(b.len(), msg(n).len(), "stream {i} message {n}");
                        assert!(b.iter().all(|&x| x == i ^ n), "stream {i} message {n}");
                    }
                    other => panic!("stream {i} message {n}: {other:?}"),
                }
            }
            writer.await.unwrap_or_else(|e| panic!("{e}"))
        }));
    }
    for t in tasks {
        let _sink = tokio::time::timeout(PATIENCE * 3, t)
            .await
            .unwrap_or_else(|_| panic!("a stream stalled"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // And the connection still opens and carries new streams.
    let mut ws = open_ws(&mut conn, "/after").await;
    echo_round_trip(&mut ws, "after 2.9 MiB").await;
}

/// A plain POST of `len` bytes to `/echo` on `conn`; the echoed body.
async fn post_echo(conn: &mut H2Conn, len: usize, fill: u8) -> Vec<u8> {
    let ready = tokio::time::timeout(PATIENCE, conn.send.clone().ready())
        .await
        .unwrap_or_else(|_| panic!("not ready"))
        .unwrap_or_else(|e| panic!("{e}"));
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/echo")
        .header("content-length", len.to_string())
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let (resp, mut body_tx) = ready
        .clone()
        .send_request(req, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let sender = tokio::spawn(async move {
        let mut left = len;
        while left > 0 {
            body_tx.reserve_capacity(left.min(64 * 1024));
            let cap = match tokio::time::timeout(
                PATIENCE,
                std::future::poll_fn(|cx| body_tx.poll_capacity(cx)),
            )
            .await
            {
                Ok(Some(Ok(c))) => c,
                other => panic!("no send capacity with {left} left: {other:?}"),
            };
            let n = cap.min(left);
            if n == 0 {
                continue;
            }
            left -= n;
            body_tx
                .send_data(bytes::Bytes::from(vec![fill; n]), left == 0)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .unwrap_or_else(|_| panic!("no answer"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .unwrap_or_else(|_| panic!("body stalled after {} bytes", got.len()))
    {
        let chunk = chunk.unwrap_or_else(|e| panic!("after {} bytes: {e}", got.len()));
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    sender.await.unwrap_or_else(|e| panic!("{e}"));
    got
}

#[tokio::test]
async fn plain_bodies_far_past_every_window_go_both_ways() {
    let backend = page_backend().await;
    let extra = "limits: { buffer_size: 4KiB, max_request_body: 4MiB }";
    let gw = spawn_gateway(&proxy_config(backend, extra)).await;
    let mut conn = connect_h2_tls(gw.addr()).await;
    for round in 0..3u8 {
        let got = post_echo(&mut conn, 900 * 1024, round).await;
        assert_eq!(got.len(), 900 * 1024, "round {round}");
        assert!(got.iter().all(|&b| b == round), "round {round}");
    }
    let mut tasks = Vec::new();
    for k in 0..4u8 {
        let mut c = H2Conn {
            send: conn.send.clone(),
            _driver: tokio::spawn(async { Ok(()) }),
        };
        tasks.push(tokio::spawn(async move {
            (k, post_echo(&mut c, 300 * 1024, 10 + k).await)
        }));
    }
    for t in tasks {
        let (k, got) = t.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.len(), 300 * 1024);
        assert!(got.iter().all(|&b| b == 10 + k));
    }
}

#[tokio::test]
async fn a_client_reset_mid_relay_is_logged_once_and_frees_every_count() {
    let backend = echo_backend().await;
    let limits =
        "max_connections_per_ip: 2, handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 }";
    let gw = spawn_gateway(&config(backend, false, limits, "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    for round in 0..5 {
        let (resp, mut send) = send_ws_connect(&mut conn, "/reset").await;
        let resp = tokio::time::timeout(PATIENCE, resp)
            .await
            .unwrap_or_else(|_| panic!("no 200"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), StatusCode::OK);
        // Half a frame, then the reset.
        send.send_data(bytes::Bytes::from_static(&[0x82, 0x85, 1, 2]), false)
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        send.send_reset(h2::Reason::CANCEL);
        await_metric(&gw, "wsgate_connections_active", &[], 0.0).await;
        let _ = round;
    }
    let closes = eventually("five ws_close lines", PATIENCE, async || {
        let n = gw
            .log_lines()
            .iter()
            .filter(|l| l["event"] == "ws_close" && l["path"] == "/reset")
            .count();
        if n == 5 { Ok(n) } else { Err(n) }
    })
    .await;
    assert_eq!(closes, 5);
    counts_back_to_one_idle_connection(&gw).await;
    // Nothing stayed counted: the connection's own place plus one stream fit under 2.
    let mut ws = open_ws(&mut conn, "/after").await;
    echo_round_trip(&mut ws, "after five resets").await;
    let mut other = connect_h2c(gw.addr()).await;
    let mut ws2 = open_ws(&mut other, "/second-conn").await;
    echo_round_trip(&mut ws2, "a second connection").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resets = gw
        .log_lines()
        .iter()
        .filter(|l| l["event"] == "ws_close" && l["path"] == "/reset")
        .count();
    assert_eq!(resets, 5, "a reset stream logged more than once");
}

/// A backend answering each plain request with fixed bytes chosen by its path, then
/// closing: what a hostile or odd backend sends.
async fn canned_backend() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                let resp: &[u8] = match path.as_str() {
                    "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 500\r\nConnection: close\r\n\r\n",
                    "/204" => b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
                    "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\nConnection: close\r\n\r\n",
                    "/trailers" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n",
                    "/hop" => b"HTTP/1.1 200 OK\r\nConnection: close, x-hop\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: h2c\r\nx-hop: 1\r\nContent-Length: 2\r\n\r\nok",
                    "/short" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly ten b",
                    "/101" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                    _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                };
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// `method path` on `conn`: the status, body (or the error that ended it) and trailers.
async fn plain_exchange(
    conn: &mut H2Conn,
    method: &str,
    path: &str,
) -> (
    StatusCode,
    http::HeaderMap,
    Result<Vec<u8>, String>,
    Option<http::HeaderMap>,
) {
    let ready = tokio::time::timeout(PATIENCE, conn.send.clone().ready())
        .await
        .unwrap_or_else(|_| panic!("not ready"))
        .unwrap_or_else(|e| panic!("{e}"));
    let req = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = ready
        .clone()
        .send_request(req, true)
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = tokio::time::timeout(PATIENCE, resp)
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} {path}"));
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::IM_A_TEAPOT,
                http::HeaderMap::new(),
                Err(format!("head: {e}")),
                None,
            );
        }
    };
    let (parts, mut body) = resp.into_parts();
    let mut got = Vec::new();
    let data = loop {
        match tokio::time::timeout(PATIENCE, body.data()).await {
            Err(_) => panic!("{method} {path}: body stalled"),
            Ok(None) => break Ok(got),
            Ok(Some(Ok(c))) => {
                let _ = body.flow_control().release_capacity(c.len());
                got.extend_from_slice(&c);
            }
            Ok(Some(Err(e))) => break Err(e.to_string()),
        }
    };
    let trailers = match data {
        Ok(_) => tokio::time::timeout(PATIENCE, body.trailers())
            .await
            .ok()
            .and_then(|t| t.ok())
            .flatten(),
        Err(_) => None,
    };
    (parts.status, parts.headers, data, trailers)
}

#[tokio::test]
async fn odd_and_hostile_backend_answers_reach_an_h2_client_well_formed() {
    let backend = canned_backend().await;
    let gw = spawn_gateway(&proxy_config(backend, "")).await;
    let mut conn = connect_h2_tls(gw.addr()).await;
    let (status, headers, body, _) = plain_exchange(&mut conn, "GET", "/304").await;
    assert_eq!(
        (status, body),
        (StatusCode::NOT_MODIFIED, Ok(vec![])),
        "{headers:?}"
    );
    let (status, _, body, _) = plain_exchange(&mut conn, "GET", "/204").await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Ok(vec![])));
    let (status, headers, body, _) = plain_exchange(&mut conn, "HEAD", "/head").await;
    assert_eq!((status, body), (StatusCode::OK, Ok(vec![])), "{headers:?}");
    let (status, _, body, trailers) = plain_exchange(&mut conn, "GET", "/trailers").await;
    assert_eq!((status, body), (StatusCode::OK, Ok(b"hello".to_vec())));
    eprintln!("trailers: {trailers:?}");
    let (status, headers, body, _) = plain_exchange(&mut conn, "GET", "/hop").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Ok(b"ok".to_vec())),
        "{headers:?}"
    );
    eprintln!("hop headers: {headers:?}");
    // A body cut short must not reach the client as a complete one.
    let (status, _, body, _) = plain_exchange(&mut conn, "GET", "/short").await;
    eprintln!("short: {status} {body:?}");
    assert!(
        status != StatusCode::OK || body.is_err(),
        "a truncated body was passed on as whole: {body:?}"
    );
    let (status, _, body, _) = plain_exchange(&mut conn, "GET", "/101").await;
    eprintln!("101: {status} {body:?}");
    // The connection still serves.
    let (status, _, _, _) = plain_exchange(&mut conn, "GET", "/204").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a_client_reset_while_its_backend_is_connecting_frees_every_count() {
    // A backend that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let backend = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = held_tx.send(s).await;
        }
    });
    let limits =
        "max_connections_per_ip: 2, handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 }";
    let gw = spawn_gateway(&config(backend, false, limits, "")).await;
    let mut conn = connect_h2c(gw.addr()).await;
    for _ in 0..3 {
        let (_resp, mut send) = send_ws_connect(&mut conn, "/stuck").await;
        let mut up = next_accepted(&mut held_rx).await;
        send.send_reset(h2::Reason::CANCEL);
        // The backend connection is let go.
        let mut buf = [0u8; 4096];
        let gone = tokio::time::timeout(PATIENCE, async {
            use tokio::io::AsyncReadExt;
            loop {
                match up.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            gone.is_ok(),
            "the backend connection was kept after the client's reset"
        );
    }
    counts_back_to_one_idle_connection(&gw).await;
    let lines: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["path"] == "/stuck")
        .collect();
    eprintln!("lines for the reset streams: {lines:?}");
}

#[tokio::test]
async fn max_connections_counts_streams_exactly_whatever_order_they_close_in() {
    let backend = echo_backend().await;
    let limits = "max_connections: 3";
    let gw = spawn_gateway(&config(backend, false, limits, "")).await;
    let active = || {
        gw.gw
            .shared
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let settle = async |want: u64| {
        eventually(&format!("active = {want}"), PATIENCE, async || {
            let now = gw
                .gw
                .shared
                .active
                .load(std::sync::atomic::Ordering::Relaxed);
            if now == want { Ok(()) } else { Err(now) }
        })
        .await
    };
    let mut conn = connect_h2c(gw.addr()).await;
    settle(1).await;
    for order in [[0usize, 1, 2], [1, 0, 2], [2, 1, 0], [1, 2, 0]] {
        let mut streams: Vec<Option<H2Ws>> = Vec::new();
        for i in 0..3 {
            let mut ws = open_ws(&mut conn, &format!("/o{i}")).await;
            echo_round_trip(&mut ws, "hi").await;
            streams.push(Some(ws));
        }
        settle(3).await;
        // A fourth stream is one past max_connections.
        let fourth = extended_connect(&mut conn, "/fourth", Some("websocket"), &[]).await;
        assert!(
            matches!(
                fourth,
                Ok(Opened::Refused(StatusCode::SERVICE_UNAVAILABLE, _))
            ),
            "order {order:?}"
        );
        settle(3).await;
        for (k, &i) in order.iter().enumerate() {
            drop(streams[i].take());
            settle((3 - k as u64 - 1).max(1)).await;
        }
        assert_eq!(active(), 1, "order {order:?}");
    }
}

/// A transport whose reads are throttled to about 64 KiB/s: a live client on a slow link.
struct SlowReads {
    inner: tokio::net::TcpStream,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for SlowReads {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(p) = self.pause.as_mut() {
            std::task::ready!(std::future::Future::poll(p.as_mut(), cx));
            self.pause = None;
        }
        let mut small = [0u8; 640];
        let n = small.len().min(buf.remaining());
        let mut rb = tokio::io::ReadBuf::new(&mut small[..n]);
        std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
        buf.put_slice(rb.filled());
        self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(10))));
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for SlowReads {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_live_client_reading_a_busy_stream_slowly_is_not_cut_as_dead() {
    let (backend, mut backends) = ws_backend().await;
    let gw = spawn_gateway(&config(
        backend,
        false,
        "",
        "keepalive: { ping_interval: 500ms, pong_timeout: 1s }",
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (send, driver) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(15 << 20)
        .handshake::<_, bytes::Bytes>(SlowReads {
            inner: tcp,
            pause: None,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let driver = tokio::spawn(driver);
    let mut conn = H2Conn {
        send,
        _driver: driver,
    };
    let mut ws = open_ws(&mut conn, "/download").await;
    let mut upstream = next_accepted(&mut backends).await;
    // The backend streams as fast as it is let; the client reads all of it, slowly.
    let flood = tokio::spawn(async move {
        for _ in 0..100_000 {
            if upstream
                .send(Message::binary(vec![7u8; 16 * 1024]))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut got = 0usize;
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got += b.len(),
            Ok(Some(Ok(_))) => {}
            other => {
                panic!("the stream of a live, reading client ended after {got} bytes: {other:?}")
            }
        }
    }
    assert!(got > 64 * 1024, "only {got} bytes in 6 s");
    flood.abort();
}

/// Waits until the gateway counts one connection and one per-IP place: the h2 connection
/// still open, every stream on it gone.
async fn counts_back_to_one_idle_connection(gw: &TestGateway) {
    eventually("counts back to one idle connection", PATIENCE, async || {
        let active = gw
            .gw
            .shared
            .active
            .load(std::sync::atomic::Ordering::Relaxed);
        let places = localhost_places(gw);
        if (active, places) == (1, 1) {
            Ok(())
        } else {
            Err((active, places))
        }
    })
    .await;
}
