//! Streaming and backpressure (SPEC §4): a large frame reaches the client while it is
//! still being sent, a client that stops reading blocks the upstream's writes instead of
//! growing the proxy's memory, and a stall past `send_timeout` cuts the slow consumer.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn first_bytes_of_a_16mib_frame_arrive_before_the_rest_is_sent() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config_for(
        backend,
        "max_frame_size: 32MiB, max_message_size: 32MiB",
    ))
    .await;
    let (mut client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    let total: usize = 16 << 20;
    let mut header = vec![0x82, 127];
    header.extend_from_slice(&(total as u64).to_be_bytes());
    let chunk = vec![0xABu8; 64 * 1024];
    up.write_all(&header)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    up.write_all(&chunk).await.unwrap_or_else(|e| panic!("{e}"));
    // The upstream now pauses; the client must already get the header and the first chunk.
    let mut got = vec![0u8; header.len() + chunk.len()];
    tokio::time::timeout(PATIENCE, client.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("first chunk did not arrive while the frame was incomplete"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&got[..header.len()], header.as_slice());
    assert!(got[header.len()..].iter().all(|&b| b == 0xAB));
    // Then the rest streams through intact.
    let rest = total - chunk.len();
    let writer = tokio::spawn(async move {
        let block = vec![0xCDu8; 1 << 20];
        let mut left = rest;
        while left > 0 {
            let n = left.min(block.len());
            if up.write_all(&block[..n]).await.is_err() {
                break;
            }
            left -= n;
        }
        up
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0usize;
    while received < rest {
        let n = tokio::time::timeout(PATIENCE, client.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        assert!(n > 0, "stream ended after {received} of {rest} bytes");
        assert!(buf[..n].iter().all(|&b| b == 0xCD));
        received += n;
    }
    let _up = writer.await;
}

#[tokio::test]
async fn a_client_that_stops_reading_blocks_the_upstream_then_is_cut_after_send_timeout() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config_for(backend, "send_timeout: 1s")).await;
    let (_client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    // The client reads nothing. Each message is 64 KiB; the upstream's writes must stall
    // long before 256 MiB (kernel socket buffers plus one 16 KiB relay buffer).
    let msg = server_frame(0x82, &vec![1u8; 64 * 1024]);
    let mut written = 0usize;
    let mut blocked = false;
    for _ in 0..4096 {
        match tokio::time::timeout(Duration::from_millis(500), up.write_all(&msg)).await {
            Ok(Ok(())) => written += msg.len(),
            Ok(Err(_)) => break,
            Err(_) => {
                blocked = true;
                break;
            }
        }
    }
    assert!(
        blocked,
        "upstream writes never blocked ({written} bytes accepted)"
    );
    assert!(
        written < 64 << 20,
        "proxy accepted {written} bytes from upstream for a client that reads nothing"
    );
    // After send_timeout the client is dropped and the upstream gets 1001.
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "slow_consumer");
    let mut tail = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, up.read_to_end(&mut tail)).await;
    let close = tail
        .windows(4)
        .any(|w| w[0] == 0x88 && w[1] & 0x7F >= 2 && (w[1] & 0x80 != 0));
    assert!(close, "upstream should receive a masked close frame");
}
