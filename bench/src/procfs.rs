//! What the kernel says about the proxy under test: CPU time (utime + stime from
//! `/proc/PID/stat`) and resident memory (`VmRSS`, `VmHWM` from `/proc/PID/status`).
//!
//! A proxy may be several processes (nginx's master and worker): every reading sums over
//! the PIDs given, so the script passes the processes that do the work.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Clock ticks per second for `/proc/PID/stat` (USER_HZ; 100 on every Linux this runs on).
const USER_HZ: u64 = 100;

/// The processes whose cost is measured; empty when the target is the backend itself.
#[derive(Clone, Debug, Default)]
pub struct Procs(pub Vec<u32>);

impl Procs {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// CPU time used so far (user + system), summed.
    pub fn cpu(&self) -> Result<Duration> {
        let mut ticks = 0u64;
        for pid in &self.0 {
            let path = format!("/proc/{pid}/stat");
            let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            // Fields after the parenthesised command name (which may hold spaces).
            let rest = stat
                .rsplit_once(')')
                .map(|(_, r)| r)
                .with_context(|| format!("{path}: no command name"))?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
            let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
                bail!("{path}: too few fields");
            };
            ticks += u.parse::<u64>().with_context(|| format!("{path}: utime"))?
                + s.parse::<u64>().with_context(|| format!("{path}: stime"))?;
        }
        Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
    }

    /// Resident set size in KiB, summed.
    pub fn rss_kib(&self) -> Result<u64> {
        self.status_field("VmRSS:")
    }

    /// Peak resident set size in KiB, summed.
    pub fn hwm_kib(&self) -> Result<u64> {
        self.status_field("VmHWM:")
    }

    fn status_field(&self, name: &str) -> Result<u64> {
        let mut total = 0;
        for pid in &self.0 {
            let path = format!("/proc/{pid}/status");
            let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{path}: no {name}"))?;
            total += line
                .split_whitespace()
                .nth(1)
                .with_context(|| format!("{path}: empty {name}"))?
                .parse::<u64>()
                .with_context(|| format!("{path}: {name}"))?;
        }
        Ok(total)
    }

    /// CPU reading when there are processes to read, `None` for the direct target.
    pub fn cpu_opt(&self) -> Result<Option<Duration>> {
        if self.is_empty() {
            Ok(None)
        } else {
            self.cpu().map(Some)
        }
    }
}

/// CPU microseconds per event between two readings, when both exist and events happened.
pub fn per_event_us(before: Option<Duration>, after: Option<Duration>, events: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if events > 0 => {
            Some(a.saturating_sub(b).as_secs_f64() * 1e6 / events as f64)
        }
        _ => None,
    }
}
