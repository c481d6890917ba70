//! What operators read: the structured access log (SPEC §6), Prometheus metrics (SPEC §7)
//! and operational logs via `tracing` on stderr; `refusals` keeps one address's refusal
//! flood to one summary line a second.

pub mod access_log;
pub mod metrics;
pub mod refusals;
pub mod report;

use std::io::IsTerminal;

/// How operational logs on stderr are written (SPEC §2 `log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

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
