//! A fleet (SPEC §10): several gateways share one real Redis (Debian's `redis-server`,
//! started here on a free loopback port, no persistence). Fleet-wide caps per address and
//! per subject and the fleet-wide handshake rate; an instance killed with SIGKILL loses
//! its counts within its lease, and one restarted under the same name never
//! double-counts; revocations and admin closes reach every instance within a second;
//! Redis stopped (local fallback, or 503 `cluster`) and started again (counts converge);
//! a Redis that hangs or answers garbage never wedges a handshake or the relay.

// Only its h2c connection is used here.
#[allow(dead_code)]
#[path = "support/h2client.rs"]
mod h2client;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use support::redis_server::{Freezer, Redis, fake_redis, free_port};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "fleet-test-jwt-secret-of-32-bytes!!";
/// The tests' lease: short, so that crash safety is seen in about a second.
const LEASE: &str = "1s";

/// A prefix of its own per fleet, so that tests sharing nothing never meet in Redis.
fn prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One fleet test at a time: each runs several gateways and a Redis, and a handshake
/// starved of CPU past the 50 ms bound is (rightly) decided without Redis, which would
/// blur what a test counts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What most fleet tests start from: their turn, a fresh Redis, an echo backend and a key
/// prefix of their own.
struct Fleetbed {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    redis: Redis,
    backend: SocketAddr,
    p: String,
}

async fn fleetbed() -> Fleetbed {
    let _serial = ONE_AT_A_TIME.lock().await;
    Fleetbed {
        _serial,
        redis: Redis::start().await,
        backend: echo_backend().await,
        p: prefix(),
    }
}

fn jwt(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 600;
    let claims = serde_json::json!({ "sub": sub, "exp": exp });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// One instance's config: a listener and admin listener (`listen`, `admin`: `host:port`),
/// route `/` open, route `/user` behind a JWT, per-process limits far above the fleet's.
fn instance_yaml(
    listen: &str,
    admin: &str,
    backend: SocketAddr,
    redis_url: &str,
    name: &str,
    prefix: &str,
    cluster_extra: &str,
) -> String {
    format!(
        r#"
listeners: [{{ name: public, bind: "{listen}" }}]
admin: {{ bind: "{admin}" }}
limits: {{ max_connections_per_ip: 100, handshakes_per_ip: {{ rate: 1000, per: 1s, burst: 1000 }} }}
keepalive: {{ ping_interval: 0s }}
drain: {{ spread: 0s, timeout: 1s }}
upstreams:
  app: {{ backends: [{{ addr: "{backend}" }}], connect_timeout: 2s }}
routes:
  - name: user
    match: {{ path_prefix: /user }}
    upstream: app
    auth: {{ jwt: {{ from: ["query:access_token"], keys: [{{ alg: HS256, secret: "{SECRET}" }}] }} }}
  - {{ name: open, match: {{ path_prefix: / }}, upstream: app }}
cluster:
  redis: "{redis_url}"
  instance: "{name}"
  prefix: "{prefix}"
  lease: {LEASE}
  {cluster_extra}
"#
    )
}

/// An in-process instance, once registered with the fleet store.
async fn instance(
    backend: SocketAddr,
    redis_url: &str,
    name: &str,
    prefix: &str,
    extra: &str,
) -> TestGateway {
    let yaml = instance_yaml(
        "127.0.0.1:0",
        "127.0.0.1:0",
        backend,
        redis_url,
        name,
        prefix,
        extra,
    );
    let gw = spawn_gateway(&yaml).await;
    await_up(&gw, true).await;
    gw
}

async fn await_up(gw: &TestGateway, up: bool) {
    let fleet = gw.gw.shared.fleet.clone();
    eventually("the instance's fleet state", PATIENCE, async || match fleet
        .as_ref()
        .map(|f| f.is_up() && f.revocations_loaded())
    {
        Some(now) if now == up => Ok(()),
        other => Err(other),
    })
    .await;
}

/// The status of an upgrade of `path` on `addr`, and the stream (open when 101).
async fn upgrade(addr: SocketAddr, path: &str) -> (u16, tokio::net::TcpStream, String) {
    let (s, head) = raw_upgrade(addr, path, "").await;
    let (status, _) = status_and_body(&head);
    (status, s, head)
}

/// Opens an upgrade that must be 101.
async fn open(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let (status, s, head) = upgrade(addr, path).await;
    assert_eq!(status, 101, "{path} on {addr}: {head}");
    s
}

/// The status of an upgrade and, when refused, the reason word of its body (a 101 is
/// dropped at once: its body is the relay).
async fn refused(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let (mut s, head) = raw_upgrade(addr, path, "").await;
    let (status, _) = status_and_body(&head);
    if status == 101 {
        return (101, String::new());
    }
    let mut body = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut body)).await;
    // The reason word: the first line (a hint may follow).
    let body = String::from_utf8_lossy(&body);
    (status, body.lines().next().unwrap_or("").trim().to_owned())
}

