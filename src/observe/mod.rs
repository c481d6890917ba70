//! What operators read: the structured access log (SPEC §6) and operational logs via
//! `tracing` on stderr.

pub mod access_log;

use crate::config::LogFormat;

/// Installs the stderr subscriber (`RUST_LOG` overrides the default `info` level).
pub fn init_tracing(format: &LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
