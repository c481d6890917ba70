//! Every upstream's pool, by name: building them, reconciling them with a reloaded config,
//! retiring removed ones after their grace, their background tasks (DNS refresh, health
//! checks), and the snapshots `/upstreams` and the metrics read.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::{NO_CHECK_SLEEP, Pool, PoolOptions};
use crate::config::Config;

/// Every upstream's pool, by name; the gateway's shared state holds it.
pub struct Pools {
    pools: RwLock<BTreeMap<String, Arc<Pool>>>,
    /// Upstreams a reload removed, and when their pools may go ([`Pools::retire`]).
    retiring: Mutex<HashMap<String, tokio::time::Instant>>,
    /// The built-in echo server, once started (at start or by a reload that needs it);
    /// every pool reads it from here.
    builtin: Arc<OnceLock<SocketAddr>>,
    options: PoolOptions,
}

impl Pools {
    /// Builds the pools of `config`, resolves their names once (so the first connections
    /// find backends), and starts their background tasks.
    pub async fn start(
        config: &Config,
        builtin: Option<SocketAddr>,
        options: PoolOptions,
    ) -> Arc<Pools> {
        let pools = Arc::new(Pools {
            pools: RwLock::default(),
            retiring: Mutex::default(),
            builtin: Arc::new(builtin.map(OnceLock::from).unwrap_or_default()),
            options,
        });
        pools.reconcile(config).await;
        pools
    }

    /// Where the built-in echo server listens, if it runs.
    pub fn builtin(&self) -> Option<SocketAddr> {
        self.builtin.get().copied()
    }

    /// Records the built-in echo server started for a reload (before [`Pools::reconcile`]).
    pub fn set_builtin(&self, addr: SocketAddr) {
        let _ = self.builtin.set(addr);
    }

    /// The pool of upstream `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools.read().ok()?.get(name).cloned()
    }

    fn all(&self) -> Vec<Arc<Pool>> {
        self.pools
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Brings the pools in line with a (new) config: new ones start, and kept ones take
    /// the new settings and backend list while keeping health, drain flags, error counts
    /// and active connections of backends that remain. Pools of removed upstreams stay
    /// until [`Pools::prune`], so handshakes still routed by the old config find them.
    pub async fn reconcile(&self, config: &Config) {
        if let Ok(mut retiring) = self.retiring.lock() {
            retiring.retain(|name, _| !config.upstreams.contains_key(name));
        }
        let mut next = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            let (pool, fresh) = match self.get(name) {
                Some(pool) => {
                    pool.set_spec(upstream.clone());
                    (pool, false)
                }
                None => {
                    let builtin = self.builtin.clone();
                    let pool = Pool::new(upstream.clone(), builtin, self.options.clone());
                    (Arc::new(pool), true)
                }
            };
            pool.refresh().await;
            if fresh {
                spawn_tasks(&pool);
            } else {
                pool.wake.send_replace(());
            }
            next.insert(name.clone(), pool);
        }
        if let Ok(mut pools) = self.pools.write() {
            pools.extend(next);
        }
    }

    /// Keeps the pools of `removed` upstreams until `until` whatever [`Pools::prune`]
    /// runs before then (a later reload's removal gets its own, later, deadline).
    pub fn retire<'a>(&self, removed: impl Iterator<Item = &'a str>, until: tokio::time::Instant) {
        if let Ok(mut retiring) = self.retiring.lock() {
            for name in removed {
                retiring.insert(name.to_owned(), until);
            }
        }
    }

    /// Drops the pools of upstreams `config` does not have, except those retiring until
    /// later (their tasks stop; leases keep their backends alive until the connections
    /// end).
    pub fn prune(&self, config: &Config) {
        let now = tokio::time::Instant::now();
        let Ok(mut retiring) = self.retiring.lock() else {
            return;
        };
        retiring.retain(|_, until| *until > now);
        if let Ok(mut pools) = self.pools.write() {
            pools.retain(|name, _| {
                config.upstreams.contains_key(name) || retiring.contains_key(name)
            });
        }
    }

    /// Every pool's backends and their state, for metrics and `GET /upstreams`.
    pub fn snapshot(&self) -> Vec<UpstreamSnapshot> {
        self.all().iter().map(|p| p.snapshot()).collect()
    }
}

/// Starts the DNS refresh and health-check tasks of a new pool.
fn spawn_tasks(pool: &Arc<Pool>) {
    let weak = Arc::downgrade(pool);
    let every = pool.options.dns_refresh;
    tokio::spawn(refresh_loop(weak.clone(), pool.wake.subscribe(), every));
    tokio::spawn(health_loop(weak, pool.wake.subscribe()));
}

/// Sleeps `wait`, or less when woken; `false` when the pool is gone.
async fn pause(wait: Duration, wake: &mut watch::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        changed = wake.changed() => changed.is_ok(),
    }
}

async fn refresh_loop(pool: Weak<Pool>, mut wake: watch::Receiver<()>, every: Duration) {
    loop {
        if !pause(every, &mut wake).await {
            return;
        }
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.refresh().await;
    }
}

async fn health_loop(pool: Weak<Pool>, mut wake: watch::Receiver<()>) {
    loop {
        let wait = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let spec = pool.spec();
            match &spec.health_check {
                Some(hc) => {
                    pool.check_health(hc, spec.tls.as_ref()).await;
                    hc.interval
                }
                None => NO_CHECK_SLEEP,
            }
        };
        if !pause(wait, &mut wake).await {
            return;
        }
    }
}

// === snapshots ===

/// One upstream's backends, read at scrape time.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamSnapshot {
    pub upstream: String,
    pub backends: Vec<BackendSnapshot>,
}

/// One backend's state. For SPEC §7: `wsgate_backend_up` is `up` (health only; a
/// draining backend is still up), `wsgate_backend_connections` is `active`, and
/// `wsgate_upstream_connect_errors_total` is `connect_errors` (a counter that restarts
/// when a backend leaves the pool and comes back).
#[derive(Debug, Clone, Serialize)]
pub struct BackendSnapshot {
    /// Resolved `ip:port` (the metric's `backend` label).
    pub addr: String,
    /// The configured entry it came from.
    pub entry: String,
    pub weight: u32,
    pub up: bool,
    pub draining: bool,
    pub active: u64,
    pub connect_errors: u64,
}

impl crate::observe::metrics::BackendSource for Pools {
    fn backend_samples(&self) -> Vec<crate::observe::metrics::BackendSample> {
        let mut out = Vec::new();
        for u in self.snapshot() {
            for b in u.backends {
                out.push(crate::observe::metrics::BackendSample {
                    upstream: u.upstream.clone(),
                    backend: b.addr,
                    up: b.up,
                    connections: b.active,
                    connect_errors: b.connect_errors,
                });
            }
        }
        out
    }

    fn queue_samples(&self) -> Vec<crate::observe::metrics::QueueSample> {
        self.all()
            .iter()
            .map(|p| {
                let (waiting, seconds) = p.queue_state();
                crate::observe::metrics::QueueSample {
                    upstream: p.name().to_owned(),
                    waiting,
                    seconds,
                }
            })
            .collect()
    }
}
