//! Issue 19's reconnect storm: a capacity-limited WebSocket backend (in this process),
//! N clients connected through the target and echoing once a second, the backend killed
//! and restarted `outage` later, and every client reconnecting on its own policy.
//!
//! The backend: an upgrade holds one of `slots` slots for `hold` (so it completes
//! `slots / hold` upgrades a second, R); with more than `max_waiting` upgrades waiting for
//! a slot it answers 503 at once, and one that waited over `max_wait` gets 503. Killing it
//! closes its listener and every connection (what the kernel does for a killed process).
//!
//! The clients: `naive` reconnect at once and retry every `interval` (no jitter);
//! `jitter` (the control) wait a uniformly random time in `[0, min(cap, base × 2^n))`
//! before the n-th retry (exponential back-off with full jitter), also before the first
//! reconnect.
//!
//! Measured from the restart: when 99 % and 100 % of the clients are back (upgraded and
//! an echo received), attempts started after the restart and what they got, the backend's
//! peak of waiting upgrades and its 503s, and the proxy's CPU from the kill to the end.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::net::{FrameReader, Refused, Sources, Target, ws_connect};
use crate::procfs::Procs;
use crate::ws::{self, Rng};

/// The scenario's knobs (defaults: issue 19).
#[derive(Clone, Debug)]
pub struct Options {
    pub clients: u32,
    pub per_addr: u32,
    pub backend: SocketAddr,
    pub slots: u32,
    pub hold: Duration,
    pub max_waiting: u32,
    pub max_wait: Duration,
    pub outage: Duration,
    pub settle: Duration,
    pub deadline: Duration,
    pub jitter: bool,
    pub interval: Duration,
    pub backoff_cap: Duration,
    pub attempt_timeout: Duration,
    /// What the proxy under test was configured with (`plain`, `queue`, `rate`): a label.
    pub variant: String,
}

// === the backend ===

/// What the backend saw since the last [`Backend::reset`].
#[derive(Default)]
struct BackendStats {
    waiting: Cell<u32>,
    peak_waiting: Cell<u32>,
    in_slots: Cell<u32>,
    peak_in_slots: Cell<u32>,
    upgrades: Cell<u64>,
    refused_full: Cell<u64>,
    refused_waited: Cell<u64>,
    /// First and last 101 since the reset: the rate the backend achieved.
    first_upgrade: Cell<Option<Instant>>,
    last_upgrade: Cell<Option<Instant>>,
}

/// The backend, run on a thread of its own (its own single-threaded runtime), as a real
/// backend runs in a process of its own: its accepts, reads and 101s do not wait behind
/// the clients' events. The conductor drives it with [`Cmd`]s.
struct Backend {
    tx: tokio::sync::mpsc::UnboundedSender<Cmd>,
}

enum Cmd {
    Start(tokio::sync::oneshot::Sender<Result<()>>),
    Kill,
    Reset,
    Report(tokio::sync::oneshot::Sender<Value>),
}

impl Backend {
    fn spawn(o: &Options) -> Result<Backend> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let o = o.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("backend runtime")?;
        std::thread::Builder::new()
            .name("storm-backend".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let mut core = BackendCore::new(&o);
                    while let Some(cmd) = rx.recv().await {
                        match cmd {
                            Cmd::Start(done) => {
                                let _ = done.send(core.start());
                            }
                            Cmd::Kill => core.kill(),
                            Cmd::Reset => core.reset(),
                            Cmd::Report(out) => {
                                let _ = out.send(core.report());
                            }
                        }
                    }
                    core.kill();
                });
            })
            .context("backend thread")?;
        Ok(Backend { tx })
    }

    async fn start(&self) -> Result<()> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Cmd::Start(done))
            .ok()
            .context("backend thread gone")?;
        rx.await.context("backend thread gone")?
    }

    fn kill(&self) {
        let _ = self.tx.send(Cmd::Kill);
    }

    fn reset(&self) {
        let _ = self.tx.send(Cmd::Reset);
    }

    async fn report(&self) -> Value {
        let (out, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Cmd::Report(out));
        rx.await.unwrap_or(Value::Null)
    }
}

