//! The admin plane through real sockets (SPEC §2 `admin`, §7): the token on every
//! state-changing endpoint, `Origin` refused, loopback-only without a token, the head
//! timeout and the connection bound; `/connections/close` and `/revoke` against live
//! relayed connections (4003 to the client, 1001 upstream); and the per-subject cap
//! (429 `subject_cap`) for JWT subjects and API keys.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

const SECRET: &str = "admin-test-jwt-secret";
const ADMIN_TOKEN: &str = "admin-test-token-0123456789";

fn jwt(sub: &str, jti: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 600;
    let claims = serde_json::json!({ "sub": sub, "jti": jti, "exp": exp });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A JWT route `/` to `backend`, an admin listener on `admin_bind` with `admin_extra`
/// YAML (e.g. its token), and extra top-level `limits`.
fn config(backend: SocketAddr, admin_bind: &str, admin_extra: &str, limits: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "{admin_bind}" {admin_extra} }}
keepalive: {{ ping_interval: 0s }}
limits: {{ max_connections_per_ip: 1000, handshakes_per_ip: {{ rate: 10000, per: 1s }} {limits} }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - name: app
    match: {{ path_prefix: / }}
    upstream: app
    auth: {{ jwt: {{ from: ["header:Authorization"], keys: [{{ alg: HS256, secret: "{SECRET}" }}] }} }}
"#
    )
}

fn with_token() -> String {
    format!(", token: \"{ADMIN_TOKEN}\"")
}

fn admin_addr(gw: &TestGateway) -> SocketAddr {
    gw.gw.admin.unwrap_or_else(|| panic!("no admin listener"))
}

/// An admin request with extra header lines; returns (status, body).
async fn admin(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{headers}\r\n");
    status_and_body(&raw_request(addr, req.as_bytes()).await)
}

fn bearer() -> String {
    format!("Authorization: Bearer {ADMIN_TOKEN}\r\n")
}

/// An upgrade as `sub` (token id `jti`): the client socket and the response head.
async fn open_as(gw: &TestGateway, sub: &str, jti: &str) -> (TcpStream, String) {
    raw_upgrade(
        gw.addr(),
        "/",
        &format!("Authorization: Bearer {}\r\n", jwt(sub, jti)),
    )
    .await
}

/// A relayed connection as `sub`: the client and its upstream side.
async fn relayed(
    gw: &TestGateway,
    accepted: &mut tokio::sync::mpsc::Receiver<(TcpStream, String)>,
    sub: &str,
    jti: &str,
) -> (TcpStream, TcpStream) {
    let (client, head) = open_as(gw, sub, jti).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{sub}: {head}");
    let (up, _) = next_accepted(accepted).await;
    (client, up)
}

