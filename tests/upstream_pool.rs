//! Sticky upstream pools end to end (SPEC §2 `upstreams`, issue 6): same key → same
//! backend across connections and across gateway instances; active health checks move
//! only a dead backend's keys; passive failover before the 101; `no_backend`; drain and
//! undrain over the admin API; bounded load; DNS changes through an injected resolver.

mod support;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::net::TcpStream;
use tokio::time::Instant;
use wsgate::config::Config;
use wsgate::observe::access_log::Sink;
use wsgate::upstream::pool::PoolOptions;
use wsgate::upstream::resolve::{Lookup, Resolver};

/// Keys used for placement checks.
const KEYS: usize = 30;

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn pool_config(backends: &[&str], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ addr: \"{a}\" }}"))
        .collect();
    format!(
        r#"
listeners: [{{ name: public, bind: "127.0.0.1:0" }}]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ max_connections_per_ip: 1000, handshakes_per_ip: {{ rate: 10000, per: 1s, burst: 10000 }} }}
upstreams:
  app:
    backends: [{}]
    sticky: {{ key: "query:room" }}
    connect_timeout: 1s
{extra}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, upstream: app }}
"#,
        list.join(", ")
    )
}

async fn backends(n: usize) -> Vec<NamedBackend> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(NamedBackend::start(&format!("b{i}")).await);
    }
    out
}

fn addrs(bs: &[NamedBackend]) -> Vec<String> {
    bs.iter().map(|b| b.addr.to_string()).collect()
}

/// Connects with sticky key `room` (`None`: no key) and returns the backend's name and
/// the live connection; `Err` with the response head when the gateway refused.
async fn open(gw: SocketAddr, room: Option<&str>) -> Result<(String, TcpStream), String> {
    let path = room.map_or("/".to_owned(), |r| format!("/?room={r}"));
    let (mut s, head) = raw_upgrade(gw, &path, "").await;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(head);
    }
    let (_, name) = read_frame(&mut s)
        .await
        .unwrap_or_else(|| panic!("no name frame"));
    Ok((String::from_utf8_lossy(&name).into_owned(), s))
}

async fn who(gw: SocketAddr, room: &str) -> String {
    match open(gw, Some(room)).await {
        Ok((name, _)) => name,
        Err(head) => panic!("refused: {head}"),
    }
}

async fn placement(gw: SocketAddr) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..KEYS {
        out.push(who(gw, &format!("room-{i}")).await);
    }
    out
}

/// Waits (bounded) until `pred` holds for upstream `app`'s snapshot.
async fn await_state(
    gw: &TestGateway,
    what: &str,
    pred: impl Fn(&[(String, bool, bool, u64)]) -> bool,
) {
    eventually(what, PATIENCE, async || {
        let state = state(gw);
        if pred(&state) { Ok(()) } else { Err(state) }
    })
    .await;
}

/// (addr, up, draining, active) per backend of upstream `app`.
fn state(gw: &TestGateway) -> Vec<(String, bool, bool, u64)> {
    gw.gw
        .shared
        .pools
        .snapshot()
        .into_iter()
        .filter(|u| u.upstream == "app")
        .flat_map(|u| u.backends)
        .map(|b| (b.addr, b.up, b.draining, b.active))
        .collect()
}

#[tokio::test]
async fn same_key_same_backend_across_connections_and_instances() {
    let bs = backends(3).await;
    let config = pool_config(
        &addrs(&bs).iter().map(String::as_str).collect::<Vec<_>>(),
        "",
    );
    let one = spawn_gateway(&config).await;
    let two = spawn_gateway(&config).await;
    let first = placement(one.addr()).await;
    assert_eq!(placement(one.addr()).await, first);
    assert_eq!(placement(two.addr()).await, first);
    let used: std::collections::BTreeSet<&String> = first.iter().collect();
    assert_eq!(
        used.len(),
        3,
        "30 keys should reach all 3 backends: {first:?}"
    );
    // The access log names the chosen backend and the key's kind, never its value.
    let (name, s) = open(one.addr(), Some("room-0"))
        .await
        .unwrap_or_else(|h| panic!("{h}"));
    drop(s);
    let addr = bs
        .iter()
        .find(|b| b.name == name)
        .map(|b| b.addr.to_string());
    let line = one
        .log_line(|l| l["event"] == "ws_close" && l["path"] == "/?room=room-0")
        .await;
    assert_eq!(line["upstream"].as_str(), addr.as_deref());
    assert_eq!(
        line["sticky"],
        serde_json::json!({"key": "query", "fallback": false})
    );
    // No key: the client IP is used, and the log says so.
    drop(open(one.addr(), None).await);
    let line = one
        .log_line(|l| l["event"] == "ws_close" && l["path"] == "/")
        .await;
    assert_eq!(
        line["sticky"],
        serde_json::json!({"key": "query", "fallback": true})
    );
}