struct BackendCore {
    addr: SocketAddr,
    slots: Rc<Semaphore>,
    stats: Rc<BackendStats>,
    /// Sent to end the accept loop and every connection (the kill).
    kill: Option<watch::Sender<bool>>,
    /// The listener, closed by [`BackendCore::kill`] itself (at once, before any
    /// connection is closed) so that no client reconnecting on a closed connection finds
    /// it still accepting.
    listener: Rc<RefCell<Option<TcpListener>>>,
    o: Options,
}

impl BackendCore {
    fn new(o: &Options) -> BackendCore {
        BackendCore {
            addr: o.backend,
            slots: Rc::new(Semaphore::new(o.slots as usize)),
            stats: Rc::default(),
            kill: None,
            listener: Rc::default(),
            o: o.clone(),
        }
    }

    fn start(&mut self) -> Result<()> {
        let sock = tokio::net::TcpSocket::new_v4().context("socket")?;
        sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
        sock.bind(self.addr)
            .with_context(|| format!("bind {}", self.addr))?;
        let listener = sock.listen(4096).context("listen")?;
        let (tx, rx) = watch::channel(false);
        self.kill = Some(tx);
        self.slots = Rc::new(Semaphore::new(self.o.slots as usize));
        self.listener = Rc::new(RefCell::new(Some(listener)));
        let (slots, stats, o) = (self.slots.clone(), self.stats.clone(), self.o.clone());
        let listener = self.listener.clone();
        tokio::task::spawn_local(accept_loop(listener, rx, slots, stats, o));
        Ok(())
    }

    fn kill(&mut self) {
        self.listener.borrow_mut().take();
        if let Some(tx) = self.kill.take() {
            let _ = tx.send(true);
        }
    }

    fn reset(&self) {
        let s = &self.stats;
        s.peak_waiting.set(s.waiting.get());
        s.peak_in_slots.set(s.in_slots.get());
        s.upgrades.set(0);
        s.refused_full.set(0);
        s.refused_waited.set(0);
        s.first_upgrade.set(None);
        s.last_upgrade.set(None);
    }

    fn report(&self) -> Value {
        let s = &self.stats;
        let achieved = match (s.first_upgrade.get(), s.last_upgrade.get()) {
            (Some(a), Some(b)) if b > a && s.upgrades.get() > 1 => {
                Some((s.upgrades.get() - 1) as f64 / b.duration_since(a).as_secs_f64())
            }
            _ => None,
        };
        json!({
            "achieved_rate_per_s": achieved,
            "peak_waiting": s.peak_waiting.get(),
            "peak_in_slots": s.peak_in_slots.get(),
            "upgrades": s.upgrades.get(),
            "refused_503": s.refused_full.get() + s.refused_waited.get(),
            "refused_503_full": s.refused_full.get(),
            "refused_503_waited": s.refused_waited.get(),
        })
    }
}

async fn accept_loop(
    listener: Rc<RefCell<Option<TcpListener>>>,
    mut kill: watch::Receiver<bool>,
    slots: Rc<Semaphore>,
    stats: Rc<BackendStats>,
    o: Options,
) {
    loop {
        let accepted = tokio::select! {
            _ = kill.changed() => return,
            a = std::future::poll_fn(|cx| match &*listener.borrow() {
                Some(l) => l.poll_accept(cx).map(Some),
                None => std::task::Poll::Ready(None),
            }) => match a {
                Some(a) => a,
                None => return,
            },
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut kill = kill.clone();
        let (slots, stats, o) = (slots.clone(), stats.clone(), o.clone());
        tokio::task::spawn_local(async move {
            tokio::select! {
                _ = kill.changed() => {}
                _ = serve(stream, &slots, &stats, &o) => {}
            }
        });
    }
}

/// Counts one upgrade in a gauge (and its peak) while it lives; a killed connection's
/// guard is dropped with its task.
struct Gauge<'a>(&'a Cell<u32>);

