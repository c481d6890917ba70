//! Fleet-wide revocation (SPEC §7, §10): `/revoke` entries stored in Redis with their
//! expiry, and `/revoke`, `DELETE /revoke` and `/connections/close` published as orders
//! on one channel that every instance listens to, each closing its own matching
//! connections at once. Handshakes read only the local copy ([`InMemory`]), which the
//! listener keeps current and rebuilds from Redis whenever it (re)subscribes.

use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use super::{Fleet, scripts};
use crate::ops::registry::{Registry, Selector};
use crate::ops::revocation::{
    InMemory, MAX_ENTRIES, MAX_KEY_LEN, RevocationStore, StoreError, StoreFuture, Target,
};
use crate::outcome::Ending;

/// Longest wait for a write to Redis on behalf of the admin API, and for a subscription.
const WRITE_WITHIN: Duration = Duration::from_secs(1);
/// Largest order taken from the channel: a key of [`MAX_KEY_LEN`] and the rest.
const MAX_ORDER: usize = MAX_KEY_LEN * 2 + 256;
/// Wait before subscribing again after the channel broke.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

/// One order on the channel.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    /// The instance that sent it (which has applied it already).
    from: String,
    op: Op,
    /// `subject`, `jti`, `ip`, `route` or `conn_id`.
    what: String,
    value: String,
    #[serde(default)]
    ttl_ms: u64,
    #[serde(default)]
    code: u16,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Op {
    Revoke,
    Lift,
    Close,
}

/// The revocation store of an instance in a fleet.
pub struct FleetRevocations {
    fleet: Arc<Fleet>,
    local: InMemory,
    registry: Arc<Registry>,
    /// Revocations applied here while the store could not take them (the admin was told
    /// 503 "applied on this instance only"), with when each ends: written to the store
    /// when it is back, and kept here until then, so its return does not wipe them.
    pending: std::sync::Mutex<Vec<(Target, tokio::time::Instant)>>,
}

impl FleetRevocations {
    pub(super) fn new(fleet: Arc<Fleet>, registry: Arc<Registry>) -> Arc<FleetRevocations> {
        Arc::new(FleetRevocations {
            fleet,
            local: InMemory::new(registry.clone()),
            registry,
            pending: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Runs `call` on the fleet's connection within [`WRITE_WITHIN`].
    async fn write<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let unavailable = |e: String| {
            StoreError::Unavailable(format!(
                "{e}; applied on this instance only (the fleet store is unreachable)"
            ))
        };
        let mut conn = self.fleet.connection().map_err(unavailable)?;
        match tokio::time::timeout(WRITE_WITHIN, call.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e.to_string())),
            Err(_) => Err(unavailable("no answer within 1s".into())),
        }
    }

    fn order(&self, op: Op, what: &str, value: &str, ttl: Duration, code: u16) -> String {
        let order = Order {
            from: self.fleet.name.to_string(),
            op,
            what: what.into(),
            value: value.into(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            code,
        };
        serde_json::to_string(&order).unwrap_or_default()
    }

    /// Applies an order another instance published.
    fn apply(&self, payload: &[u8]) {
        if payload.len() > MAX_ORDER {
            return;
        }
        let Ok(order) = serde_json::from_slice::<Order>(payload) else {
            tracing::debug!("cluster: an order that does not parse; ignored");
            return;
        };
        if order.from == *self.fleet.name || order.value.len() > MAX_KEY_LEN {
            return;
        }
        match order.op {
            Op::Revoke | Op::Lift => {
                let Some(target) = target_of(&order.what, order.value) else {
                    return;
                };
                let ttl = Duration::from_millis(order.ttl_ms);
                let applied = if order.op == Op::Revoke {
                    futures_util::FutureExt::now_or_never(self.local.revoke(target, ttl))
                        .map(|r| r.map(|_| ()))
                } else {
                    futures_util::FutureExt::now_or_never(self.local.lift(target))
                        .map(|r| r.map(|_| ()))
                };
                if let Some(Err(e)) = applied {
                    tracing::warn!(error = %e, "cluster: a revocation from the fleet was not applied here");
                }
            }
            Op::Close => {
                let Some(selector) = selector_of(&order.what, order.value) else {
                    return;
                };
                if (1000..=4999).contains(&order.code) {
                    let closed = self.registry.revoke(&selector, order.code);
                    tracing::info!(?selector, code = order.code, closed, from = %order.from, "cluster: connections closed by a fleet order");
                }
            }
        }
    }

    /// Rebuilds the local copy from Redis, over `conn` (the listener's own: it does not
    /// wait for this instance's registration).
    async fn reload(&self, conn: &mut MultiplexedConnection) -> Result<usize, String> {
        let mut call = scripts::REVOKED.key(&self.fleet.keys.revoked);
        call.arg(MAX_ENTRIES);
        let listed: Vec<String> =
            match tokio::time::timeout(WRITE_WITHIN, call.invoke_async(conn)).await {
                Ok(r) => r.map_err(|e| e.to_string())?,
                Err(_) => return Err("no answer within 1s".into()),
            };
        let entries: Vec<(Target, Duration)> = listed
            .chunks_exact(2)
            .filter_map(|pair| {
                let target = member_target(&pair[0])?;
                let left: u64 = pair[1].parse().ok()?;
                Some((target, Duration::from_millis(left)))
            })
            .collect();
        let n = entries.len();
        self.local.replace_all(entries);
        // What this instance revoked while the store was away: written now, and applied
        // here again (the copy just loaded may predate it).
        for (target, ttl) in self.push_pending(conn).await {
            let _ = futures_util::FutureExt::now_or_never(self.local.revoke(target, ttl));
        }
        self.fleet.revocations_loaded.store(true, Ordering::Release);
        Ok(n)
    }

    /// The REVOKE script's call for `target` over `ttl`: stored with its expiry, and
    /// published to the fleet.
    fn revoke_call(&self, target: &Target, ttl: Duration) -> redis::ScriptInvocation<'static> {
        let (what, value) = named(target);
        let order = self.order(Op::Revoke, what, value, ttl, Ending::REVOKED_CODE);
        let mut call = scripts::REVOKE.key(&self.fleet.keys.revoked);
        call.key(&self.fleet.keys.orders)
            .arg(member(target))
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(order);
        call
    }

