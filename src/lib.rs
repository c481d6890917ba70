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
//!   and validates headers; [`relay::pump`] moves one direction's bytes).
//! - [`observe`]: the JSON access log and tracing setup.
//! - [`admin`]: `/healthz`, `/readyz`, backend drain (`/upstreams/...`).
//! - [`echo`]: the built-in demo echo upstream.
//! - [`ids`]: connection ids.
//! - [`fuzzing`]: entry points for the fuzz targets and their corpus replay.

pub mod admin;
pub mod admission;
pub mod config;
pub mod echo;
pub mod fuzzing;
pub mod handshake;
pub mod ids;
pub mod listener;
pub mod observe;
pub mod relay;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

use config::{Config, UpstreamKind};
use observe::access_log::{AccessLog, Sink};

/// State every connection task reads.
pub struct Shared {
    pub config: Config,
    pub access: AccessLog,
    /// Address of the built-in echo upstream, when a route uses it.
    pub echo_addr: Option<SocketAddr>,
    /// Every upstream's live backends (health, drain, load); reload calls
    /// [`upstream::pool::Pools::reconcile`].
    pub pools: Arc<upstream::pool::Pools>,
    /// Connections in any phase, for `limits.max_connections`.
    pub active: AtomicU64,
    /// Connections per client IP, for `limits.max_connections_per_ip`.
    pub per_ip: Arc<admission::ip_limit::IpLimiter>,
    /// Handshakes per client IP, for `limits.handshakes_per_ip`.
    pub handshake_rate: admission::ip_limit::HandshakeRate,
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

/// A running gateway: its bound addresses, and the switch that stops accepting.
pub struct Gateway {
    /// (listener name, bound address), in config order; port 0 in config becomes real here.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// Each TLS listener's swappable configuration, by listener name.
    tls_slots: Vec<(String, Arc<listener::TlsSlot>)>,
}

impl Gateway {
    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0].1
    }

    /// Puts the certificates of a freshly loaded (hence valid) config in service for new
    /// connections; established ones keep theirs. Returns the listeners updated. This is
    /// the certificate half of SIGHUP reload; other changes still need a restart.
    pub fn reload_certificates(&self, config: &Config) -> Vec<String> {
        let mut updated = Vec::new();
        for (name, slot) in &self.tls_slots {
            let fresh = config
                .listeners
                .iter()
                .find(|l| &l.name == name)
                .and_then(|l| l.tls.as_ref());
            if let Some(tls) = fresh {
                slot.set(tls.server.clone());
                updated.push(name.clone());
            }
        }
        updated
    }

    /// Stops accepting new connections; established ones run on.
    pub fn stop_accepting(&self) {
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
    }
}

/// How often idle per-IP rate state is reclaimed: a scan from many addresses leaves
/// nothing behind for longer than this plus the bucket's refill time.
const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Periodic upkeep of shared state; ends with the gateway.
fn spawn_housekeeping(shared: std::sync::Weak<Shared>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.handshake_rate.reclaim();
        }
    });
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
        let listener = TcpListener::bind(l.bind)
            .await
            .map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        let tls = l
            .tls
            .as_ref()
            .map(|t| Arc::new(listener::TlsSlot::new(t.server.clone())));
        bound.push((l.name.clone(), addr, listener, tls, l.proxy_protocol));
    }
    let admin = match &config.admin {
        Some(a) => {
            let l = TcpListener::bind(a.bind)
                .await
                .map_err(|source| StartError::AdminBind {
                    addr: a.bind,
                    source,
                })?;
            let addr = l.local_addr().map_err(|source| StartError::AdminBind {
                addr: a.bind,
                source,
            })?;
            Some((l, addr))
        }
        None => None,
    };
    let uses_echo = config
        .upstreams
        .values()
        .any(|u| matches!(u.kind, UpstreamKind::BuiltinEcho));
    let echo_addr = if uses_echo {
        Some(echo::start().await.map_err(StartError::Echo)?)
    } else {
        None
    };
    let access = AccessLog::start(sink).map_err(StartError::AccessLog)?;
    let pools = upstream::pool::Pools::start(&config, echo_addr, pool_options).await;
    let ready = Arc::new(AtomicBool::new(false));
    let handshake_rate = admission::ip_limit::HandshakeRate::new(config.limits.handshakes_per_ip)
        .map_err(StartError::Rate)?;
    let shared = Arc::new(Shared {
        config,
        access,
        echo_addr,
        pools: pools.clone(),
        active: AtomicU64::new(0),
        per_ip: admission::ip_limit::IpLimiter::new(),
        handshake_rate,
        ready: ready.clone(),
    });
    spawn_housekeeping(Arc::downgrade(&shared));
    let (shutdown, rx) = watch::channel(false);
    for warning in &shared.config.warnings {
        tracing::warn!("{warning}");
    }
    let mut listeners = Vec::with_capacity(bound.len());
    let mut tls_slots = Vec::new();
    for (name, addr, listener, tls, proxy_protocol) in bound {
        let scheme = if tls.is_some() { "wss://" } else { "ws://" };
        tracing::info!(listener = %name, %addr, "listening ({scheme})");
        if let Some(slot) = &tls {
            tls_slots.push((name.clone(), slot.clone()));
        }
        tokio::spawn(listener::accept_loop(
            shared.clone(),
            listener,
            name.as_str().into(),
            tls,
            proxy_protocol,
            rx.clone(),
        ));
        listeners.push((name, addr));
    }
    let admin = admin.map(|(l, addr)| {
        tracing::info!(%addr, "admin listening");
        admin::spawn(l, ready.clone(), Arc::downgrade(&pools));
        addr
    });
    ready.store(true, Ordering::Release);
    Ok(Gateway {
        listeners,
        admin,
        shared,
        shutdown,
        tls_slots,
    })
}
