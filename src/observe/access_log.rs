//! The access log: one JSON line per finished connection and per refused handshake
//! (SPEC §6), written by a dedicated thread so a slow disk never stalls the relay.
//!
//! Connections hand over finished lines through a queue bounded in lines and in bytes (a
//! client shapes its lines: host, path, origin and user agent come from its request head);
//! when either bound is reached, the line is dropped and counted rather than blocking anyone.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::observe::report::{CloseInfo, Report, Rtt, Stalls, Stats};

mod json_line;

/// Lines that may wait for the writer; beyond this they are dropped (and counted).
const QUEUE_LINES: usize = 16 * 1024;

/// Bytes those lines may hold: without it, 16,384 lines of escaped 16 KiB request heads
/// would be hundreds of MiB when the writer falls behind.
const QUEUE_BYTES: u64 = 16 * 1024 * 1024;

/// The writer's pause after each batch: bounds how late a line appears, and lets the
/// queue (room for 16,384 lines, i.e. 1.6 M lines/s) fill between batches.
const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// Where access-log lines go (SPEC §2 `log.access`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    Stdout,
    Stderr,
    /// Appended to; reopened on SIGUSR1.
    File(std::path::PathBuf),
}

/// TLS facts about a client connection, as the access log writes them (`tls` object).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TlsInfo {
    pub version: Option<&'static str>,
    pub sni: Option<String>,
    /// Subject of the verified client certificate (mTLS).
    pub client_subject: Option<String>,
    /// The session was resumed (a ticket), not a full handshake.
    pub resumed: bool,
}

/// `"sticky":{"key":"cookie","fallback":false}`: where the sticky key came from (never the
/// key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StickyLog {
    pub key: &'static str,
    /// The configured source had no value: the client IP was used.
    pub fallback: bool,
}

/// Where lines end up. `Memory` is for tests that assert on whole lines.
#[derive(Clone, Debug)]
pub enum Sink {
    Target(AccessTarget),
    Memory(Arc<Mutex<Vec<String>>>),
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
    /// Set by SIGUSR1: the writer reopens its file before the next line (logrotate).
    reopen: Arc<AtomicBool>,
    /// Lines queued and not yet written out (for [`AccessLog::flush`] at exit).
    pending: Arc<AtomicU64>,
    /// Heap bytes of those lines, held under [`QUEUE_BYTES`].
    queued_bytes: Arc<AtomicU64>,
    /// `,"instance":"<name>"` with `cluster` (SPEC §6), added to every line.
    instance: std::sync::OnceLock<String>,
}

impl AccessLog {
    /// Opens the sink and starts the writer thread.
    pub fn start(sink: Sink) -> io::Result<AccessLog> {
        let (tx, rx) = sync_channel(QUEUE_LINES);
        let path = match &sink {
            Sink::Target(AccessTarget::File(path)) => Some(path.clone()),
            _ => None,
        };
        let out: Box<dyn Write + Send> = match sink {
            Sink::Target(AccessTarget::Stdout) => Box::new(io::stdout()),
            Sink::Target(AccessTarget::Stderr) => Box::new(io::stderr()),
            Sink::Target(AccessTarget::File(path)) => Box::new(open(&path)?),
            Sink::Memory(lines) => Box::new(MemoryWriter(lines)),
        };
        let log = AccessLog::new(tx);
        let writer = Writer {
            out: io::BufWriter::new(out),
            path,
            reopen: log.reopen.clone(),
            pending: log.pending.clone(),
            queued_bytes: log.queued_bytes.clone(),
        };
        std::thread::Builder::new()
            .name("wsgate-access-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(log)
    }

    fn new(tx: SyncSender<String>) -> AccessLog {
        AccessLog {
            tx,
            dropped: Arc::default(),
            reopen: Arc::default(),
            pending: Arc::default(),
            queued_bytes: Arc::default(),
            instance: std::sync::OnceLock::new(),
        }
    }

    /// Names this instance of a fleet on every line from now on (`cluster`, SPEC §6);
    /// the first name set stays.
    pub fn set_instance(&self, name: &str) {
        let quoted = serde_json::to_string(name).unwrap_or_default();
        let _ = self.instance.set(format!(",\"instance\":{quoted}"));
    }

    /// Queues one record; never blocks.
    pub fn log(&self, record: &Record<'_>) {
        let line = json_line::line(record, self.instance.get().map(String::as_str));
        let bytes = line_bytes(&line);
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens a file sink (after logrotate moved it away); a no-op for stdout/stderr.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // An empty line only wakes the writer; if the queue is full it is awake anyway.
        let _ = self.tx.try_send(String::new());
    }

    /// Waits (at most `within`) until every queued line is written: the last lines of a
    /// drain must not die with the process.
    pub fn flush(&self, within: Duration) {
        let _ = self.tx.try_send(String::new());
        let deadline = std::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The drop counter itself, for the metrics scrape.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// What a queued line holds on the heap: its capacity, which serde_json's growth may put
/// above its length.
fn line_bytes(line: &String) -> u64 {
    line.capacity() as u64
}

fn open(path: &std::path::Path) -> io::Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path)
}

struct Writer {
    out: io::BufWriter<Box<dyn Write + Send>>,
    path: Option<std::path::PathBuf>,
    reopen: Arc<AtomicBool>,
    pending: Arc<AtomicU64>,
    queued_bytes: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, rx: Receiver<String>) {
        while let Ok(line) = rx.recv() {
            self.reopen_if_asked();
            let mut written = self.write(&line);
            // Batch what is already queued, then flush so lines are visible promptly.
            while let Ok(line) = rx.try_recv() {
                written += self.write(&line);
            }
            let _ = self.out.flush();
            self.pending.fetch_sub(written, Ordering::AcqRel);
            // Lines arriving meanwhile queue up without waking this thread: under load,
            // one wake-up and one write(2) per batch, not per line.
            std::thread::sleep(BATCH_PAUSE);
        }
    }

