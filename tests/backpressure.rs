//! Streaming and backpressure (SPEC §4): a large frame reaches the client while it is
//! still being sent, a client that stops reading blocks the upstream's writes instead of
//! growing the proxy's memory, and a stall past `send_timeout` cuts the slow consumer.
//! Stalls short of that are visible (SPEC §6 `stalls`, §7 `wsgate_connections_stalled`,
//! `wsgate_stall_seconds_total`).

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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

/// Writes 64 KiB messages to `to` until a write stalls for 500 ms; returns the bytes of the
/// messages written whole (the kernel took them) and whether a write stalled.
async fn write_until_stalled(to: &mut TcpStream, msg: &[u8]) -> (usize, bool) {
    let mut written = 0usize;
    for _ in 0..4096 {
        match tokio::time::timeout(Duration::from_millis(500), to.write_all(msg)).await {
            Ok(Ok(())) => written += msg.len(),
            Ok(Err(_)) => return (written, false),
            Err(_) => return (written, true),
        }
    }
    (written, false)
}

/// What one loopback TCP connection holds when its reader never reads: the writer's send
/// buffer plus the reader's receive buffer, as the kernel sizes them here (autotuned:
/// about 3.7 MiB with Linux's default `tcp_wmem` ceiling of 4 MiB).
async fn loopback_holds(msg: &[u8]) -> usize {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let mut writer = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_reader, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
    let (held, stalled) = write_until_stalled(&mut writer, msg).await;
    assert!(
        stalled,
        "a loopback connection took {held} bytes without stalling"
    );
    held
}

#[tokio::test]
async fn a_client_that_stops_reading_blocks_the_upstream_then_is_cut_after_send_timeout() {
    let msg = server_frame(0x82, &vec![1u8; 64 * 1024]);
    let kernel = loopback_holds(&msg).await;
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config_for(backend, "send_timeout: 1s")).await;
    let (mut client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    // The client reads nothing, so the upstream's writes stall once every buffer on the
    // way is full: two loopback connections (upstream → proxy, proxy → client), each
    // holding at most `kernel` as measured above, plus the proxy's one relay buffer
    // (`buffer_size`, 16 KiB, and room for a frame header). The proxy reads from the
    // upstream while it can write, so the kernel grows that socket's receive buffer
    // (tcp_moderate_rcvbuf) beyond what the never-read measurement shows: 384 KiB here
    // (the default 128 KiB receive buffer, quadrupled); 1 MiB allows for that. Anything
    // the proxy queued beyond its buffer (a frame, a message) would show on top.
    let bound = 2 * kernel + (16 << 10) + 14 + (1 << 20);
    let (written, blocked) = write_until_stalled(&mut up, &msg).await;
    assert!(
        blocked,
        "upstream writes never blocked ({written} bytes accepted)"
    );
    assert!(
        written <= bound,
        "proxy took {written} bytes from the upstream for a client that reads nothing; the buffers on the way hold at most {bound} (a loopback connection holds {kernel})"
    );
    // After send_timeout the client is cut off: its TCP is closed, no close frame (it
    // could not be read anyway), and the upstream gets 1001 (SPEC §5 slow consumer).
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "slow_consumer");
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    let mut relayed = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, client.read_to_end(&mut relayed)).await;
    let mut at = 0;
    while let Some(frame) = relayed.get(at..at + msg.len()) {
        assert_eq!(
            frame,
            msg.as_slice(),
            "the client got only whole data frames"
        );
        at += msg.len();
    }
    assert!(
        msg.starts_with(&relayed[at..]),
        "the client's last bytes are the start of a data frame, not a close"
    );
}

/// A client whose receive buffer is small (16 KiB asked; no autotuning), so that the
/// proxy's writes to it block soon after it stops reading.
async fn upgrade_with_small_receive_buffer(gw: &TestGateway) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    socket
        .set_recv_buffer_size(16 * 1024)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut s = tokio::time::timeout(PATIENCE, socket.connect(gw.addr()))
        .await
        .unwrap_or_else(|_| panic!("connect timed out"))
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr()
    );
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// 64 KiB frames the backend sends per round: 8 MiB, twice what the proxy's send buffer
/// towards the client can grow to here (Linux's `tcp_wmem` ceiling, 4 MiB) plus the
/// client's small receive buffer, so the proxy must block on the client.
const FRAMES: usize = 128;

