//! The fleet (SPEC §10): what N instances share through Redis. Fleet-wide caps per client
//! address and per subject and the per-address handshake rate are judged in one script
//! call per handshake, bounded by [`BOUND`]; each count is held under this instance's
//! lease (renewed by a heartbeat, re-registered whole when Redis lost it), and a
//! connection's end releases its count through a batching flusher. Revocations and admin
//! closes go to every instance by pub/sub ([`store`]). When Redis is unusable the fleet
//! follows `cluster.on_unavailable`. The relay never comes here: a connection's end drops
//! a [`FleetPermit`], which only queues its release.

mod counts;
mod link;
mod scripts;
pub mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, RwLock};
use tokio::time::Instant;

pub use counts::FleetPermit;
use counts::{Counts, Field};

use crate::admission::client_ip::IpKey;
use crate::admission::subject::SubjectKey;
use crate::config::{Cluster, ClusterLimits, OnUnavailable};
use crate::outcome::Refusal;

/// Longest a handshake waits on Redis (SPEC §10); past it the failure policy applies.
pub const BOUND: Duration = Duration::from_millis(50);
/// At most one warning about an unusable store per this period (SPEC §10).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The Redis key names of one fleet (one prefix) as seen by one instance.
struct Keys {
    instances: String,
    mine: String,
    conns: String,
    rate: String,
    revoked: String,
    orders: String,
}

impl Keys {
    fn new(prefix: &str, name: &str) -> Keys {
        Keys {
            instances: format!("{prefix}instances"),
            mine: format!("{prefix}conns:{name}"),
            conns: format!("{prefix}conns:"),
            rate: format!("{prefix}rate:"),
            revoked: format!("{prefix}revoked"),
            orders: format!("{prefix}orders"),
        }
    }
}

/// This instance's membership of the fleet.
pub struct Fleet {
    name: Arc<str>,
    keys: Keys,
    lease: Duration,
    on_unavailable: OnUnavailable,
    limits: ClusterLimits,
    client: redis::Client,
    /// The connection handshakes use; `None` while Redis is unreachable.
    conn: ArcSwapOption<MultiplexedConnection>,
    /// Redis answers and holds this instance's registration: handshakes ask it.
    up: Arc<AtomicBool>,
    /// Handshakes decided without Redis (`wsgate_cluster_fallbacks_total`).
    fallbacks: Arc<AtomicU64>,
    last_warning: Mutex<Option<Instant>>,
    counts: Arc<Counts>,
    /// Readers: a handshake's script call with its local count, a flush. Writer: a
    /// registration, so that its snapshot of the counts and Redis's agree exactly.
    gate: RwLock<()>,
    /// Wakes the heartbeat early (the store just failed).
    wake: Notify,
    /// The revocations in Redis have been copied here since the order listener last
    /// (re)subscribed.
    revocations_loaded: AtomicBool,
    /// Redis may hold counts this instance does not: the heartbeat registers the truth
    /// again at once.
    dirty: AtomicBool,
    /// Drained: the heartbeat and the flusher stop, and nothing registers again.
    left: AtomicBool,
}

/// The fleet's answer to a handshake; `Err`: Redis did not judge.
type Admission = Result<Result<FleetPermit, Refusal>, String>;

/// A fleet that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cluster.redis: {0}")]
pub struct FleetError(String);

impl Fleet {
    /// This instance's fleet membership, with its heartbeat, flusher and order listener
    /// running (they end when the returned value is dropped). Does not wait for Redis:
    /// until it answers, handshakes follow `on_unavailable`.
    pub fn start(
        cluster: &Cluster,
        registry: Arc<crate::ops::registry::Registry>,
    ) -> Result<(Arc<Fleet>, Arc<store::FleetRevocations>), FleetError> {
        let client = redis::Client::open(cluster.redis.as_str())
            .map_err(|e| FleetError(format!("{:?}", e.kind())))?;
        let name: Arc<str> = match &cluster.instance {
            Some(n) => n.as_str().into(),
            None => default_name().into(),
        };
        let fleet = Arc::new(Fleet {
            keys: Keys::new(&cluster.prefix, &name),
            name,
            lease: cluster.lease,
            on_unavailable: cluster.on_unavailable,
            limits: cluster.limits,
            client,
            conn: ArcSwapOption::empty(),
            up: Arc::new(AtomicBool::new(false)),
            fallbacks: Arc::new(AtomicU64::new(0)),
            last_warning: Mutex::new(None),
            counts: Arc::new(Counts::default()),
            gate: RwLock::new(()),
            wake: Notify::new(),
            revocations_loaded: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            left: AtomicBool::new(false),
        });
        let revocations = store::FleetRevocations::new(fleet.clone(), registry);
        link::spawn(&fleet);
        store::spawn_listener(&revocations);
        Ok((fleet, revocations))
    }

