//! Plain HTTP on WebSocket routes (SPEC §2 `http`, §3 "HTTP alongside WebSockets"): a real
//! hyper backend that serves plain requests and WebSocket upgrades on one port, behind
//! wsgate, driven by hyper's client (keep-alive, streamed bodies, an upgrade on a
//! connection that carried requests before).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

type TestBody = BoxBody<Bytes, std::io::Error>;

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into()).map_err(|e| match e {}).boxed()
}

/// A backend named `name`: `/slow` never answers, `/sink` reads the whole body and
/// answers its length, a POST elsewhere echoes its body as it streams, any other request
/// answers who served it and the headers it got; an upgrade becomes a WebSocket that
/// answers `who` with the name and echoes anything else. Counts requests it received.
struct HttpBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

async fn http_backend(name: &'static str) -> HttpBackend {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(answer(name, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    HttpBackend { addr, requests }
}

async fn answer(name: &'static str, req: Request<Incoming>) -> Response<TestBody> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    if req.headers().contains_key(http::header::UPGRADE) {
        let key = header("sec-websocket-key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        tokio::spawn(async move {
            let Ok(up) = hyper::upgrade::on(req).await else {
                return;
            };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(t) if t.as_str() == "who" => Message::text(name),
                    Message::Text(_) | Message::Binary(_) => msg,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    match (req.method().as_str(), req.uri().path()) {
        (_, "/app/slow") => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full(""))
        }
        (_, "/app/big") => Response::new(full(vec![b'x'; 32 << 20])),
        (_, "/app/sink") => {
            let n = match req.into_body().collect().await {
                Ok(b) => b.to_bytes().len(),
                Err(_) => 0,
            };
            Response::new(full(format!("{n}")))
        }
        ("POST", _) => Response::new(req.into_body().map_err(std::io::Error::other).boxed()),
        _ => {
            let text = format!(
                "backend={name} method={} target={} host={} xff={} xfproto={} xfhost={} xrid={} forged={}",
                req.method(),
                req.uri(),
                header("host"),
                header("x-forwarded-for"),
                header("x-forwarded-proto"),
                header("x-forwarded-host"),
                header("x-request-id"),
                header("x-real-ip"),
            );
            Response::builder()
                .header("x-backend", name)
                .body(full(text))
                .unwrap_or_else(|e| panic!("{e}"))
        }
    }
}

/// Waits until `wsgate_http_requests_total{route="app",code}` reaches `want`.
async fn await_http_requests(gw: &TestGateway, code: &str, want: f64) {
    let labels = [("route", "app"), ("code", code)];
    await_metric(gw, "wsgate_http_requests_total", &labels, want).await;
}

