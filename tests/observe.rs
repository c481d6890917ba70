//! Observability through real sockets (issue 7): every SPEC §3 refusal leaves one
//! `ws_reject` line and moves `wsgate_handshake_rejected_total{route,reason}` by exactly one;
//! `/metrics` parses with a real Prometheus parser and counts a known sequence of
//! connections (SPEC §7); `/connections` lists live connections; a stuck access-log sink
//! never slows relaying; secrets never reach the log; `X-Request-Id`; log reopening.
//! (The `ws_close` line of every SPEC §5 ending is in `observe_endings.rs`.)

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::Value;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::config::{AccessTarget, Config};
use wsgate::observe::access_log::Sink;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const SECRET: &str = "observe-jwt-secret";

fn upgrade(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn jwt(sub: &str) -> String {
    encode(
        &Header::default(),
        &serde_json::json!({ "sub": sub, "exp": unix_now() + 600 }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A port nothing listens on (connecting is refused).
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    l.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

/// A backend that accepts TCP and never answers.
async fn silent_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A backend that refuses every upgrade with 403.
async fn refusing_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno.\n")
                .await;
        }
    });
    addr
}

/// Upgrades through a raw backend: (client, upstream, head the upstream received).
async fn open_raw(
    gw: &TestGateway,
    accepted: &mut tokio::sync::mpsc::Receiver<(TcpStream, String)>,
    path: &str,
    extra: &str,
) -> (TcpStream, TcpStream, String) {
    let (client, head) = raw_upgrade(gw.addr(), path, extra).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
    let (up, up_head) = next_accepted(accepted).await;
    (client, up, up_head)
}

fn matching_lines(gw: &TestGateway, pred: &dyn Fn(&Value) -> bool) -> Vec<Value> {
    gw.log_lines().into_iter().filter(|l| pred(l)).collect()
}

/// Waits until `n` lines match `pred`, returns them.
async fn await_lines(gw: &TestGateway, n: usize, pred: &dyn Fn(&Value) -> bool) -> Vec<Value> {
    eventually(&format!("{n} matching lines"), PATIENCE, async || {
        let lines = matching_lines(gw, pred);
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(gw.log_lines())
        }
    })
    .await
}

fn rejected(s: &prometheus_parse::Scrape, route: &str, reason: &str) -> f64 {
    metric(
        s,
        "wsgate_handshake_rejected_total",
        &[("route", route), ("reason", reason)],
    )
}

/// Sends `request` (or holds it until the response with `send`), checks the response
/// status and body word, the one new `ws_reject` line (status, reason, route or null,
/// the common fields) and that `wsgate_handshake_rejected_total{route,reason}` moved by
/// exactly one (the route label is empty when no route matched). Returns (response, line).
async fn assert_rejected(
    gw: &TestGateway,
    request: &[u8],
    status: u16,
    reason: &str,
    route: Option<&str>,
) -> (String, Value) {
    let is_it = |l: &Value| l["event"] == "ws_reject" && l["proxy_reason"] == reason;
    let before_lines = matching_lines(gw, &is_it).len();
    let before = scrape(gw).await;
    let resp = raw_request(gw.addr(), request).await;
    assert!(
        resp.starts_with(&format!("HTTP/1.1 {status} ")),
        "{reason}: want {status}, got {resp:?}"
    );
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        1,
        "one response: {resp:?}"
    );
    if reason != "upstream_status" {
        assert_eq!(refusal_word(&resp), reason, "{resp:?}");
    }
    let lines = await_lines(gw, before_lines + 1, &is_it).await;
    assert_eq!(lines.len(), before_lines + 1, "one line per refusal");
    let line = lines[before_lines].clone();
    check_reject_line(&line, status, reason, route);
    let after = scrape(gw).await;
    let label = route.unwrap_or("");
    assert_eq!(
        rejected(&after, label, reason) - rejected(&before, label, reason),
        1.0,
        "wsgate_handshake_rejected_total{{route={label:?},reason={reason}}}"
    );
    let all = |s: &prometheus_parse::Scrape| {
        metric(s, "wsgate_handshake_rejected_total", &[("reason", reason)])
    };
    assert_eq!(all(&after) - all(&before), 1.0, "{reason} counted once");
    (resp, line)
}

