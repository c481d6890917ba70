//! `flood` (issue 17, SPEC §3 "Admission before work", §9): well-behaved clients echo at a
//! steady pace from many addresses through a quiet phase and then an attack phase in
//! which one address floods the proxy with connection attempts ([`crate::flood_attack`]).
//!
//! - `--clients` (1,000) connections on `--client-addrs` (200) source addresses
//!   (127.11.x.y) each send a 64 B message every `--interval-ms` (500 ms), paced by the
//!   open loop of [`crate::echo`] (latency from the scheduled instant, HDR histograms, one
//!   per phase; lost and reordered messages counted).
//! - After `--quiet` seconds, the attack runs for `--attack` seconds (on its own threads,
//!   at a lower priority; it stops exactly at the end of the attack phase, so echoes still
//!   in flight then can arrive before the 2 s drain ends).
//! - `--newcomers` (100) new clients, each from a fresh address (127.12.x.y), arrive spread
//!   evenly over the attack: each must connect and echo once within 5 + 5 s.
//! - With `--attack-tls ADDR` the attacker (loops and slowloris) goes to the proxy's TLS
//!   listener instead, and the run counts the TLS handshakes the proxy completed for it
//!   before refusing the upgrade; the well-behaved clients stay on plain `--target`.
//!
//! Reported: the clients' p50/p99/p99.9 RTT quiet and under attack and their ratios,
//! lost/reordered messages, clients dropped, newcomers refused, the attacker's attempts
//! (made, refused by kind, per second), the proxy's CPU during the attack and per refused
//! attempt, its peak RSS, and how the attacker's admitted connections were ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::{Mutex, watch};

use crate::echo::{self, Plan, STAMP};
use crate::flood_attack::{self, Tally};
use crate::hist;
use crate::net::{Sources, Target};
use crate::procfs::{self, Procs};
use crate::ws::Rng;

pub struct Options {
    pub clients: u32,
    pub client_addrs: u32,
    pub interval: Duration,
    pub size: usize,
    pub quiet: Duration,
    pub attack: Duration,
    pub newcomers: u32,
    pub attack_tls: Option<SocketAddr>,
    pub plan: flood_attack::Plan,
}

/// Source ranges: 127.11.x.y well-behaved clients, 127.12.x.y newcomers (one each).
const CLIENTS: u8 = 11;
const NEWCOMERS: u8 = 12;

/// CPU readings of the proxy, of this generator and of each core at one instant.
#[derive(Clone)]
struct Mark {
    at: Instant,
    proxy: Option<Duration>,
    generator: Option<Duration>,
    cores: Vec<(u64, u64)>,
}

fn mark(procs: &Procs, me: &Procs) -> Mark {
    Mark {
        at: Instant::now(),
        proxy: procs.cpu_opt().ok().flatten(),
        generator: me.cpu_opt().ok().flatten(),
        cores: procfs::cpu_ticks().unwrap_or_default(),
    }
}

