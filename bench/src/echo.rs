//! `echo`: C connections each echoing messages of one size through the target.
//!
//! - Closed loop (`--rate 0`): every connection sends a message, waits for its echo, and
//!   sends the next; the result is throughput and the proxy's CPU per echoed message
//!   (one message client→backend and its echo back, both relayed by the proxy).
//! - Open loop (`--rate R`): one pacer thread sends R messages per second in total,
//!   round-robin over the connections, at fixed instants; a message's latency runs from
//!   its *scheduled* send instant to the arrival of its echo, so a stalled proxy cannot
//!   hide its stall by slowing the sender down (no coordinated omission). The pacer owns
//!   duplicated descriptors of the sockets and writes without blocking, keeping whatever
//!   a full socket did not take for the next turn of that connection.
//!
//! Every message carries its sequence number and scheduled instant, so lost and reordered
//! echoes are counted too. [`open_loop`] is also what the `abuse` scenario's well-behaved
//! clients run.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::hist;
use crate::net::{FrameReader, Sources, Stream, Target, ws_connect};
use crate::procfs::{Procs, per_event_us};
use crate::ws::{self, Rng};

/// Bytes of every message that carry the sequence number and the send instant.
pub const STAMP: usize = 16;

pub struct Options {
    pub conns: u32,
    pub size: usize,
    /// Messages per second in total; 0 = closed loop.
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
}

pub async fn run(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    if o.size < STAMP {
        bail!("--size must be at least {STAMP} bytes (sequence number and timestamp)");
    }
    if o.rate > 0.0 {
        run_open(target, procs, label, o).await
    } else {
        run_closed(target, procs, label, o).await
    }
}

async fn run_closed(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    let src = Sources {
        role: 2,
        per_addr: 1,
    };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let mut conns = Vec::new();
    let mut rng = Rng::new(2);
    for i in 0..o.conns {
        let c = ws_connect(&target, src.addr(i), &mut rng, Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("connection {i} to {}: {e}", target.addr))?;
        conns.push(c);
    }
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let (measuring, stop, size) = (measuring.clone(), stop.clone(), o.size);
        tasks.push(tokio::spawn(async move {
            let mut io = c.io;
            let mut reader = FrameReader::new(c.early, size + 64, size.max(1 << 16));
            let mut rng = Rng::new(i as u64 + 1000);
            let mut h = hist::new()?;
            let mut payload = vec![0u8; size];
            let mut frame = Vec::with_capacity(size + 14);
            let mut count = 0u64;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = base.elapsed();
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                payload[8..16].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
                frame.clear();
                ws::push_frame(&mut frame, true, ws::OP_BINARY, &payload, Some(rng.mask()));
                io.write_all(&frame).await.context("write")?;
                loop {
                    let Some((fh, _)) = reader.next(&mut io).await? else {
                        bail!("connection {i} closed by the target");
                    };
                    if fh.opcode == ws::OP_BINARY {
                        break;
                    }
                }
                seq += 1;
                if measuring.load(Ordering::Relaxed) {
                    count += 1;
                    hist::record(&mut h, (base.elapsed() - sent).as_nanos() as u64);
                }
            }
            anyhow::Ok((count, h))
        }));
    }
    tokio::time::sleep(o.warmup).await;
    // This generator's own CPU and each core's busy %: is the generator the bottleneck?
    let me = Procs(vec![std::process::id()]);
    let (cpu0, gen0, ticks0) = (procs.cpu_opt()?, me.cpu()?, crate::procfs::cpu_ticks()?);
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(o.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, gen1, ticks1) = (procs.cpu_opt()?, me.cpu()?, crate::procfs::cpu_ticks()?);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    let mut all = hist::new()?;
    for t in tasks {
        let (count, h) = t.await??;
        total += count;
        all.add(&h).context("merge histograms")?;
    }
    Ok(json!({
        "scenario": "echo",
        "mode": "closed",
        "label": label,
        "tls": target.tls.is_some(),
        "conns": o.conns,
        "size": o.size,
        "msgs": total,
        "secs": secs,
        "msgs_per_sec": total as f64 / secs,
        "cpu_us_per_msg": per_event_us(cpu0, cpu1, total),
        "cpu_pct": cpu_pct(cpu0, cpu1, secs),
        "generator_cpu_pct": 100.0 * gen1.saturating_sub(gen0).as_secs_f64() / secs,
        "core_busy_pct": crate::procfs::busy_pct(&ticks0, &ticks1),
        "latency": hist::summary(&all),
    }))
}