    /// Writes the pending revocations to the store over `conn`; returns every one still in
    /// force with its time left (written or not: those not written stay pending).
    async fn push_pending(&self, conn: &mut MultiplexedConnection) -> Vec<(Target, Duration)> {
        let now = tokio::time::Instant::now();
        let pending = match self.pending.lock() {
            Ok(mut p) => {
                p.retain(|(_, until)| *until > now);
                p.clone()
            }
            Err(_) => return Vec::new(),
        };
        let mut live = Vec::new();
        for (target, until) in pending {
            let ttl = until.saturating_duration_since(now);
            let call = self.revoke_call(&target, ttl);
            let written = tokio::time::timeout(WRITE_WITHIN, call.invoke_async::<i64>(conn)).await;
            if matches!(written, Ok(Ok(_)))
                && let Ok(mut p) = self.pending.lock()
            {
                p.retain(|(t, _)| *t != target);
            }
            live.push((target, ttl));
        }
        live
    }
}

impl RevocationStore for FleetRevocations {
    fn revoke(&self, target: Target, ttl: Duration) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let closed = self.local.revoke(target.clone(), ttl).await?;
            let call = self.revoke_call(&target, ttl);
            if let Err(e) = self.write::<i64>(call).await {
                if let (Ok(mut p), Some(until)) = (
                    self.pending.lock(),
                    tokio::time::Instant::now().checked_add(ttl),
                ) {
                    p.retain(|(t, _)| *t != target);
                    p.push((target, until));
                }
                return Err(e);
            }
            Ok(closed)
        })
    }

    fn lift(&self, target: Target) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let here = self.local.lift(target.clone()).await?;
            if let Ok(mut p) = self.pending.lock() {
                p.retain(|(t, _)| *t != target);
            }
            let (what, value) = named(&target);
            let order = self.order(Op::Lift, what, value, Duration::ZERO, 0);
            let mut call = scripts::LIFT.key(&self.fleet.keys.revoked);
            call.key(&self.fleet.keys.orders)
                .arg(member(&target))
                .arg(order);
            let there: i64 = self.write(call).await?;
            Ok(here || there == 1)
        })
    }

    fn close(&self, selector: Selector, code: u16) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let closed = self.registry.revoke(&selector, code);
            let (what, value) = selector_named(&selector);
            let order = self.order(Op::Close, what, &value, Duration::ZERO, code);
            let mut conn = self.fleet.connection().map_err(|e| {
                StoreError::Unavailable(format!("{e}; closed on this instance only"))
            })?;
            let published = tokio::time::timeout(
                WRITE_WITHIN,
                redis::cmd("PUBLISH")
                    .arg(&self.fleet.keys.orders)
                    .arg(order)
                    .query_async::<i64>(&mut conn),
            )
            .await;
            match published {
                Ok(Ok(_)) => Ok(closed),
                _ => Err(StoreError::Unavailable(
                    "the fleet store did not take the order; closed on this instance only".into(),
                )),
            }
        })
    }

    fn is_revoked(&self, subject: Option<&str>, jti: Option<&str>) -> bool {
        self.local.is_revoked(subject, jti)
    }
}

