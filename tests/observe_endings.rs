//! Every connection ending of SPEC §5, driven through real sockets, and the one `ws_close`
//! access-log line each leaves (SPEC §6): the whole field set (event, status, route,
//! upstream, close code/by/reason, `proxy_reason`, frame/message/byte counts where they are
//! deterministic, duration, `conn_id`, client address, pings, rate limiting), and the
//! matching `wsgate_closes_total{route,code,by}` sample (SPEC §7).
//! One table, [`ENDINGS`]: a row per ending, naming its scenario and the fields its line
//! and metric must carry, checked by one function ([`assert_ending`]); one test per row.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// No keepalive pings unless a test asks for them, so `pings` is deterministic.
const NO_PINGS: &str = "keepalive: { ping_interval: 0s }";

/// One listener, an admin listener, one route `chat` (`/`) to `backend`.
fn yaml(backend: SocketAddr, limits: &str, extra: &str) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ {limits} }}
{extra}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 1s }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    upstream: app
"#
    )
}

/// A gateway in front of a raw backend and one upgraded connection through it:
/// (client, upstream, gateway, backend address).
async fn pair(limits: &str, extra: &str) -> (TcpStream, TcpStream, TestGateway, SocketAddr) {
    let mut backend = None;
    let (client, up, gw) = pair_with(|b| {
        backend = Some(b);
        yaml(b, limits, extra)
    })
    .await;
    let backend = backend.unwrap_or_else(|| panic!("no backend address"));
    (client, up, gw, backend)
}

async fn send(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap_or_else(|e| panic!("{e}"));
}

/// What one ending must leave in its `ws_close` line.
struct Ending {
    code: u16,
    by: &'static str,
    /// `None`: not checked (SPEC does not name one).
    reason: Option<&'static str>,
    proxy_reason: Option<&'static str>,
    /// `[frames, messages, bytes]` per direction, when deterministic.
    c2u: Option<[u64; 3]>,
    u2c: Option<[u64; 3]>,
    /// One count, or a range where a ping may race the close.
    pings: RangeInclusive<u64>,
    rate_limited: u64,
}

impl Ending {
    /// The fields a row does not name.
    const BASE: Ending = Ending {
        code: 1000,
        by: "client",
        reason: None,
        proxy_reason: None,
        c2u: None,
        u2c: None,
        pings: 0..=0,
        rate_limited: 0,
    };
}

fn counts(v: &Value) -> [u64; 3] {
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} is not a count: {v}"))
    };
    [n("frames"), n("messages"), n("bytes")]
}

