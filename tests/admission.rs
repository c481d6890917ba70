//! Admission control through real sockets (SPEC §2 `origins`, `auth`, per-IP limits,
//! `trusted_proxies`; SPEC §3): each refusal is one HTTP response plus one access-log line,
//! and what passes reaches the upstream with the token handled as configured.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SECRET: &str = "test-secret-do-not-use";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn jwt(claims: serde_json::Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn good_token(sub: &str) -> String {
    jwt(
        serde_json::json!({ "sub": sub, "iss": "https://auth.test/", "aud": "chat", "exp": now() + 600, "scope": "chat read" }),
    )
}

/// A gateway with the given route extras in front of a raw backend.
async fn gateway(
    route_extra: &str,
    top_extra: &str,
) -> (
    TestGateway,
    tokio::sync::mpsc::Receiver<(TcpStream, String)>,
) {
    let (backend, accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
{top_extra}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - name: chat
    match: {{ path_prefix: /chat }}
    upstream: app
{route_extra}
"#
    );
    (spawn_gateway(&yaml).await, accepted)
}

fn upgrade(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    )
    .into_bytes()
}

async fn refused(gw: &TestGateway, req: &[u8], status: u16, reason: &str) -> String {
    let resp = raw_request(gw.addr(), req).await;
    assert!(
        resp.starts_with(&format!("HTTP/1.1 {status} ")),
        "want {status}: {resp}"
    );
    assert_eq!(support::refusal_word(&resp), reason, "{resp}");
    gw.log_line(|l| l["event"] == "ws_reject" && l["proxy_reason"] == reason)
        .await;
    resp
}

/// Upgrades and returns the head the upstream received.
async fn admitted(
    gw: &TestGateway,
    accepted: &mut tokio::sync::mpsc::Receiver<(TcpStream, String)>,
    req: &[u8],
) -> (TcpStream, String, String) {
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(req).await.unwrap_or_else(|e| panic!("{e}"));
    let resp = read_head(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 101 "), "{resp}");
    let (_up, head) = next_accepted(accepted).await;
    (s, resp, head)
}

const ORIGINS: &str = "    origins: [\"https://app.example.com\", \"https://*.example.com\"]";

#[tokio::test]
async fn origins_are_checked_per_route() {
    let (gw, mut accepted) = gateway(ORIGINS, "").await;
    admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat", "Origin: https://app.example.com\r\n"),
    )
    .await;
    admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat", "Origin: https://A.B.Example.com\r\n"),
    )
    .await;
    refused(
        &gw,
        &upgrade("/chat", "Origin: https://evil.test\r\n"),
        403,
        "origin",
    )
    .await;
    refused(
        &gw,
        &upgrade("/chat", "Origin: http://app.example.com\r\n"),
        403,
        "origin",
    )
    .await;
    refused(
        &gw,
        &upgrade("/chat", "Origin: https://example.com\r\n"),
        403,
        "origin",
    )
    .await;
    refused(&gw, &upgrade("/chat", "Origin: null\r\n"), 403, "origin").await;
    refused(&gw, &upgrade("/chat", ""), 403, "origin").await;
    let (gw, mut accepted) =
        gateway(&format!("{ORIGINS}\n    allow_missing_origin: true"), "").await;
    admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;
}

fn jwt_route(extra: &str) -> String {
    format!(
        r#"    auth:
      jwt:
        from: ["header:Authorization", "query:access_token", "cookie:token", "subprotocol"]
        keys: [{{ alg: HS256, secret: "{SECRET}" }}]
        issuer: "https://auth.test/"
        audience: chat
        require_claims: {{ scope: chat }}
        forward_claims: {{ sub: X-User-Id }}
        strip_token: true
{extra}"#
    )
}

