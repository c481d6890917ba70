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

/// Busy and total clock ticks of each CPU so far (`/proc/stat`): busy is everything but
/// idle and iowait. Tells whether something besides the processes measured ran on the
/// benchmark's cores (the machine may be shared).
pub fn cpu_ticks() -> Result<Vec<(u64, u64)>> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let mut out = Vec::new();
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        // "cpu " is the sum over all CPUs; "cpuN" lines are the ones wanted.
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<u64>().context("/proc/stat field"))
            .collect::<Result<_>>()?;
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        out.push((total.saturating_sub(idle), total));
    }
    Ok(out)
}

/// Per-CPU busy percentage between two [`cpu_ticks`] readings.
pub fn busy_pct(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(&(ba, ta), &(bb, tb))| {
            let total = tb.saturating_sub(ta);
            if total == 0 {
                0.0
            } else {
                100.0 * bb.saturating_sub(ba) as f64 / total as f64
            }
        })
        .collect()
}