/// Waits for the connection's `ws_close` line, checks every field of it against `want`,
/// and checks that `wsgate_closes_total` counted the same code and side once.
async fn assert_ending(gw: &TestGateway, backend: SocketAddr, want: &Ending) -> Value {
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    let ctx = format!("{line}");
    assert_eq!(line["event"], "ws_close", "{ctx}");
    assert_eq!(line["status"], 101, "{ctx}");
    assert_eq!(line["listener"], "public", "{ctx}");
    assert_eq!(line["route"], "chat", "{ctx}");
    assert_eq!(line["upstream"], backend.to_string(), "{ctx}");
    assert!(
        line["conn_id"].as_str().is_some_and(is_conn_id),
        "conn_id: {ctx}"
    );
    assert!(
        line["ts"]
            .as_str()
            .is_some_and(|t| t.len() == 24 && t.ends_with('Z')),
        "ts: {ctx}"
    );
    assert_eq!(line["client_ip"], "127.0.0.1", "{ctx}");
    assert!(line["client_port"].as_u64().is_some_and(|p| p > 0), "{ctx}");
    assert!(line["duration_ms"].is_u64(), "duration_ms: {ctx}");
    assert_eq!(line["tls"], Value::Null, "{ctx}");
    assert_eq!(line["request_id"], Value::Null, "{ctx}");
    assert_eq!(line["close"]["code"], want.code, "close.code: {ctx}");
    assert_eq!(line["close"]["by"], want.by, "close.by: {ctx}");
    if let Some(reason) = want.reason {
        assert_eq!(line["close"]["reason"], reason, "close.reason: {ctx}");
    }
    match want.proxy_reason {
        Some(r) => assert_eq!(line["proxy_reason"], r, "proxy_reason: {ctx}"),
        None => assert_eq!(line["proxy_reason"], Value::Null, "proxy_reason: {ctx}"),
    }
    if let Some(c2u) = want.c2u {
        assert_eq!(
            counts(&line["c2u"]),
            c2u,
            "c2u [frames, messages, bytes]: {ctx}"
        );
    }
    if let Some(u2c) = want.u2c {
        assert_eq!(
            counts(&line["u2c"]),
            u2c,
            "u2c [frames, messages, bytes]: {ctx}"
        );
    }
    assert!(
        line["pings"]
            .as_u64()
            .is_some_and(|p| want.pings.contains(&p)),
        "pings, want {:?}: {ctx}",
        want.pings
    );
    assert_eq!(
        line["rate_limited"], want.rate_limited,
        "rate_limited: {ctx}"
    );
    if *want.pings.end() == 0 {
        assert_eq!(line["rtt_ms"], Value::Null, "rtt_ms without pings: {ctx}");
    }
    // The metric names the same code (bucketed) and side.
    let code = want.code.to_string();
    let s = scrape(gw).await;
    let closes = metric(
        &s,
        "wsgate_closes_total",
        &[("route", "chat"), ("code", &code), ("by", want.by)],
    );
    assert_eq!(
        closes, 1.0,
        "wsgate_closes_total{{route=chat,code={code},by={}}} after {ctx}",
        want.by
    );
    assert_eq!(
        metric(&s, "wsgate_connections_active", &[("route", "chat")]),
        0.0
    );
    line
}

/// A masked client frame's wire size for a payload under 126 bytes.
const fn cw(payload: u64) -> u64 {
    2 + 4 + payload
}

/// An unmasked server frame's wire size for a payload under 126 bytes.
const fn sw(payload: u64) -> u64 {
    2 + payload
}

// === The table: every ending, the scenario that drives it, and what it must leave ===

/// What a scenario leaves for the checks.
struct Ended {
    gw: TestGateway,
    /// The backend's address, logged as `upstream`.
    backend: SocketAddr,
    /// The credential the client sent, if any (never in the line).
    token: Option<String>,
}

impl Ended {
    fn new(gw: TestGateway, backend: SocketAddr) -> Ended {
        Ended {
            gw,
            backend,
            token: None,
        }
    }
}

type Scenario = fn() -> Pin<Box<dyn Future<Output = Ended>>>;

/// Checks of a row's own, on its line and a scrape taken after the common ones.
type Also = fn(&Ended, &Value, &prometheus_parse::Scrape);

/// One row: the test that runs it, the scenario, and what the ending must leave.
struct Case {
    test: &'static str,
    scenario: Scenario,
    want: Ending,
    also: Option<Also>,
}

