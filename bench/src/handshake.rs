//! `handshake`: connect, (TLS,) upgrade, close, as fast as `--concurrency` workers can,
//! each connection from the next of 250 source addresses. Reports completed handshakes
//! per second and the proxy's CPU per handshake. TLS sessions are never resumed, so each
//! TLS connection is a full handshake.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::net::{Failures, FrameReader, Sources, Target, ws_connect};
use crate::procfs::{Procs, per_event_us};
use crate::ws::{self, Rng};

pub struct Options {
    pub concurrency: u32,
    pub warmup: Duration,
    pub duration: Duration,
}

pub async fn run(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Failures::default());
    let next = Arc::new(AtomicU32::new(0));
    // 250 addresses, one new connection from each in turn.
    let src = Sources {
        role: 4,
        per_addr: 1,
    };
    let mut workers = Vec::new();
    for w in 0..o.concurrency.max(1) {
        let (target, measuring, stop, done, failures, next) = (
            target.clone(),
            measuring.clone(),
            stop.clone(),
            done.clone(),
            failures.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(u64::from(w) + 500);
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) % 250;
                let r = once(&target, src.addr(i), &mut rng).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.record(&e),
                }
            }
        }));
    }
    tokio::time::sleep(o.warmup).await;
    let cpu0 = procs.cpu_opt()?;
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(o.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = procs.cpu_opt()?;
    let n = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    Ok(json!({
        "scenario": "handshake",
        "label": label,
        "tls": target.tls.is_some(),
        "resume": target.resume,
        "concurrency": o.concurrency,
        "handshakes": n,
        "failed": failures.count(),
        "first_error": failures.first(),
        "secs": secs,
        "per_sec": n as f64 / secs,
        "cpu_us_per_handshake": per_event_us(cpu0, cpu1, n),
    }))
}

/// One connection: upgrade, send a close, wait for the close back (or the end).
async fn once(target: &Target, src: std::net::Ipv4Addr, rng: &mut Rng) -> Result<()> {
    let conn = ws_connect(target, src, rng, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut io = conn.io;
    let mut frame = Vec::with_capacity(8);
    ws::push_frame(
        &mut frame,
        true,
        ws::OP_CLOSE,
        &1000u16.to_be_bytes(),
        Some(rng.mask()),
    );
    io.write_all(&frame).await?;
    let mut reader = FrameReader::new(conn.early, 256, 1 << 16);
    let wait = async {
        loop {
            match reader.next(&mut io).await {
                Ok(Some((h, _))) if h.opcode == ws::OP_CLOSE => return,
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        anyhow::bail!("no close within 5 s");
    }
    Ok(())
}