/// An empty-bodied GET of `path`.
fn empty_get(path: &str) -> Request<TestBody> {
    get(path)
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A hyper client connection to the gateway (upgrades allowed).
async fn client(addr: SocketAddr) -> SendRequest<TestBody> {
    let tcp = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

async fn send(sender: &mut SendRequest<TestBody>, req: Request<TestBody>) -> Response<Incoming> {
    let sent = async {
        sender.ready().await?;
        sender.send_request(req).await
    };
    tokio::time::timeout(PATIENCE, sent)
        .await
        .unwrap_or_else(|_| panic!("no answer within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn body_text(resp: Response<Incoming>) -> String {
    let body = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("body not within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&body.to_bytes()).into_owned()
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "gw.test")
}

fn upgrade_request(path: &str) -> Request<TestBody> {
    get(path)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Upgrades on `sender`'s connection and asks the WebSocket who serves it.
async fn upgrade_and_ask(mut sender: SendRequest<TestBody>, path: &str) -> String {
    let resp = send(&mut sender, upgrade_request(path)).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up = tokio::time::timeout(PATIENCE, hyper::upgrade::on(resp))
        .await
        .unwrap_or_else(|_| panic!("upgrade not within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Client, None).await;
    ws.send(Message::text("who"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reply = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .unwrap_or_else(|_| panic!("no WebSocket reply within {PATIENCE:?}"));
    match reply {
        Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn config(backends: &[SocketAddr], extra_route: &str, limits: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr: \"{b}\" }}"))
        .collect();
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ {limits} }}
upstreams:
  app: {{ backends: [{}], connect_timeout: 2s, sticky: {{ key: "query:sid" }} }}
routes:
  - {{ name: app, match: {{ path_prefix: /app }}, upstream: app, http: proxy {extra_route} }}
  - {{ name: ws-only, match: {{ path_prefix: / }}, upstream: app }}
"#,
        list.join(", ")
    )
}

#[tokio::test]
async fn get_and_streamed_post_relayed_then_upgrade_on_the_same_connection() {
    let backend = http_backend("one").await;
    let gw = spawn_gateway(&config(&[backend.addr], "", "")).await;
    let mut sender = client(gw.addr()).await;

    // 1. A GET: the backend sees the forwarded headers, never the forged ones.
    let req = get("/app/info?x=1")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-backend"], "one");
    let text = body_text(resp).await;
    assert!(
        text.contains("backend=one method=GET target=/app/info?x=1"),
        "{text}"
    );
    assert!(text.contains("host=gw.test"), "{text}");
    assert!(text.contains("xff=127.0.0.1 "), "{text}");
    assert!(text.contains("xfproto=http "), "{text}");
    assert!(text.contains("xfhost=gw.test "), "{text}");
    assert!(text.contains("forged=-"), "{text}");
    assert!(!text.contains("xrid=- "), "{text}");

    // 2. A POST on the same connection, streamed both ways: the first chunk comes back
    // before the second is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    let req = Request::post("/app/echo")
        .header("host", "gw.test")
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap_or_else(|e| panic!("{e}"));
    tx.send(Bytes::from_static(b"first;"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .unwrap_or_else(|_| panic!("first chunk not relayed while the request streams"));
    let first = first
        .and_then(Result::ok)
        .and_then(|f| f.into_data().ok())
        .unwrap_or_default();
    assert_eq!(&first[..], b"first;");
    tx.send(Bytes::from_static(b"second"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(tx);
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .unwrap_or_else(|_| panic!("rest not within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&rest.to_bytes()[..], b"second");

    // 3. The WebSocket upgrade, still on the same client connection.
    assert_eq!(upgrade_and_ask(sender, "/app/ws").await, "one");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 3);

    // One `http` line per request, and the metric.
    let line = gw
        .log_line(|l| l["event"] == "http" && l["path"] == "/app/echo")
        .await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "app");
    assert_eq!(line["http"], "1.1");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert_eq!(line["upstream"], backend.addr.to_string());
    assert_eq!(line["c2u"]["bytes"], 12);
    assert_eq!(line["u2c"]["bytes"], 12);
    assert!(line["duration_ms"].is_u64(), "{line}");
    assert!(line["conn_id"].as_str().is_some_and(is_conn_id), "{line}");
    let get_line = gw
        .log_line(|l| l["event"] == "http" && l["path"] == "/app/info?x=1")
        .await;
    assert_eq!(
        get_line["conn_id"], line["conn_id"],
        "one client connection"
    );
    await_http_requests(&gw, "200", 2.0).await;
}

#[tokio::test]
async fn polls_and_the_upgrade_of_one_sid_reach_the_same_backend() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let rate = "handshakes_per_ip: { rate: 1000, per: 1s, burst: 1000 }";
    let gw = spawn_gateway(&config(&[a.addr, b.addr], "", rate)).await;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..12 {
        let path = format!("/app/socket.io/?EIO=4&transport=polling&sid=s{i}");
        let mut sender = client(gw.addr()).await;
        let mut polled = Vec::new();
        for _ in 0..2 {
            let req = get(&path).body(full("")).unwrap_or_else(|e| panic!("{e}"));
            let resp = send(&mut sender, req).await;
            let name = resp.headers()["x-backend"]
                .to_str()
                .unwrap_or("")
                .to_owned();
            let _ = body_text(resp).await;
            polled.push(name);
        }
        assert_eq!(polled[0], polled[1], "sid s{i}");
        // The upgrade on a new connection, as socket.io does.
        let ws_path = format!("/app/socket.io/?EIO=4&transport=websocket&sid=s{i}");
        let over_ws = upgrade_and_ask(client(gw.addr()).await, &ws_path).await;
        assert_eq!(over_ws, polled[0], "sid s{i}");
        seen.insert(over_ws);
    }
    assert_eq!(seen.len(), 2, "twelve sids all on one backend: {seen:?}");
}

#[tokio::test]
async fn http_refuse_still_answers_426() {
    let backend = http_backend("one").await;
    let gw = spawn_gateway(&config(&[backend.addr], "", "")).await;
    let resp = raw_request(
        gw.addr(),
        b"GET /other HTTP/1.1\r\nHost: gw.test\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    let (status, body) = status_and_body(&resp);
    assert_eq!(status, 426, "{resp}");
    assert_eq!(body.lines().next(), Some("upgrade_required"), "{body}");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
}

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn token(sub: &str) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": 4_000_000_000u64 });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn plain_requests_meet_the_origin_and_token_checks() {
    let backend = http_backend("one").await;
    let route = format!(
        r#", origins: ["https://app.example.com"], auth: {{ jwt: {{ from: ["header:Authorization"], keys: [{{ alg: HS256, secret: "{SECRET}" }}], forward_claims: {{ sub: X-User-Id }} }} }}"#
    );
    let gw = spawn_gateway(&config(&[backend.addr], &route, "")).await;
    let bearer = format!("Bearer {}", token("alice"));
    let cases = [
        (
            Some("https://evil.example.com"),
            Some(bearer.as_str()),
            403,
            "origin",
        ),
        (Some("https://app.example.com"), None, 401, "token"),
        (None, Some("Bearer nope"), 401, "token"),
    ];
    for (origin, auth, want, reason) in cases {
        let mut sender = client(gw.addr()).await;
        let mut req = get("/app/info");
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = send(
            &mut sender,
            req.body(full("")).unwrap_or_else(|e| panic!("{e}")),
        )
        .await;
        assert_eq!(resp.status().as_u16(), want, "{origin:?} {auth:?}");
        assert_eq!(body_text(resp).await.lines().next(), Some(reason));
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
    let mut sender = client(gw.addr()).await;
    let req = get("/app/info")
        .header("origin", "https://app.example.com")
        .header("authorization", bearer.as_str())
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = body_text(resp).await;
    // No Origin at all (a same-origin GET): the Origin check applies only when present.
    let req = get("/app/info")
        .header("authorization", bearer.as_str())
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = body_text(resp).await;
    assert!(text.contains("backend=one"), "{text}");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 2);
    // An upgrade without Origin is still refused on this route.
    let mut sender = client(gw.addr()).await;
    let mut req = upgrade_request("/app/ws");
    req.headers_mut().insert(
        "authorization",
        http::HeaderValue::from_str(&bearer).unwrap_or_else(|e| panic!("{e}")),
    );
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let line = gw
        .log_line(|l| l["event"] == "http" && l["status"] == 200)
        .await;
    assert_eq!(line["subject"], "alice");
    let reject = gw
        .log_line(|l| l["event"] == "ws_reject" && l["proxy_reason"] == "origin")
        .await;
    assert_eq!(reject["status"], 403);
}

#[tokio::test]
async fn bodies_over_max_request_body_get_413() {
    let backend = http_backend("one").await;
    let gw = spawn_gateway(&config(&[backend.addr], "", "max_request_body: 1KiB")).await;

    // Declared too large: refused before any connect.
    let head = "POST /app/sink HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 2000\r\n\r\n";
    let resp = raw_request(gw.addr(), head.as_bytes()).await;
    let (status, body) = status_and_body(&resp);
    assert_eq!(status, 413, "{resp}");
    assert_eq!(body.trim(), "body_too_large");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);

    // Chunked: cut once past the limit.
    let mut sender = client(gw.addr()).await;
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 512])))),
    );
    let req = Request::post("/app/sink")
        .header("host", "gw.test")
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body_text(resp).await.trim(), "body_too_large");

    // Within the limit: relayed.
    let mut sender = client(gw.addr()).await;
    let req = Request::post("/app/sink")
        .header("host", "gw.test")
        .body(full(vec![b'y'; 1024]))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "1024");
    let line = gw
        .log_line(|l| l["event"] == "http" && l["proxy_reason"] == "body_too_large")
        .await;
    assert_eq!(line["status"], 413);
    await_http_requests(&gw, "413", 2.0).await;
}