const ENDINGS: &[Case] = &[
    Case {
        test: "client_normal_close_is_logged_by_client_with_its_reason",
        scenario: || Box::pin(client_normal_close()),
        want: Ending {
            code: 1000,
            by: "client",
            reason: Some("bye"),
            c2u: Some([2, 1, cw(5) + cw(5)]),
            u2c: Some([2, 1, sw(5) + sw(2)]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "upstream_normal_close_is_logged_by_upstream_with_its_reason",
        scenario: || Box::pin(upstream_normal_close()),
        want: Ending {
            code: 1000,
            by: "upstream",
            reason: Some("done"),
            c2u: Some([2, 1, cw(3) + cw(2)]),
            u2c: Some([2, 1, sw(5) + sw(6)]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "client_protocol_violation_is_logged_1002_protocol",
        scenario: || Box::pin(client_violation(server_frame(0x81, b"hi"), 1002)),
        want: violation(1002, "protocol error", "protocol"),
        also: None,
    },
    Case {
        test: "invalid_utf8_close_reason_is_logged_1007_protocol",
        scenario: || {
            Box::pin(client_violation(
                client_frame(0x88, &[0x03, 0xE8, 0xFF, 0xFE]),
                1007,
            ))
        },
        want: violation(1007, "invalid UTF-8", "protocol"),
        also: None,
    },
    Case {
        test: "client_frame_over_size_is_logged_1009_too_big",
        scenario: || Box::pin(client_violation(client_frame(0x82, &[7u8; 1025]), 1009)),
        want: violation(1009, "message too big", "too_big"),
        also: None,
    },
    Case {
        test: "fragment_timeout_is_logged_1008_fragment_timeout",
        scenario: || Box::pin(fragment_timeout()),
        want: Ending {
            code: 1008,
            by: "proxy",
            reason: Some("fragment timeout"),
            proxy_reason: Some("fragment_timeout"),
            c2u: Some([1, 1, cw(4)]),
            // The proxy's 1008 goes out in place of the upstream's close reply.
            u2c: Some([1, 0, sw(2 + 16)]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "rate_limit_is_logged_1008_rate_limit",
        scenario: || Box::pin(rate_limit()),
        want: Ending {
            code: 1008,
            by: "proxy",
            reason: Some("rate limit"),
            proxy_reason: Some("rate_limit"),
            c2u: Some([2, 2, 2 * cw(1)]),
            rate_limited: 1,
            ..Ending::BASE
        },
        also: Some(|_, _, s| {
            assert_eq!(
                metric(s, "wsgate_rate_limited_total", &[("route", "chat")]),
                1.0
            );
        }),
    },
    Case {
        test: "token_expiry_is_logged_4001_token_expired_with_the_subject",
        scenario: || Box::pin(token_expiry()),
        want: Ending {
            code: 4001,
            by: "proxy",
            reason: Some("token expired"),
            proxy_reason: Some("token_expired"),
            c2u: Some([0, 0, 0]),
            u2c: Some([0, 0, 0]),
            ..Ending::BASE
        },
        also: Some(|ended, line, _| {
            assert_eq!(line["subject"], "user-7");
            let token = ended.token.as_deref().unwrap_or_else(|| panic!("no token"));
            assert!(!line.to_string().contains(token));
        }),
    },
    Case {
        test: "dead_peer_is_logged_1006_by_proxy_dead_peer",
        scenario: || Box::pin(dead_peer()),
        want: Ending {
            code: 1006,
            by: "proxy",
            proxy_reason: Some("dead_peer"),
            c2u: Some([0, 0, 0]),
            pings: 1..=1,
            ..Ending::BASE
        },
        also: Some(|_, line, s| {
            assert_eq!(line["rtt_ms"], Value::Null);
            assert_eq!(
                metric(s, "wsgate_dead_peers_total", &[("route", "chat")]),
                1.0
            );
            assert_eq!(metric(s, "wsgate_pings_total", &[]), 1.0);
        }),
    },
    Case {
        test: "answered_pings_are_logged_with_their_round_trip_times",
        scenario: || Box::pin(answered_pings()),
        want: Ending {
            code: 1000,
            by: "client",
            c2u: Some([1, 0, cw(2)]),
            // A third ping may have gone out between the second pong and the close.
            pings: 2..=3,
            ..Ending::BASE
        },
        also: Some(|_, line, s| {
            let rtt = &line["rtt_ms"];
            let (min, avg, max) = (
                rtt["min"].as_f64().unwrap_or(-1.0),
                rtt["avg"].as_f64().unwrap_or(-1.0),
                rtt["max"].as_f64().unwrap_or(-1.0),
            );
            assert!(0.0 <= min && min <= avg && avg <= max, "{line}");
            assert!(max < 2000.0, "{line}");
            let pings = line["pings"].as_u64().unwrap_or(0);
            assert_eq!(metric(s, "wsgate_pings_total", &[]), pings as f64);
            assert_eq!(metric(s, "wsgate_ping_rtt_seconds_count", &[]), 2.0);
        }),
    },
    Case {
        test: "idle_timeout_is_logged_1000_by_proxy_idle",
        scenario: || Box::pin(idle_timeout()),
        want: Ending {
            code: 1000,
            by: "proxy",
            reason: Some("idle"),
            proxy_reason: Some("idle"),
            c2u: Some([0, 0, 0]),
            u2c: Some([0, 0, 0]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "client_tcp_vanishing_is_logged_1006_by_client",
        scenario: || Box::pin(client_tcp_vanishing()),
        want: Ending {
            code: 1006,
            by: "client",
            c2u: Some([1, 1, cw(1)]),
            u2c: Some([0, 0, 0]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "upstream_protocol_violation_is_logged_1014_by_proxy_protocol",
        scenario: || Box::pin(upstream_protocol_violation()),
        want: Ending {
            code: 1014,
            by: "proxy",
            proxy_reason: Some("protocol"),
            c2u: Some([0, 0, 0]),
            u2c: Some([1, 1, sw(4)]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "upstream_tcp_vanishing_is_logged_with_the_1014_the_client_got",
        scenario: || Box::pin(upstream_tcp_vanishing()),
        want: Ending {
            code: 1014,
            by: "upstream",
            c2u: Some([0, 0, 0]),
            u2c: Some([0, 0, 0]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "slow_consumer_is_logged_1006_by_proxy_slow_consumer",
        scenario: || Box::pin(slow_consumer()),
        want: Ending {
            code: 1006,
            by: "proxy",
            proxy_reason: Some("slow_consumer"),
            c2u: Some([0, 0, 0]),
            ..Ending::BASE
        },
        also: None,
    },
    Case {
        test: "drain_is_logged_1012_by_proxy_drain",
        scenario: || Box::pin(drain()),
        want: Ending {
            code: 1012,
            by: "proxy",
            reason: Some("service restart"),
            proxy_reason: Some("drain"),
            c2u: Some([0, 0, 0]),
            u2c: Some([0, 0, 0]),
            ..Ending::BASE
        },
        also: None,
    },
];

/// Runs the row of test `test`: its scenario, then the shared checks of its line and
/// metric, then its own.
async fn run_row(test: &str) {
    let case = ENDINGS
        .iter()
        .find(|c| c.test == test)
        .unwrap_or_else(|| panic!("no row for {test}"));
    let ended = (case.scenario)().await;
    let line = assert_ending(&ended.gw, ended.backend, &case.want).await;
    if let Some(also) = case.also {
        also(&ended, &line, &scrape(&ended.gw).await);
    }
}

/// One test per row (so each runs, and fails, on its own), and a check that the rows and
/// the tests are the same list.
macro_rules! row_tests {
    ($($test:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                run_row(stringify!($test)).await;
            }
        )*

        #[test]
        fn every_row_has_its_test() {
            let rows: Vec<&str> = ENDINGS.iter().map(|c| c.test).collect();
            assert_eq!(rows, [$(stringify!($test)),*]);
        }
    };
}

row_tests!(
    client_normal_close_is_logged_by_client_with_its_reason,
    upstream_normal_close_is_logged_by_upstream_with_its_reason,
    client_protocol_violation_is_logged_1002_protocol,
    invalid_utf8_close_reason_is_logged_1007_protocol,
    client_frame_over_size_is_logged_1009_too_big,
    fragment_timeout_is_logged_1008_fragment_timeout,
    rate_limit_is_logged_1008_rate_limit,
    token_expiry_is_logged_4001_token_expired_with_the_subject,
    dead_peer_is_logged_1006_by_proxy_dead_peer,
    answered_pings_are_logged_with_their_round_trip_times,
    idle_timeout_is_logged_1000_by_proxy_idle,
    client_tcp_vanishing_is_logged_1006_by_client,
    upstream_protocol_violation_is_logged_1014_by_proxy_protocol,
    upstream_tcp_vanishing_is_logged_with_the_1014_the_client_got,
    slow_consumer_is_logged_1006_by_proxy_slow_consumer,
    drain_is_logged_1012_by_proxy_drain,
);

// === The scenarios ===

/// Client says goodbye first; the upstream answers; both directions counted exactly.
async fn client_normal_close() -> Ended {
    let (mut client, mut up, gw, backend) = pair("", NO_PINGS).await;
    send(&mut client, &client_frame(0x81, b"hello")).await;
    assert_eq!(read_frame(&mut up).await, Some((0x81, b"hello".to_vec())));
    send(&mut up, &server_frame(0x81, b"world")).await;
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x81, b"world".to_vec()))
    );
    send(
        &mut client,
        &client_frame(0x88, &close_payload(1000, "bye")),
    )
    .await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    assert_eq!(read_close_code(&mut client).await, Some(1000));
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// The upstream says goodbye first.
async fn upstream_normal_close() -> Ended {
    let (mut client, mut up, gw, backend) = pair("", NO_PINGS).await;
    send(&mut client, &client_frame(0x82, b"abc")).await;
    assert_eq!(read_frame(&mut up).await, Some((0x82, b"abc".to_vec())));
    send(&mut up, &server_frame(0x81, b"world")).await;
    send(&mut up, &server_frame(0x88, &close_payload(1000, "done"))).await;
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x81, b"world".to_vec()))
    );
    assert_eq!(read_close_code(&mut client).await, Some(1000));
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// A client breaking the protocol (unmasked frame, invalid close reason, oversize) gets
/// its code; the log says the proxy ended it and why. Only the frame before the bad one
/// was relayed upstream; the upstream's reply before its close still reached the client.
async fn client_violation(bad: Vec<u8>, code: u16) -> Ended {
    let (mut client, mut up, gw, backend) =
        pair("max_frame_size: 1KiB, max_message_size: 2KiB", NO_PINGS).await;
    let mut bytes = client_frame(0x81, b"ok");
    bytes.extend_from_slice(&bad);
    send(&mut client, &bytes).await;
    assert_eq!(read_frame(&mut up).await, Some((0x81, b"ok".to_vec())));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send(&mut up, &server_frame(0x81, b"late")).await;
    send_server_close(&mut up, 1001).await;
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x81, b"late".to_vec()))
    );
    assert_eq!(read_close_code(&mut client).await, Some(code));
    drop(up);
    send_client_close(&mut client, code).await;
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// What a client violation leaves: `code` and `reason` to the client, by the proxy.
const fn violation(code: u16, reason: &'static str, proxy_reason: &'static str) -> Ending {
    Ending {
        code,
        by: "proxy",
        reason: Some(reason),
        proxy_reason: Some(proxy_reason),
        c2u: Some([1, 1, cw(2)]),
        // "late", then the client's code in place of the upstream's close reply.
        u2c: Some([2, 1, sw(4) + sw(2 + reason.len() as u64)]),
        ..Ending::BASE
    }
}

/// A fragmented message left unfinished: 1008 `fragment timeout`.
async fn fragment_timeout() -> Ended {
    let (mut client, mut up, gw, backend) = pair("fragment_timeout: 200ms", NO_PINGS).await;
    send(&mut client, &client_frame(0x01, b"part")).await;
    assert_eq!(read_frame(&mut up).await, Some((0x01, b"part".to_vec())));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    assert_eq!(read_close_code(&mut client).await, Some(1008));
    drop(up);
    send_client_close(&mut client, 1008).await;
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// Over the message budget with `on_exceed: close`: 1008 `rate limit`, `rate_limited` 1,
/// and the rate-limit counter moves too.
async fn rate_limit() -> Ended {
    let (mut client, mut up, gw, backend) = pair(
        "messages: { rate: 1, per: 10s, burst: 2, on_exceed: close }",
        NO_PINGS,
    )
    .await;
    let mut bytes = Vec::new();
    for i in 0..4u8 {
        bytes.extend(client_frame(0x81, &[b'0' + i]));
    }
    send(&mut client, &bytes).await;
    for i in 0..2u8 {
        assert_eq!(read_frame(&mut up).await, Some((0x81, vec![b'0' + i])));
    }
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    assert_eq!(read_close_code(&mut client).await, Some(1008));
    drop(up);
    send_client_close(&mut client, 1008).await;
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

const SECRET: &str = "observe-test-secret";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A token that expires mid-connection (`close_on_expiry`): 4001 `token expired`, and the
/// token's subject is logged.
async fn token_expiry() -> Ended {
    let (backend_addr, mut accepted) = raw_backend().await;
    let yaml = yaml(backend_addr, "", NO_PINGS).replace(
        "    upstream: app\n",
        &format!(
            "    upstream: app\n    auth:\n      jwt:\n        from: [\"header:Authorization\"]\n        keys: [{{ alg: HS256, secret: \"{SECRET}\" }}]\n        leeway: 0s\n        close_on_expiry: true\n"
        ),
    );
    let gw = spawn_gateway(&yaml).await;
    let token = encode(
        &Header::default(),
        &serde_json::json!({ "sub": "user-7", "exp": unix_now() + 2 }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut client, head) = raw_upgrade(
        gw.addr(),
        "/",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = next_accepted(&mut accepted).await;
    assert_eq!(read_close_code(&mut client).await, Some(4001));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_client_close(&mut client, 4001).await;
    send_server_close(&mut up, 1001).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended {
        gw,
        backend: backend_addr,
        token: Some(token),
    }
}

/// A client that never answers the proxy's ping: its TCP is cut (1006 for it), `dead_peer`,
/// one ping and no RTT; `wsgate_dead_peers_total` moves.
async fn dead_peer() -> Ended {
    let (mut client, mut up, gw, backend) = pair(
        "",
        "keepalive: { ping_interval: 200ms, pong_timeout: 300ms }",
    )
    .await;
    assert_eq!(read_frame(&mut client).await.map(|f| f.0), Some(0x89));
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    assert!(closes_tcp(&mut client).await);
    send_server_close(&mut up, 1001).await;
    drop(up);
    Ended::new(gw, backend)
}

/// Answered pings are counted and timed: `pings` and `rtt_ms {min ≤ avg ≤ max}`.
async fn answered_pings() -> Ended {
    let (mut client, mut up, gw, backend) =
        pair("", "keepalive: { ping_interval: 100ms, pong_timeout: 2s }").await;
    for _ in 0..2 {
        let (b0, payload) = read_frame(&mut client)
            .await
            .unwrap_or_else(|| panic!("no ping"));
        assert_eq!(b0, 0x89);
        send(&mut client, &client_frame(0x8A, &payload)).await;
    }
    // Stop the pings racing the close: close at once after the second pong.
    send_client_close(&mut client, 1000).await;
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_server_close(&mut up, 1000).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// No data either way for `idle_timeout`: 1000 `idle` to both, by the proxy.
async fn idle_timeout() -> Ended {
    let (mut client, mut up, gw, backend) = pair("idle_timeout: 200ms", NO_PINGS).await;
    assert_eq!(read_close_code(&mut client).await, Some(1000));
    assert_eq!(read_close_code(&mut up).await, Some(1000));
    send_client_close(&mut client, 1000).await;
    send_server_close(&mut up, 1000).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// The client's TCP vanishes without a close: 1006, by the client, no proxy reason.
async fn client_tcp_vanishing() -> Ended {
    let (mut client, mut up, gw, backend) = pair("", NO_PINGS).await;
    send(&mut client, &client_frame(0x82, b"x")).await;
    assert_eq!(read_frame(&mut up).await, Some((0x82, b"x".to_vec())));
    drop(client);
    assert_eq!(read_close_code(&mut up).await, Some(1001));
    send_server_close(&mut up, 1001).await;
    assert!(closes_tcp(&mut up).await);
    drop(up);
    Ended::new(gw, backend)
}

/// An upstream that breaks the protocol (masked frame): 1014 to the client, by the proxy.
async fn upstream_protocol_violation() -> Ended {
    let (mut client, mut up, gw, backend) = pair("", NO_PINGS).await;
    send(&mut up, &server_frame(0x81, b"fine")).await;
    send(&mut up, &client_frame(0x81, b"masked")).await;
    assert_eq!(
        read_frame(&mut client).await,
        Some((0x81, b"fine".to_vec()))
    );
    assert_eq!(read_close_code(&mut client).await, Some(1014));
    assert_eq!(read_close_code(&mut up).await, Some(1002));
    send_client_close(&mut client, 1014).await;
    send_server_close(&mut up, 1002).await;
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// The upstream's TCP vanishes without a close: the client is sent 1014 (SPEC §5), and
/// `close.code` is what the client observed (README; `wsgate_closes_total`'s HELP: "by
/// close code sent to the client").
async fn upstream_tcp_vanishing() -> Ended {
    let (mut client, up, gw, backend) = pair("", NO_PINGS).await;
    drop(up);
    assert_eq!(read_close_code(&mut client).await, Some(1014));
    send_client_close(&mut client, 1014).await;
    assert!(closes_tcp(&mut client).await);
    drop(client);
    Ended::new(gw, backend)
}

/// Upgrades with a tiny receive buffer, so a client that stops reading stalls quickly.
async fn small_window_client(addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    sock.set_recv_buffer_size(4096)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut s = sock.connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    send(&mut s, req.as_bytes()).await;
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A client that stops reading: after `send_timeout` its TCP is cut (1006), by the proxy,
/// `slow_consumer`; the upstream gets 1001.
async fn slow_consumer() -> Ended {
    let (backend, mut accepted) = raw_backend().await;
    let gw = spawn_gateway(&yaml(backend, "send_timeout: 300ms", NO_PINGS)).await;
    let client = small_window_client(gw.addr()).await;
    let (mut up, _) = next_accepted(&mut accepted).await;
    let msg = server_frame(0x82, &vec![1u8; 60 * 1024]);
    for _ in 0..2048 {
        match tokio::time::timeout(Duration::from_millis(300), up.write_all(&msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // The proxy cuts the client and tells the upstream 1001 (after whatever frame is in
    // flight, so read until the close).
    let mut tail = Vec::new();
    let read_tail = async {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match up.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => tail.extend_from_slice(&buf[..n]),
            }
            if tail.windows(2).any(|w| w[0] == 0x88 && w[1] & 0x80 != 0) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(PATIENCE, read_tail).await;
    assert!(
        tail.windows(2).any(|w| w[0] == 0x88 && w[1] & 0x80 != 0),
        "upstream gets a masked close"
    );
    let _ = up
        .write_all(&server_frame(0x88, &close_payload(1001, "")))
        .await;
    drop((client, up));
    Ended::new(gw, backend)
}

/// A drain (SPEC §8): 1012 `service restart` to the client, 1001 upstream, `drain`.
async fn drain() -> Ended {
    let (mut client, mut up, gw, backend) = pair(
        "",
        &format!("{NO_PINGS}\ndrain: {{ spread: 200ms, timeout: 2s }}"),
    )
    .await;
    let peers = async {
        assert_eq!(read_close_code(&mut client).await, Some(1012));
        assert_eq!(read_close_code(&mut up).await, Some(1001));
        send_client_close(&mut client, 1012).await;
        send_server_close(&mut up, 1001).await;
        assert!(closes_tcp(&mut client).await);
    };
    let drained = async {
        tokio::time::timeout(PATIENCE, gw.gw.drain())
            .await
            .unwrap_or_else(|_| panic!("drain did not return"));
    };
    tokio::join!(peers, drained);
    drop((client, up));
    Ended::new(gw, backend)
}

// === Not an ending of its own: how an unusual code is bucketed ===

/// A close code outside the known set is counted as `code="other"`, and the log keeps
/// the real code.
#[tokio::test]
async fn unusual_close_code_is_logged_as_is_and_counted_as_other() {
    let (mut client, mut up, gw, backend) = pair("", NO_PINGS).await;
    send(
        &mut client,
        &client_frame(0x88, &close_payload(3999, "odd")),
    )
    .await;
    assert_eq!(read_close_code(&mut up).await, Some(3999));
    send_server_close(&mut up, 3999).await;
    assert_eq!(read_close_code(&mut client).await, Some(3999));
    drop(up);
    assert!(closes_tcp(&mut client).await);
    drop(client);
    let line = gw.log_line(|l| l["event"] == "ws_close").await;
    assert_eq!(line["close"]["code"], 3999);
    assert_eq!(line["close"]["reason"], "odd");
    assert_eq!(line["upstream"], backend.to_string());
    let s = scrape(&gw).await;
    assert_eq!(
        metric(
            &s,
            "wsgate_closes_total",
            &[("route", "chat"), ("code", "other"), ("by", "client")]
        ),
        1.0
    );
    assert_eq!(
        metric(&s, "wsgate_closes_total", &[("code", "3999")]),
        0.0,
        "no label value per raw code"
    );
}