fn check_reject_line(line: &Value, status: u16, reason: &str, route: Option<&str>) {
    let ctx = line.to_string();
    assert_eq!(line["event"], "ws_reject", "{ctx}");
    assert_eq!(line["status"], status, "{ctx}");
    assert_eq!(line["proxy_reason"], reason, "{ctx}");
    match route {
        Some(r) => assert_eq!(line["route"], r, "route: {ctx}"),
        None => assert_eq!(line["route"], Value::Null, "route: {ctx}"),
    }
    assert_eq!(line["listener"], "public", "{ctx}");
    assert!(
        line["conn_id"].as_str().is_some_and(is_conn_id),
        "conn_id: {ctx}"
    );
    assert_eq!(line["client_ip"], "127.0.0.1", "{ctx}");
    assert!(line["client_port"].as_u64().is_some_and(|p| p > 0), "{ctx}");
    assert!(line["duration_ms"].is_u64(), "{ctx}");
    assert_eq!(line["close"], Value::Null, "{ctx}");
    assert_eq!(line["c2u"]["frames"], 0, "{ctx}");
    assert_eq!(line["u2c"]["frames"], 0, "{ctx}");
    assert_eq!(line["pings"], 0, "{ctx}");
    assert_eq!(line["rate_limited"], 0, "{ctx}");
}

/// Routes for every refusal that one gateway can produce.
async fn rejecting_gateway() -> (TestGateway, SocketAddr, SocketAddr, SocketAddr) {
    let app = echo_backend().await;
    let down = closed_port().await;
    let silent = silent_backend().await;
    let refusing = refusing_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
keepalive: {{ ping_interval: 0s }}
limits: {{ handshake_timeout: 300ms, handshakes_per_ip: {{ rate: 100000, per: 1s }} }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
  down: {{ backends: [{{ addr: "{down}" }}], connect_timeout: 1s }}
  silent: {{ backends: [{{ addr: "{silent}" }}], connect_timeout: 300ms }}
  refusing: {{ backends: [{{ addr: "{refusing}" }}], connect_timeout: 1s }}
routes:
  - name: chat
    match: {{ path_prefix: /chat }}
    upstream: app
    subprotocols: [v1.chat]
    origins: ["https://app.test"]
    allow_missing_origin: true
  - name: auth
    match: {{ path_prefix: /auth }}
    upstream: app
    auth: {{ jwt: {{ from: ["header:Authorization"], keys: [{{ alg: HS256, secret: "{SECRET}" }}] }} }}
  - {{ name: cap, match: {{ path_prefix: /cap }}, upstream: app, limits: {{ max_connections_per_ip: 1 }} }}
  - {{ name: down, match: {{ path_prefix: /down }}, upstream: down }}
  - {{ name: slow, match: {{ path_prefix: /slow }}, upstream: silent }}
  - {{ name: deny, match: {{ path_prefix: /deny }}, upstream: refusing }}
"#
    );
    (spawn_gateway(&yaml).await, down, silent, refusing)
}

