//! wsgate: a frame-aware WebSocket edge gateway.
//!
//! # Layout
//! - [`config`]: YAML → validated, typed [`config::Config`] (errors with file:line:column
//!   and key path).
//! - [`listener`]: accept loop; one task per connection runs the HTTP/1.1 upgrade, the
//!   upstream handshake, the relay and the access-log line.
//! - [`handshake`]: route matching and the upgrade checks of SPEC §3 (pure).
//! - [`upstream`]: backend pools (sticky rendezvous hashing, health, DNS, drain) and
//!   connecting to a backend, completing its handshake before the 101.
//! - [`relay`]: the frame-aware, unbuffered relay of SPEC §4/§5 ([`relay::frame`] parses
//!   and validates headers; [`relay::pump`] moves one direction's bytes;
//!   [`relay::deadlines`] decides pings and timeouts).
//! - [`observe`]: the JSON access log, Prometheus metrics and tracing setup.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/connections`, backend drain
//!   (`/upstreams/...`).
//! - [`ops`]: the registry of live connections, drain and hot reload (SPEC §8).
//! - [`echo`]: the built-in demo echo upstream.
//! - [`ids`]: connection ids.
//! - `fuzzing` (cargo feature `fuzzing` only): entry points for the fuzz targets and their
//!   corpus replay.

pub mod admin;
pub mod admission;
pub mod config;
pub mod echo;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod handshake;
pub mod ids;
pub mod listener;
pub mod observe;
pub mod ops;
pub mod outcome;
pub mod relay;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use admission::ip_limit::HandshakeRate;
use config::{Config, UpstreamKind};
use observe::access_log::{AccessLog, Sink};
use observe::metrics::Metrics;
use ops::registry::Registry;

/// State every connection task reads.
pub struct Shared {
    /// The configuration new connections use; a reload swaps it, and connections keep the
    /// `Arc` they started with.
    pub config: ArcSwap<Config>,
    pub access: AccessLog,
    pub metrics: Metrics,
    /// Relayed connections, for `/connections` and drains.
    pub registry: Arc<Registry>,
    /// Every upstream's live backends (health, drain, load) and the built-in echo server;
    /// reload calls [`upstream::pool::Pools::reconcile`].
    pub pools: Arc<upstream::pool::Pools>,
    /// Connections in any phase, for `limits.max_connections`.
    pub active: AtomicU64,
    /// Connections per client IP, for `limits.max_connections_per_ip`.
    pub per_ip: Arc<admission::ip_limit::IpLimiter>,
    /// Handshakes per client IP, for `limits.handshakes_per_ip`; replaced by a reload only
    /// when the policy changes, so counts survive other reloads.
    pub handshake_rate: ArcSwap<HandshakeRate>,
    pub ready: Arc<AtomicBool>,
}

/// A failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin: cannot bind {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("access log: {0}")]
    AccessLog(std::io::Error),
    #[error("built-in echo upstream: {0}")]
    Echo(std::io::Error),
    #[error("limits.handshakes_per_ip: {0}")]
    Rate(String),
}

/// A running gateway: its bound addresses, and the switches that reload and stop it.
pub struct Gateway {
    /// (listener name, bound address) at start, in config order; port 0 in config becomes
    /// real here. [`Gateway::bound`] has the current set after reloads.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    running: Mutex<Vec<listener::Running>>,
}

impl Gateway {
    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0].1
    }

    /// (listener name, bound address) of the listeners accepting now.
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.running
            .lock()
            .map(|r| r.iter().map(|l| (l.name.to_string(), l.addr)).collect())
            .unwrap_or_default()
    }

    /// Stops accepting new connections (listeners closed at once); `/readyz` turns 503.
    /// Established connections run on.
    pub fn stop_accepting(&self) {
        self.shared.ready.store(false, Ordering::Release);
        if let Ok(mut running) = self.running.lock() {
            running.clear();
        }
    }

    /// Graceful shutdown (SPEC §8): stop accepting, close relayed connections with 1012
    /// spread over `drain.spread`, and return once all are gone or `drain.timeout` has
    /// passed. Handshakes already accepted complete and are drained in the same window
    /// (a client that raced the shutdown gets a working socket, then 1012, not an error);
    /// after the window they get 503 `draining`.
    pub async fn drain(&self) {
        let drain = self.shared.config.load().drain;
        self.stop_accepting();
        let picked = self.shared.registry.drain_all(drain.spread);
        tracing::info!(
            connections = picked,
            spread = ?drain.spread,
            timeout = ?drain.timeout,
            "draining"
        );
        let deadline = tokio::time::Instant::now() + drain.timeout;
        while self.shared.active.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    left = self.shared.active.load(Ordering::Acquire),
                    "drain timeout: closing the rest"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("drained");
    }
}