#[tokio::test]
async fn a_valid_jwt_passes_from_every_source_and_never_reaches_the_upstream() {
    let (gw, mut accepted) = gateway(&jwt_route(""), "").await;
    let token = good_token("user-42");
    // Authorization header; a forged X-User-Id is replaced by the claim.
    let (_, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade(
            "/chat",
            &format!("Authorization: Bearer {token}\r\nX-User-Id: admin\r\n"),
        ),
    )
    .await;
    assert_eq!(header_value(&head, "x-user-id").as_deref(), Some("user-42"));
    assert_eq!(header_value(&head, "authorization"), None, "strip_token");
    // Query parameter: stripped upstream, redacted in the log.
    let (s, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade(&format!("/chat?room=1&access_token={token}"), ""),
    )
    .await;
    assert!(head.starts_with("GET /chat?room=1 HTTP/1.1"), "{head}");
    drop(s);
    // Cookie, other cookies kept.
    let (_, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat", &format!("Cookie: theme=dark; token={token}\r\n")),
    )
    .await;
    assert_eq!(header_value(&head, "cookie").as_deref(), Some("theme=dark"));
    // The browser trick: `bearer, <token>` offered, `bearer` answered, nothing forwarded.
    let (_, resp, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade(
            "/chat",
            &format!("Sec-WebSocket-Protocol: bearer, {token}\r\n"),
        ),
    )
    .await;
    assert_eq!(
        header_value(&resp, "sec-websocket-protocol").as_deref(),
        Some("bearer")
    );
    assert_eq!(header_value(&head, "sec-websocket-protocol"), None);
    // No log line holds the token: once all four connections have written theirs (each
    // upstream went at once, so each ends).
    eventually("four ws_close lines", PATIENCE, async || {
        let lines = gw.log_lines();
        let closes = lines.iter().filter(|l| l["event"] == "ws_close").count();
        if closes == 4 { Ok(()) } else { Err(lines) }
    })
    .await;
    let logs = gw.logs.lock().map(|l| l.join("\n")).unwrap_or_default();
    assert!(!logs.contains(&token), "a token leaked into the access log");
    assert!(
        logs.contains("access_token=REDACTED")
            || gw.log_lines().iter().all(|l| l["event"] != "ws_close"),
        "{logs}"
    );
    let line = gw
        .log_line(|l| {
            l["event"] == "ws_close" && l["path"].as_str().is_some_and(|p| p.contains("room=1"))
        })
        .await;
    assert_eq!(line["path"], "/chat?room=1&access_token=REDACTED");
    assert_eq!(line["subject"], "user-42");
}

#[tokio::test]
async fn bad_tokens_are_401_with_www_authenticate() {
    let (gw, _accepted) = gateway(&jwt_route(""), "").await;
    let base = serde_json::json!({ "sub": "u", "iss": "https://auth.test/", "aud": "chat", "exp": now() + 600, "scope": "chat" });
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        jwt(c)
    };
    let wrong_key = encode(
        &Header::default(),
        &base,
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap_or_default();
    let none_alg = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(base.to_string())
        )
    };
    let cases = [
        ("missing", String::new()),
        ("expired", with("exp", (now() - 3600).into())),
        ("not yet valid", with("nbf", (now() + 3600).into())),
        ("wrong issuer", with("iss", "https://evil.test/".into())),
        ("wrong audience", with("aud", "other".into())),
        ("claim mismatch", with("scope", "read".into())),
        ("bad signature", wrong_key),
        ("alg none", none_alg),
    ];
    for (what, token) in cases {
        let auth = if token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {token}\r\n")
        };
        let resp = refused(&gw, &upgrade("/chat", &auth), 401, "token").await;
        assert!(
            resp.contains("www-authenticate: Bearer error=\"invalid_token\""),
            "{what}: {resp}"
        );
    }
}

