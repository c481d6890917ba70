//! Issue 19, reconnect storms: the per-backend upgrade queue (`max_pending`,
//! `queue_timeout`), passive detection letting a recovered backend back in, and
//! `limits.max_connection_age`. Real sockets: a backend that holds each upgrade until the
//! test answers it, raw clients, the gateway in-process.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use support::*;

/// A backend that reads each upgrade request and hands it to the test unanswered: the
/// test decides when (and whether) it gets its 101. Returns its address and the held
/// requests in arrival order.
async fn holding_backend() -> (SocketAddr, mpsc::Receiver<(TcpStream, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if !head.is_empty() {
                    let _ = tx.send((s, head)).await;
                }
            });
        }
    });
    (addr, rx)
}

/// Answers a held upgrade with its 101.
async fn answer_101(s: &mut TcpStream, head: &str) {
    let key = header_value(head, "sec-websocket-key").unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(resp.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

fn queue_config(backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], sticky: {{ key: "query:room" }}, connect_timeout: 5s{extra} }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}
"#
    )
}

/// A backend on `listener` that answers every upgrade 101 and holds the connection.
fn serve_101(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                answer_101(&mut s, &head).await;
                tokio::time::sleep(PATIENCE).await;
            });
        }
    });
}

/// Sends an upgrade request for `room` and returns the stream, the head not yet read.
async fn send_upgrade(gw: SocketAddr, room: &str) -> TcpStream {
    let mut s = TcpStream::connect(gw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "GET /?room={room} HTTP/1.1\r\nHost: {gw}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s
}

/// The room a held upstream request is for.
fn room_of(head: &str) -> String {
    head.lines()
        .next()
        .and_then(|l| l.split("room=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?")
        .to_owned()
}

/// Nothing reaches the backend for a while.
async fn assert_quiet(held: &mut mpsc::Receiver<(TcpStream, String)>, why: &str) {
    if let Ok(Some((_, head))) = tokio::time::timeout(Duration::from_millis(300), held.recv()).await
    {
        panic!("{why}: the backend got {}", room_of(&head));
    }
}

async fn next_held(held: &mut mpsc::Receiver<(TcpStream, String)>) -> (TcpStream, String) {
    next_accepted(held).await
}

/// `max_pending: 2`: the third and later upgrades wait, in arrival order; one whose client
/// went away leaves the queue at once and is never sent upstream; past `queue_timeout`
/// the client gets 503 `queue_timeout` with a `Retry-After` within the window.
#[tokio::test]
async fn the_queue_is_fifo_drops_the_departed_and_times_out_with_retry_after() {
    let (backend, mut held) = holding_backend().await;
    let gw = spawn_gateway(&queue_config(
        backend,
        ", max_pending: 2, queue_timeout: 1500ms",
    ))
    .await;
    let addr = gw.addr();
    let _a = send_upgrade(addr, "a").await;
    let (mut up_a, head_a) = next_held(&mut held).await;
    let _b = send_upgrade(addr, "b").await;
    let (mut up_b, head_b) = next_held(&mut held).await;
    assert_eq!(
        (room_of(&head_a), room_of(&head_b)),
        ("a".into(), "b".into())
    );

    // Two in flight: the next ones wait at the gateway.
    let gone = send_upgrade(addr, "gone").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 1.0).await;
    let _d = send_upgrade(addr, "d").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 2.0).await;
    let _e = send_upgrade(addr, "e").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 3.0).await;
    assert_quiet(&mut held, "max_pending 2 with two in flight").await;

    // The client that gave up leaves the queue at once (not when its turn comes).
    drop(gone);
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 2.0).await;

    // A place frees: the next in line is d (gone never reaches the backend), then e.
    answer_101(&mut up_a, &head_a).await;
    let (mut up_d, head_d) = next_held(&mut held).await;
    assert_eq!(room_of(&head_d), "d");
    answer_101(&mut up_b, &head_b).await;
    let (_up_e, head_e) = next_held(&mut held).await;
    assert_eq!(room_of(&head_e), "e");
    answer_101(&mut up_d, &head_d).await;

    // One place is free now (a, b, d answered; e in flight): f goes through, g waits
    // behind e and f until queue_timeout.
    let _f = send_upgrade(addr, "f").await;
    let (_up_f, head_f) = next_held(&mut held).await;
    assert_eq!(room_of(&head_f), "f");
    let waited = tokio::time::Instant::now();
    let mut g = send_upgrade(addr, "g").await;
    let head = read_head(&mut g).await;
    let elapsed = waited.elapsed();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        elapsed >= Duration::from_millis(1400),
        "refused after {elapsed:?}"
    );
    let retry: u64 = header_value(&head, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {head}"));
    assert!((1..=2).contains(&retry), "{retry}");
    let line = gw
        .log_line(|l| l["event"] == "ws_reject" && l["path"] == "/?room=g")
        .await;
    assert_eq!(line["proxy_reason"], "queue_timeout");
    assert_eq!(line["status"], 503);
    assert_quiet(&mut held, "the timed-out g").await;
    let scrape = scrape(&gw).await;
    assert!(
        metric(
            &scrape,
            "wsgate_upstream_queue_seconds_count",
            &[("upstream", "app")]
        ) >= 6.0
    );
}

