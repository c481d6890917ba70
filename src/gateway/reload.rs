//! Hot reload (SPEC §8): a new, already validated configuration is put in service for new
//! connections while established ones keep the configuration they started with.
//!
//! Order matters: listeners are (re)bound first, so a failure to bind leaves the old
//! listener serving; then the config is swapped atomically; only then are connections of
//! removed routes drained. Per-IP connection counts always survive; handshake-rate state
//! survives unless its policy changed.

use std::sync::Arc;
use std::time::Duration;

use super::{Gateway, bind, ensure_echo, jwks};
use crate::admission::ip_limit::HandshakeRate;
use crate::config::Config;
use crate::listener::Running;
use crate::ops::registry::DrainKind;

/// What a reload changed.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Listeners bound anew (added, or moved to another address or mode).
    pub bound: Vec<String>,
    /// Listeners closed.
    pub closed: Vec<String>,
    /// Listeners whose certificates were swapped in place.
    pub certificates: Vec<String>,
    /// Connections on removed routes, now draining.
    pub drained: usize,
    /// Settings that only a restart applies.
    pub need_restart: Vec<&'static str>,
}

impl Gateway {
    /// Applies `config` (already validated). A listener that cannot be bound is reported,
    /// and the old one on that name keeps serving.
    pub async fn reload(&self, config: Config) -> Reloaded {
        let mut done = Reloaded::default();
        let old = self.shared.config.load_full();
        done.need_restart = restart_only(&old, &config);
        if let Err(e) = ensure_echo(&self.shared.pools, &config).await {
            tracing::error!("reload: {e}");
        }
        // Health, drain flags and connection counts of backends that stay are kept.
        self.shared.pools.reconcile(&config).await;
        self.reload_listeners(&config, &mut done);
        if old.limits.max_pending_handshakes != config.limits.max_pending_handshakes {
            self.shared
                .handshake_slots
                .resize(super::pending_bound(&config.limits));
        }
        if old.limits.handshakes_per_ip != config.limits.handshakes_per_ip {
            match HandshakeRate::new(config.limits.handshakes_per_ip) {
                Ok(rate) => self.shared.handshake_rate.store(Arc::new(rate)),
                Err(e) => tracing::error!("reload: limits.handshakes_per_ip: {e}"),
            }
        }
        // Keys already fetched stay in service (and `/readyz` stays 200) across the swap;
        // the new fetchers then fetch every URL once more, like key files are re-read.
        jwks::carry_over(&old.jwks_urls, &config.jwks_urls);
        let config = Arc::new(config);
        self.shared.config.store(config.clone());
        let fetchers = jwks::spawn_all(&self.shared, &config.jwks_urls);
        if let Ok(mut running) = self.jwks.lock() {
            // Dropping the old fetchers stops them.
            *running = fetchers;
        }
        self.prune_pools_later(&old, &config);
        let removed: Vec<&str> = old
            .routes
            .iter()
            .map(|r| r.name.as_str())
            .filter(|name| !config.routes.iter().any(|r| r.name == *name))
            .collect();
        if !removed.is_empty() {
            done.drained = self.shared.registry.drain(
                |e| removed.contains(&&*e.route),
                config.drain.spread,
                DrainKind::Final,
            );
        }
        done
    }

    /// Pools of removed upstreams are dropped once no handshake can still be on the old
    /// config: connections accepted before the swap route by it for up to their
    /// `handshake_timeout`. What is pruned is decided then, against the config in
    /// service at that time (a later reload may have brought an upstream back, or
    /// removed another one, which then keeps its own grace).
    fn prune_pools_later(&self, old: &Config, new: &Config) {
        let grace = old
            .routes
            .iter()
            .map(|r| r.limits.handshake_timeout)
            .fold(old.limits.handshake_timeout, Duration::max)
            + Duration::from_secs(1);
        let removed = old
            .upstreams
            .keys()
            .filter(|n| !new.upstreams.contains_key(*n));
        let until = tokio::time::Instant::now() + grace;
        self.shared.pools.retire(removed.map(String::as_str), until);
        let shared = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(shared) = shared.upgrade() {
                shared.pools.prune(&shared.config.load());
            }
        });
    }

    fn reload_listeners(&self, config: &Config, done: &mut Reloaded) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        if !self.shared.ready.load(std::sync::atomic::Ordering::Acquire) {
            // Shutting down: nothing is to accept again.
            return;
        }
        let mut next: Vec<Running> = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let current = running.iter().position(|r| r.serves(l));
            if let Some(i) = current {
                let kept = running.swap_remove(i);
                if let (Some(slot), Some(tls)) = (&kept.tls, &l.tls) {
                    slot.set(tls.server.clone());
                    done.certificates.push(l.name.clone());
                }
                next.push(kept);
                continue;
            }
            // As at start-up (without `--takeover`): another process listening there would
            // silently share the port. Our own listeners on that port are not another.
            let ours = running.iter().any(|r| same_port(r.addr, l.bind));
            if l.bind.port() != 0 && !ours && crate::listener::listened_on(l.bind) {
                let why = crate::listener::taken_message(&l.name, l.bind);
                tracing::error!("reload: {why}; not bound");
                if let Some(i) = running.iter().position(|r| *r.name == *l.name) {
                    next.push(running.swap_remove(i));
                }
                continue;
            }
            let launched = bind(l).and_then(|(tcp, addr)| {
                Running::launch(&self.shared, l, tcp, addr).map_err(|source| {
                    super::StartError::Bind {
                        name: l.name.clone(),
                        addr,
                        source,
                    }
                })
            });
            match launched {
                Ok(running) => {
                    next.push(running);
                    done.bound.push(l.name.clone());
                }
                Err(e) => {
                    tracing::error!("reload: {e}; keeping the old listener `{}`", l.name);
                    if let Some(i) = running.iter().position(|r| *r.name == *l.name) {
                        next.push(running.swap_remove(i));
                    }
                }
            }
        }
        done.closed = running.iter().map(|r| r.name.to_string()).collect();
        // Dropping what is left closes those sockets.
        *running = next;
    }
}

/// Whether a socket bound to `held` takes connections for `wanted` (same port, and the
/// same address or either one a wildcard).
fn same_port(held: std::net::SocketAddr, wanted: std::net::SocketAddr) -> bool {
    held.port() == wanted.port()
        && (held.ip() == wanted.ip() || held.ip().is_unspecified() || wanted.ip().is_unspecified())
}

/// Settings read once at start.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.admin != new.admin {
        keys.push("admin");
    }
    if old.log != new.log {
        keys.push("log");
    }
    // The fleet membership (store, name, lease, limits) is fixed at start.
    if old.cluster != new.cluster {
        keys.push("cluster");
    }
    keys
}
