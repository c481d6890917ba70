//! `abuse`: well-behaved clients echo at a steady rate, each from its own address, through
//! a quiet phase and then an attack phase in which one address (127.7.0.1):
//! - floods new connections (`--flood-concurrency` handshakes in flight, holding up to
//!   `--attack-conns` of those it is admitted),
//! - spams messages on admitted connections (`--spam-rate` per connection, at most
//!   `--spam-conns` of them),
//! - leaves a fragmented message unfinished on every fourth admitted connection,
//! - dribbles slowloris request heads (`--slowloris` connections, one byte a second).
//!
//! Meanwhile a newcomer from a fresh address tries to connect and echo once every
//! `--newcomer-every`. Reported: the well-behaved clients' p50/p99 under attack as a
//! ratio to the quiet phase, their lost and reordered messages, newcomers refused in
//! each phase, and the proxy's peak RSS (sampled every 100 ms, and `VmHWM`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};

use crate::echo::{self, Plan, STAMP};
use crate::hist;
use crate::net::{FrameReader, Sources, Target, tcp_connect, ws_connect};
use crate::procfs::Procs;
use crate::ws::{self, Rng};

pub struct Options {
    pub clients: u32,
    pub client_rate: f64,
    pub size: usize,
    pub quiet: Duration,
    pub attack: Duration,
    pub flood_concurrency: u32,
    pub attack_conns: u32,
    pub spam_conns: u32,
    pub spam_rate: u32,
    pub slowloris: u32,
    pub newcomer_every: Duration,
}

/// The attacker's one address.
const ATTACKER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 7, 0, 1);

#[derive(Default)]
struct Counters {
    admitted: AtomicU64,
    refused: AtomicU64,
    spam_sent: AtomicU64,
    fragments_open: AtomicU64,
    slowloris_conns: AtomicU64,
    newcomers: [AtomicU64; 2],
    newcomers_refused: [AtomicU64; 2],
}