/// The ws_close lines so far, once there are `n`.
async fn close_lines(gw: &TestGateway, n: usize) -> Vec<serde_json::Value> {
    eventually(&format!("{n} ws_close lines"), PATIENCE, async || {
        let lines: Vec<_> = gw
            .log_lines()
            .into_iter()
            .filter(|l| l["event"] == "ws_close")
            .collect();
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(lines)
        }
    })
    .await
}

/// One connection whose client stops reading for `pause` while the backend sends
/// [`FRAMES`]: returns its ws_close line (the `round`-th).
async fn pause_reading(
    gw: &TestGateway,
    accepted: &mut tokio::sync::mpsc::Receiver<(TcpStream, String)>,
    pause: Duration,
    round: usize,
) -> serde_json::Value {
    let mut client = upgrade_with_small_receive_buffer(gw).await;
    let (mut up, _) = next_accepted(accepted).await;
    let msg = server_frame(0x82, &vec![3u8; 64 * 1024]);
    let total = FRAMES * msg.len();
    let writer = tokio::spawn(async move {
        for _ in 0..FRAMES {
            up.write_all(&msg).await.unwrap_or_else(|e| panic!("{e}"));
        }
        up
    });
    let u2c = [("route", "app"), ("direction", "u2c")];
    let c2u = [("route", "app"), ("direction", "c2u")];
    // The proxy now waits on the client, which reads nothing.
    await_metric(gw, "wsgate_connections_stalled", &u2c, 1.0).await;
    let s = scrape(gw).await;
    assert_eq!(metric(&s, "wsgate_connections_stalled", &c2u), 0.0);
    // The pause is the behaviour under test: the client is a slow reader for this long.
    tokio::time::sleep(pause).await;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    let read_all = async {
        while got < total {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    };
    let _ = tokio::time::timeout(PATIENCE, read_all).await;
    assert_eq!(got, total, "the client got everything the backend sent");
    let mut up = tokio::time::timeout(PATIENCE, writer)
        .await
        .unwrap_or_else(|_| panic!("the backend's writes never finished"))
        .unwrap_or_else(|e| panic!("{e}"));
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    assert_eq!(read_close_code(&mut client).await, Some(1000));
    drop((client, up));
    let lines = close_lines(gw, round + 1).await;
    await_metric(gw, "wsgate_connections_stalled", &u2c, 0.0).await;
    lines[round].clone()
}

#[tokio::test]
async fn a_client_that_stops_reading_is_logged_and_counted_as_stalled() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
keepalive: {{ ping_interval: 0s }}
limits: {{ send_timeout: 30s }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 2s }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}
"#
    ))
    .await;
    let u2c = [("route", "app"), ("direction", "u2c")];
    let c2u = [("route", "app"), ("direction", "c2u")];
    let mut seconds = metric(&scrape(&gw).await, "wsgate_stall_seconds_total", &u2c);
    assert_eq!(seconds, 0.0);
    let mut stalled_ms = Vec::new();
    for (round, pause) in [300u64, 1200].into_iter().enumerate() {
        let line = pause_reading(&gw, &mut accepted, Duration::from_millis(pause), round).await;
        let stalls = &line["stalls"];
        let count = stalls["u2c"]["count"].as_u64().unwrap_or(0);
        let ms = stalls["u2c"]["ms"].as_u64().unwrap_or(0);
        assert!(count >= 1, "{line}");
        // The stall began before the gauge showed it and ended after the client read
        // again; the slack is for any instant the kernel took a few more bytes meanwhile.
        assert!(
            ms + 50 >= pause,
            "blocked {ms} ms for a {pause} ms pause: {line}"
        );
        assert_eq!(
            stalls["c2u"],
            serde_json::json!({"count": 0, "ms": 0}),
            "nothing waited on the backend: {line}"
        );
        // The counter grew by this connection's stall time (the log truncates to ms; the
        // hundredth is for float rounding in the counter's sum).
        let s = scrape(&gw).await;
        let now = metric(&s, "wsgate_stall_seconds_total", &u2c);
        let added_ms = (now - seconds) * 1000.0;
        assert!(
            added_ms > ms as f64 - 0.01 && added_ms < ms as f64 + 1.01,
            "wsgate_stall_seconds_total grew by {added_ms} ms, the log says {ms}"
        );
        assert_eq!(metric(&s, "wsgate_stall_seconds_total", &c2u), 0.0);
        seconds = now;
        stalled_ms.push(ms);
    }
    assert!(
        stalled_ms[1] > stalled_ms[0] && stalled_ms[1] >= 1000,
        "blocked time does not follow the pause: {stalled_ms:?}"
    );
}