/// Still relaying: a client text frame reaches the upstream.
async fn relays(client: &mut TcpStream, up: &mut TcpStream) {
    client
        .write_all(&client_frame(0x81, b"ping?"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (b0, payload) = read_frame(up)
        .await
        .unwrap_or_else(|| panic!("not relayed"));
    assert_eq!((b0, payload.as_slice()), (0x81, b"ping?".as_slice()));
}

#[tokio::test]
async fn state_changing_endpoints_need_the_admin_token_and_refuse_origin() {
    let (backend, _accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let drain = format!("/upstreams/app/backends/{backend}/drain");
    let changes = [
        ("POST", "/connections/close?route=app"),
        ("POST", "/revoke?subject=nobody&for=1m"),
        ("DELETE", "/revoke?subject=nobody"),
        ("POST", drain.as_str()),
        ("POST", &drain.replace("/drain", "/undrain")),
    ];
    for (method, path) in changes {
        let (status, body) = admin(addr, method, path, "").await;
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        let wrong = "Authorization: Bearer not-the-token\r\n";
        let (status, _) = admin(addr, method, path, wrong).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
        let browser = format!("{}Origin: https://evil.example\r\n", bearer());
        let (status, _) = admin(addr, method, path, &browser).await;
        assert_eq!(status, 403, "{method} {path} with an Origin header");
    }
    // Nothing above took effect: the backend still takes connections.
    let (_c, head) = open_as(&gw, "alice", "j1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for (method, path) in changes {
        let (status, body) = admin(addr, method, path, &bearer()).await;
        assert_eq!(status, 200, "{method} {path} with the token: {body}");
    }
    // Reads stay open.
    let (status, _) = admin(addr, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    let (status, _) = admin(addr, "GET", "/connections", "").await;
    assert_eq!(status, 200);
}

/// Without a token, a loopback admin serves changes (but never to a browser), and an
/// admin bound to every address refuses them. (This one test binds 0.0.0.0, briefly.)
#[tokio::test]
async fn without_a_token_changes_are_served_on_loopback_only() {
    let (backend, _accepted) = raw_backend().await;
    let local = spawn_gateway(&config(backend, "127.0.0.1:0", "", "")).await;
    let addr = admin_addr(&local);
    let (status, body) = admin(addr, "POST", "/connections/close?route=app", "").await;
    assert_eq!((status, body.as_str()), (200, "{\"closed\":0}\n"));
    let origin = "Origin: http://127.0.0.1:3000\r\n";
    let (status, _) = admin(addr, "POST", "/connections/close?route=app", origin).await;
    assert_eq!(status, 403);

    let open = spawn_gateway(&config(backend, "0.0.0.0:0", "", "")).await;
    let port = admin_addr(&open).port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = admin(addr, "POST", "/connections/close?route=app", "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin.token"), "{body}");
    let drain = format!("/upstreams/app/backends/{backend}/drain");
    let (status, _) = admin(addr, "POST", &drain, "").await;
    assert_eq!(status, 403);
    let (status, _) = admin(addr, "GET", "/readyz", "").await;
    assert_eq!(status, 200);
}

/// SPEC §7: request heads within 5 s. A connection that sends half a head, or nothing,
/// is closed.
#[tokio::test]
async fn an_admin_request_head_must_arrive_within_five_seconds() {
    let (backend, _accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let mut partial = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut silent = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = tokio::time::Instant::now();
    assert!(closes_tcp(&mut partial).await, "a half head is cut off");
    assert!(
        closes_tcp(&mut silent).await,
        "a silent connection is cut off"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

/// A connection to `addr` from the loopback address 127.0.0.`host` (Linux routes all of
/// 127.0.0.0/8 to `lo`): a second client address for tests.
async fn connect_from(host: u8, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    socket
        .bind(SocketAddr::from(([127, 0, 0, host], 0)))
        .unwrap_or_else(|e| panic!("bind 127.0.0.{host}: {e}"));
    socket.connect(addr).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`admin`] from 127.0.0.`host`.
async fn admin_from(host: u8, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = connect_from(host, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    let resp = String::from_utf8_lossy(&out).into_owned();
    (status_and_body(&resp).0, resp)
}

/// SPEC §7: at most 64 admin connections (8 per address); the next is answered 503 at
/// once, and a slot freed is a slot reused.
#[tokio::test]
async fn the_admin_listener_serves_at_most_64_connections() {
    let (backend, _accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let mut held = Vec::new();
    for host in 1..=8 {
        for _ in 0..8 {
            held.push(connect_from(host, addr).await);
        }
    }
    // Each held connection is served (one request each, kept alive), so all 64 slots
    // are taken before the next one arrives.
    for s in &mut held {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let head = read_head(s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let (status, body) = admin_from(9, addr, "/healthz").await;
    assert_eq!(status, 503, "the 65th connection is refused: {body}");
    assert!(body.ends_with("too many admin connections\n"), "{body}");
    drop(held.pop());
    eventually(
        "a freed admin slot serves again",
        PATIENCE,
        async || match admin_from(8, addr, "/healthz").await {
            (200, _) => Ok(()),
            other => Err(other),
        },
    )
    .await;
}

/// One address holding idle connections (and opening more) takes at most 8 admin slots:
/// probes from another address are still answered.
#[tokio::test]
async fn one_address_cannot_take_the_admin_listener_from_probes() {
    let (backend, _accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(connect_from(1, addr).await);
    }
    for _ in 0..10 {
        let (status, body) = admin_from(2, addr, "/healthz").await;
        assert_eq!(status, 200, "a probe from 127.0.0.2: {body}");
        // The abuser keeps reconnecting.
        idle.push(connect_from(1, addr).await);
    }
    let (status, body) = admin_from(1, addr, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("from this address"), "{body}");
    let (status, _) = admin_from(3, addr, "/readyz").await;
    assert_eq!(status, 200);
}

/// A client that pipelines requests and never reads the answers loses its connections
/// once a write to it stalls, so its address's slots come back.
#[tokio::test]
async fn a_client_that_stops_reading_loses_its_admin_connections() {
    let (backend, _accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let requests = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n".repeat(20_000);
    let mut writers = Vec::new();
    for _ in 0..8 {
        let mut s = connect_from(1, addr).await;
        let requests = requests.clone();
        writers.push(tokio::spawn(async move {
            // Writes until the gateway stops reading, then holds the socket unread.
            let _ = s.write_all(&requests).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = admin_from(1, addr, "/healthz").await;
    assert_eq!(status, 503, "the address holds its 8 slots: {body}");
    let started = tokio::time::Instant::now();
    eventually(
        "stalled admin connections are dropped",
        Duration::from_secs(15),
        async || match admin_from(1, addr, "/healthz").await {
            (200, _) => Ok(()),
            other => Err(other),
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    for w in writers {
        w.abort();
    }
}

/// `/connections/close` closes exactly the matching connections: 4003 `revoked` (or the
/// requested code) to the client, 1001 upstream, logged as `revoked`.
#[tokio::test]
async fn connections_close_sends_4003_to_the_client_and_1001_upstream() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let (mut alice, mut alice_up) = relayed(&gw, &mut accepted, "alice", "a1").await;
    let (mut bob, mut bob_up) = relayed(&gw, &mut accepted, "bob", "b1").await;
    let (status, body) = admin(addr, "POST", "/connections/close?subject=alice", &bearer()).await;
    assert_eq!((status, body.as_str()), (200, "{\"closed\":1}\n"));
    assert_eq!(read_close_code(&mut alice).await, Some(4003));
    assert_eq!(read_close_code(&mut alice_up).await, Some(1001));
    relays(&mut bob, &mut bob_up).await;
    let line = gw
        .log_line(|l| l["event"] == "ws_close" && l["subject"] == "alice")
        .await;
    assert_eq!(line["proxy_reason"], "revoked");
    assert_eq!(line["close"]["code"], 4003);
    assert_eq!(line["close"]["by"], "proxy");
    // By route, with another code; a selector that matches nothing closes nothing.
    let (status, body) = admin(addr, "POST", "/connections/close?ip=192.0.2.1", &bearer()).await;
    assert_eq!((status, body.as_str()), (200, "{\"closed\":0}\n"));
    let (status, body) = admin(
        addr,
        "POST",
        "/connections/close?route=app&code=4000",
        &bearer(),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "{\"closed\":1}\n"));
    assert_eq!(read_close_code(&mut bob).await, Some(4000));
    assert_eq!(read_close_code(&mut bob_up).await, Some(1001));
    // Bad requests.
    for path in [
        "/connections/close",
        "/connections/close?subject=a&ip=1.2.3.4",
        "/connections/close?subject=a&code=1006",
        "/connections/close?who=a",
    ] {
        let (status, _) = admin(addr, "POST", path, &bearer()).await;
        assert_eq!(status, 400, "{path}");
    }
    let (status, _) = admin(addr, "GET", "/connections/close?subject=a", "").await;
    assert_eq!(status, 405);
}

/// `/revoke` refuses new handshakes of a subject or token id (403 `revoked`), closes its
/// live connections, expires after `for`, and `DELETE` lifts it.
#[tokio::test]
async fn revoke_refuses_new_handshakes_closes_live_ones_and_expires() {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), "")).await;
    let addr = admin_addr(&gw);
    let (mut alice, mut alice_up) = relayed(&gw, &mut accepted, "alice", "a1").await;
    let (mut bob, mut bob_up) = relayed(&gw, &mut accepted, "bob", "b1").await;
    let (status, body) = admin(addr, "POST", "/revoke?subject=alice&for=1h", &bearer()).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(v["closed"], 1, "{body}");
    assert_eq!(read_close_code(&mut alice).await, Some(4003));
    assert_eq!(read_close_code(&mut alice_up).await, Some(1001));
    send_client_close(&mut alice, 4003).await;
    send_server_close(&mut alice_up, 1001).await;
    let (_, head) = open_as(&gw, "alice", "a2").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let refused = gw
        .log_line(|l| l["event"] == "ws_reject" && l["proxy_reason"] == "revoked")
        .await;
    assert_eq!(refused["status"], 403);
    relays(&mut bob, &mut bob_up).await;
    // By token id: that token only, for a second.
    let (status, _) = admin(addr, "POST", "/revoke?jti=b1&for=1s", &bearer()).await;
    assert_eq!(status, 200);
    assert_eq!(read_close_code(&mut bob).await, Some(4003));
    assert_eq!(read_close_code(&mut bob_up).await, Some(1001));
    send_client_close(&mut bob, 4003).await;
    send_server_close(&mut bob_up, 1001).await;
    let (_, head) = open_as(&gw, "bob", "b1").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (_, head) = open_as(&gw, "bob", "b2").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    eventually(
        "the jti revocation expires",
        Duration::from_secs(5),
        async || {
            let (_, head) = open_as(&gw, "bob", "b1").await;
            if head.starts_with("HTTP/1.1 101") {
                Ok(())
            } else {
                Err(head)
            }
        },
    )
    .await;
    // A subject or token id longer than 1 KiB is refused (the store stays small).
    let long = format!("/revoke?subject={}", "a".repeat(2000));
    let (status, body) = admin(addr, "POST", &long, &bearer()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("longer than 1024 bytes"), "{body}");
    // Lifted.
    let (status, body) = admin(addr, "DELETE", "/revoke?subject=alice", &bearer()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"lifted\":true"), "{body}");
    let (_, head) = open_as(&gw, "alice", "a3").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let scrape = scrape(&gw).await;
    assert_eq!(metric(&scrape, "wsgate_revocations_total", &[]), 2.0);
    assert!(
        metric(
            &scrape,
            "wsgate_handshake_rejected_total",
            &[("reason", "revoked")]
        ) >= 2.0
    );
    await_metric(
        &gw,
        "wsgate_closes_total",
        &[("code", "4003"), ("by", "proxy")],
        2.0,
    )
    .await;
}

/// `max_connections_per_subject`: a JWT subject holds at most that many connections
/// (429 `subject_cap` beyond), other subjects are not affected, and a closed connection
/// frees its slot.
#[tokio::test]
async fn the_per_subject_cap_refuses_429_subject_cap() {
    let (backend, mut accepted) = raw_backend().await;
    let limits = ", max_connections_per_subject: 2";
    let gw = spawn_gateway(&config(backend, "127.0.0.1:0", &with_token(), limits)).await;
    let (mut first, _first_up) = relayed(&gw, &mut accepted, "alice", "1").await;
    let _second = relayed(&gw, &mut accepted, "alice", "2").await;
    let (mut third, head) = open_as(&gw, "alice", "3").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let mut body = [0u8; 12];
    let _ = tokio::io::AsyncReadExt::read_exact(&mut third, &mut body).await;
    assert_eq!(&body, b"subject_cap\n");
    let _bob = relayed(&gw, &mut accepted, "bob", "1").await;
    send_client_close(&mut first, 1000).await;
    drop(first);
    eventually(
        "a closed connection frees its subject's slot",
        PATIENCE,
        async || {
            let (_, head) = open_as(&gw, "alice", "4").await;
            if head.starts_with("HTTP/1.1 101") {
                Ok(())
            } else {
                Err(head)
            }
        },
    )
    .await;
}

/// An API key's identity is its SHA-256: two keys are two subjects, even on the same line
/// of two routes' keys files.
#[tokio::test]
async fn the_per_subject_cap_counts_api_keys_by_their_hash() {
    let (backend, mut accepted) = raw_backend().await;
    let dir = std::env::temp_dir().join(format!("wsgate-admin-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let hex = sha256_hex;
    let (file, a_file, b_file) = (dir.join("keys.txt"), dir.join("a.txt"), dir.join("b.txt"));
    let write = |path: &std::path::Path, text: String| {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
    };
    write(&file, format!("{}\n{}\n", hex(b"key-a"), hex(b"key-b")));
    // Each of these has one key, on line 1.
    write(&a_file, format!("{}\n", hex(b"key-a")));
    write(&b_file, format!("{}\n", hex(b"key-b")));
    let route = |name: &str, prefix: &str, file: &std::path::Path| {
        format!(
            "  - {{ name: {name}, match: {{ path_prefix: {prefix} }}, upstream: app, auth: {{ api_keys: {{ header: X-Api-Key, keys_file: \"{}\" }} }} }}\n",
            file.display()
        )
    };
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
limits: {{ max_connections_per_ip: 1000, handshakes_per_ip: {{ rate: 10000, per: 1s }}, max_connections_per_subject: 1 }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
{}{}{}"#,
        route("a", "/a", &a_file),
        route("b", "/b", &b_file),
        route("app", "/", &file),
    );
    let gw = spawn_gateway(&yaml).await;
    let (_b, head) = raw_upgrade(gw.addr(), "/b", "X-Api-Key: key-b\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let _b_up = next_accepted(&mut accepted).await;
    // key-a is line 1 of a.txt as key-b is of b.txt: still another subject.
    let (_a, head) = raw_upgrade(gw.addr(), "/a", "X-Api-Key: key-a\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let _a_up = next_accepted(&mut accepted).await;
    // The same key through another route's file is the same subject.
    let (_, head) = raw_upgrade(gw.addr(), "/", "X-Api-Key: key-a\r\n").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let (_, head) = raw_upgrade(gw.addr(), "/", "X-Api-Key: key-b\r\n").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let _ = std::fs::remove_dir_all(dir);
}