pub async fn run(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    if target.tls.is_some() {
        bail!("the abuse run is plain ws:// only");
    }
    if o.size < STAMP {
        bail!("--size must be at least {STAMP} bytes");
    }
    let good = echo::connect_plain(
        &target,
        Sources {
            role: 5,
            per_addr: 1,
        },
        o.clients,
        0,
    )
    .await?;
    let warmup = Duration::from_secs(1).min(o.quiet / 2);
    let plan = Plan {
        rate: o.client_rate * f64::from(o.clients),
        size: o.size,
        warmup,
        phase_at: Some(o.quiet),
        end: o.quiet + o.attack,
    };
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let counters = Arc::new(Counters::default());
    let rss_before = if procs.is_empty() {
        None
    } else {
        Some(procs.rss_kib()?)
    };

    // Peak RSS sampler.
    let sampler = {
        let (procs, mut stop) = (procs.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut peak = 0u64;
            loop {
                if let Ok(r) = procs.rss_kib() {
                    peak = peak.max(r);
                }
                tokio::select! {
                    _ = stop.changed() => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };
    // Newcomers, through both phases: one every `newcomer_every`, each in its own task
    // (at most 64 in flight), so slow answers do not thin out the attempts.
    let newcomers = {
        let (target, counters, mut stop, every, quiet) = (
            target.clone(),
            counters.clone(),
            stop_rx.clone(),
            o.newcomer_every,
            o.quiet,
        );
        tokio::spawn(async move {
            let src = Sources {
                role: 6,
                per_addr: 1,
            };
            let in_flight = Arc::new(Semaphore::new(64));
            let mut i = 0u32;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    continue;
                };
                let phase = usize::from(start.elapsed() >= quiet);
                counters.newcomers[phase].fetch_add(1, Ordering::Relaxed);
                let (target, counters) = (target.clone(), counters.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut rng = Rng::new(u64::from(i) + 6600);
                    if !newcomer(&target, src.addr(i), &mut rng).await {
                        counters.newcomers_refused[phase].fetch_add(1, Ordering::Relaxed);
                    }
                });
                i = i.wrapping_add(1);
            }
            // Let the attempts in flight finish (each is bounded to 10 s).
            let _ = in_flight.acquire_many(64).await;
        })
    };
    // The attack starts after the quiet phase.
    let attack = {
        let (target, counters, stop) = (target.clone(), counters.clone(), stop_rx.clone());
        let a = AttackPlan {
            flood_concurrency: o.flood_concurrency,
            attack_conns: o.attack_conns,
            spam_conns: o.spam_conns,
            spam_rate: o.spam_rate,
            slowloris: o.slowloris,
        };
        let quiet = o.quiet;
        tokio::spawn(async move {
            tokio::time::sleep(quiet).await;
            attack(target, a, counters, stop).await;
        })
    };

    // The proxy's CPU share in each phase.
    let cpu_start = procs.cpu_opt()?;
    let cpu_mid = {
        let (procs, quiet) = (procs.clone(), o.quiet);
        tokio::spawn(async move {
            tokio::time::sleep(quiet).await;
            (procs.cpu_opt(), Instant::now())
        })
    };
    let r = echo::open_loop(good, &plan).await?;
    let cpu_end = procs.cpu_opt()?;
    let attack_end = Instant::now();
    let (cpu_mid, mid_at) = cpu_mid.await?;
    let cpu_mid = cpu_mid?;
    let pct = |a: Option<Duration>, b: Option<Duration>, secs: f64| match (a, b) {
        (Some(a), Some(b)) if secs > 0.0 => Some(100.0 * b.saturating_sub(a).as_secs_f64() / secs),
        _ => None,
    };
    let quiet_cpu_pct = pct(
        cpu_start,
        cpu_mid,
        mid_at.duration_since(start).as_secs_f64(),
    );
    let attack_cpu_pct = pct(
        cpu_mid,
        cpu_end,
        attack_end.duration_since(mid_at).as_secs_f64(),
    );
    let _ = stop_tx.send(true);
    let peak = sampler.await?;
    let hwm = if procs.is_empty() {
        None
    } else {
        procs.hwm_kib().ok()
    };
    // Attackers and newcomers end promptly on the stop signal (their own waits are bounded).
    let _ = tokio::time::timeout(Duration::from_secs(10), attack).await;
    let _ = tokio::time::timeout(Duration::from_secs(11), newcomers).await;
    let quiet = hist::summary(&r.phases[0]);
    let under = hist::summary(&r.phases[1]);
    let ratio = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
    let c = &counters;
    Ok(json!({
        "scenario": "abuse",
        "label": label,
        "clients": o.clients,
        "client_rate": o.client_rate,
        "quiet": quiet,
        "attack": under,
        "p50_ratio": ratio(under.p50_us, quiet.p50_us),
        "p99_ratio": ratio(under.p99_us, quiet.p99_us),
        "sent": r.sent,
        "received": r.received,
        "lost": r.sent.saturating_sub(r.received),
        "reordered": r.reordered,
        "clients_closed": r.closed,
        "newcomers_quiet": c.newcomers[0].load(Ordering::Relaxed),
        "newcomers_refused_quiet": c.newcomers_refused[0].load(Ordering::Relaxed),
        "newcomers_attack": c.newcomers[1].load(Ordering::Relaxed),
        "newcomers_refused_attack": c.newcomers_refused[1].load(Ordering::Relaxed),
        "attacker_admitted": c.admitted.load(Ordering::Relaxed),
        "attacker_refused": c.refused.load(Ordering::Relaxed),
        "attacker_spam_sent": c.spam_sent.load(Ordering::Relaxed),
        "attacker_fragments_open": c.fragments_open.load(Ordering::Relaxed),
        "attacker_slowloris_conns": c.slowloris_conns.load(Ordering::Relaxed),
        "proxy_cpu_pct_quiet": quiet_cpu_pct,
        "proxy_cpu_pct_attack": attack_cpu_pct,
        "rss_before_kib": rss_before,
        "rss_peak_kib": if procs.is_empty() { None } else { Some(peak) },
        "rss_hwm_kib": hwm,
    }))
}

/// A newcomer: connect, echo once, within 5 s. False when refused or too slow.
pub async fn newcomer(target: &Target, src: std::net::Ipv4Addr, rng: &mut Rng) -> bool {
    let Ok(conn) = ws_connect(target, src, rng, Duration::from_secs(5)).await else {
        return false;
    };
    let mut io = conn.io;
    let mut frame = Vec::new();
    ws::push_frame(
        &mut frame,
        true,
        ws::OP_BINARY,
        &[0u8; STAMP],
        Some(rng.mask()),
    );
    let mut reader = FrameReader::new(conn.early, 256, 1 << 16);
    let echoed = async {
        io.write_all(&frame).await.ok()?;
        loop {
            let (h, _) = reader.next(&mut io).await.ok()??;
            if h.opcode == ws::OP_BINARY {
                return Some(());
            }
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), echoed).await,
        Ok(Some(()))
    )
}