fn cpu_pct(a: Option<Duration>, b: Option<Duration>, secs: f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(100.0 * b.saturating_sub(a).as_secs_f64() / secs),
        _ => None,
    }
}

async fn run_open(
    target: Target,
    procs: Procs,
    label: &str,
    o: Options,
) -> Result<serde_json::Value> {
    if target.tls.is_some() {
        bail!("the open-loop run is plain ws:// only");
    }
    let src = Sources {
        role: 3,
        per_addr: 1,
    };
    let mut conns = Vec::new();
    let mut rng = Rng::new(3);
    for i in 0..o.conns {
        let c = ws_connect(&target, src.addr(i), &mut rng, Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("connection {i} to {}: {e}", target.addr))?;
        conns.push(c);
    }
    let mut streams = Vec::new();
    for c in conns {
        streams.push(into_tcp(c)?);
    }
    let plan = Plan {
        rate: o.rate,
        size: o.size,
        warmup: o.warmup,
        phase_at: None,
        end: o.warmup + o.duration,
    };
    let cpu_procs = procs.clone();
    let cpu_mark = tokio::spawn(async move {
        tokio::time::sleep(o.warmup).await;
        cpu_procs.cpu_opt()
    });
    let t0 = Instant::now();
    let r = open_loop(streams, &plan).await?;
    let cpu0 = cpu_mark.await??;
    let cpu1 = procs.cpu_opt()?;
    let secs = t0.elapsed().as_secs_f64() - o.warmup.as_secs_f64();
    Ok(json!({
        "scenario": "echo",
        "mode": "open",
        "label": label,
        "tls": false,
        "conns": o.conns,
        "size": o.size,
        "rate": o.rate,
        "sent": r.sent,
        "received": r.received,
        "lost": r.sent.saturating_sub(r.received),
        "reordered": r.reordered,
        "closed": r.closed,
        "cpu_us_per_msg": per_event_us(cpu0, cpu1, r.phases[0].len()),
        "cpu_pct": cpu_pct(cpu0, cpu1, secs),
        "latency": hist::summary(&r.phases[0]),
        "pacer_late": hist::summary(&r.late),
    }))
}

/// A plain upgraded connection as a tokio `TcpStream` plus its early bytes.
pub fn into_tcp(c: crate::net::WsConn) -> Result<(TcpStream, Vec<u8>)> {
    // The open loop needs the socket itself (to duplicate it for the pacer).
    match c.io {
        Stream::Plain(s) => Ok((s, c.early)),
        Stream::Tls(_) => bail!("the open loop needs plain ws:// connections"),
    }
}

/// Connects `n` plain connections from `src` (used by the abuse scenario).
pub async fn connect_plain(
    target: &Target,
    src: Sources,
    n: u32,
    first: u32,
) -> Result<Vec<(TcpStream, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rng = Rng::new(u64::from(first) + 5);
    for i in first..first + n {
        let c = ws_connect(target, src.addr(i), &mut rng, Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("connection {i} from {}: {e}", src.addr(i)))?;
        out.push(into_tcp(c)?);
    }
    Ok(out)
}

/// When and what the pacer sends; instants are offsets from the start of the run.
pub struct Plan {
    pub rate: f64,
    pub size: usize,
    /// Latencies of messages scheduled before this are not recorded.
    pub warmup: Duration,
    /// Messages scheduled from here on go to the second histogram (abuse: the attack).
    pub phase_at: Option<Duration>,
    pub end: Duration,
}

pub struct OpenResult {
    pub sent: u64,
    pub received: u64,
    pub reordered: u64,
    /// Connections the target closed before the end.
    pub closed: u64,
    /// [before phase_at, from phase_at on]
    pub phases: [Histogram<u64>; 2],
    /// How late the pacer sent, against schedule.
    pub late: Histogram<u64>,
}