#[tokio::test]
async fn a_killed_backend_is_marked_down_in_time_and_only_its_keys_move() {
    // The ports are held for the whole test, so the victim can be revived on its own.
    let places: Vec<Reserved> = (0..3).map(|_| Reserved::on(LOCALHOST)).collect();
    let bs: Vec<NamedBackend> = places
        .iter()
        .enumerate()
        .map(|(i, p)| NamedBackend::start_at(&format!("b{i}"), p))
        .collect();
    let interval_ms = 100;
    let unhealthy_after = 2;
    let extra = format!(
        "    health_check: {{ interval: {interval_ms}ms, timeout: 100ms, unhealthy_after: {unhealthy_after}, healthy_after: 1 }}"
    );
    let config = pool_config(
        &addrs(&bs).iter().map(String::as_str).collect::<Vec<_>>(),
        &extra,
    );
    let gw = spawn_gateway(&config).await;
    let before = placement(gw.addr()).await;
    let victim = &bs[1];
    assert!(before.contains(&victim.name), "{before:?}");
    victim.kill();
    let killed = Instant::now();
    let addr = victim.addr.to_string();
    await_state(&gw, "victim marked down", |s| {
        s.iter().any(|(a, up, _, _)| *a == addr && !up)
    })
    .await;
    // Checks run every interval; the bound allows one interval of phase plus scheduling
    // slack on a busy machine.
    let bound = Duration::from_millis(interval_ms * (unhealthy_after + 1)) + Duration::from_secs(1);
    assert!(killed.elapsed() <= bound, "{:?}", killed.elapsed());
    let after = placement(gw.addr()).await;
    for (b, a) in before.iter().zip(&after) {
        if *b == victim.name {
            assert_ne!(*a, victim.name);
        } else {
            assert_eq!(a, b, "a key of a live backend moved");
        }
    }
    // Back up (a new process on the same port, which the test held) → its keys come home.
    let _revived = NamedBackend::start_at("b1", &places[1]);
    await_state(&gw, "victim up again", |s| {
        s.iter().all(|(_, up, _, _)| *up)
    })
    .await;
    assert_eq!(placement(gw.addr()).await, before);
}

#[tokio::test]
async fn passive_failover_when_a_backend_refuses() {
    let live = NamedBackend::start("live").await;
    let dead = NamedBackend::start("dead").await;
    dead.kill();
    eventually("the killed backend refusing", PATIENCE, async || {
        match tokio::net::TcpStream::connect(dead.addr).await {
            Ok(_) => Err("still accepts"),
            Err(_) => Ok(()),
        }
    })
    .await;
    let config = pool_config(&[&live.addr.to_string(), &dead.addr.to_string()], "");
    let gw = spawn_gateway(&config).await;
    // Every key gets a 101 from the live backend, including those whose first choice
    // refuses (no health checks configured).
    for i in 0..KEYS {
        assert_eq!(who(gw.addr(), &format!("room-{i}")).await, "live");
    }
    let snap = gw.gw.shared.pools.snapshot();
    let errors: u64 = snap[0]
        .backends
        .iter()
        .filter(|b| b.addr == dead.addr.to_string())
        .map(|b| b.connect_errors)
        .sum();
    assert!(errors >= 1, "{snap:?}");
}

#[tokio::test]
async fn no_healthy_backend_is_503_no_backend() {
    let bs = backends(2).await;
    let extra =
        "    health_check: { interval: 50ms, timeout: 50ms, unhealthy_after: 1, healthy_after: 1 }";
    let config = pool_config(
        &addrs(&bs).iter().map(String::as_str).collect::<Vec<_>>(),
        extra,
    );
    let gw = spawn_gateway(&config).await;
    for b in &bs {
        b.kill();
    }
    await_state(&gw, "all down", |s| s.iter().all(|(_, up, _, _)| !up)).await;
    let head = open(gw.addr(), Some("x")).await.err().unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let line = gw.log_line(|l| l["event"] == "ws_reject").await;
    assert_eq!(line["proxy_reason"], "no_backend");
    assert_eq!(line["upstream"], serde_json::Value::Null);
}

