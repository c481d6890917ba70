//! `idle`: hold N upgraded connections and report the proxy's resident memory per
//! connection.
//!
//! A few warm-up connections first (so one-off allocations such as TLS contexts and
//! runtime structures are in the baseline), then the RSS baseline, then N connections
//! opened `--concurrency` at a time from addresses spread over 127.<role>.x.y, each
//! exchanging one message so both relay directions have been used once. After
//! `--settle` the RSS is read again: (after - before) / open connections. Holders answer
//! the proxy's keepalive pings, so `--hold` can also measure the CPU cost of keeping
//! idle connections alive.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::net::{Failures, FrameReader, Sources, Stream, Target, ws_connect};
use crate::procfs::Procs;
use crate::ws::{self, Rng};

pub struct Options {
    pub connections: u32,
    pub concurrency: u32,
    pub per_addr: u32,
    pub warm: u32,
    pub settle: Duration,
    pub hold: Duration,
}

pub async fn run(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let pongs = Arc::new(AtomicU64::new(0));
    let warm_src = Sources {
        role: 9,
        per_addr: 1000,
    };
    let mut rng = Rng::new(1);
    for i in 0..o.warm {
        let conn = open_one(&target, warm_src, i, &mut rng).await;
        match conn {
            Ok((io, reader)) => {
                tokio::spawn(hold(io, reader, stop_rx.clone(), pongs.clone()));
            }
            Err(e) => bail!("warm-up connection {i} to {}: {e:#}", target.addr),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = if procs.is_empty() {
        None
    } else {
        Some(procs.rss_kib()?)
    };
    let cpu_before = procs.cpu_opt()?;

    let started = Instant::now();
    let next = Arc::new(AtomicU32::new(0));
    let opened = Arc::new(AtomicU32::new(0));
    let failures = Arc::new(Failures::default());
    let src = Sources {
        role: 1,
        per_addr: o.per_addr,
    };
    let mut workers = Vec::new();
    for w in 0..o.concurrency.max(1) {
        let (target, next, opened, failures, stop_rx, pongs) = (
            target.clone(),
            next.clone(),
            opened.clone(),
            failures.clone(),
            stop_rx.clone(),
            pongs.clone(),
        );
        let n = o.connections;
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(u64::from(w) + 100);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match open_one(&target, src, i, &mut rng).await {
                    Ok((io, reader)) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(hold(io, reader, stop_rx.clone(), pongs.clone()));
                    }
                    Err(e) => failures.record(&e),
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let cpu_open = procs.cpu_opt()?;
    tokio::time::sleep(o.settle).await;
    let rss_after = if procs.is_empty() {
        None
    } else {
        Some(procs.rss_kib()?)
    };
    let opened = opened.load(Ordering::Relaxed);
    let kib_per = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) / f64::from(opened)),
        _ => None,
    };
    let mut hold_cpu_pct = None;
    if !o.hold.is_zero() {
        let c0 = procs.cpu_opt()?;
        let t0 = Instant::now();
        tokio::time::sleep(o.hold).await;
        if let (Some(c0), Some(c1)) = (c0, procs.cpu_opt()?) {
            hold_cpu_pct =
                Some(100.0 * c1.saturating_sub(c0).as_secs_f64() / t0.elapsed().as_secs_f64());
        }
    }
    let handshake_cpu_us = crate::procfs::per_event_us(cpu_before, cpu_open, u64::from(opened));
    let _ = stop_tx.send(true);
    Ok(json!({
        "scenario": "idle",
        "label": label,
        "tls": target.tls.is_some(),
        "connections": o.connections,
        "open": opened,
        "failed": failures.count(),
        "first_error": failures.first(),
        "open_secs": open_secs,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_conn": kib_per,
        "handshake_cpu_us": handshake_cpu_us,
        "hold_secs": o.hold.as_secs_f64(),
        "hold_cpu_pct": hold_cpu_pct,
        "pongs": pongs.load(Ordering::Relaxed),
    }))
}

/// Opens connection `i`, sends one small message and waits for its echo.
async fn open_one(
    target: &Target,
    src: Sources,
    i: u32,
    rng: &mut Rng,
) -> Result<(Stream, FrameReader)> {
    let conn = ws_connect(target, src.addr(i), rng, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("connection {i} from {}: {e}", src.addr(i)))?;
    let mut io = conn.io;
    let mut frame = Vec::with_capacity(32);
    ws::push_frame(
        &mut frame,
        true,
        ws::OP_BINARY,
        &u64::from(i).to_le_bytes(),
        Some(rng.mask()),
    );
    io.write_all(&frame).await?;
    let mut reader = FrameReader::new(conn.early, 256, 1 << 16);
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match reader.next(&mut io).await? {
                Some((h, _)) if h.opcode == ws::OP_BINARY => return Ok(()),
                Some(_) => continue,
                None => bail!("connection {i} closed before its echo"),
            }
        }
    })
    .await;
    match got {
        Ok(r) => r?,
        Err(_) => bail!("connection {i}: no echo within 30 s"),
    }
    Ok((io, reader))
}

/// Keeps a connection open, answering pings, until told to stop.
async fn hold(
    mut io: Stream,
    mut reader: FrameReader,
    mut stop: watch::Receiver<bool>,
    pongs: Arc<AtomicU64>,
) {
    let mut rng = Rng::new(pongs.load(Ordering::Relaxed) + 7);
    loop {
        let pong = tokio::select! {
            _ = stop.changed() => return,
            frame = reader.next(&mut io) => match frame {
                Ok(Some((h, payload))) if h.opcode == ws::OP_PING => {
                    let mut out = Vec::with_capacity(payload.len() + 6);
                    ws::push_frame(&mut out, true, ws::OP_PONG, payload, Some(rng.mask()));
                    out
                }
                Ok(Some(_)) => continue,
                _ => return,
            },
        };
        if io.write_all(&pong).await.is_err() {
            return;
        }
        pongs.fetch_add(1, Ordering::Relaxed);
    }
}