fn addr(gw: &TestGateway) -> SocketAddr {
    gw.addr()
}

fn admin(gw: &TestGateway) -> SocketAddr {
    gw.gw.admin.unwrap_or_else(|| panic!("no admin"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_address_gets_exactly_its_fleet_cap_across_three_instances() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    let cap = "limits: { max_connections_per_ip: 4 }";
    let a = instance(backend, &redis.url(), "a", &p, cap).await;
    let b = instance(backend, &redis.url(), "b", &p, cap).await;
    let c = instance(backend, &redis.url(), "c", &p, cap).await;
    let all = [addr(&a), addr(&b), addr(&c)];
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(open(all[i % 3], "/").await);
    }
    // Each per-process cap is 100: only the fleet's count refuses the fifth, wherever.
    for at in all {
        assert_eq!(refused(at, "/").await, (429, "ip_cap".into()), "on {at}");
    }
    let line = b.log_line(|l| l["proxy_reason"] == "ip_cap").await;
    assert_eq!(line["instance"], "b", "{line}");
    let in_redis = redis.hget(&format!("{p}conns:a"), "i:127.0.0.1").await
        + redis.hget(&format!("{p}conns:b"), "i:127.0.0.1").await
        + redis.hget(&format!("{p}conns:c"), "i:127.0.0.1").await;
    assert_eq!(in_redis, 4, "the fleet counts exactly the live connections");
    // A connection that ends gives its place back at once (batched, never lost).
    drop(held.pop());
    let again = eventually(
        "a place freed by a closed connection",
        PATIENCE,
        async || match upgrade(all[2], "/").await {
            (101, s, _) => Ok(s),
            (status, _, head) => Err((status, head)),
        },
    )
    .await;
    assert_eq!(refused(all[0], "/").await, (429, "ip_cap".into()));
    drop((again, held));
    eventually("every place released in Redis", PATIENCE, async || {
        let n = redis.hget(&format!("{p}conns:a"), "i:127.0.0.1").await
            + redis.hget(&format!("{p}conns:b"), "i:127.0.0.1").await
            + redis.hget(&format!("{p}conns:c"), "i:127.0.0.1").await;
        if n == 0 { Ok(()) } else { Err(n) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_gets_its_fleet_cap_and_others_are_apart() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    let cap = "limits: { max_connections_per_subject: 2 }";
    let a = instance(backend, &redis.url(), "a", &p, cap).await;
    let b = instance(backend, &redis.url(), "b", &p, cap).await;
    let alice = format!("/user?access_token={}", jwt("alice"));
    let bob = format!("/user?access_token={}", jwt("bob"));
    let _one = open(addr(&a), &alice).await;
    let _two = open(addr(&b), &alice).await;
    assert_eq!(refused(addr(&a), &alice).await, (429, "subject_cap".into()));
    assert_eq!(refused(addr(&b), &alice).await, (429, "subject_cap".into()));
    let _bob = open(addr(&a), &bob).await;
    let _bob2 = open(addr(&b), &bob).await;
    // The route without a token has no subject: the subject cap does not apply.
    let _anon: Vec<_> = futures_util::future::join_all((0..3).map(|_| open(addr(&a), "/"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_rate_holds_fleet_wide() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    // Three handshakes, then one per hour: the per-process rate (1000/s) never decides.
    let rate = "limits: { handshakes_per_ip: { rate: 1, per: 1h, burst: 3 } }";
    let a = instance(backend, &redis.url(), "a", &p, rate).await;
    let b = instance(backend, &redis.url(), "b", &p, rate).await;
    drop(open(addr(&a), "/").await);
    drop(open(addr(&b), "/").await);
    drop(open(addr(&a), "/").await);
    for at in [addr(&b), addr(&a)] {
        let (status, _, head) = upgrade(at, "/").await;
        assert_eq!(status, 429, "{head}");
        assert!(head.contains("ip_rate") || header_value(&head, "retry-after").is_some());
        let retry: u64 = header_value(&head, "retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(retry > 3000, "Retry-After names the hour's refill: {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_instance_leaves_the_fleet_at_once() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    let cap = "limits: { max_connections_per_ip: 4 }";
    let a = instance(backend, &redis.url(), "a", &p, cap).await;
    let _held = [open(addr(&a), "/").await, open(addr(&a), "/").await];
    assert_eq!(
        redis.hget(&format!("{p}conns:a"), "~").await,
        1,
        "registered"
    );
    a.gw.drain().await;
    let mut c = redis.conn().await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{p}conns:a"))
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let member: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("{p}instances"))
        .arg("a")
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (exists, member),
        (0, None),
        "gone from the fleet before its lease"
    );
}

/// A gateway child process (the built binary) with its config in a scratch file.
struct Child {
    process: std::process::Child,
    addr: SocketAddr,
}

impl Child {
    async fn start(yaml_for: impl Fn(&str, &str) -> String, tag: &str) -> Child {
        let listen = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let dir = std::env::temp_dir().join(format!("wsgate-fleet-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("wsgate.yaml");
        std::fs::write(&file, yaml_for(&listen, &admin)).unwrap_or_else(|e| panic!("{e}"));
        let process = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--config")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("wsgate: {e}"));
        let addr: SocketAddr = listen.parse().unwrap_or_else(|e| panic!("{e}"));
        let admin: SocketAddr = admin.parse().unwrap_or_else(|e| panic!("{e}"));
        // Registered with the fleet: its metrics say so.
        eventually(
            "the child registered with the fleet",
            PATIENCE,
            async || {
                let resp = metrics_of(admin).await;
                if resp.contains("wsgate_cluster_up 1") {
                    Ok(())
                } else {
                    Err(resp.len())
                }
            },
        )
        .await;
        Child { process, addr }
    }

    fn kill9(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `/metrics` of an admin listener that may not listen yet (then empty).
async fn metrics_of(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(1), fetch)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_its_counts_within_its_lease_and_a_restart_never_double_counts() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    let cap = "limits: { max_connections_per_ip: 4 }";
    let url = redis.url();
    let yaml =
        |listen: &str, admin: &str| instance_yaml(listen, admin, backend, &url, "victim", &p, cap);
    let mut victim = Child::start(&yaml, "victim").await;
    let b = instance(backend, &redis.url(), "b", &p, cap).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open(victim.addr, "/").await);
    }
    assert_eq!(refused(addr(&b), "/").await, (429, "ip_cap".into()));
    victim.kill9();
    let killed = Instant::now();
    drop(held);
    // Within the lease (1 s) and a heartbeat of slack, the capped client is back.
    let back = eventually(
        "the killed instance's counts dropped",
        PATIENCE,
        async || match upgrade(addr(&b), "/").await {
            (101, s, _) => Ok(s),
            (status, _, _) => Err(status),
        },
    )
    .await;
    let after = killed.elapsed();
    assert!(
        after < Duration::from_millis(2500),
        "the counts outlived the lease: {after:?}"
    );
    // Restarted under the same name, holding two: the fleet counts 1 + 2, not 4 + 2.
    let mut again = Child::start(&yaml, "victim-again").await;
    let _two = [open(again.addr, "/").await, open(again.addr, "/").await];
    eventually(
        "the restarted instance's own two in Redis",
        PATIENCE,
        async || match redis.hget(&format!("{p}conns:victim"), "i:127.0.0.1").await {
            2 => Ok(()),
            n => Err(n),
        },
    )
    .await;
    let _fourth = open(addr(&b), "/").await;
    assert_eq!(refused(addr(&b), "/").await, (429, "ip_cap".into()));
    again.kill9();
    drop(back);
}

/// Reads frames until a close arrives; its code.
async fn close_code_of(s: &mut tokio::net::TcpStream) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(1), read_close_code(s))
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_instance_closes_and_refuses_on_every_instance() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    let a = instance(backend, &redis.url(), "a", &p, "").await;
    let b = instance(backend, &redis.url(), "b", &p, "").await;
    let alice = format!("/user?access_token={}", jwt("alice"));
    let bob = format!("/user?access_token={}", jwt("bob"));
    let mut on_a = open(addr(&a), &alice).await;
    let mut on_b = open(addr(&b), &alice).await;
    let mut bob_on_a = open(addr(&a), &bob).await;
    let revoked = admin_request(admin(&a), "POST", "/revoke?subject=alice&for=1h").await;
    assert_eq!(status_and_body(&revoked).0, 200, "{revoked}");
    // Within a second, on both (close_code_of waits at most 1 s each, concurrently).
    let (code_a, code_b) = tokio::join!(close_code_of(&mut on_a), close_code_of(&mut on_b));
    assert_eq!((code_a, code_b), (Some(4003), Some(4003)));
    for at in [addr(&a), addr(&b)] {
        assert_eq!(refused(at, &alice).await, (403, "revoked".into()), "{at}");
    }
    // An instance that joins later learns it from Redis.
    let c = instance(backend, &redis.url(), "c", &p, "").await;
    eventually(
        "the newcomer refuses alice",
        PATIENCE,
        async || match refused(addr(&c), &alice).await {
            (403, r) if r == "revoked" => Ok(()),
            other => Err(other),
        },
    )
    .await;
    // /connections/close on B closes bob's connection on A.
    let closed = admin_request(admin(&b), "POST", "/connections/close?subject=bob").await;
    assert_eq!(status_and_body(&closed).0, 200, "{closed}");
    assert_eq!(close_code_of(&mut bob_on_a).await, Some(4003));
    // Lifted on B: alice is welcome again everywhere.
    let lifted = admin_request(admin(&b), "DELETE", "/revoke?subject=alice").await;
    assert_eq!(status_and_body(&lifted).0, 200, "{lifted}");
    eventually(
        "alice admitted again on A",
        PATIENCE,
        async || match upgrade(addr(&a), &alice).await {
            (101, s, _) => Ok(s),
            (status, _, _) => Err(status),
        },
    )
    .await;
}

async fn cluster_metrics(gw: &TestGateway) -> (f64, f64) {
    let s = scrape(gw).await;
    (
        metric(&s, "wsgate_cluster_up", &[]),
        metric(&s, "wsgate_cluster_fallbacks_total", &[]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_falls_back_or_refuses_and_counts_converge_when_it_returns() {
    let Fleetbed {
        _serial,
        mut redis,
        backend,
        p,
    } = fleetbed().await;
    let cap = "limits: { max_connections_per_ip: 4 }";
    let local = instance(backend, &redis.url(), "local", &p, cap).await;
    let strict = instance(
        backend,
        &redis.url(),
        "strict",
        &p,
        &format!("on_unavailable: refuse\n  {cap}"),
    )
    .await;
    let mut held = vec![open(addr(&local), "/").await, open(addr(&local), "/").await];
    assert_eq!(cluster_metrics(&local).await, (1.0, 0.0));
    redis.stop();
    // No handshake waits on Redis longer than 50 ms: each is far below a second even
    // while the store is gone (the first finds out, the rest do not ask).
    for _ in 0..3 {
        let started = Instant::now();
        held.push(open(addr(&local), "/").await);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "a fallback handshake took {took:?}"
        );
    }
    // Local limits only: five on this address, over the fleet's four.
    assert_eq!(held.len(), 5);
    let (status, reason) = refused(addr(&strict), "/").await;
    assert_eq!((status, reason.as_str()), (503, "cluster"));
    let (up, fallbacks) = cluster_metrics(&local).await;
    assert_eq!(up, 0.0);
    assert!(fallbacks >= 3.0, "fallbacks counted: {fallbacks}");
    // Back (empty: it lost everything): the instance registers its five again.
    drop(held.pop());
    let _redis = Redis::start_on(redis.port).await;
    await_up(&local, true).await;
    await_up(&strict, true).await;
    eventually(
        "the counts converged to the four live ones",
        PATIENCE,
        async || {
            let n = _redis.hget(&format!("{p}conns:local"), "i:127.0.0.1").await;
            if n == 4 { Ok(()) } else { Err(n) }
        },
    )
    .await;
    assert_eq!(refused(addr(&strict), "/").await, (429, "ip_cap".into()));
    assert_eq!(cluster_metrics(&local).await.0, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_mid_connection_costs_a_handshake_at_most_the_bound() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let freezer = Freezer::start(redis.port).await;
    let backend = echo_backend().await;
    let p = prefix();
    let cap = "limits: { max_connections_per_ip: 4 }";
    let gw = instance(backend, &freezer.url(), "a", &p, cap).await;
    let mut ws = connect(&gw.url("/")).await;
    freezer.freeze(true);
    let started = Instant::now();
    let s = open(addr(&gw), "/").await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "the handshake waited on a hung Redis for {took:?}"
    );
    // The relay never asks Redis: the open connection echoes on.
    ws.send(Message::text("still here"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let echoed = tokio::time::timeout(PATIENCE, ws.next()).await;
    assert!(
        matches!(echoed, Ok(Some(Ok(Message::Text(ref t)))) if t.as_str() == "still here"),
        "{echoed:?}"
    );
    freezer.freeze(false);
    await_up(&gw, true).await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_redis_that_hangs_or_answers_garbage_never_wedges_a_handshake() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let backend = echo_backend().await;
    for (answer, what) in [
        (None, "hangs"),
        (
            Some(&b"garbage that is no RESP at all\r\n\x00\xff"[..]),
            "garbage",
        ),
        (Some(&b"-ERR nope\r\n"[..]), "errors"),
    ] {
        let fake = fake_redis(answer).await;
        let url = format!("redis://{fake}/0");
        for policy in ["local", "refuse"] {
            let yaml = instance_yaml(
                "127.0.0.1:0",
                "127.0.0.1:0",
                backend,
                &url,
                "a",
                &prefix(),
                &format!("on_unavailable: {policy}\n  limits: {{ max_connections_per_ip: 4 }}"),
            );
            let gw = spawn_gateway(&yaml).await;
            for _ in 0..3 {
                let started = Instant::now();
                let (status, _, head) = upgrade(addr(&gw), "/").await;
                let took = started.elapsed();
                let want = if policy == "local" { 101 } else { 503 };
                assert_eq!(status, want, "{what}, {policy}: {head}");
                assert!(
                    took < Duration::from_millis(500),
                    "{what}, {policy}: {took:?}"
                );
            }
            if policy == "local" {
                let mut ws = connect(&gw.url("/")).await;
                ws.send(Message::text("x"))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let echoed = tokio::time::timeout(PATIENCE, ws.next()).await;
                assert!(matches!(echoed, Ok(Some(Ok(_)))), "{what}: {echoed:?}");
            }
            assert_eq!(cluster_metrics(&gw).await.0, 0.0, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_handshake_costs_one_script_call() {
    let Fleetbed {
        _serial,
        redis,
        backend,
        p,
    } = fleetbed().await;
    let gw = instance(
        backend,
        &redis.url(),
        "a",
        &p,
        "limits: { max_connections_per_ip: 100, handshakes_per_ip: { rate: 1000, per: 1s } }",
    )
    .await;
    // The scripts are loaded by the first handshake (a NOSCRIPT answer, then SCRIPT LOAD).
    drop(open(addr(&gw), "/").await);
    let evalsha = async || {
        redis
            .command_calls()
            .await
            .into_iter()
            .find(|(n, _)| n == "evalsha")
            .map_or(0, |(_, c)| c)
    };
    let before = evalsha().await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(open(addr(&gw), "/").await);
    }
    let after = evalsha().await;
    // Ten admissions; heartbeats (one per lease / 3) may add a few.
    assert!(
        (10..=16).contains(&(after - before)),
        "EVALSHA calls for ten handshakes: {}",
        after - before
    );
}

/// The shipped fleet example (conf/fleet) and the commented Kubernetes option validate;
/// `--check` needs no Redis.
#[test]
fn the_fleet_examples_pass_check_without_redis() {
    let k8s = std::fs::read_to_string("conf/k8s/wsgate.yaml").unwrap_or_else(|e| panic!("{e}"));
    let uncommented: String = k8s
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if rest.starts_with("cluster:") || l.starts_with("#   ") => {
                l[2..].to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(uncommented.contains("\ncluster:\n"), "{uncommented}");
    let dir = std::env::temp_dir().join(format!("wsgate-fleet-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let k8s_file = dir.join("k8s.yaml");
    std::fs::write(&k8s_file, uncommented).unwrap_or_else(|e| panic!("{e}"));
    for file in [std::path::PathBuf::from("conf/fleet/wsgate.yaml"), k8s_file] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .arg("--check")
            .arg("--config")
            .arg(&file)
            .env("WSGATE_ADMIN_TOKEN", "a-long-random-token-from-a-secret")
            .env("WSGATE_INSTANCE", "wsgate-a")
            .env("POD_NAME", "wsgate-0")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{file:?}: {err}");
    }
}

/// An HTTP/2 client resets its extended CONNECT (RST_STREAM) while the fleet's script call
/// is in flight: hyper drops the stream's handshake, Redis still runs the call. The count
/// it took must come back at once (not after a re-registration), or the address stays
/// capped fleet-wide with no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_mid_call_leaves_no_count_in_redis() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = Redis::start().await;
    let freezer = Freezer::start(redis.port).await;
    let backend = echo_backend().await;
    let p = prefix();
    let yaml = instance_yaml(
        "127.0.0.1:0",
        "127.0.0.1:0",
        backend,
        &freezer.url(),
        "a",
        &p,
        "limits: { max_connections_per_ip: 1 }",
    )
    .replace(
        r#"bind: "127.0.0.1:0" }]"#,
        r#"bind: "127.0.0.1:0", http2: true }]"#,
    );
    let gw = spawn_gateway(&yaml).await;
    await_up(&gw, true).await;
    let mut h2 = h2client::connect_h2c(addr(&gw)).await;
    // Resets well within the 50 ms bound (a call cut at the bound is another path) and
    // late enough that the call was sent: Redis runs it when the freezer lets it through.
    for delay_ms in [15u64, 20, 25].repeat(3) {
        freezer.freeze(true);
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("http://localhost/")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"));
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        h2.send = tokio::time::timeout(PATIENCE, h2.send.clone().ready())
            .await
            .unwrap_or_else(|_| panic!("h2 not ready"))
            .unwrap_or_else(|e| panic!("{e}"));
        let (_response, mut stream) = h2
            .send
            .send_request(req, false)
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        stream.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(Duration::from_millis(3)).await;
        freezer.freeze(false);
        // Lets the call the freezer held reach Redis (the freezer looks every 5 ms; one
        // connection: it runs before any later handshake's).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Well within the periodic re-registration (ten leases): only a release can do it.
    eventually(
        "an upgrade under a cap of 1 with no connection",
        Duration::from_millis(1500),
        async || match refused(addr(&gw), "/").await {
            (101, _) => Ok(()),
            other => Err(other),
        },
    )
    .await;
    let key = format!("{p}conns:a");
    eventually(
        "no count left for an address without connections",
        PATIENCE,
        async || match redis.hget(&key, "i:127.0.0.1").await {
            0 => Ok(()),
            n => Err(n),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_while_redis_was_down_survives_its_return_and_reaches_the_fleet() {
    let Fleetbed {
        _serial,
        mut redis,
        backend,
        p,
    } = fleetbed().await;
    let a = instance(backend, &redis.url(), "a", &p, "").await;
    let alice = format!("/user?access_token={}", jwt("alice"));
    redis.stop();
    await_up(&a, false).await;
    let revoked = admin_request(admin(&a), "POST", "/revoke?subject=alice&for=1h").await;
    assert_eq!(status_and_body(&revoked).0, 503, "{revoked}");
    assert_eq!(refused(addr(&a), &alice).await, (403, "revoked".into()));
    let redis = Redis::start_on(redis.port).await;
    await_up(&a, true).await;
    // Written to the fleet store once it is back: still refused here, and by an
    // instance that joins now.
    let b = instance(backend, &redis.url(), "b", &p, "").await;
    for at in [addr(&a), addr(&b)] {
        eventually("alice refused", PATIENCE, async || {
            match refused(at, &alice).await {
                (403, r) if r == "revoked" => Ok(()),
                other => Err(other),
            }
        })
        .await;
    }
}