    /// This instance's name in the fleet.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `wsgate_cluster_up` and `wsgate_cluster_fallbacks_total`, read at scrape time.
    pub fn gauges(&self) -> (Arc<AtomicBool>, Arc<AtomicU64>) {
        (self.up.clone(), self.fallbacks.clone())
    }

    /// Whether Redis answers and holds this instance's registration.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether this instance holds the fleet's revocations (copied from Redis since its
    /// order listener subscribed): until then only its own are refused.
    pub fn revocations_loaded(&self) -> bool {
        self.revocations_loaded.load(Ordering::Acquire)
    }

    /// Connections this instance counts under a client address (tests, `/connections`).
    pub fn held_for_ip(&self, ip: IpKey) -> u32 {
        self.counts.held(&ip_field(ip))
    }

    /// Judges a handshake that passed every per-process check against the fleet's
    /// limits: one script call within [`BOUND`]. `Ok(None)`: no fleet limit applies.
    /// Redis unusable: `on_unavailable` decides (`local` counts the connection here, so
    /// that the next registration carries it).
    ///
    /// The call runs in a task of its own that always sees its answer through, so that a
    /// handshake dropped mid-call (an HTTP/2 stream reset, a closed socket) or cut at the
    /// bound never leaves a count in Redis: an admission nobody receives drops its
    /// permit, which releases the count like any connection's end.
    pub async fn admit(
        self: &Arc<Self>,
        ip: IpKey,
        subject: Option<&SubjectKey>,
    ) -> Result<Option<FleetPermit>, Refusal> {
        let ip_f = (self.limits.max_connections_per_ip > 0).then(|| ip_field(ip));
        let sub_f = subject
            .filter(|_| self.limits.max_connections_per_subject > 0)
            .map(subject_field);
        if ip_f.is_none() && sub_f.is_none() && self.limits.handshakes_per_ip.is_none() {
            return Ok(None);
        }
        if self.is_up() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let fleet = self.clone();
            let (ip_c, sub_c) = (ip_f.clone(), sub_f.clone());
            tokio::spawn(async move {
                let answer = fleet.ask(ip, ip_c, sub_c, &tx).await;
                if let Some(Err(why)) = &answer {
                    fleet.mark_down(why);
                }
                // Unreceived (the handshake is gone): a permit in it is dropped here.
                if let Some(answer) = answer {
                    let _ = tx.send(answer);
                }
            });
            match tokio::time::timeout(BOUND, rx).await {
                Ok(Ok(Ok(Ok(permit)))) => return Ok(Some(permit)),
                Ok(Ok(Ok(Err(refusal)))) => return Err(refusal),
                // Marked down by the task.
                Ok(Ok(Err(_))) | Ok(Err(_)) => {}
                // Slow, perhaps only this once: this handshake goes on without Redis, the
                // next ones still ask (each within the bound). The call goes on to its
                // end: counted, it releases at once; failed (a hung Redis fails at the
                // connection's response timeout), it marks the store down.
                Err(_) => {}
            }
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.warn_unavailable();
        match self.on_unavailable {
            OnUnavailable::Refuse => Err(Refusal::Cluster),
            OnUnavailable::Local => Ok(Some(self.counts.hold(fields(ip_f, sub_f)))),
        }
    }

    /// The script call. `Err`: Redis did not judge (unreachable, an error, an answer that
    /// makes no sense, this instance's registration gone).
    /// `None`: the handshake went away before the call was sent (nothing asked).
    async fn ask(
        &self,
        ip: IpKey,
        ip_f: Option<Field>,
        sub_f: Option<Field>,
        waiting: &tokio::sync::oneshot::Sender<Admission>,
    ) -> Option<Admission> {
        let _gate = self.gate.read().await;
        if waiting.is_closed() {
            return None;
        }
        Some(self.ask_now(ip, ip_f, sub_f).await)
    }

    async fn ask_now(&self, ip: IpKey, ip_f: Option<Field>, sub_f: Option<Field>) -> Admission {
        let mut conn = self.connection()?;
        let (step, tolerance) = match self.limits.handshakes_per_ip {
            Some(r) => gcra(r),
            None => (0, 0),
        };
        let answer: Vec<i64> = scripts::ADMIT
            .key(&self.keys.instances)
            .key(&self.keys.mine)
            .key(format!("{}{ip}", self.keys.rate))
            .arg(&*self.name)
            .arg(ip_f.as_deref().unwrap_or(""))
            .arg(sub_f.as_deref().unwrap_or(""))
            .arg(self.limits.max_connections_per_ip)
            .arg(self.limits.max_connections_per_subject)
            .arg(step)
            .arg(tolerance)
            .arg(&self.keys.conns)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        match answer.as_slice() {
            [0, _] => Ok(Ok(self.counts.hold(fields(ip_f, sub_f)))),
            [1, wait_ms] => Ok(Err(Refusal::IpRate {
                retry_after_secs: u64::try_from(*wait_ms).unwrap_or(0).div_ceil(1000).max(1),
            })),
            [2, _] => Ok(Err(Refusal::IpCap)),
            [3, _] => Ok(Err(Refusal::SubjectCap)),
            [4, _] => Err("this instance's registration is gone".into()),
            _ => Err("the admission script answered nonsense".into()),
        }
    }