/// A check of a refusal's response: what it shows, and the test.
type RespCheck = (&'static str, fn(&str) -> bool);

/// One SPEC §3 refusal: the request, and what it must get and leave (checked by
/// [`assert_rejected`], then the row's own checks).
struct Refusal {
    request: Vec<u8>,
    status: u16,
    reason: &'static str,
    /// The route logged and labelled; `None` when none matched.
    route: Option<&'static str>,
    /// What else the response must show.
    resp: Option<RespCheck>,
    /// The backend logged as `upstream`.
    upstream: Option<SocketAddr>,
    /// A path upgraded and held open while this request is refused.
    holding: Option<&'static str>,
}

impl Refusal {
    fn new(
        request: impl Into<Vec<u8>>,
        status: u16,
        reason: &'static str,
        route: Option<&'static str>,
    ) -> Refusal {
        Refusal {
            request: request.into(),
            status,
            reason,
            route,
            resp: None,
            upstream: None,
            holding: None,
        }
    }
}

/// Each row in turn, on one gateway. Rows are paced so that no second holds more than
/// ten refusals of this one client address: beyond that, refusals are summarised (SPEC §3).
async fn assert_refusals(gw: &TestGateway, table: &[Refusal]) {
    for row in table {
        tokio::time::sleep(Duration::from_millis(110)).await;
        let held = match row.holding {
            Some(path) => {
                let (held, head) = raw_upgrade(gw.addr(), path, "").await;
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                Some(held)
            }
            None => None,
        };
        let (resp, line) =
            assert_rejected(gw, &row.request, row.status, row.reason, row.route).await;
        drop(held);
        if let Some((what, check)) = row.resp {
            assert!(check(&resp), "{}: {what}: {resp}", row.reason);
        }
        if let Some(upstream) = row.upstream {
            assert_eq!(line["upstream"], upstream.to_string());
        }
    }
}

/// Every SPEC §3 refusal one configuration can produce: its status, reason, route (null
/// when none matched) and exactly one increment of its metric.
#[tokio::test]
async fn every_refusal_is_logged_once_and_counted_once() {
    let (gw, down, silent, refusing) = rejecting_gateway().await;
    let post = String::from_utf8_lossy(&upgrade("/chat", "")).replacen("GET", "POST", 1);
    let v8 = String::from_utf8_lossy(&upgrade("/chat", "")).replace("Version: 13", "Version: 8");
    let table = [
        Refusal::new(post, 400, "bad_upgrade", Some("chat")),
        Refusal {
            resp: Some(("names version 13", |r| {
                r.to_ascii_lowercase().contains("sec-websocket-version: 13")
            })),
            ..Refusal::new(v8, 426, "bad_version", Some("chat"))
        },
        Refusal::new(
            "GET /chat HTTP/1.1\r\nHost: gw.test\r\n\r\n",
            426,
            "upgrade_required",
            Some("chat"),
        ),
        Refusal::new(upgrade("/nowhere", ""), 404, "no_route", None),
        Refusal::new(
            upgrade("/chat", "Origin: https://evil.test\r\n"),
            403,
            "origin",
            Some("chat"),
        ),
        Refusal {
            resp: Some(("www-authenticate", |r| {
                r.contains("www-authenticate: Bearer error=\"invalid_token\"")
            })),
            ..Refusal::new(upgrade("/auth", ""), 401, "token", Some("auth"))
        },
        Refusal::new(
            upgrade("/chat", "Sec-WebSocket-Protocol: v9\r\n"),
            400,
            "subprotocol",
            Some("chat"),
        ),
        // One connection held on /cap: a second from the same IP is over the route's cap.
        Refusal {
            holding: Some("/cap"),
            ..Refusal::new(upgrade("/cap", ""), 429, "ip_cap", Some("cap"))
        },
        Refusal {
            upstream: Some(down),
            ..Refusal::new(upgrade("/down", ""), 502, "upstream_connect", Some("down"))
        },
        Refusal {
            upstream: Some(silent),
            ..Refusal::new(upgrade("/slow", ""), 504, "upstream_timeout", Some("slow"))
        },
        Refusal {
            resp: Some(("the upstream's body is relayed", |r| r.ends_with("no.\n"))),
            upstream: Some(refusing),
            ..Refusal::new(upgrade("/deny", ""), 403, "upstream_status", Some("deny"))
        },
        // A head that never completes: 408 within handshake_timeout.
        Refusal::new(
            "GET /chat HTTP/1.1\r\nHost: gw.test\r\n",
            408,
            "handshake_timeout",
            None,
        ),
    ];
    assert_refusals(&gw, &table).await;
}

/// Requests hyper cannot parse, heads over 16 KiB and an HTTP/2 preface get the proxy's
/// own answer (hyper's would have an empty body, or be a silent close), naming the
/// reason, and are logged and counted as `bad_upgrade` like any other refusal.
#[tokio::test]
async fn unparseable_and_oversized_heads_are_answered_logged_and_counted() {
    let (gw, ..) = rejecting_gateway().await;
    let big = format!("X-Filler: {}\r\n", "f".repeat(20 * 1024));
    let table = [
        Refusal {
            resp: Some(("connection: close", |r| r.contains("connection: close\r\n"))),
            ..Refusal::new("NOT HTTP AT ALL\r\n\r\n", 400, "bad_upgrade", None)
        },
        Refusal::new(upgrade("/chat", &big), 431, "bad_upgrade", None),
        Refusal::new("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_upgrade", None),
    ];
    assert_refusals(&gw, &table).await;
}

/// Handshake rate per IP: 429 with `Retry-After`, logged and counted once.
#[tokio::test]
async fn handshake_rate_refusal_is_logged_counted_and_has_retry_after() {
    let app = echo_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ handshakes_per_ip: {{ rate: 1, per: 10s, burst: 1 }} }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let _first = connect(&gw.url("/chat")).await;
    // Judged at accept, before the head: no route is known.
    let (resp, _) = assert_rejected(&gw, &upgrade("/chat", ""), 429, "ip_rate", None).await;
    let retry: u64 = header_value(&resp, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=10).contains(&retry), "{resp}");
}

/// Whole-process cap: 503 `capacity`, logged and counted once.
#[tokio::test]
async fn capacity_refusal_is_logged_and_counted() {
    let app = echo_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ max_connections: 1 }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let _first = connect(&gw.url("/chat")).await;
    // Judged at accept, before the head: no route is known.
    assert_rejected(&gw, &upgrade("/chat", ""), 503, "capacity", None).await;
}