impl<'a> Gauge<'a> {
    fn new(now: &'a Cell<u32>, peak: &Cell<u32>) -> Gauge<'a> {
        now.set(now.get() + 1);
        peak.set(peak.get().max(now.get()));
        Gauge(now)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

async fn serve(mut stream: TcpStream, slots: &Semaphore, stats: &BackendStats, o: &Options) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 4096];
    let mut end = 0;
    let head_len = loop {
        if end == buf.len() {
            return;
        }
        match stream.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
        if let Some(h) = ws::head_end(&buf[..end]) {
            break h;
        }
    };
    let Some(key) = ws::header(&buf[..head_len], "sec-websocket-key").map(<[u8]>::to_vec) else {
        return;
    };
    const BUSY: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy";
    if stats.waiting.get() >= o.max_waiting {
        stats.refused_full.set(stats.refused_full.get() + 1);
        let _ = stream.write_all(BUSY).await;
        return;
    }
    let permit = {
        let _w = Gauge::new(&stats.waiting, &stats.peak_waiting);
        tokio::time::timeout(o.max_wait, slots.acquire()).await
    };
    let Ok(Ok(_permit)) = permit else {
        stats.refused_waited.set(stats.refused_waited.get() + 1);
        let _ = stream.write_all(BUSY).await;
        return;
    };
    let in_slot = Gauge::new(&stats.in_slots, &stats.peak_in_slots);
    // The expensive part of an upgrade (authentication, session set-up): it holds the slot.
    tokio::time::sleep(o.hold).await;
    drop(in_slot);
    drop(_permit);
    if stream.write_all(&ws::upgrade_response(&key)).await.is_err() {
        return;
    }
    stats.upgrades.set(stats.upgrades.get() + 1);
    let now = Instant::now();
    stats
        .first_upgrade
        .set(stats.first_upgrade.get().or(Some(now)));
    stats.last_upgrade.set(Some(now));
    buf.copy_within(head_len..end, 0);
    end -= head_len;
    let _ = crate::backend::echo_loop(stream, buf, end, 1 << 16).await;
}

// === the clients ===

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Connecting,
    Steady,
    Down,
    Restarted,
}

/// Shared between the clients and the conductor (one thread: `Rc` and `Cell`).
struct World {
    target: Target,
    o: Options,
    phase: Cell<Phase>,
    restarted: Cell<Option<Instant>>,
    connected: Cell<u32>,
    /// Per client: when it was back after the restart (upgraded, an echo received).
    back: RefCell<Vec<Option<Instant>>>,
    /// Per client: its connection broke after the kill (it has something to come back from).
    lost: RefCell<Vec<bool>>,
    attempts_down: Cell<u64>,
    attempts_after: Cell<u64>,
    failed_after: Cell<u64>,
    /// Outcomes of attempts after the kill: "101", "503", "closed", "timeout", ...
    outcomes: RefCell<BTreeMap<String, u64>>,
    /// Attempts per client after the restart.
    per_client: RefCell<Vec<u32>>,
    start_gate: Semaphore,
    echoes: Cell<u64>,
    errors: RefCell<Option<String>>,
}

impl World {
    fn record(&self, id: usize, started: Instant, outcome: &Result<(), Refused>) {
        let phase = self.phase.get();
        if phase < Phase::Down {
            return;
        }
        let after = self.restarted.get().is_some_and(|r| started >= r);
        let word = match outcome {
            Ok(()) => "101".to_string(),
            Err(Refused::Status(s)) => s.to_string(),
            Err(Refused::Closed) => "closed".to_string(),
            Err(Refused::Timeout) => "timeout".to_string(),
            Err(Refused::Other(e)) => {
                self.errors
                    .borrow_mut()
                    .get_or_insert_with(|| format!("{e:#}"));
                "error".to_string()
            }
        };
        *self.outcomes.borrow_mut().entry(word).or_default() += 1;
        if after {
            self.attempts_after.set(self.attempts_after.get() + 1);
            if outcome.is_err() {
                self.failed_after.set(self.failed_after.get() + 1);
            }
            if let Some(n) = self.per_client.borrow_mut().get_mut(id) {
                *n += 1;
            }
        } else {
            self.attempts_down.set(self.attempts_down.get() + 1);
        }
    }
}