/// The `Retry-After` of queue timeouts is spread over the window, not one value.
#[tokio::test]
async fn queue_timeouts_spread_their_retry_after() {
    let (backend, mut held) = holding_backend().await;
    let gw = spawn_gateway(&queue_config(
        backend,
        ", max_pending: 1, queue_timeout: 200ms",
    ))
    .await;
    let _first = send_upgrade(gw.addr(), "first").await;
    let _held_first = next_held(&mut held).await;
    let mut waits = Vec::new();
    for i in 0..12 {
        let mut s = send_upgrade(gw.addr(), &format!("late{i}")).await;
        waits.push(tokio::spawn(async move { read_head(&mut s).await }));
    }
    let mut values = std::collections::BTreeSet::new();
    for w in waits {
        let head = w.await.unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        values.insert(header_value(&head, "retry-after").unwrap_or_default());
    }
    // Window max(2, 0.2 s) = 2 s: values 1 and 2; twelve draws all alike is 2 × 2^-12.
    assert_eq!(values.len(), 2, "{values:?}");
}

/// `limits.max_connection_age: 1s`: each connection is closed 1001 `max age` within
/// 0.9–1.1 s of its start (± 10 % jitter), the upstream gets 1001, the log says `max_age`.
#[tokio::test]
async fn max_connection_age_closes_1001_within_its_jitter_window() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config_for(backend, "max_connection_age: 1s")).await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let started = tokio::time::Instant::now();
        let (client, head) = raw_upgrade(gw.addr(), "/", "").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let (up, _) = next_accepted(&mut accepted).await;
        conns.push((started, client, up));
    }
    for (started, mut client, mut up) in conns {
        let code = tokio::time::timeout(Duration::from_secs(3), read_close_frame(&mut client))
            .await
            .unwrap_or_else(|_| panic!("no close within 3 s"));
        let age = started.elapsed();
        assert_eq!(code, Some((1001, "max age".to_string())));
        // The lower bound is exact; the upper one allows the scheduling of a busy machine.
        assert!(age >= Duration::from_millis(900), "closed at {age:?}");
        assert!(
            age <= Duration::from_millis(1100 + 400),
            "closed at {age:?}"
        );
        assert_eq!(read_close_code(&mut up).await, Some(1001));
    }
    let line = gw
        .log_line(|l| l["event"] == "ws_close" && l["proxy_reason"] == "max_age")
        .await;
    assert_eq!(line["close"]["code"], 1001);
}

/// The code and reason of the next close frame from the proxy.
async fn read_close_frame(s: &mut TcpStream) -> Option<(u16, String)> {
    for _ in 0..1000 {
        let (b0, payload) = read_frame(s).await?;
        if b0 & 0x0F == 0x8 {
            let code = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
            let reason = String::from_utf8_lossy(payload.get(2..)?).into_owned();
            return Some((code, reason));
        }
    }
    None
}