    fn connection(&self) -> Result<MultiplexedConnection, String> {
        match self.conn.load().as_deref() {
            Some(c) => Ok(c.clone()),
            None => Err("not connected".into()),
        }
    }

    /// Redis failed: handshakes stop asking it until the heartbeat has re-registered.
    fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            if self.may_warn() {
                tracing::warn!(instance = %self.name, error = why, "cluster: fleet store unusable; following on_unavailable until it is back");
            } else {
                tracing::debug!(instance = %self.name, error = why, "cluster: fleet store unusable");
            }
        }
        self.counts.untrack();
        self.conn.store(None);
        self.wake.notify_one();
    }

    fn warn_unavailable(&self) {
        if !self.may_warn() {
            return;
        }
        let policy = match self.on_unavailable {
            OnUnavailable::Local => "per-process limits only",
            OnUnavailable::Refuse => "refusing with 503 cluster",
        };
        tracing::warn!(
            instance = %self.name,
            fallbacks = self.fallbacks.load(Ordering::Relaxed),
            "cluster: fleet store unavailable; {policy}"
        );
    }

    /// Whether a warning about the store may be logged now: at most one per
    /// [`WARN_EVERY`], whatever it says, however often Redis flaps (SPEC §10).
    fn may_warn(&self) -> bool {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// `hostname:pid` (SPEC §2 `cluster.instance` default).
fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.len() <= 64 && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "wsgate".to_owned());
    format!("{host}:{}", std::process::id())
}

fn fields(ip: Option<Field>, sub: Option<Field>) -> Vec<Field> {
    ip.into_iter().chain(sub).collect()
}

fn ip_field(ip: IpKey) -> Field {
    format!("i:{ip}").into()
}

/// A subject as a bounded field: the digest of its kind, issuer and name.
fn subject_field(s: &SubjectKey) -> Field {
    let mut h = Sha256::new();
    match s {
        SubjectKey::Jwt { iss, sub } => {
            h.update(b"jwt\0");
            h.update(iss.as_deref().unwrap_or("").as_bytes());
            h.update(b"\0");
            h.update(sub.as_bytes());
        }
        SubjectKey::ApiKey(digest) => {
            h.update(b"key\0");
            h.update(digest);
        }
    }
    let d = h.finalize();
    let mut out = String::with_capacity(2 + 32);
    out.push_str("s:");
    for b in &d[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out.into()
}

/// The rate as GCRA in milliseconds: one handshake per `step`, `tolerance` ahead allowed
/// (a full bucket of `burst`).
fn gcra(r: crate::admission::ip_limit::RatePolicy) -> (u64, u64) {
    let per = u64::try_from(r.per.as_millis()).unwrap_or(u64::MAX);
    let step = (per / u64::from(r.rate.max(1))).max(1);
    (step, step.saturating_mul(u64::from(r.burst.max(1))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_fields_are_bounded_and_apart() {
        let a = subject_field(&SubjectKey::jwt(Some("i"), "alice"));
        let b = subject_field(&SubjectKey::jwt(None, "alice"));
        let k = subject_field(&SubjectKey::ApiKey([1; 32]));
        assert_eq!(a.len(), 34);
        assert!(a != b && a != k);
        assert_eq!(a, subject_field(&SubjectKey::jwt(Some("i"), "alice")));
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_flapping_store_warns_once_per_period() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let cluster = Cluster {
            // Nothing listens there: the background tasks only fail to connect.
            redis: "redis://127.0.0.1:1/0".into(),
            instance: Some("flap".into()),
            prefix: "t:".into(),
            lease: Duration::from_secs(1),
            on_unavailable: OnUnavailable::Local,
            limits: ClusterLimits::default(),
        };
        let registry = crate::ops::registry::Registry::new();
        let (fleet, _revocations) =
            Fleet::start(&cluster, registry).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..20 {
            // Up, then down again: every path that warns, many times within 10 s.
            fleet.up.store(true, Ordering::Release);
            fleet.mark_down("flap");
            fleet.warn_unavailable();
        }
        let text = String::from_utf8_lossy(&out.0.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned();
        assert_eq!(text.matches("WARN").count(), 1, "{text}");
    }

    #[test]
    fn the_rate_becomes_a_step_and_a_tolerance() {
        let r = crate::admission::ip_limit::RatePolicy {
            rate: 50,
            per: Duration::from_secs(1),
            burst: 100,
        };
        assert_eq!(gcra(r), (20, 2000));
    }
}
