//! Every protocol-violation row of SPEC §5, with exact bytes: the offender gets its code,
//! the other side gets 1001 (client offender) or 1002/1009 (upstream offender), and the
//! access log names the reason.

mod support;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A gateway in front of a raw backend, one connection through it: (client, upstream, gw).
async fn pair(limits: &str) -> (TcpStream, TcpStream, TestGateway) {
    pair_with(|b| config_for(b, limits)).await
}

async fn client_violation(bytes: &[u8], to_client: u16, reason: &str) {
    let (mut client, mut up, gw) = pair("max_frame_size: 1KiB, max_message_size: 2KiB").await;
    client
        .write_all(bytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Frames before the offending one were relayed; then comes the proxy's 1001.
    assert_eq!(
        read_close_code(&mut up).await,
        Some(1001),
        "to upstream for {bytes:02x?}"
    );
    // The client's code takes the place of the upstream's close reply, so anything the
    // upstream sent before it still reaches the client first.
    up.write_all(&server_frame(0x82, b"late reply"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send_server_close(&mut up, 1001).await;
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x82, b"late reply".to_vec()))
    );
    assert_eq!(
        read_close_code(&mut client).await,
        Some(to_client),
        "to client for {bytes:02x?}"
    );
    drop(up);
    // The client answers the close; the proxy then closes the TCP connection.
    send_client_close(&mut client, to_client).await;
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], to_client);
    assert_eq!(line["close"]["by"], "proxy");
    assert_eq!(line["proxy_reason"], reason);
}

#[tokio::test]
async fn unmasked_client_frame_is_1002() {
    client_violation(&server_frame(0x81, b"hi"), 1002, "protocol").await;
}

#[tokio::test]
async fn reserved_opcode_is_1002() {
    client_violation(&client_frame(0x83, b"x"), 1002, "protocol").await;
    client_violation(&client_frame(0x8B, b"x"), 1002, "protocol").await;
}

#[tokio::test]
async fn rsv_bits_without_extension_are_1002() {
    client_violation(&client_frame(0xC1, b"x"), 1002, "protocol").await;
}

#[tokio::test]
async fn oversized_control_frame_is_1002() {
    client_violation(&client_frame(0x89, &[0u8; 126]), 1002, "protocol").await;
}

#[tokio::test]
async fn fragmented_control_frame_is_1002() {
    client_violation(&client_frame(0x09, b"x"), 1002, "protocol").await;
}

#[tokio::test]
async fn continuation_without_start_is_1002() {
    client_violation(&client_frame(0x80, b"x"), 1002, "protocol").await;
}

#[tokio::test]
async fn length_with_top_bit_set_is_1002() {
    let mut f = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&[1, 2, 3, 4]);
    client_violation(&f, 1002, "protocol").await;
}

#[tokio::test]
async fn invalid_close_reason_is_1007() {
    client_violation(
        &client_frame(0x88, &[0x03, 0xE8, 0xFF, 0xFE]),
        1007,
        "protocol",
    )
    .await;
}

#[tokio::test]
async fn invalid_utf8_text_is_1007_when_its_frame_ends() {
    client_violation(
        &client_frame(0x81, &[b'o', b'k', 0xED, 0xA0, 0x80]),
        1007,
        "protocol",
    )
    .await;
    let mut split = client_frame(0x01, &[b'a', 0xF0, 0x9F]);
    split.extend(client_frame(0x89, b"ping between fragments"));
    split.extend(client_frame(0x80, &[0x98])); // the sequence never completes
    client_violation(&split, 1007, "protocol").await;
}

#[tokio::test]
async fn invalid_close_code_is_1002() {
    client_violation(
        &client_frame(0x88, &close_payload(1005, "")),
        1002,
        "protocol",
    )
    .await;
}

#[tokio::test]
async fn frame_over_limit_is_1009() {
    client_violation(&client_frame(0x82, &[7u8; 1025]), 1009, "too_big").await;
}

#[tokio::test]
async fn message_over_limit_is_1009() {
    let mut bytes = client_frame(0x02, &[1u8; 1024]);
    bytes.extend(client_frame(0x00, &[1u8; 1024]));
    bytes.extend(client_frame(0x80, &[1u8; 1]));
    client_violation(&bytes, 1009, "too_big").await;
}

async fn upstream_violation(bytes: &[u8], to_upstream: u16, reason: &str) {
    let (mut client, mut up, gw) = pair("max_frame_size: 1KiB").await;
    up.write_all(bytes).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_close_code(&mut client).await, Some(1014));
    assert_eq!(read_close_code(&mut up).await, Some(to_upstream));
    send_client_close(&mut client, 1014).await;
    send_server_close(&mut up, to_upstream).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], 1014);
    assert_eq!(line["proxy_reason"], reason);
}

#[tokio::test]
async fn masked_upstream_frame_is_1014_and_1002() {
    upstream_violation(&client_frame(0x81, b"hi"), 1002, "protocol").await;
}

#[tokio::test]
async fn oversized_upstream_frame_is_1014_and_1009() {
    upstream_violation(&server_frame(0x82, &[0u8; 2048]), 1009, "too_big").await;
}

#[tokio::test]
async fn upstream_vanishing_gives_the_client_1014() {
    let (mut client, up, gw) = pair("").await;
    drop(up);
    assert_eq!(read_close_code(&mut client).await, Some(1014));
    send_client_close(&mut client, 1014).await;
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["by"], "upstream");
}

#[tokio::test]
async fn client_vanishing_gives_the_upstream_1001() {
    let (client, mut up, gw) = pair("").await;
    drop(client);
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    assert!(
        closes_tcp(&mut up).await,
        "the proxy half-closes after the close handshake"
    );
    drop(up);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["by"], "client");
    assert_eq!(line["close"]["code"], 1006);
}

/// A pong that answers no proxy ping is relayed; a violation right behind it in the same
/// segment still gets both sides their close codes (a relayed pong is not a close).
#[tokio::test]
async fn a_violation_right_behind_a_relayed_pong_still_closes_both_sides() {
    let (mut client, mut up, gw) = pair_with(|b| {
        let keepalive = "keepalive: { ping_interval: 100ms, pong_timeout: 10s }";
        format!("{}{keepalive}\n", config_for(b, ""))
    })
    .await;
    let (mut bytes, wrong) = pong_not_answering_next_ping(&mut client).await;
    bytes.extend(server_frame(0x81, b"unmasked"));
    client
        .write_all(&bytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_frame(&mut up).await, Some((0x8A, wrong)));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    assert_eq!(read_close_code(&mut client).await, Some(1002));
    send_client_close(&mut client, 1002).await;
    assert!(closes_tcp(&mut client).await);
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], 1002);
    assert_eq!(line["close"]["by"], "proxy");
    assert_eq!(line["proxy_reason"], "protocol");
}