#[derive(Clone, Copy)]
struct AttackPlan {
    flood_concurrency: u32,
    attack_conns: u32,
    spam_conns: u32,
    spam_rate: u32,
    slowloris: u32,
}

async fn attack(target: Target, a: AttackPlan, c: Arc<Counters>, stop: watch::Receiver<bool>) {
    let held = Arc::new(Semaphore::new(a.attack_conns as usize));
    let spam_slots = Arc::new(Semaphore::new(a.spam_conns as usize));
    let mut tasks = Vec::new();
    for w in 0..a.flood_concurrency {
        let (target, c, stop, held, spam_slots) = (
            target.clone(),
            c.clone(),
            stop.clone(),
            held.clone(),
            spam_slots.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(u64::from(w) + 7000);
            while !*stop.borrow() {
                let Ok(permit) = held.clone().acquire_owned().await else {
                    return;
                };
                match ws_connect(&target, ATTACKER, &mut rng, Duration::from_secs(5)).await {
                    Ok(conn) => {
                        let n = c.admitted.fetch_add(1, Ordering::Relaxed);
                        let (c, stop) = (c.clone(), stop.clone());
                        let spam = if n % 4 == 0 {
                            None
                        } else {
                            spam_slots.clone().try_acquire_owned().ok()
                        };
                        let rate = a.spam_rate;
                        tokio::spawn(async move {
                            let _permit = permit;
                            abuse_conn(conn, n % 4 == 0, spam.map(|s| (s, rate)), c, stop).await;
                        });
                    }
                    Err(_) => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                        // A refused flooder retries at once, but never spins on an error.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        }));
    }
    for i in 0..a.slowloris {
        let (target, c, stop) = (target.clone(), c.clone(), stop.clone());
        tasks.push(tokio::spawn(
            async move { slowloris(target, i, c, stop).await },
        ));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One admitted attacker connection: unfinished fragment, spam, or just held open.
async fn abuse_conn(
    conn: crate::net::WsConn,
    fragment: bool,
    spam: Option<(tokio::sync::OwnedSemaphorePermit, u32)>,
    c: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let crate::net::Stream::Plain(stream) = conn.io else {
        return;
    };
    let (mut rd, mut wr) = stream.into_split();
    let mut rng = Rng::new(c.admitted.load(Ordering::Relaxed));
    if fragment {
        let mut f = Vec::new();
        ws::push_frame(&mut f, false, ws::OP_BINARY, &[7u8; 64], Some(rng.mask()));
        if wr.write_all(&f).await.is_err() {
            return;
        }
        c.fragments_open.fetch_add(1, Ordering::Relaxed);
    }
    let writer = async {
        let Some((_permit, rate)) = spam else {
            return std::future::pending::<()>().await;
        };
        // Every 10 ms, a batch of rate/100 frames in one write.
        let per_tick = (rate / 100).max(1) as usize;
        let mut batch = Vec::with_capacity(per_tick * 80);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            batch.clear();
            for _ in 0..per_tick {
                ws::push_frame(
                    &mut batch,
                    true,
                    ws::OP_BINARY,
                    &[1u8; 64],
                    Some(rng.mask()),
                );
            }
            if wr.write_all(&batch).await.is_err() {
                return;
            }
            c.spam_sent.fetch_add(per_tick as u64, Ordering::Relaxed);
        }
    };
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    };
    tokio::select! {
        _ = stop.changed() => {}
        _ = writer => {}
        _ = reader => {}
    }
}

/// A slowloris: a request head one byte a second, reconnecting when dropped.
async fn slowloris(target: Target, i: u32, c: Arc<Counters>, mut stop: watch::Receiver<bool>) {
    let head = format!(
        "GET /bench HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow-{i}: ",
        target.host
    );
    loop {
        if *stop.borrow() {
            return;
        }
        let Ok(mut s) = tcp_connect(ATTACKER, target.addr).await else {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        };
        c.slowloris_conns.fetch_add(1, Ordering::Relaxed);
        if s.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if s.write_all(b"a").await.is_err() {
                break;
            }
        }
    }
}
