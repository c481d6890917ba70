//! The `flood` scenario's attacker: one source address (127.13.0.1) that
//! - runs `loops` parallel loops of connect (+ TLS) + upgrade as fast as they go, answering
//!   every refusal by closing with RST (SO_LINGER 0, as real flooders do so that they never
//!   run out of ports),
//! - holds what it is admitted, up to `hold` connections (the per-address cap),
//! - floods messages as fast as it can on `spam` of those, leaves a fragmented message
//!   unfinished on `fragments` others,
//! - dribbles `slowloris` request heads, one byte a second.
//!
//! Every attempt's outcome is counted by kind (HTTP status, reset, close, TLS failure,
//! timeout), and every held connection records how it ended (close code, EOF, reset).
//! All of it runs on its own thread(s) and runtime, at a lower priority (`nice`), so the
//! well-behaved clients and the echo backend sharing core 1 are not queued behind it: the
//! clients' latency should show the proxy's delay, not the generator's.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::net::{FrameReader, Stream, Target};
use crate::ws::{self, Rng};

/// The attacker's one address.
pub const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 13, 0, 1);

/// An attempt that gets no answer within this is given up (and counted as a timeout).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on the attempts of one loop, whatever the duration (bounded loops): far
/// above what one core can do in the longest sensible attack (64 loops × 2 M).
const MAX_ATTEMPTS_PER_LOOP: u64 = 2_000_000;

/// Frames per write of a spamming connection (64 B payload each).
const SPAM_BATCH: usize = 64;

/// Upper bound on the batches one spamming connection writes (bounded loops).
const MAX_SPAM_BATCHES: u64 = 50_000_000;

/// Pause after an error on our side (no port, no descriptor), so a loop never spins on it.
const LOCAL_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// What the attacker does; see the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub loops: u32,
    pub hold: u32,
    pub spam: u32,
    pub fragments: u32,
    pub slowloris: u32,
    pub threads: u32,
    pub nice: i32,
    /// Attempts per second over all loops; 0 = as fast as they go.
    pub rate: u32,
}

/// How one connection attempt ended.
enum Outcome {
    Admitted(Stream, Vec<u8>),
    Refused(Refusal),
    /// Our own failure (no free port, no descriptor): not an attempt the proxy saw.
    Local,
}

/// Kinds of refusal, as the attacker sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Any answer other than 101.
    Status(u16),
    /// The connection was reset (before or after the request).
    Reset,
    /// Closed (EOF) with no answer.
    Closed,
    /// The TLS handshake failed (closed, reset or an alert before it completed).
    TlsFail,
    /// No answer within [`ATTEMPT_TIMEOUT`].
    Timeout,
    /// The kernel refused the connection (no listener, or its queue is full).
    ConnRefused,
}

impl Refusal {
    fn key(self) -> String {
        match self {
            Refusal::Status(s) => format!("http_{s}"),
            Refusal::Reset => "reset".into(),
            Refusal::Closed => "closed".into(),
            Refusal::TlsFail => "tls_fail".into(),
            Refusal::Timeout => "timeout".into(),
            Refusal::ConnRefused => "conn_refused".into(),
        }
    }
}

/// Counts kept while the attack runs; read once at the end.
#[derive(Default)]
pub struct Tally {
    pub attempts: AtomicU64,
    pub admitted: AtomicU64,
    /// Admitted while already holding `hold`: closed at once (RST).
    pub admitted_over_hold: AtomicU64,
    pub local_errors: AtomicU64,
    /// TLS handshakes completed, and of those the ones whose upgrade was then refused.
    pub tls_completed: AtomicU64,
    pub tls_completed_refused: AtomicU64,
    pub spam_frames: AtomicU64,
    pub fragments_sent: AtomicU64,
    pub slowloris_conns: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    slowloris_ends: Mutex<BTreeMap<String, u64>>,
    held_ends: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += 1;
    }
}

fn snapshot(map: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    map.lock().map(|m| m.clone()).unwrap_or_default()
}

impl Tally {
    pub fn refused_total(&self) -> u64 {
        snapshot(&self.refused).values().sum()
    }

    pub fn slowloris_refused(&self) -> u64 {
        snapshot(&self.slowloris_ends).values().sum()
    }

    /// The counts as JSON (for the run's output).
    pub fn to_json(&self, secs: f64) -> serde_json::Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let attempts = get(&self.attempts);
        let refused = self.refused_total();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        json!({
            "attempts": attempts,
            "attempts_per_sec": per_sec(attempts),
            "refused": refused,
            "refused_per_sec": per_sec(refused),
            "refused_by_kind": snapshot(&self.refused),
            "admitted": get(&self.admitted),
            "admitted_over_hold": get(&self.admitted_over_hold),
            "local_errors": get(&self.local_errors),
            "tls_completed": get(&self.tls_completed),
            "tls_completed_refused": get(&self.tls_completed_refused),
            "spam_frames": get(&self.spam_frames),
            "fragments_sent": get(&self.fragments_sent),
            "slowloris_conns": get(&self.slowloris_conns),
            "slowloris_ends": snapshot(&self.slowloris_ends),
            "held_ends": snapshot(&self.held_ends),
        })
    }
}