/// With `max_pending` set, a backend restart shorter than `queue_timeout` is a wait, not
/// an error: upgrades that find the backend refusing wait for it (it is probed) and get
/// their 101 once it listens again; none is refused meanwhile.
#[tokio::test]
async fn a_short_backend_restart_is_a_wait_not_an_error() {
    // Held, not listening: refused until the test listens on it.
    let place = Reserved::on(std::net::IpAddr::from([127, 0, 0, 1]));
    let gw = spawn_gateway(&queue_config(
        place.addr,
        ", max_pending: 4, queue_timeout: 8s",
    ))
    .await;
    let addr = gw.addr();
    let mut waiting = Vec::new();
    for i in 0..6 {
        let mut s = send_upgrade(addr, &format!("w{i}")).await;
        waiting.push(tokio::spawn(async move {
            let head = read_head(&mut s).await;
            (s, head)
        }));
    }
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 6.0).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "a client was answered while the backend was away"
    );
    let listener = place.listener();
    let started = tokio::time::Instant::now();
    serve_101(listener);
    for w in waiting {
        let (_s, head) = w.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    // Probes back off by a quarter from 100 ms to 250 ms: back well within 2.5 s.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        gw.log_lines().iter().all(|l| l["event"] != "ws_reject"),
        "{:?}",
        gw.log_lines()
    );
}

/// One client alone (fewer failed connects than `unhealthy_after`, so no probe runs): the
/// backend back within the wait still makes it a wait, not a `queue_timeout` 503.
#[tokio::test]
async fn a_lone_client_waiting_through_a_short_restart_is_served_when_the_backend_is_back() {
    let place = Reserved::on(std::net::IpAddr::from([127, 0, 0, 1]));
    let gw = spawn_gateway(&queue_config(
        place.addr,
        ", max_pending: 4, queue_timeout: 6s",
    ))
    .await;
    let mut s = send_upgrade(gw.addr(), "lone").await;
    let waiting = tokio::spawn(async move {
        let head = read_head(&mut s).await;
        (s, head)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "answered while the backend was away"
    );
    let listener = place.listener();
    let started = tokio::time::Instant::now();
    serve_101(listener);
    let (_s, head) = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served {:?} after the backend was back",
        started.elapsed()
    );
}

/// Handshakes queued for a dead upstream do not hold `max_pending_handshakes` slots: a
/// route to a live backend is served meanwhile.
#[tokio::test]
async fn handshakes_queued_for_a_dead_upstream_do_not_stall_other_routes() {
    let dead = Reserved::on(std::net::IpAddr::from([127, 0, 0, 1]));
    let live = echo_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
limits: {{ max_pending_handshakes: 4 }}
upstreams:
  dead: {{ backends: [{{ addr: "{}" }}], max_pending: 32, queue_timeout: 5s, connect_timeout: 1s }}
  live: {{ backends: [{{ addr: "{live}" }}] }}
routes:
  - {{ name: dead, match: {{ path_prefix: /dead }}, upstream: dead }}
  - {{ name: live, match: {{ path_prefix: / }}, upstream: live }}
"#,
        dead.addr
    );
    let gw = spawn_gateway(&yaml).await;
    let mut queued = Vec::new();
    for i in 0..6 {
        let mut s = TcpStream::connect(gw.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = format!(
            "GET /dead?i={i} HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        queued.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    let (_s, head) = raw_upgrade(gw.addr(), "/live", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the live route waited {:?} behind the queued ones",
        started.elapsed()
    );
    drop(queued);
}

// === issue 19, second round: pre-connect, plain requests, the queue's bound, order across
// a backend's return, resizing, weights ===

/// Per-IP limits out of the way: these tests open hundreds of connections from 127.0.0.1.
const MANY: &str = "limits: { max_connections_per_ip: 4000, handshakes_per_ip: { rate: 100000, per: 1s, burst: 100000 } }";

/// `queue_config` with [`MANY`], the listener at `bind`, and `http` for the route.
fn config_at(bind: &str, backends: &str, upstream: &str, http: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "{bind}" }}]
admin: {{ bind: "127.0.0.1:0" }}
{MANY}
upstreams:
  app: {{ backends: [{backends}], sticky: {{ key: "query:room" }}, connect_timeout: 5s{upstream} }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app{http} }}