/// How often idle per-IP rate state is reclaimed: a scan from many addresses leaves
/// nothing behind for longer than this plus the bucket's refill time.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// Periodic upkeep of shared state; ends with the gateway.
fn spawn_housekeeping(shared: std::sync::Weak<Shared>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.handshake_rate.load().reclaim();
        }
    });
}

/// Starts the built-in echo upstream if a route of `config` uses it and it is not running.
async fn ensure_echo(pools: &upstream::pool::Pools, config: &Config) -> Result<(), StartError> {
    let uses_echo = config
        .upstreams
        .values()
        .any(|u| matches!(u.kind, UpstreamKind::BuiltinEcho));
    if uses_echo && pools.builtin().is_none() {
        let addr = echo::start().await.map_err(StartError::Echo)?;
        pools.set_builtin(addr);
    }
    Ok(())
}

/// Binds every listener (all or nothing), starts the access log, the echo upstream and the
/// admin listener, and begins accepting.
pub async fn start(config: Config, sink: Sink) -> Result<Gateway, StartError> {
    start_with(config, sink, upstream::pool::PoolOptions::default()).await
}

/// [`start`] with pool options that are not in the config file (a test resolver, the DNS
/// refresh period).
pub async fn start_with(
    config: Config,
    sink: Sink,
    pool_options: upstream::pool::PoolOptions,
) -> Result<Gateway, StartError> {
    let mut bound = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        bound.push((l.clone(), listener::bind(l)?));
    }
    let admin = match &config.admin {
        Some(a) => {
            Some(
                listener::bind_reuseport(a.bind).map_err(|source| StartError::AdminBind {
                    addr: a.bind,
                    source,
                })?,
            )
        }
        None => None,
    };
    let access = AccessLog::start(sink).map_err(StartError::AccessLog)?;
    let echo_addr = match config
        .upstreams
        .values()
        .any(|u| matches!(u.kind, UpstreamKind::BuiltinEcho))
    {
        true => Some(echo::start().await.map_err(StartError::Echo)?),
        false => None,
    };
    let pools = upstream::pool::Pools::start(&config, echo_addr, pool_options).await;
    let ready = Arc::new(AtomicBool::new(false));
    let handshake_rate =
        HandshakeRate::new(config.limits.handshakes_per_ip).map_err(StartError::Rate)?;
    let metrics = Metrics::new();
    metrics.watch_log_drops(access.dropped_counter());
    metrics.watch_backends(pools.clone());
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let shared = Arc::new(Shared {
        config: ArcSwap::from_pointee(config),
        access,
        metrics,
        registry: Registry::new(),
        pools,
        active: AtomicU64::new(0),
        per_ip: admission::ip_limit::IpLimiter::new(),
        handshake_rate: ArcSwap::from_pointee(handshake_rate),
        ready: ready.clone(),
    });
    spawn_housekeeping(Arc::downgrade(&shared));
    ops::memory::spawn_trimmer(Arc::downgrade(&shared));
    let mut listeners = Vec::with_capacity(bound.len());
    let mut running = Vec::with_capacity(bound.len());
    for (config, (tcp, addr)) in bound {
        listeners.push((config.name.clone(), addr));
        running.push(listener::Running::launch(&shared, &config, tcp, addr));
    }
    let admin = admin.map(|(l, addr)| {
        tracing::info!(%addr, "admin listening");
        admin::spawn(l, shared.clone());
        addr
    });
    ready.store(true, Ordering::Release);
    Ok(Gateway {
        listeners,
        admin,
        shared,
        running: Mutex::new(running),
    })
}