/// A handshake whose head arrives after the drain's spread window: 503 `draining`, logged
/// and counted once.
#[tokio::test]
async fn draining_refusal_is_logged_and_counted() {
    let app = echo_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
drain: {{ spread: 200ms, timeout: 2s }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let before = scrape(&gw).await;
    // Connected before the drain, request head sent after it began.
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Wait for the gateway to count the connection before draining.
    eventually("the connection accepted", PATIENCE, async || {
        match active(&gw) {
            0 => Err(0),
            n => Ok(n),
        }
    })
    .await;
    let client = async {
        // Handshakes accepted before the drain still complete within `drain.spread`;
        // after the window they are refused.
        eventually("the drain window over", PATIENCE, async || {
            gw.gw
                .shared
                .registry
                .past_drain_window()
                .then_some(())
                .ok_or(())
        })
        .await;
        s.write_all(&upgrade("/chat", ""))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut resp = String::new();
        let _ = tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_string(&mut s, &mut resp),
        )
        .await;
        resp
    };
    let (resp, ()) = tokio::join!(client, gw.gw.drain());
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    assert!(resp.ends_with("draining\n"), "{resp}");
    let line = gw
        .log_line(|l| l["event"] == "ws_reject" && l["proxy_reason"] == "draining")
        .await;
    check_reject_line(&line, 503, "draining", Some("chat"));
    let after = scrape(&gw).await;
    assert_eq!(
        rejected(&after, "chat", "draining") - rejected(&before, "chat", "draining"),
        1.0
    );
    let (status, _) = admin_get(&gw, "/readyz").await;
    assert_eq!(status, 503, "/readyz while draining");
    let (status, _) = admin_get(&gw, "/healthz").await;
    assert_eq!(status, 200, "/healthz while draining");
}

/// Behind a trusted proxy, refusals decided before route matching (process cap, handshake
/// rate) are judged at the head and still name the route its path matches, as every other
/// refusal of a routable request does (SPEC §6 `route`, §7
/// `wsgate_handshake_rejected_total{route,reason}`). Judged at accept, no route is known.
#[tokio::test]
async fn refusals_before_routing_still_name_the_matching_route() {
    let app = echo_backend().await;
    // Behind a trusted proxy the client is known from the head only, so the process cap
    // and the rate are judged there, with the route known.
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
trusted_proxies: ["127.0.0.1/32"]
limits: {{ max_connections: 1, handshakes_per_ip: {{ rate: 1, per: 10s, burst: 1 }} }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let first = connect(&gw.url("/chat")).await;
    assert_rejected(&gw, &upgrade("/chat", ""), 503, "capacity", Some("chat")).await;
    drop(first);
    // The process cap frees its place once the relay has seen the client go.
    eventually(
        "the first connection ended",
        PATIENCE,
        async || match active(&gw) {
            0 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    assert_rejected(&gw, &upgrade("/chat", ""), 429, "ip_rate", Some("chat")).await;
}

/// Connections the gateway counts as open (handshakes included).
fn active(gw: &TestGateway) -> u64 {
    gw.gw
        .shared
        .active
        .load(std::sync::atomic::Ordering::Acquire)
}

/// Connects with a forwarded client address (the gateway trusts 127.0.0.1).
async fn connect_as(url: &str, client_ip: &str) -> Client {
    let mut req = url.into_client_request().unwrap_or_else(|e| panic!("{e}"));
    req.headers_mut().insert(
        "X-Forwarded-For",
        client_ip.parse().unwrap_or_else(|e| panic!("{e}")),
    );
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((ws, _))) => ws,
        other => panic!("connect {url}: {other:?}"),
    }
}

async fn echo_round(ws: &mut Client, text: &str) {
    ws.send(Message::text(text))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), text),
        other => panic!("expected echo, got {other:?}"),
    }
}

async fn close_with(mut ws: Client, code: u16) {
    ws.close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: "".into(),
    }))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Families declared by `# TYPE` and `# HELP`, and the family of every sample line.
fn families(text: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut typed = Vec::new();
    let mut helped = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.extend(rest.split(' ').next().map(str::to_owned));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.extend(rest.split(' ').next().map(str::to_owned));
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            samples.push(name.to_owned());
        }
    }
    (typed, helped, samples)
}