pub async fn run(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    if target.tls.is_some() {
        bail!("the well-behaved clients are plain ws://; use --attack-tls for the TLS flood");
    }
    if o.size < STAMP {
        bail!("--size must be at least {STAMP} bytes");
    }
    if o.clients == 0 || o.interval.is_zero() {
        bail!("--clients and --interval-ms must be above 0");
    }
    let attack_target = match o.attack_tls {
        Some(addr) => Target::new(addr, &target.path, true, false)?,
        None => target.clone(),
    };
    let per_addr = o.clients.div_ceil(o.client_addrs.max(1));
    let src = Sources {
        role: CLIENTS,
        per_addr,
    };
    let good = echo::connect_plain(&target, src, o.clients, 0).await?;
    let plan = Plan {
        rate: f64::from(o.clients) / o.interval.as_secs_f64(),
        size: o.size,
        warmup: Duration::from_secs(1).min(o.quiet / 2),
        phase_at: Some(o.quiet),
        end: o.quiet + o.attack,
    };
    let me = Procs(vec![std::process::id()]);
    let rss_before = procs.rss_kib().ok().filter(|_| !procs.is_empty());
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let tally = Arc::new(Tally::default());

    let sampler = spawn_rss_sampler(procs.clone(), stop_rx.clone());
    let newcomers = spawn_newcomers(target.clone(), start, &o, stop_rx.clone())?;
    // The attack and the CPU marks around it, on one timeline from `start`.
    let attack = {
        let (procs, me, tally, quiet, attack) =
            (procs.clone(), me.clone(), tally.clone(), o.quiet, o.attack);
        let (plan, stop_rx) = (o.plan, stop_rx.clone());
        tokio::spawn(async move {
            let m0 = mark(&procs, &me);
            tokio::time::sleep_until((start + quiet).into()).await;
            let m1 = mark(&procs, &me);
            let handle = flood_attack::spawn(attack_target, plan, tally, stop_rx);
            tokio::time::sleep_until((start + quiet + attack).into()).await;
            let m2 = mark(&procs, &me);
            let _ = stop_tx.send(true);
            (m0, m1, m2, handle)
        })
    };
    let r = echo::open_loop(good, &plan).await?;
    let (m0, m1, m2, handle) = attack.await.context("attack task")?;
    join_attacker(handle?).await;
    let peak = sampler.await.context("RSS sampler")?;
    let (tried, failed, times) = newcomers.await.context("newcomers")?;
    let hwm = procs.hwm_kib().ok().filter(|_| !procs.is_empty());

    let attack_secs = m2.at.duration_since(m1.at).as_secs_f64();
    let quiet = hist::summary(&r.phases[0]);
    let under = hist::summary(&r.phases[1]);
    let refused = tally.refused_total() + tally.slowloris_refused();
    Ok(json!({
        "scenario": "flood",
        "mode": if o.attack_tls.is_some() { "tls" } else { "plain" },
        "label": label,
        "clients": o.clients,
        "client_addrs": o.client_addrs,
        "interval_ms": o.interval.as_millis() as u64,
        "quiet_s": o.quiet.as_secs_f64(),
        "attack_s": attack_secs,
        "plan": {
            "loops": o.plan.loops, "hold": o.plan.hold, "spam": o.plan.spam,
            "fragments": o.plan.fragments, "slowloris": o.plan.slowloris,
            "threads": o.plan.threads, "nice": o.plan.nice, "rate": o.plan.rate,
        },
        "quiet": quiet,
        "attack": under,
        "p50_ratio": ratio(under.p50_us, quiet.p50_us),
        "p99_ratio": ratio(under.p99_us, quiet.p99_us),
        "p999_ratio": ratio(under.p999_us, quiet.p999_us),
        "sent": r.sent,
        "received": r.received,
        "lost": r.sent.saturating_sub(r.received),
        "reordered": r.reordered,
        "clients_dropped": r.closed,
        "pacer_late": hist::summary(&r.late),
        "newcomers": tried,
        "newcomers_refused": failed,
        "newcomer_connect_echo": hist::summary(&times),
        "attacker": tally.to_json(attack_secs),
        "refused_all": refused,
        "proxy_cpu_pct_quiet": pct(m0.proxy, m1.proxy, m1.at.duration_since(m0.at)),
        "proxy_cpu_pct_attack": pct(m1.proxy, m2.proxy, m2.at.duration_since(m1.at)),
        "proxy_cpu_s_attack": delta(m1.proxy, m2.proxy),
        "cpu_us_per_refused": per_refused(m1.proxy, m2.proxy, refused),
        "cpu_us_per_refused_net": per_refused_net(&[m0.clone(), m1.clone(), m2.clone()], refused),
        // Core 0 runs the proxy alone and core 1 the generator and the backend: busy time
        // beyond theirs is someone else's work on a shared machine.
        "core_busy_pct_quiet": procfs::busy_pct(&m0.cores, &m1.cores),
        "core_busy_pct_attack": procfs::busy_pct(&m1.cores, &m2.cores),
        "generator_cpu_pct_quiet": pct(m0.generator, m1.generator, m1.at.duration_since(m0.at)),
        "generator_cpu_pct_attack": pct(m1.generator, m2.generator, m2.at.duration_since(m1.at)),
        "rss_before_kib": rss_before,
        "rss_peak_kib": if procs.is_empty() { None } else { Some(peak) },
        "rss_hwm_kib": hwm,
    }))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    if b > 0.0 { Some(a / b) } else { None }
}