/// Runs the attack on its own thread(s) until `stop` turns true; returns when every task
/// has ended (each is bounded). The runtime's threads run at `plan.nice`.
pub fn spawn(
    target: Target,
    plan: Plan,
    tally: Arc<Tally>,
    stop: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>> {
    let nice = plan.nice;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.threads.max(1) as usize)
        .thread_name("flood-attacker")
        .on_thread_start(move || set_nice(nice))
        .enable_all()
        .build()
        .context("attacker runtime")?;
    std::thread::Builder::new()
        .name("flood-attack".into())
        .spawn(move || rt.block_on(attack(target, plan, tally, stop)))
        .context("attacker thread")
}

/// Lowers this thread's priority (Linux: the nice value is per thread).
fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority on our own thread id only changes that thread's nice value.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// The shared slots of admitted connections: held at all, spamming, fragment left open.
#[derive(Clone)]
struct Slots {
    hold: Arc<Semaphore>,
    spam: Arc<Semaphore>,
    fragments: Arc<Semaphore>,
}

async fn attack(target: Target, plan: Plan, tally: Arc<Tally>, stop: watch::Receiver<bool>) {
    let slots = Slots {
        hold: Arc::new(Semaphore::new(plan.hold as usize)),
        spam: Arc::new(Semaphore::new(plan.spam as usize)),
        fragments: Arc::new(Semaphore::new(plan.fragments as usize)),
    };
    let mut tasks = Vec::new();
    for w in 0..plan.loops {
        let (target, tally, stop, slots) =
            (target.clone(), tally.clone(), stop.clone(), slots.clone());
        // With a rate, each loop starts an attempt every `loops / rate` seconds at most.
        let pace = (plan.rate > 0)
            .then(|| Duration::from_secs_f64(f64::from(plan.loops) / f64::from(plan.rate)));
        tasks.push(tokio::spawn(async move {
            flood_loop(w, target, tally, stop, slots, pace).await;
        }));
    }
    for i in 0..plan.slowloris {
        let (target, tally, stop) = (target.clone(), tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            slowloris(i, target, tally, stop).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// One loop: attempt, count, hand an admitted connection to a holder, again at once.
async fn flood_loop(
    w: u32,
    target: Target,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
    slots: Slots,
    pace: Option<Duration>,
) {
    let mut rng = Rng::new(u64::from(w) + 13_000);
    let mut holders = Vec::new();
    let mut next = tokio::time::Instant::now();
    for _ in 0..MAX_ATTEMPTS_PER_LOOP {
        if *stop.borrow() {
            break;
        }
        if let Some(pace) = pace {
            // Behind schedule (a slow attempt) the loop goes on at once, never in a burst.
            next = next.max(tokio::time::Instant::now() - pace) + pace;
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        let outcome = tokio::select! {
            _ = stop.changed() => break,
            o = attempt(&target, &mut rng, &tally) => o,
        };
        match outcome {
            Outcome::Local => {
                tally.local_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(LOCAL_ERROR_PAUSE).await;
            }
            Outcome::Refused(r) => {
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                bump(&tally.refused, r.key());
            }
            Outcome::Admitted(io, early) => {
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                tally.admitted.fetch_add(1, Ordering::Relaxed);
                let Ok(hold) = slots.hold.clone().try_acquire_owned() else {
                    // Over what we mean to hold: dropped, which resets it (SO_LINGER 0).
                    tally.admitted_over_hold.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (role, slot) = Role::pick(&slots);
                let (tally, stop) = (tally.clone(), stop.clone());
                holders.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                holders.push(tokio::spawn(async move {
                    held(io, early, role, tally, stop).await;
                    drop((hold, slot));
                }));
            }
        }
    }
    for h in holders {
        let _ = h.await;
    }
}

/// A TCP socket from the attacker's address that resets when closed (SO_LINGER 0).
fn flood_socket() -> std::io::Result<TcpSocket> {
    let sock = TcpSocket::new_v4()?;
    set_zero_linger(sock.as_raw_fd())?;
    sock.bind(SocketAddr::new(ATTACKER.into(), 0))?;
    Ok(sock)
}

fn set_zero_linger(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` outlives the call and its size is passed; fd is a socket we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One connect (+ TLS) + upgrade, within [`ATTEMPT_TIMEOUT`].
async fn attempt(target: &Target, rng: &mut Rng, tally: &Tally) -> Outcome {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt_inner(target, rng, tally)).await {
        Ok(o) => o,
        Err(_) => Outcome::Refused(Refusal::Timeout),
    }
}

async fn attempt_inner(target: &Target, rng: &mut Rng, tally: &Tally) -> Outcome {
    let Ok(sock) = flood_socket() else {
        return Outcome::Local;
    };
    let tcp = match sock.connect(target.addr).await {
        Ok(t) => t,
        Err(e) => return connect_error(&e),
    };
    let _ = tcp.set_nodelay(true);
    let (io, tls) = match &target.tls {
        None => (Stream::Plain(tcp), false),
        Some(connector) => {
            let Ok(name) = ServerName::try_from(target.host.clone()) else {
                return Outcome::Local;
            };
            match connector.connect(name, tcp).await {
                Ok(s) => {
                    tally.tls_completed.fetch_add(1, Ordering::Relaxed);
                    (Stream::Tls(Box::new(s)), true)
                }
                Err(_) => return Outcome::Refused(Refusal::TlsFail),
            }
        }
    };
    let outcome = upgrade(io, target, rng).await;
    if tls && matches!(outcome, Outcome::Refused(_)) {
        tally.tls_completed_refused.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

fn connect_error(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Outcome::Refused(Refusal::ConnRefused),
        ConnectionReset | ConnectionAborted => Outcome::Refused(Refusal::Reset),
        _ => Outcome::Local,
    }
}

/// Sends the upgrade request and reads the answer's head.
async fn upgrade(mut io: Stream, target: &Target, rng: &mut Rng) -> Outcome {
    let req = ws::upgrade_request(&target.host, &target.path, rng);
    // A proxy refusing at accept may answer (and close) before the request is written:
    // a failed write is not the end, the answer may already be waiting to be read.
    let wrote = io.write_all(&req).await;
    match read_head(&mut io).await {
        Ok((101, early)) => Outcome::Admitted(io, early),
        Ok((code, _)) => Outcome::Refused(Refusal::Status(code)),
        Err(r) => match (r, wrote) {
            (Refusal::Closed, Err(e)) if is_reset(&e) => Outcome::Refused(Refusal::Reset),
            (r, _) => Outcome::Refused(r),
        },
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// The answer's status and the bytes read past its head.
async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<(u16, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match io.read(&mut chunk).await {
            Ok(0) => return Err(Refusal::Closed),
            Ok(n) => n,
            Err(e) if is_reset(&e) => return Err(Refusal::Reset),
            Err(_) => return Err(Refusal::Closed),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = ws::head_end(&buf) {
            let code = ws::status_code(&buf[..end]).unwrap_or(0);
            return Ok((code, buf.split_off(end)));
        }
        if buf.len() > ws::MAX_HEAD {
            // Not an HTTP answer we can read: status 0.
            return Ok((0, Vec::new()));
        }
    }
}

/// What an admitted connection does while held.
#[derive(Clone, Copy, Debug)]
enum Role {
    Spam,
    Fragment,
    Hold,
}

impl Role {
    /// Spam slots fill first, then fragment slots; the rest are only held. The permit (if
    /// any) is the slot, given back when the connection ends.
    fn pick(slots: &Slots) -> (Role, Option<OwnedSemaphorePermit>) {
        if let Ok(p) = slots.spam.clone().try_acquire_owned() {
            (Role::Spam, Some(p))
        } else if let Ok(p) = slots.fragments.clone().try_acquire_owned() {
            (Role::Fragment, Some(p))
        } else {
            (Role::Hold, None)
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Spam => "spam",
            Role::Fragment => "fragment",
            Role::Hold => "hold",
        }
    }
}

/// One held connection: does its role until the proxy ends it or the attack stops, and
/// records how it ended ("spam:close_1008", "hold:eof", "fragment:open_at_end", ...).
async fn held(
    io: Stream,
    early: Vec<u8>,
    role: Role,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let name = role.name();
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut rng = Rng::new(tally.admitted.load(Ordering::Relaxed) + 77);
    if let Role::Fragment = role {
        let mut f = Vec::new();
        ws::push_frame(&mut f, false, ws::OP_BINARY, &[7u8; 64], Some(rng.mask()));
        if wr.write_all(&f).await.is_ok() {
            tally.fragments_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    let writer = async {
        if let Role::Spam = role {
            spam(&mut wr, &mut rng, &tally).await;
        }
        // Writing failed (or there was nothing to write): the reader sees how the proxy
        // ended the connection.
        std::future::pending::<String>().await
    };
    let end = tokio::select! {
        _ = stop.changed() => "open_at_end".to_string(),
        e = writer => e,
        e = how_it_ended(&mut rd, early) => e,
    };
    bump(&tally.held_ends, format!("{name}:{end}"));
}

/// Frames as fast as the socket takes them: one prebuilt batch, written again and again.
async fn spam<W: AsyncWrite + Unpin>(wr: &mut W, rng: &mut Rng, tally: &Tally) {
    let mut batch = Vec::with_capacity(SPAM_BATCH * 80);
    for _ in 0..SPAM_BATCH {
        ws::push_frame(
            &mut batch,
            true,
            ws::OP_BINARY,
            &[1u8; 64],
            Some(rng.mask()),
        );
    }
    for _ in 0..MAX_SPAM_BATCHES {
        if wr.write_all(&batch).await.is_err() {
            return;
        }
        tally
            .spam_frames
            .fetch_add(SPAM_BATCH as u64, Ordering::Relaxed);
    }
}

/// Reads (and drops) whatever comes back until the end: "close_CODE", "eof", "reset"
/// or "error".
async fn how_it_ended<R: AsyncRead + Unpin>(rd: &mut R, early: Vec<u8>) -> String {
    let mut reader = FrameReader::new(early, 16 * 1024, 1 << 20);
    loop {
        match reader.next(rd).await {
            Ok(Some((h, p))) if h.opcode == ws::OP_CLOSE => {
                return match p.get(..2) {
                    Some(c) => format!("close_{}", u16::from_be_bytes([c[0], c[1]])),
                    None => "close_none".to_string(),
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => return "eof".to_string(),
            Err(e) => {
                let reset = e
                    .chain()
                    .filter_map(|c| c.downcast_ref::<std::io::Error>())
                    .any(is_reset);
                return if reset { "reset" } else { "error" }.to_string();
            }
        }
    }
}

/// One slowloris: connects (with TLS when the target has it), sends the start of a request
/// head, then one byte a second. When the proxy answers or ends the connection, the way it
/// did is counted and the slowloris reconnects at its next tick (at most once a second).
async fn slowloris(i: u32, target: Target, tally: Arc<Tally>, mut stop: watch::Receiver<bool>) {
    let head = format!(
        "GET /bench HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow-{i}: ",
        target.host
    );
    let started = Instant::now();
    // Bounded: one connection per second at most, for at most a day.
    for _ in 0..86_400u32 {
        if *stop.borrow() {
            return;
        }
        let end = tokio::select! {
            _ = stop.changed() => return,
            e = dribble(&target, head.as_bytes(), &tally) => e,
        };
        if let Some(end) = end {
            bump(&tally.slowloris_ends, end);
        }
        // The next try at the next whole second since the start: never faster than 1/s.
        let next = Duration::from_secs(started.elapsed().as_secs() + 1);
        let wait = next.saturating_sub(started.elapsed());
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One slowloris connection, until the proxy answers or ends it: how it ended, or `None`
/// when we could not connect (our own failure).
async fn dribble(target: &Target, head: &[u8], tally: &Tally) -> Option<String> {
    let io = match slow_connect(target).await {
        Ok(io) => io,
        Err(Some(r)) => return Some(r.key()),
        Err(None) => return None,
    };
    tally.slowloris_conns.fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = async {
        if wr.write_all(head).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        // At most an hour of bytes; the proxy's head timeout ends it long before.
        for _ in 0..3600 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if wr.write_all(b"a").await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        match read_head(&mut rd).await {
            Ok((code, _)) => Refusal::Status(code).key(),
            Err(r) => r.key(),
        }
    };
    tokio::pin!(reader);
    let end = tokio::select! {
        k = &mut reader => k,
        () = writer => {
            // Our write failed: the answer or the reset that caused it is what to count.
            tokio::time::timeout(Duration::from_secs(1), &mut reader)
                .await
                .unwrap_or_else(|_| "write_failed".to_string())
        }
    };
    Some(end)
}

/// Connects a slowloris (TCP, then TLS when the target has it), within
/// [`ATTEMPT_TIMEOUT`]. `Err(Some)`: the proxy refused; `Err(None)`: our own failure.
async fn slow_connect(target: &Target) -> Result<Stream, Option<Refusal>> {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, slow_connect_inner(target)).await {
        Ok(r) => r,
        Err(_) => Err(Some(Refusal::Timeout)),
    }
}

async fn slow_connect_inner(target: &Target) -> Result<Stream, Option<Refusal>> {
    let sock = flood_socket().map_err(|_| None)?;
    let tcp: TcpStream = match sock.connect(target.addr).await {
        Ok(t) => t,
        Err(e) => {
            return Err(match connect_error(&e) {
                Outcome::Refused(r) => Some(r),
                _ => None,
            });
        }
    };
    let Some(connector) = &target.tls else {
        return Ok(Stream::Plain(tcp));
    };
    let Ok(name) = ServerName::try_from(target.host.clone()) else {
        return Err(None);
    };
    match connector.connect(name, tcp).await {
        Ok(s) => Ok(Stream::Tls(Box::new(s))),
        Err(_) => Err(Some(Refusal::TlsFail)),
    }
}