#[tokio::test]
async fn drain_and_undrain_over_the_admin_api() {
    let bs = backends(3).await;
    let config = pool_config(
        &addrs(&bs).iter().map(String::as_str).collect::<Vec<_>>(),
        "",
    );
    let gw = spawn_gateway(&config).await;
    let admin = gw.gw.admin.unwrap_or_else(|| panic!("no admin"));
    let before = placement(gw.addr()).await;
    let target = bs
        .iter()
        .find(|b| before.contains(&b.name))
        .unwrap_or_else(|| panic!("no backend used"));
    // Without `close_within`, a connection on the target stays up through the drain.
    let key = before.iter().position(|n| *n == target.name).unwrap_or(0);
    let (_, mut held) = open(gw.addr(), Some(&format!("room-{key}")))
        .await
        .unwrap_or_else(|h| panic!("{h}"));
    let path = format!("/upstreams/app/backends/{}/drain", target.addr);
    let resp = admin_request(admin, "POST", &path).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"draining\":true"), "{resp}");
    let during = placement(gw.addr()).await;
    for (b, d) in before.iter().zip(&during) {
        if *b == target.name {
            assert_ne!(*d, target.name);
        } else {
            assert_eq!(d, b, "a key of another backend moved");
        }
    }
    let listing = admin_request(admin, "GET", "/upstreams").await;
    assert!(listing.contains("\"draining\":true"), "{listing}");
    // The held connection still relays (its close is answered).
    send_client_close(&mut held, 1000).await;
    assert_eq!(read_close_code(&mut held).await, Some(1000));
    let path = format!("/upstreams/app/backends/{}/undrain", target.addr);
    let resp = admin_request(admin, "POST", &path).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(placement(gw.addr()).await, before);
    // Wrong method, unknown names, bad window.
    let resp = admin_request(admin, "GET", &path).await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    let resp = admin_request(admin, "POST", "/upstreams/nope/backends/1.2.3.4:5/drain").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let resp = admin_request(admin, "POST", "/upstreams/app/backends/1.2.3.4:5/drain").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let bad = format!(
        "/upstreams/app/backends/{}/drain?close_within=soon",
        target.addr
    );
    let resp = admin_request(admin, "POST", &bad).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

/// A gateway in front of `n` backends with `conns` connections spread over them by room;
/// the target is the backend of the first connection.
struct Spread {
    gw: TestGateway,
    admin: SocketAddr,
    backends: Vec<NamedBackend>,
    held: Vec<(String, TcpStream)>,
    target: String,
    addr: SocketAddr,
}

async fn spread(n: usize, conns: usize) -> Spread {
    let backends = backends(n).await;
    let config = pool_config(
        &addrs(&backends)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "",
    );
    let gw = spawn_gateway(&config).await;
    let admin = gw.gw.admin.unwrap_or_else(|| panic!("no admin"));
    let mut held = Vec::new();
    for i in 0..conns {
        held.push(
            open(gw.addr(), Some(&format!("room-{i}")))
                .await
                .unwrap_or_else(|h| panic!("{h}")),
        );
    }
    let target = held[0].0.clone();
    let addr = backends
        .iter()
        .find(|b| b.name == target)
        .map(|b| b.addr)
        .unwrap_or_else(|| panic!("unknown backend {target}"));
    Spread {
        gw,
        admin,
        backends,
        held,
        target,
        addr,
    }
}

/// `close_within` closes the drained backend's established connections with 1012 (1001
/// upstream), spread over the window; connections to other backends are untouched.
#[tokio::test]
async fn drain_with_close_within_closes_only_that_backends_connections() {
    let Spread {
        gw,
        admin,
        backends: _bs,
        mut held,
        target,
        addr,
    } = spread(3, 30).await;
    let path = format!("/upstreams/app/backends/{addr}/drain?close_within=300ms");
    let resp = admin_request(admin, "POST", &path).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (mut on_target, mut elsewhere) = (0, 0);
    for (name, s) in &mut held {
        if *name == target {
            assert_eq!(read_close_code(s).await, Some(1012), "{name}");
            on_target += 1;
        } else {
            // Still relaying: its own close is answered by the backend.
            send_client_close(s, 1000).await;
            assert_eq!(read_close_code(s).await, Some(1000), "{name}");
            elsewhere += 1;
        }
    }
    assert!(
        on_target >= 1 && elsewhere >= 1,
        "{on_target} / {elsewhere}"
    );
    let line = gw
        .log_line(|l| l["event"] == "ws_close" && l["proxy_reason"] == "drain")
        .await;
    assert_eq!(line["upstream"], addr.to_string());
}

