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
    ws.close(None)
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["http"], "2", "{line}");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["close"]["code"], 1005, "{line}");
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
