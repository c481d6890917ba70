//! Frame policy and liveness through real sockets (SPEC §2 `limits`/`keepalive`, §4, §5):
//! message rate (close and throttle), fragment and idle timeouts, proxy pings with RTT,
//! dead peers, and upstream pings.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A gateway in front of a raw backend with extra config, and one connection through it.
async fn pair(extra: &str) -> (TcpStream, TcpStream, TestGateway) {
    pair_with(|b| with_extra(b, extra)).await
}

/// `config_for` with top-level YAML blocks appended (`keepalive:` and `limits:` overrides).
fn with_extra(backend: std::net::SocketAddr, extra: &str) -> String {
    let base = config_for(backend, "");
    match extra.strip_prefix("limits: ") {
        Some(limits) => base.replace("limits: {  }", &format!("limits: {}", limits.trim())),
        None => format!("{base}{extra}\n"),
    }
}

async fn next_text(ws: &mut Client) -> String {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn message_rate_close_gives_1008_and_1001() {
    let (mut client, mut up, gw) =
        pair("limits: { messages: { rate: 1, per: 10s, burst: 3, on_exceed: close } }").await;
    for i in 0..5u8 {
        client
            .write_all(&client_frame(0x81, &[b'0' + i]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for i in 0..3u8 {
        assert_eq!(
            read_frame(&mut up).await,
            Some((0x81, vec![b'0' + i])),
            "within the burst"
        );
    }
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    let (b0, payload) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no close"));
    assert_eq!(b0, 0x88);
    assert_eq!(&payload[..2], &1008u16.to_be_bytes());
    assert_eq!(&payload[2..], b"rate limit");
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "rate_limit");
    assert_eq!(line["close"]["code"], 1008);
    assert_eq!(line["rate_limited"], 1);
}

#[tokio::test]
async fn message_rate_throttle_delays_but_delivers_everything_in_order() {
    let backend = echo_backend().await;
    let gw = spawn_gateway(&with_extra(
        backend,
        "limits: { messages: { rate: 10, per: 1s, burst: 1, on_exceed: throttle } }",
    ))
    .await;
    let mut ws = connect(&gw.url("/")).await;
    let started = Instant::now();
    // 10x the rate: 20 messages at once against 10/s with no burst to speak of.
    for i in 0..20 {
        ws.send(Message::text(format!("m{i}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for i in 0..20 {
        assert_eq!(next_text(&mut ws).await, format!("m{i}"));
    }
    let took = started.elapsed();
    // 19 messages beyond the first token at 10/s cannot take less than 1.9 s.
    assert!(
        took >= Duration::from_millis(1800),
        "throttled delivery took only {took:?}"
    );
    ws.close(None).await.unwrap_or_else(|e| panic!("{e}"));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["c2u"]["messages"], 20);
    assert!(line["rate_limited"].as_u64().unwrap_or(0) >= 10, "{line}");
    assert_eq!(line["proxy_reason"], serde_json::Value::Null);
}

#[tokio::test]
async fn unfinished_fragmented_message_is_closed_1008_after_fragment_timeout() {
    let (mut client, mut up, gw) = pair("limits: { fragment_timeout: 300ms }").await;
    client
        .write_all(&client_frame(0x01, b"part one"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        read_frame(&mut up).await,
        Some((0x01, b"part one".to_vec()))
    );
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    let (_, payload) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no close"));
    assert_eq!(&payload[..2], &1008u16.to_be_bytes());
    assert_eq!(&payload[2..], b"fragment timeout");
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "fragment_timeout");
}

#[tokio::test]
async fn idle_connection_is_closed_1000_both_ways() {
    let (mut client, mut up, gw) = pair("limits: { idle_timeout: 300ms }").await;
    // Traffic keeps it open for a while: a frame every 150 ms (part of the scenario, under
    // the 300 ms idle_timeout), 450 ms in all.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        client
            .write_all(&client_frame(0x82, b"x"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_frame(&mut up).await, Some((0x82, b"x".to_vec())));
    }
    let (b0, payload) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no close"));
    assert_eq!(
        (b0, &payload[..]),
        (0x88, &[0x03, 0xE8, b'i', b'd', b'l', b'e'][..])
    );
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    let line_pending = gw.log_lines().is_empty();
    assert!(
        line_pending,
        "the connection ends only after the close handshake"
    );
    send_client_close(&mut client, 1000).await;
    send_server_close(&mut up, 1000).await;
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "idle");
    assert_eq!(line["close"]["code"], 1000);
}

#[tokio::test]
async fn proxy_pings_reach_the_client_not_the_upstream_and_pongs_are_consumed() {
    let (mut client, mut up, gw) =
        pair("keepalive: { ping_interval: 200ms, pong_timeout: 2s }").await;
    for round in 0..2 {
        let started = Instant::now();
        let (b0, payload) = read_frame(&mut client)
            .await
            .unwrap_or_else(|| panic!("no ping"));
        assert_eq!(b0, 0x89, "round {round}");
        assert_eq!(payload.len(), 8);
        assert!(started.elapsed() < Duration::from_secs(2));
        client
            .write_all(&client_frame(0x8A, &payload))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The upstream sees neither the pings nor the pongs, only real traffic.
    client
        .write_all(&client_frame(0x82, b"after"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_frame(&mut up).await, Some((0x82, b"after".to_vec())));
    // A pong that answers no proxy ping is the client's own business: relayed.
    client
        .write_all(&client_frame(0x8A, b"12345678"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        read_frame(&mut up).await,
        Some((0x8A, b"12345678".to_vec()))
    );
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert!(line["pings"].as_u64().unwrap_or(0) >= 2, "{line}");
    assert!(line["rtt_ms"]["max"].as_f64().is_some(), "{line}");
}

#[tokio::test]
async fn client_that_never_answers_pings_is_cut_and_upstream_gets_1001() {
    let (mut client, mut up, gw) =
        pair("keepalive: { ping_interval: 200ms, pong_timeout: 300ms }").await;
    let started = Instant::now();
    assert_eq!(read_frame(&mut client).await.map(|f| f.0), Some(0x89));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    let cut = started.elapsed();
    assert!(
        cut < Duration::from_secs(3),
        "dead peer found after {cut:?}"
    );
    // No close frame for the client: its TCP is just closed.
    assert!(closes_tcp(&mut client).await);
    send_server_close(&mut up, 1001).await;
    drop(up);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "dead_peer");
    assert_eq!(line["close"]["by"], "proxy");
}

#[tokio::test]
async fn upstream_pings_are_masked_and_their_pongs_consumed() {
    let (mut client, mut up, _gw) =
        pair("keepalive: { ping_interval: 0s, upstream_ping_interval: 200ms }").await;
    let mut head = [0u8; 2];
    tokio::time::timeout(PATIENCE, up.read_exact(&mut head))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no ping"));
    assert_eq!(head, [0x89, 0x80 | 8], "a masked 8-byte ping");
    let mut rest = [0u8; 12];
    up.read_exact(&mut rest)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let payload: Vec<u8> = rest[4..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ rest[i % 4])
        .collect();
    up.write_all(&server_frame(0x8A, &payload))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The client never sees that pong; it sees the next real frame.
    up.write_all(&server_frame(0x81, b"data"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x81, b"data".to_vec()))
    );
}

#[tokio::test]
async fn pings_wait_for_the_end_of_a_slowly_streamed_frame() {
    let (mut client, mut up, _gw) =
        pair("keepalive: { ping_interval: 100ms, pong_timeout: 5s }").await;
    // Answer the first ping so the connection stays healthy, then stream a frame slowly:
    // a ping falls due in the middle of it and must wait for its last byte.
    let (_, first) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no ping"));
    client
        .write_all(&client_frame(0x8A, &first))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let total = 4 * 1024;
    let mut header = vec![0x82, 126];
    header.extend_from_slice(&(total as u16).to_be_bytes());
    up.write_all(&header)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..4u8 {
        // Part of the scenario: the frame's bytes arrive slowly, over a ping interval.
        tokio::time::sleep(Duration::from_millis(250)).await;
        up.write_all(&vec![i; 1024])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (b0, payload) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no frame"));
    assert_eq!(b0, 0x82);
    let want: Vec<u8> = (0..4u8).flat_map(|i| vec![i; 1024]).collect();
    assert_eq!(payload, want, "the frame arrives whole and uncorrupted");
    let (b0, _) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no ping after the frame"));
    assert_eq!(b0, 0x89);
}

/// `pair` with pings off, or on at `keepalive`, plus `limits`.
async fn pair_with_keepalive(limits: &str, keepalive: &str) -> (TcpStream, TcpStream, TestGateway) {
    pair_with(|b| format!("{}keepalive: {keepalive}\n", with_extra(b, limits))).await
}

#[tokio::test]
async fn a_throttled_message_is_counted_once_while_upstream_traffic_wakes_the_relay() {
    let (mut client, mut up, gw) = pair_with_keepalive(
        "limits: { messages: { rate: 1, per: 2s, burst: 1, on_exceed: throttle } }",
        "{ ping_interval: 0s }",
    )
    .await;
    let mut both = client_frame(0x81, b"one");
    both.extend(client_frame(0x81, b"two"));
    client
        .write_all(&both)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_frame(&mut up).await, Some((0x81, b"one".to_vec())));
    // "two" waits for a token while every upstream frame wakes the relay.
    for i in 0..50u8 {
        up.write_all(&server_frame(0x82, &[i]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_frame(&mut client).await, Some((0x82, vec![i])));
    }
    assert_eq!(read_frame(&mut up).await, Some((0x81, b"two".to_vec())));
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["rate_limited"], 1, "{line}");
    assert_eq!(line["c2u"]["messages"], 2, "{line}");
}

/// A pong still arriving when the proxy closes (here: idle) is not relayed after the
/// proxy's close: nothing follows a close frame (SPEC §5).
#[tokio::test]
async fn a_pong_completed_after_the_proxys_close_is_not_relayed() {
    let (mut client, mut up, gw) = pair_with_keepalive(
        "limits: { idle_timeout: 1s }",
        "{ ping_interval: 100ms, pong_timeout: 10s }",
    )
    .await;
    // Half a pong that does not answer the ping (so it would be relayed)...
    let (pong, _) = pong_not_answering_next_ping(&mut client).await;
    client
        .write_all(&pong[..8])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // ...then the idle close reaches both sides, then the rest of the pong.
    assert_eq!(read_close_code(&mut client).await, Some(1000));
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    client
        .write_all(&pong[8..])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The client never answers the close: whatever the proxy sends the upstream until it
    // gives up (5 s) and closes TCP is collected.
    send_server_close(&mut up, 1000).await;
    let mut tail = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, up.read_to_end(&mut tail)).await;
    assert!(
        tail.is_empty(),
        "after its close the upstream got {tail:02x?}"
    );
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "idle");
}

/// Fragmenting a message must not get around the message budget (issue 16): under 5
/// messages/s, a message of 200,002 frames used to be relayed whole with `rate_limited: 0`.
/// With `max_fragments` (default 256), the first frame past the bound closes the client
/// 1008 `too many fragments` and the upstream 1001, and nothing past the bound is relayed.
#[tokio::test]
async fn a_message_fragmented_past_max_fragments_is_closed_1008() {
    let (mut client, mut up, gw) =
        pair("limits: { messages: { rate: 5, per: 1s, burst: 5, on_exceed: close } }").await;
    // The default bound: 256 frames (the first one included) pass, the 257th does not.
    let mut wire = client_frame(0x01, b"f");
    for _ in 0..200_001 {
        wire.extend(client_frame(0x00, b"f"));
    }
    wire.extend(client_frame(0x80, b"f"));
    let writer = tokio::spawn(async move {
        // The proxy stops reading once it has closed, so the end of this may never go out.
        let _ = client.write_all(&wire).await;
        client
    });
    let mut relayed = 0usize;
    let code = loop {
        let (b0, payload) = read_frame(&mut up)
            .await
            .unwrap_or_else(|| panic!("upstream got no close after {relayed} frames"));
        match b0 & 0x0F {
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => relayed += 1,
        }
    };
    assert_eq!(code, 1001);
    assert_eq!(relayed, 256, "frames relayed before the close");
    send_server_close(&mut up, 1001).await;
    let mut client = writer.await.unwrap_or_else(|e| panic!("{e}"));
    let (b0, payload) = read_frame(&mut client)
        .await
        .unwrap_or_else(|| panic!("no close"));
    assert_eq!(b0, 0x88);
    assert_eq!(&payload[..2], &1008u16.to_be_bytes());
    assert_eq!(&payload[2..], b"too many fragments");
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "fragments");
    assert_eq!(line["close"]["code"], 1008);
    assert_eq!(line["close"]["by"], "proxy");
}

/// `limits.max_fragments` per route: a bound of 4 lets a 4-frame message through and
/// closes on the 5th frame of the next one.
#[tokio::test]
async fn max_fragments_is_a_route_limit() {
    let (mut client, mut up, _gw) = pair_with(|b| {
        config_for(b, "").replace(
            "upstream: app }",
            "upstream: app, limits: { max_fragments: 4 } }",
        )
    })
    .await;
    let message = |frames: usize| {
        let mut wire = client_frame(0x02, b"a");
        for _ in 1..frames - 1 {
            wire.extend(client_frame(0x00, b"b"));
        }
        wire.extend(client_frame(0x80, b"c"));
        wire
    };
    client
        .write_all(&message(4))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for want in [0x02, 0x00, 0x00, 0x80] {
        assert_eq!(read_frame(&mut up).await.map(|f| f.0), Some(want));
    }
    client
        .write_all(&message(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for want in [0x02, 0x00, 0x00, 0x00] {
        assert_eq!(read_frame(&mut up).await.map(|f| f.0), Some(want));
    }
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    assert_eq!(read_close_code(&mut client).await, Some(1008));
}

/// SPEC §5 "dead peer" on the upstream side: with `upstream_ping_interval`, an upstream
/// that never answers the proxy's ping within `pong_timeout` is cut off (its TCP closed,
/// no close frame) and the client gets 1014.
#[tokio::test]
async fn an_upstream_that_never_answers_pings_is_cut_and_the_client_gets_1014() {
    let (mut client, mut up, gw) = pair_with_keepalive(
        "limits: {  }",
        "{ ping_interval: 0s, upstream_ping_interval: 200ms, pong_timeout: 300ms }",
    )
    .await;
    let started = Instant::now();
    assert_eq!(read_frame(&mut up).await.map(|f| f.0), Some(0x89));
    assert_eq!(read_close_code(&mut client).await, Some(1014));
    let cut = started.elapsed();
    assert!(
        cut < Duration::from_secs(3),
        "dead upstream found after {cut:?}"
    );
    // The upstream only ever sees pings, then its TCP closes.
    while let Some((b0, _)) = read_frame(&mut up).await {
        assert_eq!(b0, 0x89, "the dead upstream got a frame other than a ping");
    }
    send_client_close(&mut client, 1014).await;
    assert!(closes_tcp(&mut client).await);
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "dead_peer");
    assert_eq!(line["close"]["code"], 1014);
    assert_eq!(line["close"]["by"], "proxy");
}