/// Listens to the fleet's orders until the store is dropped: subscribes (again after any
/// break), rebuilds the local copy, then applies each order as it comes.
pub(super) fn spawn_listener(store: &Arc<FleetRevocations>) {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            let Some(store) = weak.upgrade() else {
                return;
            };
            let client = store.fleet.client.clone();
            let channel = store.fleet.keys.orders.clone();
            drop(store);
            if let Ok(Ok(mut pubsub)) =
                tokio::time::timeout(WRITE_WITHIN, client.get_async_pubsub()).await
                && let Ok(Ok(())) =
                    tokio::time::timeout(WRITE_WITHIN, pubsub.subscribe(&channel)).await
                && let Ok(Ok(conn)) =
                    tokio::time::timeout(WRITE_WITHIN, client.get_multiplexed_async_connection())
                        .await
            {
                listen(&weak, pubsub.into_on_message(), conn).await;
            } else if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                // Fails open: until the listener is back, a handshake is refused only
                // for the revocations this instance holds.
                warned = Some(tokio::time::Instant::now());
                tracing::warn!(channel = %channel, "cluster: cannot subscribe to the fleet's orders (Redis unreachable, or an ACL without channel permission); revocations made elsewhere are not enforced here until it can");
            }
            if let Some(store) = weak.upgrade() {
                store
                    .fleet
                    .revocations_loaded
                    .store(false, Ordering::Release);
            }
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    });
}

/// Applies orders until the channel breaks or the store is gone.
async fn listen(
    weak: &Weak<FleetRevocations>,
    mut messages: redis::aio::PubSubStream,
    mut conn: MultiplexedConnection,
) {
    let mut reloaded = false;
    let mut warned = false;
    loop {
        let Some(store) = weak.upgrade() else {
            return;
        };
        if !reloaded {
            // Orders published from now on arrive; what was decided before is in Redis.
            match store.reload(&mut conn).await {
                Ok(n) => {
                    reloaded = true;
                    tracing::debug!(entries = n, "cluster: revocations loaded");
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "cluster: the fleet's revocations cannot be loaded; only this instance's own are enforced until they are");
                }
                Err(e) => tracing::debug!(error = %e, "cluster: revocations not loaded yet"),
            }
        }
        let wait = if reloaded {
            Duration::from_secs(1)
        } else {
            RESUBSCRIBE_AFTER
        };
        drop(store);
        let next = tokio::time::timeout(wait, messages.next()).await;
        match next {
            Ok(Some(msg)) => {
                if let Some(store) = weak.upgrade() {
                    store.apply(msg.get_payload_bytes());
                }
            }
            Ok(None) => return,
            Err(_) => {}
        }
    }
}

fn named(target: &Target) -> (&'static str, &str) {
    match target {
        Target::Subject(s) => ("subject", s),
        Target::TokenId(j) => ("jti", j),
    }
}

fn member(target: &Target) -> String {
    match target {
        Target::Subject(s) => format!("s:{s}"),
        Target::TokenId(j) => format!("j:{j}"),
    }
}

fn member_target(member: &str) -> Option<Target> {
    if member.len() > MAX_KEY_LEN + 2 {
        return None;
    }
    if let Some(s) = member.strip_prefix("s:") {
        return Some(Target::Subject(s.into()));
    }
    member.strip_prefix("j:").map(|j| Target::TokenId(j.into()))
}

fn target_of(what: &str, value: String) -> Option<Target> {
    match what {
        "subject" => Some(Target::Subject(value)),
        "jti" => Some(Target::TokenId(value)),
        _ => None,
    }
}

fn selector_named(selector: &Selector) -> (&'static str, String) {
    match selector {
        Selector::Subject(s) => ("subject", s.clone()),
        Selector::TokenId(j) => ("jti", j.clone()),
        Selector::Ip(ip) => ("ip", ip.to_string()),
        Selector::Route(r) => ("route", r.clone()),
        Selector::ConnId(c) => ("conn_id", c.clone()),
    }
}

fn selector_of(what: &str, value: String) -> Option<Selector> {
    Some(match what {
        "subject" => Selector::Subject(value),
        "jti" => Selector::TokenId(value),
        "ip" => Selector::Ip(value.parse::<IpAddr>().ok()?),
        "route" => Selector::Route(value),
        "conn_id" => Selector::ConnId(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_members_go_there_and_back() {
        for s in [
            Selector::Subject("a".into()),
            Selector::TokenId("t".into()),
            Selector::Ip([192, 0, 2, 1].into()),
            Selector::Route("chat".into()),
            Selector::ConnId("01J".into()),
        ] {
            let (what, value) = selector_named(&s);
            assert_eq!(selector_of(what, value).as_ref(), Some(&s));
        }
        assert_eq!(
            member_target(&member(&Target::Subject("s:x".into()))),
            Some(Target::Subject("s:x".into()))
        );
        assert_eq!(member_target("x:y"), None);
        assert_eq!(selector_of("ip", "not an ip".into()), None);
    }
}
