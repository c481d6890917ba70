//! The handshake outcomes of SPEC §3 through real sockets: each refusal is one HTTP
//! response with its reason word plus one access-log line; accepted upgrades carry the
//! forwarded headers upstream and the upstream's choices back.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    )
    .into_bytes()
}

async fn assert_refused(gw: &TestGateway, request: &[u8], status: u16, reason: &str) -> String {
    let resp = raw_request(gw.addr(), request).await;
    assert!(
        resp.starts_with(&format!("HTTP/1.1 {status} ")),
        "want {status}, got {resp:?}"
    );
    assert_eq!(
        support::refusal_word(&resp),
        reason,
        "body should name {reason} first: {resp:?}"
    );
    let line = gw
        .log_line(|l| l["event"] == "ws_reject" && l["proxy_reason"] == reason)
        .await;
    assert_eq!(line["status"], status);
    resp
}

const ROUTED: &str = r#"
listeners: [{ name: public, bind: "127.0.0.1:0" }]
upstreams:
  app: { backends: [{ addr: "BACKEND" }], connect_timeout: 500ms }
routes:
  - { name: chat, match: { path_prefix: /chat }, upstream: app, subprotocols: [v1.chat] }
"#;

async fn gateway(backend: &str) -> TestGateway {
    spawn_gateway(&ROUTED.replace("BACKEND", backend)).await
}

#[tokio::test]
async fn malformed_upgrades_are_400_bad_upgrade() {
    let gw = gateway("127.0.0.1:9").await;
    let post = String::from_utf8_lossy(&upgrade_request("/chat", "")).replacen("GET", "POST", 1);
    assert_refused(&gw, post.as_bytes(), 400, "bad_upgrade").await;
    let no_key = b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_refused(&gw, no_key, 400, "bad_upgrade").await;
    // A dot segment could reach another route's resources upstream.
    let dots = upgrade_request("/chat/%2e%2e/admin", "");
    assert_refused(&gw, &dots, 400, "bad_upgrade").await;
}

#[tokio::test]
async fn wrong_version_is_426_with_the_supported_version() {
    let gw = gateway("127.0.0.1:9").await;
    let req =
        String::from_utf8_lossy(&upgrade_request("/chat", "")).replace("Version: 13", "Version: 8");
    let resp = assert_refused(&gw, req.as_bytes(), 426, "bad_version").await;
    assert!(
        resp.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{resp}"
    );
}

#[tokio::test]
async fn plain_http_to_a_websocket_route_is_426_upgrade_required() {
    let gw = gateway("127.0.0.1:9").await;
    assert_refused(
        &gw,
        b"GET /chat HTTP/1.1\r\nHost: h\r\n\r\n",
        426,
        "upgrade_required",
    )
    .await;
}

#[tokio::test]
async fn unknown_path_is_404_no_route() {
    let gw = gateway("127.0.0.1:9").await;
    assert_refused(&gw, &upgrade_request("/elsewhere", ""), 404, "no_route").await;
}

#[tokio::test]
async fn subprotocol_outside_the_allowlist_is_400() {
    let gw = gateway("127.0.0.1:9").await;
    assert_refused(
        &gw,
        &upgrade_request("/chat", "Sec-WebSocket-Protocol: v9\r\n"),
        400,
        "subprotocol",
    )
    .await;
}

#[tokio::test]
async fn refused_upstream_connect_is_502() {
    // A port that was just free: connecting is refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(9);
    let gw = gateway(&format!("127.0.0.1:{port}")).await;
    assert_refused(&gw, &upgrade_request("/chat", ""), 502, "upstream_connect").await;
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let silent = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = silent.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let gw = gateway(&addr.to_string()).await;
    assert_refused(&gw, &upgrade_request("/chat", ""), 504, "upstream_timeout").await;
    hold.abort();
}

#[tokio::test]
async fn upstream_refusal_is_relayed_with_its_status_and_body() {
    let refusing = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = refusing.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = refusing.accept().await {
            let _ = read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\nX-Why: policy\r\n\r\nnot for you\n")
                .await;
        }
    });
    let gw = gateway(&addr.to_string()).await;
    let resp = raw_request(gw.addr(), &upgrade_request("/chat", "")).await;
    assert!(resp.starts_with("HTTP/1.1 403 "), "{resp}");
    assert!(resp.ends_with("not for you\n"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("x-why: policy"),
        "{resp}"
    );
    let line = gw
        .log_line(|l| l["proxy_reason"] == "upstream_status")
        .await;
    assert_eq!(line["status"], 403);
}

/// A backend that answers every handshake with `answer`, then closes.
async fn answering(answer: Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = read_head(&mut s).await;
            let _ = s.write_all(&answer).await;
        }
    });
    addr
}

