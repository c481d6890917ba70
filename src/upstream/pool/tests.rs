use std::collections::HashMap;
use std::io;

use super::*;
use crate::config::Config;
use crate::upstream::resolve::Lookup;

/// Records the test sets; a missing name fails like NXDOMAIN.
#[derive(Default)]
struct FakeDns(Mutex<HashMap<String, Vec<SocketAddr>>>);

impl FakeDns {
    fn set(&self, host: &str, ips: &[&str]) {
        let addrs = ips.iter().map(|ip| format!("{ip}:0").parse().unwrap());
        if let Ok(mut m) = self.0.lock() {
            m.insert(host.to_owned(), addrs.collect());
        }
    }

    fn remove(&self, host: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(host);
        }
    }
}

impl Resolver for FakeDns {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        let found = self.0.lock().ok().and_then(|m| m.get(host).cloned());
        Box::pin(async move {
            match found {
                Some(addrs) => Ok(addrs
                    .into_iter()
                    .map(|a| SocketAddr::new(a.ip(), port))
                    .collect()),
                None => Err(io::Error::other("no such name")),
            }
        })
    }
}

fn config(upstream: &str) -> Config {
    let text = format!(
        "listeners: [{{ bind: \"127.0.0.1:0\" }}]\nupstreams:\n  up: {upstream}\nroutes: [{{ name: r, match: {{ path_prefix: / }}, upstream: up }}]\n"
    );
    Config::from_yaml_str_with_env(&text, "t.yaml", &|_| None).unwrap_or_else(|e| panic!("{e}"))
}

fn five_backends(extra: &str) -> Config {
    let list: Vec<String> = (1..=5)
        .map(|i| format!("{{ addr: \"10.0.0.{i}:9001\" }}"))
        .collect();
    config(&format!("{{ backends: [{}]{extra} }}", list.join(", ")))
}

async fn pools_for(config: &Config, dns: Arc<FakeDns>) -> Arc<Pools> {
    let options = PoolOptions {
        resolver: dns,
        // Long: these tests refresh by hand.
        dns_refresh: Duration::from_secs(3600),
    };
    Pools::start(config, None, options).await
}

fn pick(pool: &Pool, key: &str) -> Option<Lease> {
    pool.candidates(key.as_bytes(), pool.spec().bounded_load)
        .next()
}

fn pick_addr(pool: &Pool, key: &str) -> Option<String> {
    pick(pool, key).map(|l| l.backend().identity.clone())
}

fn placement(pool: &Pool, n: usize) -> Vec<Option<String>> {
    (0..n)
        .map(|i| pick_addr(pool, &format!("key-{i}")))
        .collect()
}

#[tokio::test]
async fn names_resolve_to_one_backend_per_record_and_follow_changes() {
    let dns = Arc::new(FakeDns::default());
    dns.set("chat.internal", &["10.1.0.2", "10.1.0.1"]);
    let config = config(
        "{ backends: [{ addr: \"chat.internal:9001\", weight: 3 }, { addr: \"10.0.0.9:9001\" }] }",
    );
    let pools = pools_for(&config, dns.clone()).await;
    let pool = pools.get("up").unwrap();
    let snap = pool.snapshot();
    let addrs: Vec<(&str, &str, u32)> = snap
        .backends
        .iter()
        .map(|b| (b.addr.as_str(), b.entry.as_str(), b.weight))
        .collect();
    assert_eq!(
        addrs,
        [
            ("10.0.0.9:9001", "10.0.0.9:9001", 1),
            ("10.1.0.1:9001", "chat.internal:9001", 3),
            ("10.1.0.2:9001", "chat.internal:9001", 3),
        ]
    );
    // A backend that stays keeps its state across a refresh.
    let kept = pool.backends()[1].clone();
    pool.set_drain("10.1.0.1:9001", true);
    dns.set("chat.internal", &["10.1.0.1", "10.1.0.3"]);
    pool.refresh().await;
    let now: Vec<String> = pool.backends().iter().map(|b| b.identity.clone()).collect();
    assert_eq!(now, ["10.0.0.9:9001", "10.1.0.1:9001", "10.1.0.3:9001"]);
    assert!(Arc::ptr_eq(&kept, &pool.backends()[1]));
    assert!(pool.backends()[1].is_draining());
    // A failed lookup keeps the last good answer.
    dns.remove("chat.internal");
    pool.refresh().await;
    assert_eq!(pool.backends().len(), 3);
}

