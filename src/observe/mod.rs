//! What operators read: the structured access log (SPEC §6), Prometheus metrics (SPEC §7)
//! and operational logs via `tracing` on stderr.

pub mod access_log;
pub mod metrics;
pub mod report;

use std::io::IsTerminal;
use std::sync::LazyLock;

use crate::config::LogFormat;

/// Installs the stderr subscriber (`RUST_LOG` overrides the default `info` level).
pub fn init_tracing(format: &LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: piped logs must stay greppable. Internal-error reports
    // are off because they go through `eprintln!`, which panics when stderr is a closed
    // pipe: a vanished log reader must not take the gateway down.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Whether a warning about a connection that failed before HTTP (TLS, PROXY header) may be
/// written now: about ten lines a second across the process, so a scanner cannot flood
/// stderr. The failures are still counted exactly, in the metrics.
pub fn warn_budget() -> bool {
    use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
    static BUDGET: LazyLock<DefaultDirectRateLimiter> = LazyLock::new(|| {
        let ten = std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(ten))
    });
    BUDGET.check().is_ok()
}