fn delta(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(b?.saturating_sub(a?).as_secs_f64())
}

fn pct(a: Option<Duration>, b: Option<Duration>, over: Duration) -> Option<f64> {
    let secs = over.as_secs_f64();
    (secs > 0.0).then_some(100.0 * delta(a, b)? / secs)
}

/// The proxy's CPU during the attack over the attempts it refused, in µs (the issue's
/// figure: everything the proxy did in that time is charged to the refusals).
fn per_refused(a: Option<Duration>, b: Option<Duration>, refused: u64) -> Option<f64> {
    (refused > 0).then_some(delta(a, b)? * 1e6 / refused as f64)
}

/// The same, less what the quiet phase's CPU rate would have cost over the attack's
/// duration (relaying the well-behaved clients): closer to the cost of a refusal itself,
/// though it still includes relaying the attacker's admitted spam.
fn per_refused_net(m: &[Mark; 3], refused: u64) -> Option<f64> {
    let quiet_rate = delta(m[0].proxy, m[1].proxy)? / m[1].at.duration_since(m[0].at).as_secs_f64();
    let attack_secs = m[2].at.duration_since(m[1].at).as_secs_f64();
    let net = delta(m[1].proxy, m[2].proxy)? - quiet_rate * attack_secs;
    (refused > 0).then_some(net.max(0.0) * 1e6 / refused as f64)
}

/// Waits (bounded) for the attacker's thread to end after the stop signal.
async fn join_attacker(handle: std::thread::JoinHandle<()>) {
    let joined = tokio::task::spawn_blocking(move || handle.join());
    // Its tasks end on the stop signal; in-flight attempts are dropped at once.
    if tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        eprintln!("flood: the attacker did not end within 10 s of the stop");
    }
}

/// Peak RSS of the proxy, sampled every 100 ms until `stop`.
fn spawn_rss_sampler(
    procs: Procs,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0u64;
        // Bounded: one sample per 100 ms for at most a day.
        for _ in 0..864_000u32 {
            if let Ok(r) = procs.rss_kib() {
                peak = peak.max(r);
            }
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        peak
    })
}

/// The newcomers, spread evenly over the attack; each connects and echoes once (bounded
/// to 5 + 5 s). Returns how many tried, how many failed, and the time each success took.
fn spawn_newcomers(
    target: Target,
    start: Instant,
    o: &Options,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<(u64, u64, Histogram<u64>)>> {
    let (n, quiet, attack) = (o.newcomers, o.quiet, o.attack);
    let times = Arc::new(Mutex::new(hist::new()?));
    Ok(tokio::spawn(async move {
        let src = Sources {
            role: NEWCOMERS,
            per_addr: 1,
        };
        let failed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..n {
            let at = start + quiet + attack.mul_f64((f64::from(i) + 0.5) / f64::from(n));
            tokio::time::sleep_until(at.into()).await;
            if *stop.borrow() {
                break;
            }
            let (target, failed, times) = (target.clone(), failed.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(u64::from(i) + 12_000);
                let t = Instant::now();
                if crate::abuse::newcomer(&target, src.addr(i), &mut rng).await {
                    hist::record(&mut *times.lock().await, t.elapsed().as_nanos() as u64);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let tried = tasks.len() as u64;
        for t in tasks {
            let _ = t.await;
        }
        let h = times.lock().await.clone();
        (tried, failed.load(Ordering::Relaxed), h)
    }))
}