#[tokio::test]
async fn close_on_expiry_closes_a_live_connection_4001() {
    let (gw, mut accepted) = gateway(&jwt_route("        close_on_expiry: true"), "").await;
    let token = jwt(
        serde_json::json!({ "sub": "u", "iss": "https://auth.test/", "aud": "chat", "exp": now() + 2, "scope": "chat" }),
    );
    let mut client = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .write_all(&upgrade(
            "/chat",
            &format!("Authorization: Bearer {token}\r\n"),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(read_head(&mut client).await.starts_with("HTTP/1.1 101"));
    let (mut up, _) = next_accepted(&mut accepted).await;
    let started = Instant::now();
    assert_eq!(read_close_code(&mut client).await, Some(4001));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_client_close(&mut client, 4001).await;
    send_server_close(&mut up, 1001).await;
    drop((client, up));
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["proxy_reason"], "token_expired");
    assert_eq!(line["close"]["code"], 4001);
}

#[tokio::test]
async fn api_keys_are_compared_by_hash() {
    let file = keys_file("keys", &[b"k-123"]);
    let hashes = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&file, format!("# one per line\n{hashes}")).unwrap_or_else(|e| panic!("{e}"));
    let extra = format!(
        "    auth: {{ api_keys: {{ header: X-Api-Key, keys_file: \"{}\" }} }}",
        file.display()
    );
    let (gw, mut accepted) = gateway(&extra, "").await;
    admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat", "X-Api-Key: k-123\r\n"),
    )
    .await;
    refused(&gw, &upgrade("/chat", "X-Api-Key: k-124\r\n"), 401, "token").await;
    refused(&gw, &upgrade("/chat", ""), 401, "token").await;
    // Given twice, only one would be checked: refused.
    refused(
        &gw,
        &upgrade("/chat", "X-Api-Key: k-123\r\nX-Api-Key: forged\r\n"),
        401,
        "token",
    )
    .await;
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn per_ip_cap_counts_and_releases_across_many_cycles() {
    let (gw, mut accepted) = gateway("    limits: { max_connections_per_ip: 2 }", "").await;
    let a = admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;
    let b = admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;
    refused(&gw, &upgrade("/chat", ""), 429, "ip_cap").await;
    drop((a, b));
    // Many cycles against a roomy cap and rate, to see every permit come back.
    let (gw, mut accepted) = gateway(
        "    limits: { max_connections_per_ip: 1000 }",
        "limits: { handshakes_per_ip: { rate: 100000, per: 1s } }",
    )
    .await;
    // Abort cycles: after the 101, and in the middle of the head; every permit comes back.
    for i in 0..1000 {
        let mut s = TcpStream::connect(gw.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if i % 2 == 0 {
            s.write_all(&upgrade("/chat", ""))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let head = read_head(&mut s).await;
            assert!(head.starts_with("HTTP/1.1 101"), "cycle {i}: {head}");
            let _ = tokio::time::timeout(PATIENCE, accepted.recv()).await;
        } else {
            s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        drop(s);
    }
    eventually(
        "no permit leaked",
        PATIENCE,
        async || match localhost_places(&gw) {
            0 => Ok(()),
            held => Err(held),
        },
    )
    .await;
    assert!(
        gw.gw.shared.per_ip.is_empty(),
        "the per-IP table shrinks back to nothing"
    );
    admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;
}

#[tokio::test]
async fn handshake_rate_gives_429_with_retry_after() {
    let (gw, mut accepted) = gateway(
        "",
        "limits: { handshakes_per_ip: { rate: 1, per: 10s, burst: 2 } }",
    )
    .await;
    admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;
    admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;
    let resp = refused(&gw, &upgrade("/chat", ""), 429, "ip_rate").await;
    let retry: u64 = header_value(&resp, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=10).contains(&retry), "{resp}");
}

#[tokio::test]
async fn trusted_proxies_make_x_forwarded_for_the_client() {
    let (gw, mut accepted) = gateway("", "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]").await;
    let (s, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade(
            "/chat",
            "X-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.1.2.3\r\n",
        ),
    )
    .await;
    assert_eq!(
        header_value(&head, "x-forwarded-for").as_deref(),
        Some("203.0.113.7")
    );
    drop(s);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["client_ip"], "203.0.113.7");
    // Without trust, the header is ignored.
    let (gw, mut accepted) = gateway("", "").await;
    let (_, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat", "X-Forwarded-For: 203.0.113.7\r\n"),
    )
    .await;
    assert_eq!(
        header_value(&head, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    let _ = accepted.recv().now_or_never();
}

trait NowOrNever: std::future::Future + Sized {
    fn now_or_never(self) -> Option<Self::Output> {
        futures_util::FutureExt::now_or_never(self)
    }
}
impl<F: std::future::Future> NowOrNever for F {}

#[allow(dead_code)]
async fn drain(ws: &mut Client) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(10), ws.next()).await {}
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_name_the_client_and_garbage_is_refused() {
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: lb, bind: "127.0.0.1:0", proxy_protocol: true }}]
admin: {{ bind: "127.0.0.1:0" }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    // v1, in the same packet as the upgrade.
    let mut req = b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 443\r\n".to_vec();
    req.extend(upgrade("/chat", ""));
    let (_s, _, head) = admitted(&gw, &mut accepted, &req).await;
    assert_eq!(
        header_value(&head, "x-forwarded-for").as_deref(),
        Some("203.0.113.9")
    );
    // v2 (binary): PROXY, TCP over IPv4, 198.51.100.4:6000 → 10.0.0.1:443.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0x00, 12, 198, 51, 100, 4, 10, 0, 0, 1, 0x17, 0x70, 0x01, 0xBB,
    ]);
    v2.extend(upgrade("/chat", ""));
    let (_s2, _, head) = admitted(&gw, &mut accepted, &v2).await;
    assert_eq!(
        header_value(&head, "x-forwarded-for").as_deref(),
        Some("198.51.100.4")
    );
    // No header, or a broken one: closed without reaching HTTP, and counted.
    let failures = || async {
        let scrape = scrape(&gw).await;
        metric(&scrape, "wsgate_proxy_protocol_failures_total", &[])
    };
    let before = failures().await;
    for bad in [
        upgrade("/chat", ""),
        b"PROXY TCP4 999.1.1.1 x y z\r\n".to_vec(),
    ] {
        let resp = raw_request(gw.addr(), &bad).await;
        assert!(!resp.contains("101"), "{resp}");
    }
    // The counter is process-wide (other tests' gateways add to it too).
    assert!(failures().await >= before + 2.0);
    let line = gw.log_line(|l| l["client_ip"] == "203.0.113.9").await;
    assert_eq!(line["route"], "chat");
}