/// Runs the open loop over already-upgraded plain connections until `plan.end`, then
/// waits up to two seconds for the last echoes.
pub async fn open_loop(streams: Vec<(TcpStream, Vec<u8>)>, plan: &Plan) -> Result<OpenResult> {
    let base = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let received_total = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (i, (stream, early)) in streams.into_iter().enumerate() {
        let std = stream.into_std().context("socket to std")?;
        let writer = std.try_clone().context("dup socket")?;
        let stream = TcpStream::from_std(std).context("socket back to tokio")?;
        writers.push(writer);
        let (mut stop_rx, received_total) = (stop_rx.clone(), received_total.clone());
        let (warmup, phase_at, size) = (plan.warmup, plan.phase_at, plan.size);
        readers.push(tokio::spawn(async move {
            let mut stream = stream;
            let mut reader = FrameReader::new(early, size + 64, size.max(1 << 16));
            let mut phases = [hist::new()?, hist::new()?];
            let (mut received, mut reordered, mut last, mut closed) =
                (0u64, 0u64, None::<u64>, false);
            loop {
                let frame = tokio::select! {
                    _ = stop_rx.changed() => break,
                    f = reader.next(&mut stream) => f,
                };
                let now = base.elapsed().as_nanos() as u64;
                match frame {
                    Ok(Some((h, p))) if h.opcode == ws::OP_BINARY && p.len() >= STAMP => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&p[..8]);
                        let seq = u64::from_le_bytes(b);
                        b.copy_from_slice(&p[8..16]);
                        let at = u64::from_le_bytes(b);
                        received += 1;
                        received_total.fetch_add(1, Ordering::Relaxed);
                        if last.is_some_and(|l| seq <= l) {
                            reordered += 1;
                        }
                        last = Some(last.map_or(seq, |l| l.max(seq)));
                        if at >= warmup.as_nanos() as u64 {
                            let phase = match phase_at {
                                Some(p) if at >= p.as_nanos() as u64 => 1,
                                _ => 0,
                            };
                            hist::record(&mut phases[phase], now.saturating_sub(at));
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        closed = true;
                        break;
                    }
                }
                let _ = i;
            }
            anyhow::Ok((received, reordered, closed, phases))
        }));
    }
    let (rate, size, end) = (plan.rate, plan.size, plan.end);
    let pacer = tokio::task::spawn_blocking(move || pace(writers, base, rate, size, end));
    let (sent, late) = pacer.await??;
    // Wait for the echoes still in flight (bounded).
    let deadline = Instant::now() + Duration::from_secs(2);
    while received_total.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let mut out = OpenResult {
        sent,
        received: 0,
        reordered: 0,
        closed: 0,
        phases: [hist::new()?, hist::new()?],
        late,
    };
    for r in readers {
        let (received, reordered, closed, phases) = r.await??;
        out.received += received;
        out.reordered += reordered;
        out.closed += u64::from(closed);
        for (all, one) in out.phases.iter_mut().zip(phases.iter()) {
            all.add(one).context("merge histograms")?;
        }
    }
    Ok(out)
}

/// The pacer: sends at fixed instants, round-robin, never blocking on a socket.
fn pace(
    mut writers: Vec<std::net::TcpStream>,
    base: Instant,
    rate: f64,
    size: usize,
    end: Duration,
) -> Result<(u64, Histogram<u64>)> {
    // Sleep precisely: the default 50 µs timer slack would show up as latency.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let n = writers.len();
    if n == 0 || rate <= 0.0 {
        return Ok((0, hist::new()?));
    }
    let period = 1e9 / rate;
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut dead = vec![false; n];
    let mut seqs = vec![0u64; n];
    let mut rng = Rng::new(99);
    let mut payload = vec![0u8; size];
    let mut late = hist::new()?;
    let mut sent = 0u64;
    let end_ns = end.as_nanos() as f64;
    let mut k = 0u64;
    loop {
        let at = k as f64 * period;
        if at >= end_ns {
            break;
        }
        let at = Duration::from_nanos(at as u64);
        let now = base.elapsed();
        if at > now {
            std::thread::sleep(at - now);
        }
        hist::record(
            &mut late,
            base.elapsed().saturating_sub(at).as_nanos() as u64,
        );
        let c = (k % n as u64) as usize;
        k += 1;
        if dead[c] {
            continue;
        }
        payload[..8].copy_from_slice(&seqs[c].to_le_bytes());
        payload[8..16].copy_from_slice(&(at.as_nanos() as u64).to_le_bytes());
        seqs[c] += 1;
        ws::push_frame(
            &mut pending[c],
            true,
            ws::OP_BINARY,
            &payload,
            Some(rng.mask()),
        );
        sent += 1;
        match writers[c].write(&pending[c]) {
            Ok(w) => {
                pending[c].drain(..w);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => dead[c] = true,
        }
        // A connection that cannot take anything for 64 MiB is given up on (bounded).
        if pending[c].len() > 64 << 20 {
            dead[c] = true;
        }
    }
    // Flush what is left (bounded by the reader's two-second wait on the other side).
    let deadline = Instant::now() + Duration::from_secs(1);
    for (c, w) in writers.iter_mut().enumerate() {
        while !pending[c].is_empty() && !dead[c] && Instant::now() < deadline {
            match w.write(&pending[c]) {
                Ok(n) => {
                    pending[c].drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => dead[c] = true,
            }
        }
    }
    Ok((sent, late))
}
