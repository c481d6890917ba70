//! Latency histograms (HDR, nanoseconds, 3 significant digits) and their JSON summary.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded: 60 s (anything slower is clamped to it).
const MAX_NS: u64 = 60_000_000_000;

pub fn new() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_NS, 3).context("histogram bounds")
}

/// Records one latency, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    // In range by construction, so this cannot fail; a failure would only lose one sample.
    let _ = h.record(ns.clamp(1, MAX_NS));
}

/// Percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

pub fn summary(h: &Histogram<u64>) -> Summary {
    let us = |ns: u64| ns as f64 / 1000.0;
    Summary {
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.50)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}