    /// Writes a line (an empty one only wakes the writer); returns how many it wrote.
    /// Its bytes leave the queue's budget here: it is in the `BufWriter` or out.
    fn write(&mut self, line: &String) -> u64 {
        self.queued_bytes
            .fetch_sub(line_bytes(line), Ordering::AcqRel);
        if line.is_empty() {
            return 0;
        }
        let _ = writeln!(self.out, "{line}");
        1
    }

    fn reopen_if_asked(&mut self) {
        if !self.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        let _ = self.out.flush();
        match open(path) {
            Ok(file) => {
                self.out = io::BufWriter::new(Box::new(file));
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log; writing on to the old file");
            }
        }
    }
}

struct MemoryWriter(Arc<Mutex<Vec<String>>>);

impl Write for MemoryWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut lines) = self.0.lock() {
            for line in String::from_utf8_lossy(buf).lines() {
                lines.push(line.to_owned());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One access-log line. Field names are SPEC §6's; absent facts are `null`. `Default` is
/// a line with no relay half (a refusal, or a relay not yet reported).
#[derive(Debug, Default, Serialize)]
pub struct Record<'a> {
    pub ts: String,
    pub event: &'static str,
    /// `null` only on a summary line (`count`), which is about many connections.
    pub conn_id: Option<&'a str>,
    /// The client's own `X-Request-Id` when it sent a plain one (`conn_id` goes upstream).
    pub request_id: Option<&'a str>,
    pub listener: &'a str,
    pub route: Option<&'a str>,
    pub client_ip: String,
    pub client_port: u16,
    pub tls: Option<&'a TlsInfo>,
    pub host: Option<&'a str>,
    pub path: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The token's `sub` claim (never the token).
    pub subject: Option<&'a str>,
    pub upstream: Option<&'a str>,
    /// Where the sticky key came from and whether it fell back to the client IP (never
    /// the key itself); `null` before a backend was chosen.
    pub sticky: Option<StickyLog>,
    pub status: u16,
    pub duration_ms: u64,
    pub c2u: Counts,
    pub u2c: Counts,
    /// Backpressure per direction: how often and how long a full peer blocked the relay.
    pub stalls: StallsLog,
    pub close: Option<Close<'a>>,
    pub proxy_reason: Option<&'a str>,
    /// On a 502/504 of the proxy's own: what went wrong with the backend, as the OS or TLS
    /// said it (`connect: Connection refused (os error 111)`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_error: Option<&'a str>,
    /// On a summarised `ws_reject` line only: how many refusals it stands for (SPEC §3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Proxy pings sent to the client.
    pub pings: u64,
    /// Round trips of those pings; `null` when none was answered.
    pub rtt_ms: Option<RttMs>,
    /// Times the client exceeded its message budget (closed or throttled).
    pub rate_limited: u64,
    /// The client's HTTP version (`"1.1"` or `"2"`), on every line whose request was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct RttMs {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

impl RttMs {
    fn from(rtt: &Rtt) -> Option<RttMs> {
        let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
        (rtt.count > 0).then(|| RttMs {
            min: ms(rtt.min),
            avg: ms(rtt.avg()),
            max: ms(rtt.max),
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
}

impl From<Stats> for Counts {
    fn from(s: Stats) -> Counts {
        Counts {
            frames: s.frames,
            messages: s.messages,
            bytes: s.bytes,
        }
    }
}

// === stalls (SPEC §6): `"stalls":{"u2c":{"count":3,"ms":840},"c2u":{...}}` ===

/// `stalls`: the slow client (`u2c`) first, then the slow upstream (`c2u`).
#[derive(Debug, Default, Serialize)]
pub struct StallsLog {
    pub u2c: StallCount,
    pub c2u: StallCount,
}

#[derive(Debug, Default, Serialize)]
pub struct StallCount {
    pub count: u64,
    /// Whole milliseconds blocked.
    pub ms: u64,
}

impl From<&Report> for StallsLog {
    fn from(report: &Report) -> StallsLog {
        let count = |s: &Stalls| StallCount {
            count: s.count,
            ms: u64::try_from(s.time().as_millis()).unwrap_or(u64::MAX),
        };
        StallsLog {
            u2c: count(&report.u2c.stalls),
            c2u: count(&report.c2u.stalls),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Close<'a> {
    pub code: u16,
    pub reason: &'a str,
    pub by: &'static str,
}

impl<'a> From<&'a CloseInfo> for Close<'a> {
    fn from(c: &'a CloseInfo) -> Close<'a> {
        Close {
            code: c.code,
            reason: &c.reason,
            by: c.by.as_str(),
        }
    }
}

impl Record<'_> {
    /// Fills the relay half of a `ws_close` record.
    pub fn set_report<'r>(record: &mut Record<'r>, report: &'r Report) {
        record.c2u = report.c2u.into();
        record.u2c = report.u2c.into();
        record.stalls = StallsLog::from(report);
        record.close = report.close.as_ref().map(Close::from);
        record.proxy_reason = report.proxy_reason.map(|r| r.as_str());
        record.pings = report.pings;
        record.rtt_ms = RttMs::from(&report.rtt);
        record.rate_limited = report.c2u.rate_limited;
    }
}

/// Current UTC time as RFC 3339 with milliseconds (`2026-11-23T19:40:00.123Z`).
pub fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    rfc3339(since)
}

/// Written digit by digit: it runs once per log line, and `format!` was ~10 × slower.
fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let mut out = String::with_capacity(24);
    let mut digits = |v: u64, width: u32, then: char| {
        for i in (0..width).rev() {
            out.push(char::from(b'0' + (v / 10u64.pow(i) % 10) as u8));
        }
        out.push(then);
    };
    digits(y.clamp(0, 9999) as u64, 4, '-');
    digits(u64::from(m), 2, '-');
    digits(u64::from(d), 2, 'T');
    digits(rem / 3600, 2, ':');
    digits(rem % 3600 / 60, 2, ':');
    digits(rem % 60, 2, '.');
    digits(u64::from(since_epoch.subsec_millis()), 3, 'Z');
    out
}

/// Days since 1970-01-01 → (year, month, day), after Howard Hinnant's civil calendar
/// algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(Duration::from_millis(0)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(Duration::from_millis(1_795_462_800_123)),
            "2026-11-23T19:40:00.123Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, _rx) = sync_channel(1);
        let log = AccessLog::new(tx);
        let rec = record();
        log.log(&rec);
        log.log(&rec);
        assert_eq!(log.dropped(), 1);
    }

    /// Long request heads make long lines: behind a stalled writer, at most
    /// [`QUEUE_BYTES`] of them wait, however few lines that is.
    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let (tx, _rx) = sync_channel(QUEUE_LINES);
        let log = AccessLog::new(tx);
        // 16 KiB of quotes escape to 32 KiB (held in up to 64 KiB): 256 to 512 lines fit.
        let path = "\"".repeat(16 * 1024);
        let rec = Record {
            path: Some(&path),
            ..record()
        };
        for _ in 0..1000 {
            log.log(&rec);
        }
        let queued = log.queued_bytes.load(Ordering::Acquire);
        assert!(queued <= QUEUE_BYTES, "{queued} bytes queued");
        assert!(queued > QUEUE_BYTES / 2, "{queued} bytes queued");
        let kept = 1000 - log.dropped();
        assert!((256..512).contains(&kept), "{kept} lines kept");
        assert_eq!(log.pending.load(Ordering::Acquire), kept);
    }