#[tokio::test]
async fn a_backend_silent_past_http_timeout_gets_504() {
    let backend = http_backend("one").await;
    let gw = spawn_gateway(&config(&[backend.addr], "", "http_timeout: 300ms")).await;
    let mut sender = client(gw.addr()).await;
    let started = tokio::time::Instant::now();
    let req = empty_get("/app/slow");
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(body_text(resp).await.trim(), "upstream_timeout");
    let line = gw
        .log_line(|l| l["event"] == "http" && l["status"] == 504)
        .await;
    assert_eq!(line["proxy_reason"], "upstream_timeout");
    assert_eq!(line["upstream"], serde_json::Value::Null);
    await_http_requests(&gw, "504", 1.0).await;
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer("ka", req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let gw = spawn_gateway(&config(&[addr], "", "")).await;
    for _ in 0..5 {
        // A new client connection each time: the upstream side is still reused.
        let mut sender = client(gw.addr()).await;
        let req = get("/app/info")
            .body(full(""))
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = send(&mut sender, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = body_text(resp).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn each_kept_alive_request_counts_against_the_handshake_rate() {
    let backend = http_backend("one").await;
    let rate = "handshakes_per_ip: { rate: 1, per: 1h, burst: 3 }";
    let gw = spawn_gateway(&config(&[backend.addr], "", rate)).await;
    let mut sender = client(gw.addr()).await;
    // The accept counted once (the first request's), then each later request once more.
    for _ in 0..3 {
        let req = get("/app/info")
            .body(full(""))
            .unwrap_or_else(|e| panic!("{e}"));
        let resp = send(&mut sender, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = body_text(resp).await;
    }
    let req = get("/app/info")
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut sender, req).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body_text(resp).await.lines().next(), Some("ip_rate"));
    assert_eq!(backend.requests.load(Ordering::SeqCst), 3);
    // The connection's per-IP place is released once it closes.
    drop(sender);
    eventually(
        "the per-IP place released",
        PATIENCE,
        async || match localhost_places(&gw) {
            0 => Ok(()),
            n => Err(n),
        },
    )
    .await;
}

#[tokio::test]
async fn a_kept_alive_connection_waits_handshake_timeout_for_its_next_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = http_backend("one").await;
    let gw = spawn_gateway(&config(&[backend.addr], "", "handshake_timeout: 300ms")).await;
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"GET /app/info HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = tokio::time::Instant::now();
    let mut out = Vec::new();
    // The answer, then the close once the connection has idled past the bound.
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "still open after {PATIENCE:?}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("backend=one"), "{text}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_long_poll_does_not_hold_a_pending_handshake_slot() {
    let backend = http_backend("one").await;
    let limits = "max_pending_handshakes: 1, http_timeout: 30s";
    let gw = spawn_gateway(&config(&[backend.addr], "", limits)).await;
    // A long poll the backend never answers, in progress.
    let mut polling = client(gw.addr()).await;
    let req = get("/app/slow")
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"));
    let poll = tokio::spawn(async move { polling.send_request(req).await.map(|r| r.status()) });
    eventually(
        "the long poll at the backend",
        PATIENCE,
        async || match backend.requests.load(Ordering::SeqCst) {
            1 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    await_metric(&gw, "wsgate_handshakes_pending", &[], 0.0).await;
    // The only handshake slot is free: another client is served meanwhile.
    let mut other = client(gw.addr()).await;
    let req = get("/app/info")
        .body(full(""))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = send(&mut other, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!poll.is_finished());
    poll.abort();
}

/// A client that asks for a large answer and never reads it is cut at `http_timeout`:
/// its per-IP place and the backend connection are freed, and its line says
/// `slow_consumer` (a slow reader must not hold them for ever).
#[tokio::test]
async fn a_client_that_never_reads_its_answer_is_cut_at_http_timeout() {
    let backend = http_backend("one").await;
    let gw = spawn_gateway(&config(
        &[backend.addr],
        "",
        "http_timeout: 1s, handshake_timeout: 300ms",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"GET /app/big HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Never read: the answer (32 MiB) fills the socket buffers.
    let line = gw
        .log_line(|l| l["event"] == "http" && l["path"] == "/app/big")
        .await;
    assert_eq!(line["proxy_reason"], "slow_consumer", "{line}");
    eventually(
        "the per-IP place freed",
        PATIENCE,
        async || match localhost_places(&gw) {
            0 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    drop(s);
}

/// A backend that answers before it has read the request body keeps reading it; its
/// connection must not serve another request before that body is sent whole, so a
/// request right after is not stuck behind it.
#[tokio::test]
async fn a_connection_still_taking_a_request_body_is_not_reused() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    // Answers each request at its head, then reads whatever follows without answering
    // again: a second request on the same connection would never be answered.
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    let gw = spawn_gateway(&config(&[addr], "", "handshake_timeout: 30s")).await;
    // A: a chunked POST with one chunk, its answer read, the body never finished.
    let mut a = TcpStream::connect(gw.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    a.write_all(b"POST /app/up HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = [0u8; 256];
    let n = tokio::time::timeout(PATIENCE, a.read(&mut got))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 200"));
    // B: a plain GET; stuck until A's connection closes if it reused A's backend one.
    // Let A's answer be wholly relayed first (its backend connection checked in, or not).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sender = client(gw.addr()).await;
    let req = empty_get("/app/b");
    // Reusing A's backend connection would wait for A's body until A is closed (30 s).
    let answered = tokio::time::timeout(PATIENCE, send(&mut sender, req)).await;
    assert!(
        matches!(&answered, Ok(r) if r.status() == StatusCode::OK),
        "the second request waited behind the first's body"
    );
    drop(a);
}