async fn client(w: Rc<World>, id: u32, sources: Sources) {
    let src = sources.addr(id);
    let mut rng = Rng::new(u64::from(id) + 0x5707_u64);
    let mut fails: u32 = 0;
    let mut first = true;
    loop {
        let gate = if first {
            w.start_gate.acquire().await.ok()
        } else {
            None
        };
        let started = Instant::now();
        let attempt = ws_connect(&w.target, src, &mut rng, w.o.attempt_timeout).await;
        drop(gate);
        let conn = match attempt {
            Ok(c) => {
                w.record(id as usize, started, &Ok(()));
                c
            }
            Err(e) => {
                w.record(id as usize, started, &Err(e));
                fails += 1;
                let wait = if w.phase.get() == Phase::Connecting {
                    Duration::from_millis(100)
                } else {
                    retry_delay(&w.o, fails, &mut rng)
                };
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        fails = 0;
        if first {
            first = false;
            w.connected.set(w.connected.get() + 1);
        }
        echo(&w, id as usize, conn, &mut rng).await;
        if w.phase.get() >= Phase::Down
            && let Some(l) = w.lost.borrow_mut().get_mut(id as usize)
        {
            *l = true;
        }
        // The connection broke: naive clients come back at once, the control after a
        // jittered wait.
        if w.o.jitter {
            tokio::time::sleep(retry_delay(&w.o, 0, &mut rng)).await;
        }
    }
}

/// The wait before a retry after `fails` failures (0: the reconnect after a drop).
fn retry_delay(o: &Options, fails: u32, rng: &mut Rng) -> Duration {
    if !o.jitter {
        return o.interval;
    }
    let ceiling = o
        .interval
        .saturating_mul(1u32 << fails.min(16))
        .min(o.backoff_cap);
    let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ceiling.mul_f64(unit)
}

/// Echoes one 16-byte message a second until the connection ends.
async fn echo(w: &World, id: usize, conn: crate::net::WsConn, rng: &mut Rng) {
    let (mut rd, mut wr) = tokio::io::split(conn.io);
    let mut reader = FrameReader::new(conn.early, 256, 4096);
    let mut next = Instant::now();
    let mut frame = Vec::with_capacity(32);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                frame.clear();
                ws::push_frame(&mut frame, true, ws::OP_BINARY, b"storm-echo-16byt", Some(rng.mask()));
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                next += w.o.interval;
            }
            got = reader.next(&mut rd) => {
                match got {
                    Ok(Some((h, _))) if h.opcode == ws::OP_BINARY => {
                        w.echoes.set(w.echoes.get() + 1);
                        let lost = w.lost.borrow().get(id).copied().unwrap_or(false);
                        if lost && w.phase.get() == Phase::Restarted {
                            let mut back = w.back.borrow_mut();
                            if let Some(slot @ None) = back.get_mut(id) {
                                *slot = Some(Instant::now());
                            }
                        }
                    }
                    Ok(Some((h, _))) if h.opcode == ws::OP_CLOSE => return,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        }
    }
}

// === the conductor ===

pub async fn run(target: Target, procs: Procs, label: &str, o: Options) -> Result<Value> {
    let local = tokio::task::LocalSet::new();
    local.run_until(run_local(target, procs, label, o)).await
}

async fn run_local(target: Target, procs: Procs, label: &str, o: Options) -> Result<Value> {
    let n = o.clients as usize;
    let backend = Backend::spawn(&o)?;
    backend.start().await?;
    let w = Rc::new(World {
        target,
        o: o.clone(),
        phase: Cell::new(Phase::Connecting),
        restarted: Cell::new(None),
        connected: Cell::new(0),
        back: RefCell::new(vec![None; n]),
        lost: RefCell::new(vec![false; n]),
        attempts_down: Cell::new(0),
        attempts_after: Cell::new(0),
        failed_after: Cell::new(0),
        outcomes: RefCell::default(),
        per_client: RefCell::new(vec![0; n]),
        // The initial connections go in at the backend's concurrency: no storm before
        // the one measured.
        start_gate: Semaphore::new(o.slots as usize),
        echoes: Cell::new(0),
        errors: RefCell::default(),
    });
    let sources = Sources {
        role: 21,
        per_addr: o.per_addr,
    };
    for id in 0..o.clients {
        tokio::task::spawn_local(client(w.clone(), id, sources));
    }
    let t0 = Instant::now();
    while w.connected.get() < o.clients {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {} clients connected in 120 s (first error: {:?})",
                w.connected.get(),
                o.clients,
                w.errors.borrow()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t0.elapsed().as_secs_f64();
    w.phase.set(Phase::Steady);
    tokio::time::sleep(o.settle).await;

    let cpu0 = procs.cpu_opt()?;
    let killed = Instant::now();
    w.phase.set(Phase::Down);
    // Every client has to come back, whether its connection breaks now or was being
    // re-made when the backend went.
    w.lost.borrow_mut().iter_mut().for_each(|l| *l = true);
    backend.kill();
    tokio::time::sleep(o.outage).await;
    backend.reset();
    backend.start().await?;
    let restarted = Instant::now();
    w.restarted.set(Some(restarted));
    w.phase.set(Phase::Restarted);

    let all_back = |w: &World| w.back.borrow().iter().filter(|b| b.is_some()).count();
    let ends = restarted + o.deadline;
    while all_back(&w) < n && Instant::now() < ends {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = Instant::now();
    let cpu1 = procs.cpu_opt()?;
    let backend_report = backend.report().await;

    let mut times: Vec<f64> = w
        .back
        .borrow()
        .iter()
        .flatten()
        .map(|t| t.duration_since(restarted).as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |share: f64| -> Option<f64> {
        let need = ((n as f64) * share).ceil() as usize;
        (need >= 1 && times.len() >= need).then(|| times[need - 1])
    };
    let rate = f64::from(o.slots) / o.hold.as_secs_f64();
    let ideal = n as f64 / rate;
    let per_client = w.per_client.borrow();
    let max_attempts = per_client.iter().copied().max().unwrap_or(0);
    let cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
        _ => None,
    };
    let window = ended.duration_since(killed).as_secs_f64();
    let lost = w.lost.borrow().iter().filter(|l| **l).count();
    let t100 = at(1.0);
    Ok(json!({
        "scenario": "storm",
        "label": label,
        "variant": o.variant,
        "mode": if o.jitter { "jitter" } else { "naive" },
        "clients": o.clients,
        "per_addr": o.per_addr,
        "backend": {
            "slots": o.slots, "hold_ms": o.hold.as_millis() as u64,
            "max_waiting": o.max_waiting, "max_wait_ms": o.max_wait.as_millis() as u64,
            "rate_per_s": rate,
        },
        "outage_s": o.outage.as_secs_f64(),
        "initial_connect_s": connect_s,
        "ideal_s": ideal,
        "lost": lost,
        "back": times.len(),
        "t99_s": at(0.99),
        "t100_s": t100,
        "t99_x": at(0.99).map(|t| t / ideal),
        "t100_x": t100.map(|t| t / ideal),
        "attempts_during_outage": w.attempts_down.get(),
        "attempts_after_restart": w.attempts_after.get(),
        "attempts_per_client": w.attempts_after.get() as f64 / n as f64,
        "max_attempts_one_client": max_attempts,
        "wasted_after_restart": w.failed_after.get(),
        "wasted_pct_of_clients": w.failed_after.get() as f64 * 100.0 / n as f64,
        "outcomes": w.outcomes.borrow().clone(),
        "backend_after_restart": backend_report,
        "proxy_cpu_s": cpu_s,
        "proxy_cpu_pct": cpu_s.map(|c| c * 100.0 / window),
        "window_s": window,
        "echoes": w.echoes.get(),
        "first_error": w.errors.borrow().clone(),
    }))
}