"#
    )
}

/// [`holding_backend`] on `listener`, also counting the TCP connections it accepted
/// (before any request arrives on them).
fn hold_counting(
    listener: TcpListener,
) -> (
    mpsc::Receiver<(TcpStream, String)>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (tx, rx) = mpsc::channel(512);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if !head.is_empty() {
                    let _ = tx.send((s, head)).await;
                }
            });
        }
    });
    (rx, accepted)
}

/// A gateway in front of one [`hold_counting`] backend, with `upstream` and `http` added
/// to its config as in [`config_at`]: the gateway, the backend's `backends` entry, what it
/// holds and how many connections it accepted.
async fn gateway_holding(
    upstream: &str,
    http: &str,
) -> (
    TestGateway,
    String,
    mpsc::Receiver<(TcpStream, String)>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = bind_local().await;
    let backends = format!(r#"{{ addr: "{}" }}"#, local_addr(&listener));
    let (held, accepted) = hold_counting(listener);
    let gw = spawn_gateway(&config_at("127.0.0.1:0", &backends, upstream, http)).await;
    (gw, backends, held, accepted)
}

async fn bind_local() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

async fn accepted_reaches(n: &std::sync::atomic::AtomicUsize, want: usize) {
    eventually("backend connections", PATIENCE, async || {
        let now = n.load(std::sync::atomic::Ordering::SeqCst);
        if now == want { Ok(()) } else { Err(now) }
    })
    .await;
}

/// A queued upgrade at the head of the line connects to the backend before a place is
/// free (so a place covers only request → 101), but sends nothing until it has one, and
/// at most `max_pending` connect ahead.
#[tokio::test]
async fn the_next_upgrade_connects_ahead_but_sends_only_with_its_place() {
    let (gw, _, mut held, accepted) =
        gateway_holding(", max_pending: 1, queue_timeout: 5s", "").await;
    let addr = gw.addr();
    let _a = send_upgrade(addr, "a").await;
    let (mut up_a, head_a) = next_held(&mut held).await;
    let _b = send_upgrade(addr, "b").await;
    let _c = send_upgrade(addr, "c").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 2.0).await;
    // a in flight, b connected ahead; c waits without a connection.
    accepted_reaches(&accepted, 2).await;
    assert_quiet(&mut held, "b is connected, but has no place yet").await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    answer_101(&mut up_a, &head_a).await;
    let (mut up_b, head_b) = next_held(&mut held).await;
    assert_eq!(room_of(&head_b), "b");
    accepted_reaches(&accepted, 3).await;
    assert_quiet(&mut held, "c connected ahead while b is in flight").await;
    answer_101(&mut up_b, &head_b).await;
    let (_up_c, head_c) = next_held(&mut held).await;
    assert_eq!(room_of(&head_c), "c");
}

/// Plain requests on an `http: proxy` route take a `max_pending` place too, in line with
/// the upgrades: the backend never has more than `max_pending` requests in progress.
#[tokio::test]
async fn plain_requests_take_a_max_pending_place() {
    let (gw, _, mut held, _) =
        gateway_holding(", max_pending: 1, queue_timeout: 5s", ", http: proxy").await;
    let addr = gw.addr();
    let get = |room: &'static str| async move {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = format!("GET /poll?room={room} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s
    };
    let mut first = get("p1").await;
    let (mut up1, head1) = next_held(&mut held).await;
    assert!(head1.starts_with("GET /poll?room=p1"), "{head1}");
    let mut second = get("p2").await;
    let _upgrade = send_upgrade(addr, "u3").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 2.0).await;
    assert_quiet(&mut held, "max_pending 1 with a plain request in progress").await;
    // `connection: close`: the next request comes on a new connection the test sees.
    up1.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = read_head(&mut first).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (mut up2, head2) = next_held(&mut held).await;
    assert!(head2.starts_with("GET /poll?room=p2"), "{head2}");
    assert_quiet(&mut held, "the upgrade waits for the second request").await;
    up2.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = read_head(&mut second).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let Ok(Some((_up3, head3))) = tokio::time::timeout(PATIENCE, held.recv()).await else {
        panic!(
            "the upgrade never reached the backend: {:?}",
            gw.log_lines()
        );
    };
    assert_eq!(room_of(&head3), "u3");
}