#[tokio::test]
async fn handshakes_in_progress_count_against_the_per_ip_cap_and_tls_aborts_release() {
    let (gw, mut accepted) = gateway("", "limits: { max_connections_per_ip: 2 }").await;
    // Two connections still sending their heads already hold the address's two places.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.write_all(b"GET /chat HTTP/1.1\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        slow.push(s);
    }
    eventually(
        "in-progress handshakes counted",
        PATIENCE,
        async || match localhost_places(&gw) {
            2.. => Ok(()),
            held => Err(held),
        },
    )
    .await;
    refused(&gw, &upgrade("/chat", ""), 429, "ip_cap").await;
    // Another address is not starved by this one's flood.
    let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    socket
        .bind("127.0.0.2:0".parse().unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut other = socket
        .connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    other
        .write_all(&upgrade("/chat", ""))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = read_head(&mut other).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let _ = tokio::time::timeout(PATIENCE, accepted.recv()).await;
    drop(other);
    drop(slow);
    eventually(
        "aborted heads give their places back",
        PATIENCE,
        async || match localhost_places(&gw) {
            0 => Ok(()),
            held => Err(held),
        },
    )
    .await;
    admitted(&gw, &mut accepted, &upgrade("/chat", "")).await;

    // Aborts in the middle of a TLS handshake release their place too.
    let yaml = r#"
listeners: [{ name: secure, bind: "127.0.0.1:0", tls: { self_signed: true } }]
limits: { max_connections_per_ip: 1000, handshakes_per_ip: { rate: 100000, per: 1s } }
upstreams:
  echo: { builtin: echo }
routes:
  - { name: echo, match: { path_prefix: / }, upstream: echo }
"#;
    let tls_gw = spawn_gateway(yaml).await;
    for _ in 0..300 {
        let mut s = TcpStream::connect(tls_gw.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The start of a ClientHello record, then gone.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(s);
    }
    eventually(
        "TLS aborts give their places back",
        PATIENCE,
        async || match localhost_places(&tls_gw) {
            0 => Ok(()),
            held => Err(held),
        },
    )
    .await;
}

/// With the `subprotocol` source configured, the offers lose their bearer entries and meet
/// the allowlist wherever the token came from; hop-by-hop names cannot take out the claim
/// headers; a credential given twice is refused; `strip_token` strips every source.
#[tokio::test]
async fn credentials_are_judged_once_and_never_forwarded_unverified() {
    let route = format!("{}    subprotocols: [v1.chat]", jwt_route(""));
    let (gw, mut accepted) = gateway(&route, "").await;
    let token = good_token("user-42");
    let auth = format!("Authorization: Bearer {token}\r\n");
    refused(
        &gw,
        &upgrade(
            "/chat",
            &format!("{auth}Sec-WebSocket-Protocol: evil, bearer, forged\r\n"),
        ),
        400,
        "subprotocol",
    )
    .await;
    let (_s, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade(
            "/chat",
            &format!("{auth}Sec-WebSocket-Protocol: v1.chat, bearer, forged\r\n"),
        ),
    )
    .await;
    assert_eq!(
        header_value(&head, "sec-websocket-protocol").as_deref(),
        Some("v1.chat")
    );
    // `Connection` naming a claim header does not suppress it.
    let req = upgrade("/chat", &auth)
        .iter()
        .map(|&b| b as char)
        .collect::<String>();
    let req = req.replace("Connection: Upgrade", "Connection: Upgrade, X-User-Id");
    let (_s, _, head) = admitted(&gw, &mut accepted, req.as_bytes()).await;
    assert_eq!(header_value(&head, "x-user-id").as_deref(), Some("user-42"));
    // A verified token plus unverified ones elsewhere: none of them reaches the upstream.
    let (_s, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade(
            "/chat?room=1&access_token=forged",
            &format!("{auth}Cookie: theme=dark; token=forged\r\n"),
        ),
    )
    .await;
    assert!(head.starts_with("GET /chat?room=1 HTTP/1.1"), "{head}");
    assert_eq!(header_value(&head, "authorization"), None);
    assert_eq!(header_value(&head, "cookie").as_deref(), Some("theme=dark"));
    // The same source twice: only one could be verified.
    for repeated in [
        upgrade(
            &format!("/chat?access_token={token}&access_token=forged"),
            "",
        ),
        upgrade("/chat", &format!("{auth}Authorization: Bearer forged\r\n")),
        upgrade("/chat", &format!("Cookie: token={token}; token=forged\r\n")),
        upgrade(
            "/chat",
            &format!("Sec-WebSocket-Protocol: bearer, {token}, bearer, forged\r\n"),
        ),
    ] {
        refused(&gw, &repeated, 401, "token").await;
    }
}

/// The route named in the log (and so the query values redacted) is the one the request
/// takes, also for an absolute-form target without a `Host` header.
#[tokio::test]
async fn token_query_values_are_redacted_for_absolute_form_targets() {
    let (backend, _accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - name: secret
    match: {{ host: gw.test, path_prefix: /chat }}
    upstream: app
{}
  - {{ name: open, match: {{ path_prefix: / }}, upstream: app }}
"#,
        jwt_route("")
    );
    let gw = spawn_gateway(&yaml).await;
    let req = format!(
        "GET http://gw.test/chat?access_token=SUPERSECRETVALUE HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    );
    let resp = raw_request(gw.addr(), req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
    let line = gw.log_line(|l| l["event"] == "ws_reject").await;
    assert_eq!(line["route"], "secret");
    assert_eq!(line["path"], "/chat?access_token=REDACTED");
}

/// A signed `exp` beyond what the clock can hold means no expiry, not a panic.
#[tokio::test]
async fn a_far_future_exp_with_close_on_expiry_is_admitted() {
    let (gw, mut accepted) = gateway(&jwt_route("        close_on_expiry: true"), "").await;
    let token = jwt(serde_json::json!({
        "sub": "u", "iss": "https://auth.test/", "aud": "chat", "exp": 10_000_000_000_000_000_000u64, "scope": "chat"
    }));
    let auth = format!("Authorization: Bearer {token}\r\n");
    admitted(&gw, &mut accepted, &upgrade("/chat", &auth)).await;
    admitted(&gw, &mut accepted, &upgrade("/chat", &auth)).await;
}

/// A route may allow an address more connections than the top level does, and another
/// route fewer: connections count at accept against the highest cap, then at the head
/// against their route's own.
#[tokio::test]
async fn a_route_may_lower_the_per_ip_cap_while_another_raises_it() {
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
limits: {{ max_connections_per_ip: 2 }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: few, match: {{ path_prefix: /few }}, upstream: app, limits: {{ max_connections_per_ip: 1 }} }}
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app, limits: {{ max_connections_per_ip: 4 }} }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let first = admitted(&gw, &mut accepted, &upgrade("/few", "")).await;
    refused(&gw, &upgrade("/few", ""), 429, "ip_cap").await;
    let mut held = vec![first];
    for _ in 0..3 {
        held.push(admitted(&gw, &mut accepted, &upgrade("/chat", "")).await);
    }
    refused(&gw, &upgrade("/chat", ""), 429, "ip_cap").await;
}

/// A route may allow an address more connections than the top level does.
#[tokio::test]
async fn a_route_may_raise_the_per_ip_cap() {
    let (gw, mut accepted) = gateway(
        "    limits: { max_connections_per_ip: 4 }",
        "limits: { max_connections_per_ip: 2 }",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(admitted(&gw, &mut accepted, &upgrade("/chat", "")).await);
    }
    refused(&gw, &upgrade("/chat", ""), 429, "ip_cap").await;
}

/// An API key is never forwarded upstream, from a header or from the query (SPEC §2
/// `api_keys`), and the query value is never logged.
#[tokio::test]
async fn api_keys_are_never_forwarded_upstream() {
    let file = keys_file("keys-fwd", &[b"k-123"]);
    let header = format!(
        "    auth: {{ api_keys: {{ header: X-Api-Key, keys_file: \"{}\" }} }}",
        file.display()
    );
    let (gw, mut accepted) = gateway(&header, "").await;
    let (_s, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat", "X-Api-Key: k-123\r\nX-Other: kept\r\n"),
    )
    .await;
    assert_eq!(header_value(&head, "x-api-key"), None, "{head}");
    assert_eq!(header_value(&head, "x-other").as_deref(), Some("kept"));
    let query = format!(
        "    auth: {{ api_keys: {{ query: api_key, keys_file: \"{}\" }} }}",
        file.display()
    );
    let (gw, mut accepted) = gateway(&query, "").await;
    let (s, _, head) = admitted(
        &gw,
        &mut accepted,
        &upgrade("/chat?room=1&api_key=k-123&x=2", ""),
    )
    .await;
    assert!(head.starts_with("GET /chat?room=1&x=2 HTTP/1.1"), "{head}");
    drop(s);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["path"], "/chat?room=1&api_key=REDACTED&x=2");
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A token sent in the query of a route that does not read it is still a token: every
/// query name any route reads a token or key from is redacted in every log line.
#[tokio::test]
async fn token_query_values_are_redacted_on_every_route() {
    let file = keys_file("keys-log", &[b"k-123"]);
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - name: secret
    match: {{ path_prefix: /chat }}
    upstream: app
{}
  - name: keyed
    match: {{ path_prefix: /keyed }}
    upstream: app
    auth: {{ api_keys: {{ query: api_key, keys_file: "{}" }} }}
  - {{ name: open, match: {{ path_prefix: / }}, upstream: app }}
"#,
        jwt_route(""),
        file.display()
    );
    let gw = spawn_gateway(&yaml).await;
    let path = "/open?access_token=SUPERSECRETVALUE&room=1&api_key=KEYSECRETVALUE";
    let (s, _, _) = admitted(&gw, &mut accepted, &upgrade(path, "")).await;
    drop(s);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["route"], "open");
    assert_eq!(
        line["path"],
        "/open?access_token=REDACTED&room=1&api_key=REDACTED"
    );
    // Refusals too.
    let resp = raw_request(
        gw.addr(),
        &upgrade("/chat?access_token=SUPERSECRETVALUE", ""),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
    let line = gw.log_line(|l| l["event"] == "ws_reject").await;
    assert_eq!(line["path"], "/chat?access_token=REDACTED");
    for l in gw.log_lines() {
        assert!(!l.to_string().contains("SECRETVALUE"), "{l}");
    }
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// With `trusted_proxies` set, a PROXY header is believed only from those peers: from any
/// other, the connection is refused (and counted) like a bad header.
#[tokio::test]
async fn proxy_headers_are_believed_only_from_trusted_proxies() {
    let (backend, mut accepted) = raw_backend().await;
    let yaml = |trusted: &str| {
        format!(
            r#"
listeners: [{{ name: lb, bind: "127.0.0.1:0", proxy_protocol: true }}]
admin: {{ bind: "127.0.0.1:0" }}
trusted_proxies: [{trusted}]
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: /chat }}, upstream: app }}
"#
        )
    };
    let mut req = b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 443\r\n".to_vec();
    req.extend(upgrade("/chat", ""));
    // 127.0.0.1 is not a trusted proxy here.
    let gw = spawn_gateway(&yaml("10.0.0.0/8")).await;
    let failures = || async {
        let scrape = scrape(&gw).await;
        metric(&scrape, "wsgate_proxy_protocol_failures_total", &[])
    };
    let before = failures().await;
    let resp = raw_request(gw.addr(), &req).await;
    assert!(resp.is_empty(), "{resp}");
    assert!(failures().await >= before + 1.0);
    assert!(
        accepted.try_recv().is_err(),
        "nothing may reach the upstream"
    );
    assert!(gw.log_lines().is_empty(), "{:?}", gw.log_lines());
    // It is here: the header names the client.
    let gw = spawn_gateway(&yaml("127.0.0.0/8")).await;
    let (_s, _, head) = admitted(&gw, &mut accepted, &req).await;
    assert_eq!(
        header_value(&head, "x-forwarded-for").as_deref(),
        Some("203.0.113.9")
    );
}

