//! The running gateway (SPEC §8): starts every part (listeners, access log, pools, the
//! admin listener, housekeeping, the `jwks_url` fetchers of `jwks.rs`), and is what drains and reloads (`reload.rs`) act on.
//! The top of the crate: nothing below imports it.

mod jwks;
mod reload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::admission::ip_limit::{HandshakeRate, IpLimiter};
use crate::admission::pending::HandshakeSlots;
use crate::admission::subject::SubjectLimiter;
use crate::config::{Config, Listener, UpstreamKind};
use crate::fleet::Fleet;
use crate::listener::{self, Running};
use crate::observe::access_log::{AccessLog, Sink};
use crate::observe::metrics::Metrics;
use crate::observe::refusals::Refusals;
use crate::ops::registry::Registry;
use crate::ops::revocation::{InMemory, RevocationStore};
use crate::shared::Shared;
use crate::upstream::pool::{PoolOptions, Pools};
use crate::{admin, echo, ops};

pub use reload::Reloaded;

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
    #[error("{0}")]
    Fleet(#[from] crate::fleet::FleetError),
}

/// A running gateway: its bound addresses, and the switches that reload and stop it.
pub struct Gateway {
    /// (listener name, bound address) at start, in config order; port 0 in config becomes
    /// real here. [`Gateway::bound`] has the current set after reloads.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    running: Mutex<Vec<Running>>,
    /// The `jwks_url` fetchers of the config in service; a reload replaces them.
    jwks: Mutex<jwks::Fetchers>,
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
                self.leave_fleet().await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("drained");
        self.leave_fleet().await;
    }

    /// With `cluster`: this instance's counts leave the fleet now, not a lease later.
    async fn leave_fleet(&self) {
        if let Some(fleet) = &self.shared.fleet {
            fleet.leave().await;
        }
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

/// `limits.max_pending_handshakes` as a slot count.
pub(crate) fn pending_bound(limits: &crate::config::Limits) -> usize {
    usize::try_from(limits.max_pending_handshakes).unwrap_or(usize::MAX)
}

/// Once a second, writes the summary lines of the second that ended: one `ws_reject`
/// line with `count` per address and reason that drew more than ten refusals (SPEC §3).
fn spawn_refusal_summaries(shared: std::sync::Weak<Shared>) {
    tokio::spawn(async move {
        // The tally's clock starts before the first tick, so each sweep finds the second
        // that just ended.
        crate::observe::refusals::this_second();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let (summaries, untracked) = shared.refusals.sweep();
            for s in &summaries {
                crate::handshake::log_summary(&shared, s);
            }
            if untracked > 0 {
                tracing::warn!(
                    refusals = untracked,
                    "refusals neither logged nor summarised (more refusing addresses in a second than the tally holds); counted in the metrics"
                );
            }
        }
    });
}

/// Starts the built-in echo upstream if a route of `config` uses it and it is not running.
async fn ensure_echo(pools: &Pools, config: &Config) -> Result<(), StartError> {
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
    start_with(config, sink, PoolOptions::default()).await
}

/// [`start`] with pool options that are not in the config file (a test resolver, the DNS
/// refresh period).
pub async fn start_with(
    config: Config,
    sink: Sink,
    pool_options: PoolOptions,
) -> Result<Gateway, StartError> {
    let mut bound = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        bound.push((l.clone(), bind(l)?));
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
    let pools = Pools::start(&config, echo_addr, pool_options).await;
    let ready = Arc::new(AtomicBool::new(false));
    let handshake_rate =
        HandshakeRate::new(config.limits.handshakes_per_ip).map_err(StartError::Rate)?;
    let metrics = Metrics::new();
    metrics.watch_log_drops(access.dropped_counter());
    metrics.watch_backends(pools.clone());
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let registry = Registry::new();
    let config_limits = config.limits.clone();
    let (fleet, revocations): (_, Arc<dyn RevocationStore>) = match &config.cluster {
        Some(cluster) => {
            let (fleet, store) = Fleet::start(cluster, registry.clone())?;
            let (up, fallbacks) = fleet.gauges();
            metrics.watch_cluster(up, fallbacks);
            access.set_instance(fleet.name());
            tracing::info!(instance = fleet.name(), "cluster: joining the fleet");
            (Some(fleet), store)
        }
        None => (None, Arc::new(InMemory::new(registry.clone()))),
    };
    let shared = Arc::new(Shared {
        config: ArcSwap::from_pointee(config),
        access,
        metrics,
        revocations,
        registry,
        pools,
        active: AtomicU64::new(0),
        per_ip: IpLimiter::new(),
        per_subject: SubjectLimiter::new(),
        handshake_rate: ArcSwap::from_pointee(handshake_rate),
        ready: ready.clone(),
        handshake_slots: HandshakeSlots::new(pending_bound(&config_limits)),
        refusals: Refusals::default(),
        fleet,
    });
    spawn_refusal_summaries(Arc::downgrade(&shared));
    spawn_housekeeping(Arc::downgrade(&shared));
    let fetchers = jwks::spawn_all(&shared, &shared.config.load().jwks_urls);
    spawn_trimmer(Arc::downgrade(&shared));
    let mut listeners = Vec::with_capacity(bound.len());
    let mut running = Vec::with_capacity(bound.len());
    for (config, (tcp, addr)) in bound {
        listeners.push((config.name.clone(), addr));
        let launched = listener::Running::launch(&shared, &config, tcp, addr);
        running.push(launched.map_err(|source| StartError::Bind {
            name: config.name.clone(),
            addr,
            source,
        })?);
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
        jwks: Mutex::new(fetchers),
    })
}

/// Binds one configured listener.
fn bind(l: &Listener) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    listener::bind_reuseport(l.bind).map_err(|source| StartError::Bind {
        name: l.name.clone(),
        addr: l.bind,
        source,
    })
}

/// Gives freed heap back to the OS after connections came or went (see [`ops::memory`]).
fn spawn_trimmer(shared: std::sync::Weak<Shared>) {
    ops::memory::spawn_trimmer(move || {
        let shared = shared.upgrade()?;
        Some(shared.active.load(Ordering::Relaxed))
    });
}
