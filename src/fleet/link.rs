//! The fleet's background tasks: the heartbeat (connects, registers this instance's
//! counts whole, renews the lease, notices a lost registration and registers again) and
//! the flusher (sends released counts in batches). Both hold the fleet weakly and end
//! once it is dropped.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::AsyncConnectionConfig;

use super::{Fleet, scripts};

/// Longest wait for a connection to Redis (TCP, TLS, hello) or a background call.
const CONNECT_WITHIN: Duration = Duration::from_secs(1);
/// Longest wait between two attempts while Redis is unusable: when it is back, counts
/// converge within this plus one registration.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long the flusher gathers releases after the first one: under load one call carries
/// many (each call costs the proxy a round trip), and a released place is back in the
/// fleet's count within this.
const GATHER: Duration = Duration::from_millis(5);
/// Every this many heartbeats (ten leases) the instance registers its whole truth again,
/// so that whatever Redis may have counted wrongly (a call whose end nobody saw) is
/// corrected within that time.
const REREGISTER_EVERY: u32 = 30;
/// How often a task holding the fleet weakly looks whether it is gone.
const LOOK_EVERY: Duration = Duration::from_secs(1);

pub(super) fn spawn(fleet: &Arc<Fleet>) {
    tokio::spawn(heartbeat(Arc::downgrade(fleet)));
    tokio::spawn(flusher(Arc::downgrade(fleet)));
}

async fn heartbeat(fleet: Weak<Fleet>) {
    let mut beats = 0u32;
    loop {
        let Some(f) = fleet.upgrade() else {
            return;
        };
        if f.left.load(Ordering::Acquire) {
            return;
        }
        beats = beats.saturating_add(1);
        if beats >= REREGISTER_EVERY {
            beats = 0;
            f.dirty.store(true, Ordering::Release);
        }
        let healthy = if f.is_up() && f.dirty.swap(false, Ordering::AcqRel) {
            match f.connection() {
                Ok(conn) => f.register(conn).await,
                Err(_) => false,
            }
        } else if f.is_up() {
            f.beat().await
        } else {
            f.connect_and_register().await
        };
        let renew = f.lease / 3;
        let wait = if healthy {
            renew
        } else {
            renew.min(PROBE_EVERY)
        };
        let f2 = f.clone();
        drop(f);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = f2.wake.notified() => {}
        }
    }
}

async fn flusher(fleet: Weak<Fleet>) {
    loop {
        let Some(f) = fleet.upgrade() else {
            return;
        };
        if f.left.load(Ordering::Acquire) {
            return;
        }
        let counts = f.counts.clone();
        drop(f);
        if tokio::time::timeout(LOOK_EVERY, counts.flush.notified())
            .await
            .is_err()
        {
            continue;
        }
        tokio::time::sleep(GATHER).await;
        let Some(f) = fleet.upgrade() else {
            return;
        };
        f.flush().await;
    }
}

impl Fleet {
    /// Renews the lease; re-registers when Redis lost the registration. Whether Redis
    /// is usable afterwards.
    async fn beat(&self) -> bool {
        let Ok(mut conn) = self.connection() else {
            return false;
        };
        let renewed = tokio::time::timeout(
            CONNECT_WITHIN,
            scripts::HEARTBEAT
                .key(&self.keys.instances)
                .key(&self.keys.mine)
                .arg(&*self.name)
                .arg(millis(self.lease))
                .invoke_async::<i64>(&mut conn),
        )
        .await;
        match renewed {
            Ok(Ok(1)) => true,
            Ok(Ok(_)) => {
                if self.may_warn() {
                    tracing::warn!(instance = %self.name, "cluster: this instance's registration was lost (lease expired or Redis restarted); registering again");
                } else {
                    tracing::debug!(instance = %self.name, "cluster: registration lost; registering again");
                }
                self.up.store(false, Ordering::Release);
                self.counts.untrack();
                self.register(conn).await
            }
            Ok(Err(e)) => {
                self.mark_down(&e.to_string());
                false
            }
            Err(_) => {
                self.mark_down("heartbeat unanswered");
                false
            }
        }
    }

    async fn connect_and_register(&self) -> bool {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_WITHIN))
            .set_response_timeout(Some(CONNECT_WITHIN));
        let connected = tokio::time::timeout(
            CONNECT_WITHIN,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        let conn = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(instance = %self.name, error = %e, "cluster: cannot connect");
                self.warn_unavailable();
                return false;
            }
            Err(_) => {
                tracing::debug!(instance = %self.name, "cluster: connect timed out");
                self.warn_unavailable();
                return false;
            }
        };
        self.register(conn).await
    }

    /// Writes this instance's counts whole under its name (the heartbeat's lease starts
    /// anew) and lets handshakes ask Redis again.
    async fn register(&self, mut conn: redis::aio::MultiplexedConnection) -> bool {
        // No handshake's script call or flush runs between the snapshot and the write.
        let gate = self.gate.write().await;
        let held = self.counts.snapshot_and_track();
        let mut call = scripts::REGISTER.key(&self.keys.instances);
        call.key(&self.keys.mine)
            .arg(&*self.name)
            .arg(millis(self.lease));
        for (field, n) in &held {
            call.arg(&**field).arg(*n);
        }
        let done = tokio::time::timeout(CONNECT_WITHIN, call.invoke_async::<i64>(&mut conn)).await;
        match done {
            Ok(Ok(_)) => {
                self.conn.store(Some(Arc::new(conn)));
                self.up.store(true, Ordering::Release);
                tracing::info!(instance = %self.name, fields = held.len(), "cluster: registered with the fleet store");
                true
            }
            Ok(Err(e)) => {
                drop(gate);
                self.mark_down(&e.to_string());
                self.warn_unavailable();
                false
            }
            Err(_) => {
                drop(gate);
                self.mark_down("registration unanswered");
                self.warn_unavailable();
                false
            }
        }
    }

    /// Leaves the fleet at the end of a drain: this instance's counts go at once instead
    /// of at the end of its lease. Within [`CONNECT_WITHIN`]; a failure only leaves the
    /// lease to run out.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::Release);
        self.wake.notify_one();
        let Ok(mut conn) = self.connection() else {
            return;
        };
        self.up.store(false, Ordering::Release);
        let _gate = self.gate.write().await;
        self.counts.untrack();
        let mut pipe = redis::pipe();
        pipe.del(&self.keys.mine)
            .ignore()
            .zrem(&self.keys.instances, &*self.name)
            .ignore();
        let left = tokio::time::timeout(CONNECT_WITHIN, pipe.query_async::<()>(&mut conn)).await;
        if !matches!(left, Ok(Ok(()))) {
            tracing::debug!(instance = %self.name, "cluster: could not leave; the lease will run out");
        }
    }

    /// Sends the releases queued so far in one call.
    async fn flush(&self) {
        if !self.is_up() {
            return;
        }
        let _gate = self.gate.read().await;
        let released = self.counts.take_released();
        if released.is_empty() {
            return;
        }
        let Ok(mut conn) = self.connection() else {
            return;
        };
        let mut call = scripts::RELEASE.key(&self.keys.mine);
        for (field, n) in &released {
            call.arg(&**field).arg(*n);
        }
        match tokio::time::timeout(CONNECT_WITHIN, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(1)) => {}
            // Not applied: the next registration writes the truth whole.
            Ok(Ok(_)) => self.mark_down("this instance's registration is gone"),
            Ok(Err(e)) => self.mark_down(&e.to_string()),
            Err(_) => self.mark_down("release unanswered"),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