/// A chunked refusal body is decoded and passed on whole (re-framed for the client); a
/// 100 Continue before it is skipped; an answer head that is not HTTP, or too large, is a
/// 502 like any failed upstream handshake.
#[tokio::test]
async fn upstream_answers_are_framed_and_bounded() {
    let chunked = answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\ntry a\r\nb\r\ngain later\n\r\n0\r\nX-T: 1\r\n\r\n".to_vec()).await;
    let gw = gateway(&chunked.to_string()).await;
    let resp = raw_request(gw.addr(), &upgrade_request("/chat", "")).await;
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let decoded: String = body
        .split("\r\n")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, part)| part)
        .collect();
    assert_eq!(decoded, "try again later\n", "{resp}");
    // `Transfer-Encoding` decides the framing; the backend's `Content-Length` is not
    // repeated to the client (it would cut the body short).
    let both = answering(b"HTTP/1.1 403 No\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nc\r\nnot for you!\r\n0\r\n\r\n".to_vec()).await;
    let gw = gateway(&both.to_string()).await;
    let resp = raw_request(gw.addr(), &upgrade_request("/chat", "")).await;
    assert!(resp.starts_with("HTTP/1.1 403 "), "{resp}");
    assert!(
        !resp.to_ascii_lowercase().contains("content-length: 3"),
        "{resp}"
    );
    assert!(resp.contains("not for you!"), "{resp}");
    for answer in [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(),
        format!("HTTP/1.1 101 OK\r\nX: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(),
    ] {
        let gw = gateway(&answering(answer).await.to_string()).await;
        assert_refused(&gw, &upgrade_request("/chat", ""), 502, "upstream_connect").await;
    }
}

/// An upstream refusal whose body never finishes cannot hold the connection: the rest of
/// the handshake after the head has a bound (3 × connect_timeout + handshake_timeout).
#[tokio::test]
async fn a_never_ending_upstream_refusal_body_is_cut() {
    let refusing = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = refusing.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = refusing.accept().await {
            let _ = read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 1000\r\n\r\nonly the start")
                .await;
            // Never sends the rest, never closes.
            if let Ok(mut k) = keep.lock() {
                k.push(s);
            }
        }
    });
    let yaml = ROUTED.replace("BACKEND", &addr.to_string()).replace(
        "upstreams:",
        "limits: { handshake_timeout: 300ms }\nupstreams:",
    );
    let gw = spawn_gateway(&yaml).await;
    let started = tokio::time::Instant::now();
    let resp = raw_request(gw.addr(), &upgrade_request("/chat", "")).await;
    assert!(resp.starts_with("HTTP/1.1 403 "), "{resp}");
    assert!(resp.ends_with("only the start"), "{resp}");
    // raw_request waits up to PATIENCE (10 s) for EOF; the bound is 0.3 + 3 × 0.5 + 0.3 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(held.lock().map(|h| h.len()).unwrap_or(0), 1);
}

#[tokio::test]
async fn slow_head_gets_408_and_silent_connection_is_closed() {
    let yaml = ROUTED.replace("BACKEND", "127.0.0.1:9").replace(
        "upstreams:",
        "limits: { handshake_timeout: 300ms }\nupstreams:",
    );
    let gw = spawn_gateway(&yaml).await;
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: h\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut resp = String::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_string(&mut resp)).await;
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp:?}");
    let mut silent = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = tokio::time::Instant::now();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection should be closed without a response"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    gw.log_line(|l| l["proxy_reason"] == "handshake_timeout" && l["status"] == 408)
        .await;
}