    #[test]
    fn flush_waits_until_every_queued_line_is_written() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = AccessLog::start(Sink::Memory(lines.clone())).unwrap();
        for _ in 0..500 {
            log.log(&record());
        }
        log.flush(Duration::from_secs(5));
        assert_eq!(lines.lock().map(|l| l.len()).unwrap_or(0), 500);
        assert_eq!(log.queued_bytes.load(Ordering::Acquire), 0);
    }

    #[test]
    fn stalls_are_logged_per_direction_in_whole_milliseconds() {
        let mut report = Report::default();
        report.u2c.stalls = Stalls {
            count: 3,
            nanos: 840_900_000,
        };
        let mut rec = record();
        Record::set_report(&mut rec, &report);
        let line = serde_json::to_string(&rec).unwrap_or_default();
        assert!(
            line.contains(r#""stalls":{"u2c":{"count":3,"ms":840},"c2u":{"count":0,"ms":0}}"#),
            "{line}"
        );
    }

    fn record() -> Record<'static> {
        Record {
            ts: now_rfc3339(),
            event: "ws_reject",
            conn_id: Some("x"),
            request_id: None,
            listener: "l",
            route: None,
            client_ip: "127.0.0.1".into(),
            client_port: 1,
            tls: None,
            host: None,
            path: None,
            origin: None,
            user_agent: None,
            subject: None,
            upstream: None,
            sticky: None,
            status: 404,
            duration_ms: 0,
            c2u: Counts::default(),
            u2c: Counts::default(),
            stalls: StallsLog::default(),
            close: None,
            proxy_reason: Some("no_route"),
            upstream_error: None,
            count: None,
            pings: 0,
            rtt_ms: None,
            rate_limited: 0,
            http: None,
        }
    }
}