/// An undrain calls off the closes a `close_within` drain scheduled and has not sent yet:
/// after the window, the target's connections still relay. (The first close may fall
/// within the few ms before the undrain lands, so one 1012 is tolerated; without the
/// undrain all of them get one.)
#[tokio::test]
async fn undrain_calls_off_the_scheduled_closes() {
    let Spread {
        gw: _gw,
        admin,
        backends: _bs,
        mut held,
        target,
        addr,
    } = spread(2, 20).await;
    let drain = format!("/upstreams/app/backends/{addr}/drain?close_within=2s");
    let resp = admin_request(admin, "POST", &drain).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let undrain = format!("/upstreams/app/backends/{addr}/undrain");
    let resp = admin_request(admin, "POST", &undrain).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Part of the scenario, not a wait: past the window (the closes are spread over it,
    // with jitter), to show that none of the called-off closes is sent.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (mut on_target, mut closed) = (0, 0);
    for (name, s) in &mut held {
        send_client_close(s, 1000).await;
        let code = read_close_code(s).await;
        if *name == target {
            on_target += 1;
            closed += usize::from(code == Some(1012));
        } else {
            assert_eq!(code, Some(1000), "{name}: still relaying");
        }
    }
    assert!(
        on_target >= 2,
        "{on_target} connection(s) on the drained backend"
    );
    assert!(
        closed <= 1,
        "{closed} of {on_target} closed after the undrain"
    );
}

#[tokio::test]
async fn bounded_load_caps_the_hottest_backend() {
    let bs = backends(4).await;
    let extra = "    balance: { bounded_load: 1.25 }";
    let config = pool_config(
        &addrs(&bs).iter().map(String::as_str).collect::<Vec<_>>(),
        extra,
    );
    let gw = spawn_gateway(&config).await;
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(
            open(gw.addr(), Some("hot"))
                .await
                .unwrap_or_else(|h| panic!("{h}")),
        );
    }
    let state = state(&gw);
    let max = state.iter().map(|s| s.3).max().unwrap_or(0);
    assert_eq!(state.iter().map(|s| s.3).sum::<u64>(), 40, "{state:?}");
    // ceil(1.25 × 40 / 4) = 13
    assert!(max <= 13, "{state:?}");
    drop(held);
    await_state(&gw, "leases released", |s| s.iter().all(|b| b.3 == 0)).await;
}

/// Names the test controls: `pool.test` → the IPs in the cell.
struct TestDns(Mutex<Vec<IpAddr>>);

impl Resolver for TestDns {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        let ips = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        Box::pin(async move {
            if host != "pool.test" {
                return Err(io::Error::other("unknown name"));
            }
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect())
        })
    }
}