/// `/metrics` after a known sequence: 3 connections on `chat` (2 messages each way each,
/// two closed 1000 and one 3999), one on `feed` closed for its message rate. The text
/// parses with prometheus-parse; every family has HELP and TYPE; label values never carry
/// client addresses or paths.
#[tokio::test]
async fn metrics_count_a_known_sequence_of_connections() {
    let app = echo_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
trusted_proxies: [127.0.0.0/8]
keepalive: {{ ping_interval: 0s }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
  - name: feed
    match: {{ path_prefix: /feed }}
    upstream: app
    limits: {{ messages: {{ rate: 1, per: 10s, burst: 1, on_exceed: close }} }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let url = gw.url("/chat/secret-room-42?user=alice");
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(connect_as(&url, "203.0.113.77").await);
    }
    let s = scrape(&gw).await;
    assert_eq!(
        metric(&s, "wsgate_connections_active", &[("route", "chat")]),
        3.0
    );
    assert_eq!(
        metric(&s, "wsgate_connections_total", &[("route", "chat")]),
        3.0
    );
    for ws in &mut conns {
        echo_round(ws, "ab").await;
        echo_round(ws, "cd").await;
    }
    let codes = [1000, 1000, 3999];
    for (ws, code) in conns.into_iter().zip(codes) {
        close_with(ws, code).await;
    }
    let mut feed = connect_as(&gw.url("/feed"), "203.0.113.77").await;
    for m in ["1", "2", "3"] {
        let _ = feed.send(Message::text(m)).await;
    }
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = feed.next().await {}
    })
    .await;
    drop(feed);
    let lines = await_lines(&gw, 4, &|l| l["event"] == "ws_close").await;
    let chat: Vec<&Value> = lines.iter().filter(|l| l["route"] == "chat").collect();
    let sum = |dir: &str, field: &str| -> f64 {
        chat.iter()
            .map(|l| l[dir][field].as_u64().unwrap_or(0) as f64)
            .sum()
    };
    let text = metrics_text(&gw).await;
    let s = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("{e}"));
    let chat_l = [("route", "chat")];
    assert_eq!(metric(&s, "wsgate_connections_active", &chat_l), 0.0);
    assert_eq!(metric(&s, "wsgate_connections_total", &chat_l), 3.0);
    assert_eq!(
        metric(&s, "wsgate_connections_total", &[("route", "feed")]),
        1.0
    );
    let dir = |d| [("route", "chat"), ("direction", d)];
    assert_eq!(metric(&s, "wsgate_messages_total", &dir("c2u")), 6.0);
    assert_eq!(metric(&s, "wsgate_messages_total", &dir("u2c")), 6.0);
    assert_eq!(
        metric(&s, "wsgate_bytes_total", &dir("c2u")),
        sum("c2u", "bytes"),
        "bytes metric = sum of the log lines' bytes"
    );
    assert_eq!(
        metric(&s, "wsgate_bytes_total", &dir("u2c")),
        sum("u2c", "bytes")
    );
    assert!(sum("c2u", "bytes") >= 6.0 * 8.0, "{lines:?}");
    let closes = |route, code, by| {
        metric(
            &s,
            "wsgate_closes_total",
            &[("route", route), ("code", code), ("by", by)],
        )
    };
    assert_eq!(closes("chat", "1000", "client"), 2.0);
    assert_eq!(closes("chat", "other", "client"), 1.0);
    assert_eq!(closes("feed", "1008", "proxy"), 1.0);
    assert_eq!(
        metric(&s, "wsgate_rate_limited_total", &[("route", "feed")]),
        1.0
    );
    assert_eq!(metric(&s, "wsgate_rate_limited_total", &chat_l), 0.0);
    assert_eq!(metric(&s, "wsgate_pings_total", &[]), 0.0);
    assert_eq!(metric(&s, "wsgate_dead_peers_total", &chat_l), 0.0);
    for present in [
        "wsgate_log_dropped_total",
        "wsgate_pings_total",
        "wsgate_ping_rtt_seconds_count",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            s.samples.iter().any(|x| x.metric == present),
            "{present} missing:\n{text}"
        );
    }
    assert!(metric(&s, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(metric(&s, "process_open_fds", &[]) >= 3.0);
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "wsgate_ping_rtt_seconds"
                && matches!(x.value, prometheus_parse::Value::Histogram(_))),
        "the RTT histogram parses as a histogram"
    );
    // HELP and TYPE for every family that has samples.
    let (typed, helped, sampled) = families(&text);
    for name in &sampled {
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|sfx| {
                name.strip_suffix(sfx)
                    .filter(|f| typed.iter().any(|t| t == f))
            })
            .unwrap_or(name);
        assert!(typed.iter().any(|t| t == family), "no TYPE for {name}");
        assert!(helped.iter().any(|h| h == family), "no HELP for {name}");
    }
    // The log has the client's address and path; no label value does.
    assert!(chat.iter().all(|l| l["client_ip"] == "203.0.113.77"));
    for sample in &s.samples {
        for (k, v) in sample.labels.iter() {
            for leak in ["203.0.113.77", "secret-room", "alice", "/chat", "/feed"] {
                assert!(
                    !v.contains(leak),
                    "{}{{{k}={v:?}}} carries a client address or path",
                    sample.metric
                );
            }
        }
    }
}