/// A backend's queue holds at most 256 × `max_pending` handshakes: the next one gets 503
/// `queue_timeout` with a `Retry-After` at once, not after `queue_timeout`.
#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let (gw, _, mut held, _) = gateway_holding(", max_pending: 1, queue_timeout: 30s", "").await;
    let addr = gw.addr();
    let _first = send_upgrade(addr, "first").await;
    let _in_flight = next_held(&mut held).await;
    // One connected ahead (waiting for the place) and 256 waiting to be let ahead.
    let mut queued = Vec::new();
    for i in 0..257 {
        queued.push(send_upgrade(addr, &format!("q{i}")).await);
    }
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 257.0).await;
    let mut over = send_upgrade(addr, "over").await;
    let mut answer = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut over, &mut answer);
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .unwrap_or_else(|_| panic!("the handshake past the queue's bound was not refused at once"))
        .unwrap_or_else(|e| panic!("{e}"));
    let head = String::from_utf8_lossy(&answer).into_owned();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(refusal_word(&head), "queue_timeout", "{head}");
    let retry: u64 = header_value(&head, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {head}"));
    assert!((1..=30).contains(&retry), "{retry}");
    assert_quiet(&mut held, "the refused one never reaches the backend").await;
}

/// Handshakes that waited through a backend's outage reach it in their arrival order when
/// it is back (they are woken together; none with a later ticket is let ahead first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshakes_waiting_through_an_outage_reach_the_backend_in_arrival_order() {
    let place = Reserved::on(std::net::IpAddr::from([127, 0, 0, 1]));
    let gw = spawn_gateway(&config_at(
        "127.0.0.1:0",
        &format!(r#"{{ addr: "{}" }}"#, place.addr),
        ", max_pending: 1, queue_timeout: 10s",
        "",
    ))
    .await;
    let addr = gw.addr();
    let mut clients = Vec::new();
    for i in 0..12 {
        clients.push(send_upgrade(addr, &format!("r{i:02}")).await);
        // Arrival order is the order the gateway read the heads in.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // Every one has found the backend refusing (and waits for it) a few times over.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (mut held, _) = hold_counting(place.listener());
    let mut order = Vec::new();
    for _ in 0..12 {
        let (mut up, head) = next_held(&mut held).await;
        order.push(room_of(&head));
        answer_101(&mut up, &head).await;
    }
    let want: Vec<String> = (0..12).map(|i| format!("r{i:02}")).collect();
    assert_eq!(order, want);
}

/// A reload that shrinks `max_pending` neither adds places nor lets the old waiters use
/// the old ones: never more in flight than max(old, new), and no more than the new size
/// once the old holders are done.
#[tokio::test]
async fn shrinking_max_pending_on_reload_never_exceeds_the_sizes() {
    let (gw, backends, mut held, _) =
        gateway_holding(", max_pending: 2, queue_timeout: 10s", "").await;
    let addr = gw.addr();
    let _a = send_upgrade(addr, "a").await;
    let (mut up_a, head_a) = next_held(&mut held).await;
    let _b = send_upgrade(addr, "b").await;
    let (mut up_b, head_b) = next_held(&mut held).await;
    let _c = send_upgrade(addr, "c").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 1.0).await;
    let text = config_at(
        &addr.to_string(),
        &backends,
        ", max_pending: 1, queue_timeout: 10s",
        "",
    );
    let config = wsgate::config::Config::from_yaml_str_with_env(&text, "reload.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    gw.gw.reload(config).await;
    let _d = send_upgrade(addr, "d").await;
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 2.0).await;
    assert_quiet(&mut held, "two in flight, max_pending now 1").await;
    answer_101(&mut up_a, &head_a).await;
    assert_quiet(&mut held, "one in flight, max_pending now 1").await;
    answer_101(&mut up_b, &head_b).await;
    let (mut up_c, head_c) = next_held(&mut held).await;
    assert_eq!(room_of(&head_c), "c");
    assert_quiet(&mut held, "c in flight, max_pending now 1").await;
    answer_101(&mut up_c, &head_c).await;
    let (_up_d, head_d) = next_held(&mut held).await;
    assert_eq!(room_of(&head_d), "d");
}