#[tokio::test]
async fn forwarded_headers_and_negotiation_cross_the_proxy() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = gateway(&backend.to_string()).await;
    let extra = "Sec-WebSocket-Protocol: v1.chat\r\nSec-WebSocket-Extensions: x-test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Request-Id: forged\r\nConnection: Upgrade, X-Secret\r\nX-Secret: hop\r\nKeep-Alive: timeout=5\r\nCookie: a=b\r\n";
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = String::from_utf8_lossy(&upgrade_request("/chat/room?x=1", extra))
        .replace("Connection: Upgrade\r\n", "");
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_up, head) = next_accepted(&mut accepted).await;
    assert!(head.starts_with("GET /chat/room?x=1 HTTP/1.1"), "{head}");
    assert_eq!(
        header_value(&head, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        header_value(&head, "x-forwarded-proto").as_deref(),
        Some("http")
    );
    assert_eq!(
        header_value(&head, "x-forwarded-host").as_deref(),
        Some("gw.test")
    );
    assert_eq!(
        header_value(&head, "sec-websocket-protocol").as_deref(),
        Some("v1.chat")
    );
    assert_eq!(
        header_value(&head, "sec-websocket-extensions").as_deref(),
        Some("x-test")
    );
    assert_eq!(
        header_value(&head, "sec-websocket-key").as_deref(),
        Some(KEY)
    );
    assert_eq!(header_value(&head, "cookie").as_deref(), Some("a=b"));
    assert_eq!(
        header_value(&head, "x-secret"),
        None,
        "header named in Connection must not be forwarded"
    );
    assert_eq!(header_value(&head, "keep-alive"), None);
    let request_id = header_value(&head, "x-request-id").unwrap_or_default();
    assert_ne!(request_id, "forged");
    // The raw backend answered 101 without choosing a protocol; the client sees the 101.
    let resp = read_head(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
    drop(s);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(
        line["conn_id"],
        request_id.as_str(),
        "X-Request-Id is the connection id"
    );
    assert_eq!(line["route"], "chat");
    assert_eq!(line["path"], "/chat/room?x=1");
}

#[tokio::test]
async fn upstream_subprotocol_choice_reaches_the_client() {
    let (backend, mut accepted) = ws_backend().await;
    let _ = &mut accepted;
    let gw = gateway(&backend.to_string()).await;
    // tokio-tungstenite's default server callback picks no protocol; use a raw request and
    // check the accept key the client receives is the right one for its key.
    let (_s, head) = raw_upgrade(gw.addr(), "/chat", "").await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(KEY.as_bytes());
    assert_eq!(
        header_value(&head, "sec-websocket-accept").as_deref(),
        Some(accept.as_str())
    );
}

#[tokio::test]
async fn beyond_max_connections_is_503_capacity() {
    let backend = echo_backend().await;
    let yaml = ROUTED
        .replace("BACKEND", &backend.to_string())
        .replace("upstreams:", "limits: { max_connections: 1 }\nupstreams:");
    let gw = spawn_gateway(&yaml).await;
    let _first = connect(&gw.url("/chat")).await;
    assert_refused(&gw, &upgrade_request("/chat", ""), 503, "capacity").await;
}

/// A public route and a JWT route that forwards a claim as `X-User-Id`, both in front of
/// `backend`; `top` is extra top-level YAML.
fn two_routes(backend: &str, top: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
{top}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 500ms }}
routes:
  - name: private
    match: {{ path_prefix: /private }}
    upstream: app
    auth:
      jwt:
        from: ["header:Authorization"]
        keys: [{{ alg: HS256, secret: "a-test-secret-of-at-least-32-bytes!!" }}]
        forward_claims: {{ sub: X-User-Id }}
  - {{ name: public, match: {{ path_prefix: / }}, upstream: app }}
"#
    )
}

/// Upgrades with `request` and returns the head the backend received (after the 101).
async fn upstream_head(
    gw: &TestGateway,
    accepted: &mut tokio::sync::mpsc::Receiver<(TcpStream, String)>,
    request: &[u8],
) -> (TcpStream, String) {
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(request).await.unwrap_or_else(|e| panic!("{e}"));
    let resp = read_head(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
    let (_up, head) = next_accepted(accepted).await;
    (s, head)
}

/// Every header a proxy sets on any route (another route's claim header included), the
/// `strip_headers` list and names with `_` are removed on every route: a route without a
/// token cannot carry a forged identity upstream.
#[tokio::test]
async fn forged_proxy_and_claim_headers_are_removed_on_every_route() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&two_routes(&backend.to_string(), "")).await;
    let forged = "X-User-Id: admin\r\nX_User_Id: admin\r\nx_user-id: admin\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 1\r\nX-Forwarded-Host: evil.example\r\nX-Other: kept\r\n";
    let (_s, head) = upstream_head(&gw, &mut accepted, &upgrade_request("/public", forged)).await;
    let lower = head.to_ascii_lowercase();
    for gone in [
        "x-user-id",
        "x_user_id",
        "x_user-id",
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
    ] {
        assert!(
            !lower.contains(&format!("\n{gone}:")),
            "{gone} reached the upstream: {head}"
        );
    }
    assert_eq!(
        header_value(&head, "x-forwarded-host").as_deref(),
        Some("gw.test")
    );
    assert_eq!(header_value(&head, "x-other").as_deref(), Some("kept"));
    // A configured list replaces the default one; claim headers are still removed.
    let gw = spawn_gateway(&two_routes(
        &backend.to_string(),
        "strip_headers: [X-Internal]",
    ))
    .await;
    let extra = "X-Internal: yes\r\nX-User-Id: admin\r\nForwarded: for=6.6.6.6\r\n";
    let (_s, head) = upstream_head(&gw, &mut accepted, &upgrade_request("/public", extra)).await;
    assert_eq!(header_value(&head, "x-internal"), None, "{head}");
    assert_eq!(header_value(&head, "x-user-id"), None, "{head}");
    assert_eq!(
        header_value(&head, "forwarded").as_deref(),
        Some("for=6.6.6.6")
    );
}