/// A PROXY v1 or v2 header on an `http2` listener: the bytes read past the header and the
/// bytes the h2c sniff looked at go to the HTTP/1.1 parser and then the relay in order,
/// none lost or repeated, whether they come in one segment or one byte per segment.
async fn proxy_then_sniff_keeps_every_byte_in_order(byte_at_a_time: bool, v2: bool) {
    let (backend, mut accepted) = raw_backend().await;
    let yaml = format!(
        r#"
listeners: [{{ name: lb, bind: "127.0.0.1:0", proxy_protocol: true, http2: true }}]
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}] }}
routes:
  - {{ name: chat, match: {{ path_prefix: / }}, upstream: app }}
"#
    );
    let gw = spawn_gateway(&yaml).await;
    let mut req = if v2 {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        h.extend_from_slice(&12u16.to_be_bytes());
        h.extend_from_slice(&[203, 0, 113, 9, 10, 0, 0, 1]);
        h.extend_from_slice(&5555u16.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        h
    } else {
        b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 443\r\n".to_vec()
    };
    // The sniff reads the first 24 bytes: the path spans that boundary, so a byte lost or
    // repeated there shows in the request line the upstream gets.
    const PATH: &str = "/0123456789abcdefghijklmnopqrstuvwxyz";
    req.extend(upgrade(PATH, ""));
    let frames: Vec<u8> = (0..20u8)
        .flat_map(|i| client_frame(0x82, &[i; 7]))
        .collect();
    req.extend(&frames);
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.set_nodelay(true).unwrap_or_else(|e| panic!("{e}"));
    if byte_at_a_time {
        for b in &req {
            s.write_all(&[*b]).await.unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    } else {
        s.write_all(&req).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, up_head) = next_accepted(&mut accepted).await;
    assert_eq!(
        header_value(&up_head, "x-forwarded-for").as_deref(),
        Some("203.0.113.9"),
        "{up_head}"
    );
    assert!(
        up_head.starts_with(&format!("GET {PATH} HTTP/1.1\r\n")),
        "{up_head}"
    );
    for i in 0..20u8 {
        let got = tokio::time::timeout(PATIENCE, read_frame(&mut up))
            .await
            .unwrap_or_else(|_| panic!("frame {i}: none in time"));
        assert_eq!(got, Some((0x82, vec![i; 7])), "frame {i}");
    }
}

#[tokio::test]
async fn proxy_v1_then_h2c_sniff_keeps_bytes_in_one_segment() {
    proxy_then_sniff_keeps_every_byte_in_order(false, false).await
}

#[tokio::test]
async fn proxy_v1_then_h2c_sniff_keeps_bytes_byte_at_a_time() {
    proxy_then_sniff_keeps_every_byte_in_order(true, false).await
}

#[tokio::test]
async fn proxy_v2_then_h2c_sniff_keeps_bytes_in_one_segment() {
    proxy_then_sniff_keeps_every_byte_in_order(false, true).await
}

#[tokio::test]
async fn proxy_v2_then_h2c_sniff_keeps_bytes_byte_at_a_time() {
    proxy_then_sniff_keeps_every_byte_in_order(true, true).await
}