/// A backend on `listener` that answers every upgrade 101 and counts them.
fn counting_101(listener: TcpListener) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                answer_101(&mut s, &head).await;
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = read_head(&mut s).await; // until the gateway closes
            });
        }
    });
    n
}

/// While one backend ramps up (`slow_start`), the others keep their configured shares,
/// even with weights above 4.29 million (weight × 1000 used to saturate `u32`, making
/// 5 M and 10 M equal).
#[tokio::test]
async fn slow_start_keeps_large_weights_in_proportion() {
    let (la, lb) = (bind_local().await, bind_local().await);
    let (a, b) = (local_addr(&la), local_addr(&lb));
    let (na, nb) = (counting_101(la), counting_101(lb));
    let newcomer = bind_local().await;
    let c = local_addr(&newcomer);
    let _nc = counting_101(newcomer);
    let two = format!(r#"{{ addr: "{a}", weight: 5000000 }}, {{ addr: "{b}", weight: 10000000 }}"#);
    let gw = spawn_gateway(&config_at("127.0.0.1:0", &two, ", slow_start: 1h", "")).await;
    let addr = gw.addr();
    // A third backend added by a reload ramps over the hour: the two others share the keys.
    let three = format!(r#"{two}, {{ addr: "{c}", weight: 10000000 }}"#);
    let text = config_at(&addr.to_string(), &three, ", slow_start: 1h", "");
    let config = wsgate::config::Config::from_yaml_str_with_env(&text, "reload.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    gw.gw.reload(config).await;
    for i in 0..300 {
        let mut s = send_upgrade(addr, &format!("k{i}")).await;
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    let (na, nb) = (
        na.load(std::sync::atomic::Ordering::SeqCst),
        nb.load(std::sync::atomic::Ordering::SeqCst),
    );
    let ratio = nb as f64 / na.max(1) as f64;
    assert!(
        (1.5..=2.7).contains(&ratio),
        "weights 1:2, connections {na}:{nb}"
    );
}

/// A backend that answers each upgrade 101 after `delay`, counting the upgrade requests
/// it has read and not answered yet (a request the gateway gave up on counts until
/// answered, as a backend still works on it); returns (now, peak, answered).
#[allow(clippy::type_complexity)]
fn slow_counting_101(
    listener: TcpListener,
    delay: Duration,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (now, peak, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (n, p, d) = (now.clone(), peak.clone(), done.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (n, p, d) = (n.clone(), p.clone(), d.clone());
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if head.is_empty() {
                    return;
                }
                let c = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(c, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                n.fetch_sub(1, Ordering::SeqCst);
                answer_101(&mut s, &head).await;
                d.fetch_add(1, Ordering::SeqCst);
                let _ = read_head(&mut s).await; // until the gateway closes
            });
        }
    });
    (now, peak, done)
}

/// Review of issue 19's queue: clients that go away at every stage (waiting to be let
/// ahead, connecting ahead, waiting for a place, in flight) and handshakes timing out as
/// places are granted never leak a place nor let the backend see more than `max_pending`
/// upgrades at once; afterwards a lone handshake gets through at once and the queue gauge
/// is back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn departures_and_timeouts_at_every_stage_leak_no_place() {
    use std::sync::atomic::Ordering;
    let listener = bind_local().await;
    let backend = local_addr(&listener);
    let (_now, peak, done) = slow_counting_101(listener, Duration::from_millis(8));
    let gw = spawn_gateway(&config_at(
        "127.0.0.1:0",
        &format!(r#"{{ addr: "{backend}" }}"#),
        ", max_pending: 3, queue_timeout: 150ms",
        "",
    ))
    .await;
    let addr = gw.addr();
    let mut tasks = Vec::new();
    for i in 0u64..300 {
        tasks.push(tokio::spawn(async move {
            let mut s = send_upgrade(addr, &format!("c{}", i % 7)).await;
            // Every third reads its answer; the others leave after 0..120 ms.
            if i % 3 == 0 {
                let _ = tokio::time::timeout(PATIENCE, read_head(&mut s)).await;
            } else {
                let ms = (i * 7919) % 120;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }));
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    for t in tasks {
        let _ = tokio::time::timeout(PATIENCE, t).await;
    }
    await_metric(&gw, "wsgate_upstream_queue", &[("upstream", "app")], 0.0).await;
    let before = done.load(Ordering::SeqCst);
    for i in 0..6 {
        let mut s = send_upgrade(addr, &format!("after{i}")).await;
        let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut s))
            .await
            .unwrap_or_else(|_| panic!("handshake {i} after the herd never got through"));
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
    assert!(done.load(Ordering::SeqCst) >= before + 6);
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= 3,
        "the backend saw {peak} upgrades at once, max_pending 3"
    );
}

/// A long poll on an `http: proxy` route (engine.io, SockJS: the backend answers only when
/// it has something, up to `http_timeout`) holds a `max_pending` place at most
/// `connect_timeout`, not until its answer: else `max_pending` long polls would keep every
/// upgrade to their backend waiting until `queue_timeout`. The poll itself is still
/// answered.
#[tokio::test]
async fn a_long_poll_does_not_hold_its_place_until_its_answer() {
    let listener = bind_local().await;
    let backend = local_addr(&listener);
    let (mut held, _) = hold_counting(listener);
    let gw = spawn_gateway(&format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
{MANY}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], sticky: {{ key: "query:room" }}, connect_timeout: 400ms, max_pending: 1, queue_timeout: 4s }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app, http: proxy }}
"#
    ))
    .await;
    let addr = gw.addr();
    let mut poll = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!("GET /poll?room=p HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    poll.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut up_poll, head_poll) = next_held(&mut held).await;
    assert!(head_poll.starts_with("GET /poll?room=p"), "{head_poll}");
    let started = tokio::time::Instant::now();
    let _u = send_upgrade(addr, "u").await;
    let Ok(Some((_up_u, head_u))) = tokio::time::timeout(Duration::from_secs(3), held.recv()).await
    else {
        panic!("an upgrade waited behind a long poll for its whole answer");
    };
    assert_eq!(room_of(&head_u), "u");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the poll held its place a while"
    );
    up_poll
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = read_head(&mut poll).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// A client that goes away while its upgrade request is with the backend does not free
/// its place before the backend has answered (or `connect_timeout` passed): the backend
/// is still working on that request (authentication, session set-up), so the next
/// request would make `max_pending` + 1 at once.
#[tokio::test]
async fn a_departed_client_keeps_its_place_until_the_backend_answers() {
    let (gw, _, mut held, _) = gateway_holding(", max_pending: 1, queue_timeout: 5s", "").await;
    let addr = gw.addr();
    let a = send_upgrade(addr, "a").await;
    let (mut up_a, head_a) = next_held(&mut held).await;
    drop(a);
    // Lets the gateway see the client leave (it used to close a's upstream connection and
    // give its place to b at once).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = send_upgrade(addr, "b").await;
    assert_quiet(&mut held, "a's request is still with the backend").await;
    answer_101(&mut up_a, &head_a).await;
    let (mut up_b, head_b) = next_held(&mut held).await;
    assert_eq!(room_of(&head_b), "b");
    answer_101(&mut up_b, &head_b).await;
    let head = read_head(&mut b).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}