/// `Host` and the handshake's own headers survive a `Connection` header naming them;
/// `Proxy-Connection` does not pass; an absolute-form target without `Host` still gives
/// the upstream a `Host`.
#[tokio::test]
async fn the_upstream_request_always_has_its_host_and_handshake_headers() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = gateway(&backend.to_string()).await;
    let req = String::from_utf8_lossy(&upgrade_request(
        "/chat",
        "Proxy-Connection: keep-alive\r\n",
    ))
    .replace(
        "Connection: Upgrade\r\n",
        "Connection: Upgrade, Host, Sec-WebSocket-Key, Sec-WebSocket-Version\r\n",
    );
    let (_s, head) = upstream_head(&gw, &mut accepted, req.as_bytes()).await;
    assert_eq!(
        header_value(&head, "host").as_deref(),
        Some("gw.test"),
        "{head}"
    );
    assert_eq!(
        header_value(&head, "sec-websocket-key").as_deref(),
        Some(KEY)
    );
    assert_eq!(
        header_value(&head, "sec-websocket-version").as_deref(),
        Some("13")
    );
    assert_eq!(header_value(&head, "proxy-connection"), None, "{head}");
    let absolute = format!(
        "GET http://gw.test:8080/chat?x=1 HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let (_s, head) = upstream_head(&gw, &mut accepted, absolute.as_bytes()).await;
    assert!(head.starts_with("GET /chat?x=1 HTTP/1.1\r\n"), "{head}");
    assert_eq!(
        header_value(&head, "host").as_deref(),
        Some("gw.test:8080"),
        "{head}"
    );
    assert_eq!(head.matches("\r\nhost:").count(), 1, "{head}");
}

/// Paths a server might normalise into another route (`//`, `;` parameters) and hosts
/// that are not `host[:port]` are refused before any route is chosen; host matching
/// ignores case and one trailing dot.
#[tokio::test]
async fn path_and_host_confusion_is_refused() {
    let yaml = r#"
listeners: [{ name: public, bind: "127.0.0.1:0" }]
limits: { handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 } }
upstreams:
  app: { backends: [{ addr: "127.0.0.1:9" }], connect_timeout: 500ms }
routes:
  - { name: admin, match: { host: admin.example.com, path_prefix: / }, upstream: app, origins: ["https://admin.example.com"] }
  - { name: public, match: { path_prefix: / }, upstream: app }
"#;
    let gw = spawn_gateway(yaml).await;
    for path in [
        "/ws//admin",
        "/ws;x=1/admin",
        "/ws/admin;",
        "/ws/%2F/admin",
        "/ws/%3Bx/admin",
        "//admin",
        // WHATWG URL parsers (Node's `URL`, browsers) read `\` as `/`.
        "/ws\\admin",
        "/ws%5Cadmin",
        "/ws%5cadmin",
    ] {
        let resp = raw_request(gw.addr(), &upgrade_request(path, "")).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{path}: {resp}");
        assert!(resp.ends_with("bad_upgrade\n"), "{path}: {resp}");
    }
    let with_host = |host: &str| {
        String::from_utf8_lossy(&upgrade_request("/ws", ""))
            .replace("Host: gw.test", &format!("Host: {host}"))
    };
    for host in [
        "exa mple.com",
        "example.com:http",
        "example.com:99999",
        "example.com:",
        "user@admin.example.com",
        "admin..example.com",
        ".example.com",
        "example.com..",
        "[::1",
        "[nope]:80",
        "example.com/x",
    ] {
        let resp = raw_request(gw.addr(), with_host(host).as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{host}: {resp}");
        assert!(resp.ends_with("bad_upgrade\n"), "{host}: {resp}");
    }
    // The absolute-form target names the host; a `Host` naming another is refused.
    let split = format!(
        "GET http://admin.example.com/ws HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let resp = raw_request(gw.addr(), split.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    // The admin route (origin required) is chosen whatever the case or a trailing dot.
    for host in [
        "admin.example.com.",
        "ADMIN.Example.com",
        "admin.example.com.:8080",
    ] {
        let resp = raw_request(gw.addr(), with_host(host).as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 403 "), "{host}: {resp}");
    }
    // (More than 10 refusals a second from one address are summarised: look for one.)
    gw.log_line(|l| l["event"] == "ws_reject" && l["proxy_reason"] == "bad_upgrade")
        .await;
}