/// SPEC §7's backend families: `wsgate_backend_up`, `wsgate_backend_connections` and
/// `wsgate_upstream_connect_errors_total`, labelled `{upstream,backend}`.
#[tokio::test]
async fn backend_metrics_are_exposed() {
    let app = echo_backend().await;
    let down = closed_port().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
  down: {{ backends: [{{ addr: "{down}" }}], connect_timeout: 1s }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
  - {{ name: down, match: {{ path_prefix: /down }}, upstream: down }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let _ws = connect(&gw.url("/chat")).await;
    assert_rejected(
        &gw,
        &upgrade("/down", ""),
        502,
        "upstream_connect",
        Some("down"),
    )
    .await;
    let text = metrics_text(&gw).await;
    let s = scrape(&gw).await;
    let app_s = app.to_string();
    let down_s = down.to_string();
    let app_l = [("upstream", "app"), ("backend", app_s.as_str())];
    let down_l = [("upstream", "down"), ("backend", down_s.as_str())];
    assert!(
        s.samples.iter().any(|x| x.metric == "wsgate_backend_up"),
        "wsgate_backend_up missing:\n{text}"
    );
    assert_eq!(metric(&s, "wsgate_backend_up", &app_l), 1.0);
    assert_eq!(metric(&s, "wsgate_backend_connections", &app_l), 1.0);
    assert_eq!(
        metric(&s, "wsgate_upstream_connect_errors_total", &down_l),
        1.0
    );
}

/// `/connections`: three live connections on two routes are counted per route and per
/// backend, the oldest first; the counts drop as they close.
#[tokio::test]
async fn connections_lists_live_connections_per_route_and_backend() {
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
keepalive: {{ ping_interval: 0s }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
  - {{ name: feed, match: {{ path_prefix: /feed }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let mut open = Vec::new();
    for path in ["/chat", "/chat", "/feed"] {
        let (c, u, head) = open_raw(&gw, &mut accepted, path, "").await;
        let id = header_value(&head, "x-request-id").unwrap_or_default();
        open.push((c, u, id));
        // Part of the scenario, not a wait: distinct upgrade milliseconds, so "oldest" has
        // one answer.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let (status, body) = admin_get(&gw, "/connections").await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(view["total"], 3, "{view}");
    assert_eq!(view["routes"], serde_json::json!({ "chat": 2, "feed": 1 }));
    assert_eq!(
        view["backends"],
        serde_json::json!({ format!("app/{backend}"): 3 })
    );
    let oldest = view["oldest"]
        .as_array()
        .unwrap_or_else(|| panic!("{view}"));
    assert_eq!(oldest.len(), 3);
    let ids: Vec<&str> = oldest
        .iter()
        .filter_map(|o| o["conn_id"].as_str())
        .collect();
    let want: Vec<String> = open.iter().map(|(_, _, id)| id.clone()).collect();
    assert_eq!(ids, want, "oldest first");
    assert_eq!(oldest[0]["route"], "chat");
    assert_eq!(oldest[0]["upstream"], "app");
    assert_eq!(oldest[0]["backend"], backend.to_string());
    assert_eq!(oldest[0]["client_ip"], "127.0.0.1");
    assert!(oldest[0]["age_s"].is_u64());
    assert_eq!(oldest[2]["route"], "feed");
    // Close the first /chat connection, then the rest.
    let mut open = open.into_iter();
    drop(open.next());
    let wait_for = |total: u64, routes: Value| {
        let gw = &gw;
        async move {
            let what = format!("/connections at total {total}, routes {routes}");
            eventually(&what, PATIENCE, async || {
                let (_, body) = admin_get(gw, "/connections").await;
                let view: Value = serde_json::from_str(&body).unwrap_or_default();
                if view["total"] == total && view["routes"] == routes {
                    Ok(view)
                } else {
                    Err(view)
                }
            })
            .await
        }
    };
    let view = wait_for(2, serde_json::json!({ "chat": 1, "feed": 1 })).await;
    assert_eq!(view["oldest"][0]["conn_id"], want[1].as_str());
    drop(open);
    let view = wait_for(0, serde_json::json!({})).await;
    assert_eq!(view["backends"], serde_json::json!({}));
    assert_eq!(view["oldest"], serde_json::json!([]));
}

/// Starts wsgate on a file sink (not the in-memory one).
async fn spawn_with_file_sink(yaml: &str, path: &std::path::Path) -> TestGateway {
    let config = Config::from_yaml_str_with_env(yaml, "test.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("config: {e}"));
    let gw = wsgate::start(config, Sink::Target(AccessTarget::File(path.to_owned())))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    TestGateway {
        gw,
        logs: Default::default(),
    }
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// An access log that nobody reads (a FIFO whose one reader never reads): lines pile up
/// and are dropped and counted, while WebSocket connections keep being relayed at speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_sink_drops_lines_and_never_slows_relaying() {
    let dir = scratch_dir("fifo");
    let fifo = dir.join("access.log");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap_or_else(|e| panic!("mkfifo: {e}"));
    assert!(made.success());
    // Opening read-write never blocks on Linux and keeps a reader on the pipe, so the
    // gateway's write-only open succeeds; nobody ever reads it.
    let _unread = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap_or_else(|e| panic!("{e}"));
    let app = echo_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
keepalive: {{ ping_interval: 0s }}
limits: {{ handshakes_per_ip: {{ rate: 1000000, per: 1s }} }}
trusted_proxies: ["127.0.0.1/32"]
upstreams:
  app: {{ backends: [{{ addr: "{app}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
    );
    let gw = spawn_with_file_sink(&yaml, &fifo).await;
    let addr = gw.addr();
    let dropped = |s: &prometheus_parse::Scrape| metric(s, "wsgate_log_dropped_total", &[]);
    // Cheap log lines (404s) until the pipe (64 KiB) and the writer's queue are full, each
    // from its own forwarded client: one address's refusals beyond ten a second would be
    // summarised, not logged one by one.
    let flood_started = Instant::now();
    let mut sent = 0usize;
    while dropped(&scrape(&gw).await) == 0.0 {
        assert!(
            sent < 40_000 && flood_started.elapsed() < Duration::from_secs(60),
            "no line dropped after {sent} refusals"
        );
        let batch: Vec<_> = (0..1000u32)
            .map(|i| {
                let n = sent as u32 + i;
                let xff = format!(
                    "X-Forwarded-For: 10.{}.{}.{}\r\n",
                    n >> 16 & 255,
                    n >> 8 & 255,
                    n & 255
                );
                async move { raw_request(addr, &upgrade("/nowhere", &xff)).await }
            })
            .collect();
        let resps: Vec<String> = futures_util::stream::iter(batch)
            .buffer_unordered(16)
            .collect()
            .await;
        assert!(resps.iter().all(|r| r.starts_with("HTTP/1.1 404 ")));
        sent += resps.len();
    }
    let before = dropped(&scrape(&gw).await);
    // Real connections are relayed as usual while the log is stuck.
    let started = Instant::now();
    for i in 0..20 {
        let mut ws = connect(&gw.url("/chat")).await;
        echo_round(&mut ws, &format!("m{i}")).await;
        close_with(ws, 1000).await;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "20 echo connections took {took:?} with a stuck log"
    );
    eventually(
        &format!("20 closes dropped after {before}"),
        PATIENCE,
        async || {
            let now = dropped(&scrape(&gw).await);
            if now >= before + 20.0 {
                Ok(())
            } else {
                Err(now)
            }
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Tokens, cookies, token query values and API keys, valid or not, never appear in an
/// access-log line or in `/connections` (SPEC §6).
#[tokio::test]
async fn secrets_never_reach_the_log_or_the_admin_listener() {
    let dir = scratch_dir("secrets");
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, sha256_hex(b"KEYSECRETVALID") + "\n").unwrap_or_else(|e| panic!("{e}"));
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
keepalive: {{ ping_interval: 0s }}
limits: {{ handshakes_per_ip: {{ rate: 100000, per: 1s }} }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - name: chat
    match: {{ path_prefix: /chat }}
    upstream: app
    auth:
      jwt:
        from: ["header:Authorization", "query:access_token", "cookie:token", "subprotocol"]
        keys: [{{ alg: HS256, secret: "{SECRET}" }}]
        strip_token: true
  - name: keyed
    match: {{ path_prefix: /keyed }}
    upstream: app
    auth: {{ api_keys: {{ query: api_key, keys_file: "{}" }} }}
  - name: headerkey
    match: {{ path_prefix: /hkey }}
    upstream: app
    auth: {{ api_keys: {{ header: X-Api-Key, keys_file: "{}" }} }}
"#,
        keys.display(),
        keys.display()
    );
    let gw = spawn_gateway(&yaml).await;
    let valid: Vec<String> = (1..=4).map(|i| jwt(&format!("user-{i}"))).collect();
    let invalid: Vec<String> = (1..=6).map(|i| format!("SECRETINVALID{i}x")).collect();
    let good = [
        ("/chat", format!("Authorization: Bearer {}\r\n", valid[0])),
        (
            &*format!("/chat?room=1&access_token={}", valid[1]),
            String::new(),
        ),
        (
            "/chat",
            format!("Cookie: theme=dark; token={}\r\n", valid[2]),
        ),
        (
            "/chat",
            format!("Sec-WebSocket-Protocol: bearer, {}\r\n", valid[3]),
        ),
        ("/keyed?api_key=KEYSECRETVALID&x=1", String::new()),
        ("/hkey", "X-Api-Key: KEYSECRETVALID\r\n".to_owned()),
    ]
    .map(|(p, h)| (p.to_owned(), h));
    let mut held = Vec::new();
    for (path, extra) in &good {
        held.push(open_raw(&gw, &mut accepted, path, extra).await);
    }
    let bad = [
        (
            "/chat".to_owned(),
            format!("Authorization: Bearer {}\r\n", invalid[0]),
        ),
        (format!("/chat?access_token={}", invalid[1]), String::new()),
        (
            "/chat".to_owned(),
            format!("Cookie: token={}\r\n", invalid[2]),
        ),
        (
            "/chat".to_owned(),
            format!("Sec-WebSocket-Protocol: bearer, {}\r\n", invalid[3]),
        ),
        // The parameter name percent-encoded.
        (
            format!("/chat?access%5Ftoken={}", invalid[4]),
            String::new(),
        ),
        ("/keyed?api_key=KEYSECRETINVALID".to_owned(), String::new()),
        (
            "/hkey".to_owned(),
            "X-Api-Key: KEYSECRETINVALID\r\n".to_owned(),
        ),
    ];
    for (path, extra) in &bad {
        let resp = raw_request(gw.addr(), &upgrade(path, extra)).await;
        assert!(resp.starts_with("HTTP/1.1 401 "), "{path}: {resp}");
    }
    // A refusal for another reason, with a token in the query.
    let v8 = String::from_utf8_lossy(&upgrade(&format!("/chat?access_token={}", invalid[5]), ""))
        .replace("Version: 13", "Version: 8");
    let resp = raw_request(gw.addr(), v8.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 426 "), "{resp}");
    let (_, connections) = admin_get(&gw, "/connections").await;
    drop(held);
    await_lines(&gw, good.len(), &|l| l["event"] == "ws_close").await;
    await_lines(&gw, bad.len() + 1, &|l| l["event"] == "ws_reject").await;
    let raw = gw.logs.lock().map(|l| l.join("\n")).unwrap_or_default();
    let mut secrets: Vec<&str> = valid.iter().chain(&invalid).map(String::as_str).collect();
    secrets.extend(["KEYSECRETVALID", "KEYSECRETINVALID"]);
    for secret in secrets {
        assert!(!raw.contains(secret), "{secret} in the access log:\n{raw}");
        assert!(
            !connections.contains(secret),
            "{secret} in /connections: {connections}"
        );
    }
    // The redaction leaves a trace of where the secret was.
    assert!(raw.contains("access_token=REDACTED"), "{raw}");
    assert!(raw.contains("api_key=REDACTED"), "{raw}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `X-Request-Id`: a plain client id is logged as `request_id`, while the upstream gets
/// the proxy's `conn_id`; an overlong or spaced one is logged as null.
#[tokio::test]
async fn client_request_ids_are_logged_and_conn_ids_go_upstream() {
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
keepalive: {{ ping_interval: 0s }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: / }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let long = "a".repeat(300);
    let cases: [(&str, Option<&str>); 3] = [
        ("client-abc.123", Some("client-abc.123")),
        (&long, None),
        ("has a space", None),
    ];
    for (sent, logged) in cases {
        let (client, up, head) = open_raw(
            &gw,
            &mut accepted,
            "/",
            &format!("X-Request-Id: {sent}\r\n"),
        )
        .await;
        let forwarded = header_value(&head, "x-request-id").unwrap_or_default();
        assert!(is_conn_id(&forwarded), "upstream got {forwarded:?}");
        drop((client, up));
        let line = gw
            .log_line(|l| l["event"] == "ws_close" && l["conn_id"] == forwarded.as_str())
            .await;
        match logged {
            Some(id) => assert_eq!(line["request_id"], id, "{line}"),
            None => assert_eq!(line["request_id"], Value::Null, "{line}"),
        }
    }
    // Refusals carry the client's id too.
    let resp = raw_request(
        gw.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-1\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 426 "), "{resp}");
    let line = gw.log_line(|l| l["event"] == "ws_reject").await;
    assert_eq!(line["request_id"], "r-1");
}

/// Reads a file's JSON lines (none if it does not exist).
fn file_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn await_file_line(path: &std::path::Path, request_id: &str) {
    let what = format!("a line {request_id} in {}", path.display());
    eventually(&what, PATIENCE, async || {
        let lines = file_lines(path);
        if lines.iter().any(|l| l["request_id"] == request_id) {
            Ok(())
        } else {
            Err(lines)
        }
    })
    .await;
}

/// logrotate: after the file is moved away and the log reopened (what SIGUSR1 does), new
/// lines go to a new file at the configured path, old ones stay in the moved file.
#[tokio::test]
async fn reopening_the_log_after_a_rename_writes_a_new_file() {
    let dir = scratch_dir("reopen");
    let path = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let app = echo_backend().await;
    let gw = spawn_with_file_sink(&config_for(app, ""), &path).await;
    let one = |id: &'static str| {
        let url = gw.url("/");
        async move {
            let mut req = url.into_client_request().unwrap_or_else(|e| panic!("{e}"));
            req.headers_mut()
                .insert("X-Request-Id", id.parse().unwrap_or_else(|e| panic!("{e}")));
            let (mut ws, _) = tokio_tungstenite::connect_async(req)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            echo_round(&mut ws, id).await;
            close_with(ws, 1000).await;
        }
    };
    one("first").await;
    await_file_line(&path, "first").await;
    std::fs::rename(&path, &rotated).unwrap_or_else(|e| panic!("{e}"));
    gw.gw.shared.access.reopen();
    one("second").await;
    await_file_line(&path, "second").await;
    let old = file_lines(&rotated);
    let new = file_lines(&path);
    assert!(old.iter().any(|l| l["request_id"] == "first"));
    assert!(old.iter().all(|l| l["request_id"] != "second"), "{old:?}");
    assert!(new.iter().all(|l| l["request_id"] != "first"), "{new:?}");
    assert_eq!(new.len(), 1, "{new:?}");
    let _ = std::fs::remove_dir_all(dir);
}