#[tokio::test]
async fn the_refresh_task_picks_up_a_changed_record() {
    let dns = Arc::new(FakeDns::default());
    dns.set("svc.test", &["10.2.0.1"]);
    let options = PoolOptions {
        resolver: dns.clone(),
        dns_refresh: Duration::from_millis(20),
    };
    let pools = Pools::start(
        &config("{ backends: [{ addr: \"svc.test:80\" }] }"),
        None,
        options,
    )
    .await;
    let pool = pools.get("up").unwrap();
    assert_eq!(pick_addr(&pool, "k").as_deref(), Some("10.2.0.1:80"));
    dns.set("svc.test", &["10.2.0.2"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pick_addr(&pool, "k").as_deref() != Some("10.2.0.2:80") {
        assert!(Instant::now() < deadline, "record change not picked up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Dropping the pools ends the tasks: nothing else holds the pool.
    let weak = Arc::downgrade(&pool);
    drop(pool);
    drop(pools);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(weak.upgrade().is_none());
}

#[tokio::test]
async fn draining_moves_only_the_drained_backends_keys_and_undrain_brings_them_back() {
    let config = five_backends("");
    let pools = pools_for(&config, Arc::default()).await;
    let pool = pools.get("up").unwrap();
    let before = placement(&pool, 2000);
    assert_eq!(pool.set_drain("10.0.0.3:9001", true).len(), 1);
    let during = placement(&pool, 2000);
    let mut moved = 0;
    for (b, d) in before.iter().zip(&during) {
        if b != d {
            assert_eq!(b.as_deref(), Some("10.0.0.3:9001"));
            moved += 1;
        }
        assert_ne!(d.as_deref(), Some("10.0.0.3:9001"));
    }
    assert!((300..500).contains(&moved), "{moved}");
    assert!(pool.set_drain("10.0.0.99:9001", true).is_empty());
    pool.set_drain("10.0.0.3:9001", false);
    assert_eq!(placement(&pool, 2000), before);
}

#[tokio::test]
async fn draining_an_entry_drains_all_its_addresses() {
    let dns = Arc::new(FakeDns::default());
    dns.set("many.test", &["10.3.0.1", "10.3.0.2"]);
    let config = config("{ backends: [{ addr: \"many.test:1\" }, { addr: \"10.0.0.1:1\" }] }");
    let pools = pools_for(&config, dns).await;
    let pool = pools.get("up").unwrap();
    assert_eq!(pool.set_drain("many.test:1", true).len(), 2);
    for i in 0..50 {
        assert_eq!(
            pick_addr(&pool, &format!("k{i}")).as_deref(),
            Some("10.0.0.1:1")
        );
    }
    pool.set_drain("many.test:1", false);
    assert!(pool.backends().iter().all(|b| !b.is_draining()));
}

#[tokio::test]
async fn bounded_load_caps_the_hottest_backend() {
    let config = config(
        "{ backends: [{ addr: \"10.0.0.1:1\" }, { addr: \"10.0.0.2:1\" }, { addr: \"10.0.0.3:1\" }, { addr: \"10.0.0.4:1\" }], balance: { bounded_load: 1.25 } }",
    );
    let pools = pools_for(&config, Arc::default()).await;
    let pool = pools.get("up").unwrap();
    // One very hot key: without the bound every lease would land on one backend.
    let mut leases = Vec::new();
    for n in 1..=100u64 {
        leases.push(pick(&pool, "hot-room").unwrap());
        let max = pool.backends().iter().map(|b| b.active()).max().unwrap();
        let cap = (1.25 * n as f64 / 4.0).ceil() as u64;
        assert!(max <= cap, "after {n}: {max} > {cap}");
    }
    let loads: Vec<u64> = pool.backends().iter().map(|b| b.active()).collect();
    assert_eq!(loads.iter().sum::<u64>(), 100);
    assert!(loads.iter().all(|&l| l <= 32), "{loads:?}");
    drop(leases);
    assert!(pool.backends().iter().all(|b| b.active() == 0));
    // Without load, the key's own backend is chosen again (the bound only spills).
    let with_bound = config.upstreams["up"].clone();
    let plain = pool
        .candidates(b"hot-room", None)
        .next()
        .unwrap()
        .backend()
        .clone();
    let bounded = pool
        .candidates(b"hot-room", with_bound.bounded_load)
        .next()
        .unwrap();
    assert_eq!(plain.identity, bounded.backend().identity);
}

#[tokio::test]
async fn failover_order_skips_tried_backends_and_ends() {
    let pools = pools_for(&five_backends(""), Arc::default()).await;
    let pool = pools.get("up").unwrap();
    let mut c = pool.candidates(b"user-7", None);
    let mut seen = BTreeSet::new();
    while let Some(lease) = c.next() {
        assert!(seen.insert(lease.backend().identity.clone()));
    }
    assert_eq!(seen.len(), 5);
}

#[tokio::test]
async fn passive_failures_without_checks_cool_a_backend_off() {
    let pools = pools_for(&five_backends(""), Arc::default()).await;
    let pool = pools.get("up").unwrap();
    let first = pick(&pool, "k").unwrap().backend().clone();
    for _ in 0..DEFAULT_UNHEALTHY_AFTER - 1 {
        pool.connect_failed(&first);
        assert_eq!(
            pick_addr(&pool, "k").as_deref(),
            Some(first.identity.as_str())
        );
    }
    pool.connect_failed(&first);
    assert_ne!(
        pick_addr(&pool, "k").as_deref(),
        Some(first.identity.as_str())
    );
    let snap = pool.snapshot();
    let b = snap
        .backends
        .iter()
        .find(|b| b.addr == first.identity)
        .unwrap();
    assert!(!b.up);
    assert_eq!(b.connect_errors, u64::from(DEFAULT_UNHEALTHY_AFTER));
    // A success (a connection that got through) ends the ejection.
    pool.connect_succeeded(&first);
    assert_eq!(
        pick_addr(&pool, "k").as_deref(),
        Some(first.identity.as_str())
    );
}

#[tokio::test]
async fn health_hysteresis_marks_down_and_up() {
    let config = five_backends(
        ", health_check: { interval: 1h, timeout: 1s, unhealthy_after: 2, healthy_after: 3 }",
    );
    let pools = pools_for(&config, Arc::default()).await;
    let pool = pools.get("up").unwrap();
    let b = pool.backends()[0].clone();
    pool.check_result(&b, false);
    assert!(b.is_up());
    pool.check_result(&b, false);
    assert!(!b.is_up());
    pool.check_result(&b, true);
    pool.check_result(&b, true);
    assert!(!b.is_up());
    pool.connect_succeeded(&b); // only active checks bring a backend they marked down back
    assert!(!b.is_up());
    pool.check_result(&b, true);
    assert!(b.is_up());
}

/// Passive failures eject a backend whether or not active checks run; a probe that
/// connects lets it back in within the first back-offs (issue 19: a 1 s outage must not
/// cost a 10 s cool-off).
#[tokio::test]
async fn an_ejected_backend_is_probed_back_in() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener); // refused until it listens again
    for extra in [
        "",
        ", health_check: { interval: 1h, timeout: 1s, unhealthy_after: 2 }",
    ] {
        let config = config(&format!(
            "{{ backends: [{{ addr: \"{addr}\" }}], max_ejected: 100%{extra} }}"
        ));
        let pools = pools_for(&config, Arc::default()).await;
        let pool = pools.get("up").unwrap();
        let b = pool.backends()[0].clone();
        for _ in 0..DEFAULT_UNHEALTHY_AFTER {
            pool.connect_failed(&b);
        }
        assert!(pick(&pool, "k").is_none(), "{extra}: still eligible");
        assert!(
            b.is_up(),
            "{extra}: passive ejection is not an active verdict"
        );
        tokio::time::sleep(PROBE_FIRST * 3).await;
        assert!(pick(&pool, "k").is_none(), "{extra}: back while refusing");
        let revived = std::net::TcpListener::bind(addr).unwrap();
        let back = std::time::Instant::now();
        while pick(&pool, "k").is_none() {
            assert!(
                back.elapsed() < Duration::from_secs(3),
                "{extra}: not probed back in"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(revived);
    }
}

#[tokio::test]
async fn no_eligible_backend_gives_no_candidate() {
    let pools = pools_for(
        &config("{ backends: [{ addr: \"10.0.0.1:1\" }] }"),
        Arc::default(),
    )
    .await;
    let pool = pools.get("up").unwrap();
    pool.set_drain("10.0.0.1:1", true);
    assert!(pick(&pool, "k").is_none());
    // A name that never resolved leaves the pool empty: no candidate either.
    let empty = pools_for(
        &config("{ backends: [{ addr: \"nowhere.test:1\" }] }"),
        Arc::default(),
    )
    .await;
    assert!(pick(&empty.get("up").unwrap(), "k").is_none());
}

#[tokio::test]
async fn reconcile_keeps_the_state_of_backends_that_stay() {
    let pools = pools_for(&five_backends(""), Arc::default()).await;
    let pool = pools.get("up").unwrap();
    pool.set_drain("10.0.0.2:9001", true);
    let lease = pick(&pool, "k").unwrap();
    let held = lease.backend().identity.clone();
    let b1 = pool.backends()[0].clone();
    pool.connect_failed(&b1);
    // 10.0.0.5 leaves, 10.0.0.6 arrives, weights change, a second upstream appears.
    let text = "{ backends: [{ addr: \"10.0.0.1:9001\", weight: 2 }, { addr: \"10.0.0.2:9001\" }, { addr: \"10.0.0.3:9001\" }, { addr: \"10.0.0.4:9001\" }, { addr: \"10.0.0.6:9001\" }] }\n  other: { backends: [{ addr: \"10.9.0.1:1\" }] }";
    pools.reconcile(&config(text)).await;
    let same = pools.get("up").unwrap();
    assert!(Arc::ptr_eq(&pool, &same));
    let snap = same.snapshot();
    let by: HashMap<&str, &BackendSnapshot> =
        snap.backends.iter().map(|b| (b.addr.as_str(), b)).collect();
    assert!(by["10.0.0.2:9001"].draining);
    assert_eq!(by["10.0.0.1:9001"].connect_errors, 1);
    assert_eq!(by["10.0.0.1:9001"].weight, 2);
    assert!(!by.contains_key("10.0.0.5:9001"));
    assert!(by.contains_key("10.0.0.6:9001"));
    if let Some(b) = by.get(held.as_str()) {
        assert_eq!(b.active, 1);
    }
    assert!(pools.get("other").is_some());
    drop(lease);
    // Removing an upstream keeps its pool until the prune that follows the config swap.
    let without = config("{ backends: [{ addr: \"10.0.0.1:9001\" }] }");
    pools.reconcile(&without).await;
    assert!(pools.get("other").is_some());
    pools.prune(&without);
    assert!(pools.get("other").is_none());
    assert_eq!(pools.snapshot().len(), 1);
}

/// A removed upstream's pool outlives prunes until its retirement deadline; a later
/// reload that brings the upstream back calls the retirement off.
#[tokio::test(start_paused = true)]
async fn retiring_pools_outlive_prunes_until_their_deadline() {
    let one = "{ backends: [{ addr: \"10.0.0.1:9001\" }] }";
    let both = config(&format!("{one}\n  other: {one}"));
    let without = config(one);
    let pools = pools_for(&both, Arc::default()).await;
    pools.reconcile(&without).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    pools.retire(["other"].into_iter(), until);
    // An earlier reload's prune, firing now, must not take it.
    pools.prune(&without);
    assert!(pools.get("other").is_some());
    tokio::time::advance(Duration::from_secs(11)).await;
    pools.prune(&without);
    assert!(pools.get("other").is_none());
    // Retired, then back before the deadline: kept by every later prune.
    pools.reconcile(&both).await;
    pools.reconcile(&without).await;
    pools.retire(
        ["other"].into_iter(),
        tokio::time::Instant::now() + Duration::from_secs(10),
    );
    pools.reconcile(&both).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    pools.prune(&both);
    assert!(pools.get("other").is_some());
    pools.prune(&without);
    assert!(
        pools.get("other").is_none(),
        "not retiring any more: pruned at once"
    );
}

/// Without checks nothing marks a backend up again: a reload that drops `health_check`
/// must not leave the backends it had marked down out of service for good.
#[tokio::test]
async fn removing_health_checks_brings_down_backends_back() {
    let checked = five_backends(
        ", health_check: { interval: 1h, timeout: 1s, unhealthy_after: 1, healthy_after: 3 }",
    );
    let pools = pools_for(&checked, Arc::default()).await;
    let pool = pools.get("up").unwrap();
    for b in pool.backends() {
        pool.check_result(&b, true);
        pool.check_result(&b, false);
        assert!(!b.is_up());
    }
    assert!(pick(&pool, "k").is_none());
    pools.reconcile(&five_backends("")).await;
    assert!(pool.backends().iter().all(|b| b.is_up()));
    assert!(pick(&pool, "k").is_some());
    // The failure and pass streaks start afresh.
    let b = pool.backends()[0].clone();
    assert_eq!(b.fails.load(Ordering::Relaxed), 0);
    assert_eq!(b.passes.load(Ordering::Relaxed), 0);
    // Checks added back later start from "up", as on a fresh start.
    pools.reconcile(&checked).await;
    assert!(pool.backends().iter().all(|b| b.is_up()));
}

/// An upstream switched from `backends:` to `builtin: echo` by a reload (which starts the
/// echo server first) must reach it, not be left with no backend.
#[tokio::test]
async fn a_reload_to_builtin_echo_finds_the_echo_server() {
    let pools = pools_for(&five_backends(""), Arc::default()).await;
    let pool = pools.get("up").unwrap();
    let echo: SocketAddr = "127.0.0.1:4242".parse().unwrap();
    pools.set_builtin(echo);
    pools.reconcile(&config("{ builtin: echo }")).await;
    let same = pools.get("up").unwrap();
    assert!(Arc::ptr_eq(&pool, &same));
    let now: Vec<SocketAddr> = same.backends().iter().map(|b| b.addr).collect();
    assert_eq!(now, [echo]);
    assert_eq!(pick_addr(&same, "k").as_deref(), Some("127.0.0.1:4242"));
}

/// [`FakeDns`], except that while `holding`, a lookup of `held` first signals `entered`
/// and then waits for a permit of `gate`.
struct GatedDns {
    dns: FakeDns,
    held: String,
    holding: std::sync::atomic::AtomicBool,
    entered: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
}

impl Resolver for GatedDns {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        let hold = host == self.held && self.holding.load(Ordering::Acquire);
        Box::pin(async move {
            if hold {
                self.entered.notify_one();
                let _permit = self.gate.acquire().await;
            }
            self.dns.lookup(host, port).await
        })
    }
}

/// A refresh that read the spec before a reload and looked names up while the reload ran
/// must not put the backends the reload removed back.
#[tokio::test]
async fn a_refresh_from_before_a_reload_does_not_undo_it() {
    let dns = Arc::new(GatedDns {
        dns: FakeDns::default(),
        held: "svc.test".into(),
        holding: false.into(),
        entered: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    dns.dns.set("svc.test", &["10.4.0.1"]);
    let before = config("{ backends: [{ addr: \"svc.test:80\" }, { addr: \"10.0.0.1:1\" }] }");
    let options = PoolOptions {
        resolver: dns.clone(),
        dns_refresh: Duration::from_secs(3600),
    };
    let pools = Pools::start(&before, None, options).await;
    let pool = pools.get("up").unwrap();
    assert_eq!(pool.backends().len(), 2);
    dns.holding.store(true, Ordering::Release);
    let stale = tokio::spawn({
        let pool = pool.clone();
        async move { pool.refresh().await }
    });
    // The refresh has its spec and waits on the name: now the reload.
    let within = Duration::from_secs(30);
    tokio::time::timeout(within, dns.entered.notified())
        .await
        .expect("the refresh never looked the name up");
    pools
        .reconcile(&config("{ backends: [{ addr: \"10.0.0.2:1\" }] }"))
        .await;
    let addrs = |pool: &Pool| -> Vec<String> {
        pool.backends().iter().map(|b| b.identity.clone()).collect()
    };
    assert_eq!(addrs(&pool), ["10.0.0.2:1"]);
    dns.gate.add_permits(1);
    tokio::time::timeout(within, stale)
        .await
        .expect("the refresh never ended")
        .unwrap();
    assert_eq!(addrs(&pool), ["10.0.0.2:1"]);
}

/// Issue 19 `slow_start`: a backend a DNS change adds gets its share of new keys ramped
/// over the window (asserted on counts of 2,000 keys at four points of it); without
/// `slow_start` it takes its full share at once. Time is tokio's, paused.
#[tokio::test(start_paused = true)]
async fn slow_start_ramps_an_added_backends_share() {
    let share = |pool: &Pool, new: &str| {
        placement(pool, 2000)
            .iter()
            .filter(|a| a.as_deref() == Some(new))
            .count()
    };
    for slow_start in ["", ", slow_start: 8s"] {
        let dns = Arc::new(FakeDns::default());
        dns.set("chat.internal", &["10.1.0.1"]);
        let config = config(&format!(
            "{{ backends: [{{ addr: \"chat.internal:9001\" }}, {{ addr: \"10.0.0.9:9001\" }}]{slow_start} }}"
        ));
        let pools = pools_for(&config, dns.clone()).await;
        let pool = pools.get("up").unwrap();
        assert_eq!(share(&pool, "10.1.0.2:9001"), 0);
        dns.set("chat.internal", &["10.1.0.1", "10.1.0.2"]);
        pool.refresh().await;
        let mut counts = Vec::new();
        for _ in 0..4 {
            counts.push(share(&pool, "10.1.0.2:9001"));
            tokio::time::advance(Duration::from_secs(3)).await;
        }
        // Three equal backends: the full share is a third of the keys (~667).
        if slow_start.is_empty() {
            assert!(
                counts.iter().all(|&n| (550..800).contains(&n)),
                "{counts:?}"
            );
        } else {
            // At 0, 3, 6 and 9 s of 8: ~0, then growing, then the full third.
            assert!(counts[0] <= 10, "{counts:?}");
            assert!(counts[0] < counts[1] && counts[1] < counts[2], "{counts:?}");
            assert!(counts[1] < 400, "{counts:?}");
            assert!((550..800).contains(&counts[3]), "{counts:?}");
        }
    }
}