#[tokio::test]
async fn dns_re_resolution_picks_up_a_changed_record() {
    // One port on both 127.0.0.1 and 127.0.0.2 (a name's records share the entry's port),
    // both held before anything is configured. Another process may hold the port on
    // 127.0.0.2 (an outgoing connection from it, say): then the next port is tried.
    let second_ip: IpAddr = [127, 0, 0, 2].into();
    let (first_place, second_place) = (0..50)
        .find_map(|_| {
            let first = Reserved::on(LOCALHOST);
            let second = Reserved::at(SocketAddr::new(second_ip, first.addr.port())).ok()?;
            Some((first, second))
        })
        .unwrap_or_else(|| panic!("no port free on both 127.0.0.1 and 127.0.0.2 in 50 tries"));
    let first = NamedBackend::start_at("first", &first_place);
    let second = NamedBackend::start_at("second", &second_place);
    let port = first.addr.port();
    let dns = Arc::new(TestDns(Mutex::new(vec![first.addr.ip()])));
    let yaml = pool_config(&[&format!("pool.test:{port}")], "");
    let config = Config::from_yaml_str_with_env(&yaml, "test.yaml", &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    let options = PoolOptions {
        resolver: dns.clone(),
        dns_refresh: Duration::from_millis(50),
    };
    let logs = Arc::new(Mutex::new(Vec::new()));
    let gw = wsgate::start_with(config, Sink::Memory(logs.clone()), options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway { gw, logs };
    assert_eq!(who(gw.addr(), "r").await, "first");
    if let Ok(mut ips) = dns.0.lock() {
        *ips = vec![second.addr.ip()];
    }
    let want = second.addr.to_string();
    await_state(&gw, "new record in the pool", |s| {
        s.len() == 1 && s[0].0 == want
    })
    .await;
    assert_eq!(who(gw.addr(), "r").await, "second");
    // Two records → two backends.
    if let Ok(mut ips) = dns.0.lock() {
        *ips = vec![first.addr.ip(), second.addr.ip()];
    }
    await_state(&gw, "both records in the pool", |s| s.len() == 2).await;
    let names: HashMap<String, usize> = {
        let mut m = HashMap::new();
        for i in 0..KEYS {
            *m.entry(who(gw.addr(), &format!("k{i}")).await).or_insert(0) += 1;
        }
        m
    };
    assert_eq!(names.len(), 2, "{names:?}");
}

/// A backend that upgrades like [`NamedBackend`], except that a request for a path
/// starting `/poison` makes it close the connection without answering (as a backend
/// that crashes on some request would).
fn poison_backend(name: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let place = Reserved::on(LOCALHOST);
    let listener = place.listener();
    let addr = place.addr;
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        let _place = place;
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let name = name.clone();
            conns.spawn(async move {
                let head = read_head(&mut s).await;
                if head.starts_with("GET /poison") {
                    return;
                }
                let key = header_value(&head, "sec-websocket-key").unwrap_or_default();
                let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                    key.as_bytes(),
                );
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.write_all(&server_frame(0x81, name.as_bytes())).await;
                while let Some((b0, payload)) = read_frame(&mut s).await {
                    if b0 & 0x0F == 0x8 {
                        let _ = s.write_all(&server_frame(0x88, &payload)).await;
                        return;
                    }
                }
            });
            while conns.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

/// Issue 16: a request that makes every backend close without answering used to count as
/// a failed connect on each; three of them took both backends out and clean clients got
/// 503 `no_backend`. Only failures to reach a backend count now, with active checks and
/// without.
#[tokio::test]
async fn requests_that_make_backends_close_take_none_out() {
    let checks =
        "    health_check: { interval: 1h, timeout: 1s, unhealthy_after: 2, healthy_after: 1 }";
    for extra in ["", checks] {
        let (a, _a) = poison_backend("a");
        let (b, _b) = poison_backend("b");
        let gw = spawn_gateway(&pool_config(&[&a.to_string(), &b.to_string()], extra)).await;
        for i in 0..6 {
            let (_, head) = raw_upgrade(gw.addr(), &format!("/poison?room={i}"), "").await;
            assert!(head.starts_with("HTTP/1.1 502"), "{extra:?}: {head}");
        }
        // Each poison request failed over to the other backend: both were reached.
        let snap = gw.gw.shared.pools.snapshot();
        let errors: Vec<u64> = snap[0].backends.iter().map(|b| b.connect_errors).collect();
        assert!(errors.iter().all(|&e| e >= 3), "{extra:?}: {snap:?}");
        assert!(
            state(&gw).iter().all(|(_, up, _, _)| *up),
            "{extra:?}: {:?}",
            state(&gw)
        );
        for i in 0..KEYS {
            let name = open(gw.addr(), Some(&format!("clean-{i}")))
                .await
                .unwrap_or_else(|head| panic!("{extra:?}: a clean client was refused: {head}"))
                .0;
            assert!(name == "a" || name == "b", "{name}");
        }
    }
}

/// `max_ejected` (default 50%): with both backends unreachable, passive detection takes
/// one out and keeps the other in, so clients get 502 `upstream_connect` (the backend
/// was tried), never 503 `no_backend`; at 100% both go out.
#[tokio::test]
async fn passive_ejection_never_takes_more_than_max_ejected_out() {
    for (extra, out, status, reason) in [
        ("", 1, "502", "upstream_connect"),
        ("    max_ejected: 100%", 2, "503", "no_backend"),
    ] {
        // Held, never listening: every connect is refused.
        let dead = [Reserved::on(LOCALHOST), Reserved::on(LOCALHOST)];
        let list = [dead[0].addr.to_string(), dead[1].addr.to_string()];
        let gw = spawn_gateway(&pool_config(&[&list[0], &list[1]], extra)).await;
        // 3 failures in a row take a backend out (no health checks); each request tries
        // both, so 6 requests give each backend more than enough failures.
        for i in 0..6 {
            let (_, head) = raw_upgrade(gw.addr(), &format!("/?room={i}"), "").await;
            assert!(head.starts_with("HTTP/1.1 50"), "{head}");
        }
        let now = state(&gw);
        assert_eq!(
            now.iter().filter(|(_, up, _, _)| !up).count(),
            out,
            "{extra:?}: {now:?}"
        );
        let (_, head) = raw_upgrade(gw.addr(), "/?room=last", "").await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{extra:?}: {head}"
        );
        let line = gw
            .log_line(|l| l["event"] == "ws_reject" && l["path"] == "/?room=last")
            .await;
        assert_eq!(line["proxy_reason"], reason, "{extra:?}");
    }
}
