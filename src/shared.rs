//! The state every connection task reads: the config in service, the access log and
//! metrics, the registry of live connections, the upstream pools and the limiters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::admission::ip_limit::{HandshakeRate, IpLimiter};
use crate::admission::pending::HandshakeSlots;
use crate::admission::subject::SubjectLimiter;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::observe::refusals::Refusals;
use crate::ops::registry::Registry;
use crate::ops::revocation::RevocationStore;
use crate::upstream::pool::Pools;

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
    /// reload calls [`Pools::reconcile`].
    pub pools: Arc<Pools>,
    /// Connections in any phase, for `limits.max_connections`.
    pub active: AtomicU64,
    /// Connections per client IP, for `limits.max_connections_per_ip`.
    pub per_ip: Arc<IpLimiter>,
    /// Connections per subject, for `limits.max_connections_per_subject`.
    pub per_subject: Arc<SubjectLimiter>,
    /// Revoked subjects and token ids, and admin closes (`/revoke`, `/connections/close`).
    pub revocations: Arc<dyn RevocationStore>,
    /// Handshakes per client IP, for `limits.handshakes_per_ip`; replaced by a reload only
    /// when the policy changes, so counts survive other reloads.
    pub handshake_rate: ArcSwap<HandshakeRate>,
    /// Listening and not draining.
    pub ready: Arc<AtomicBool>,
    /// `limits.max_pending_handshakes`: taken before accept, given back at the relay.
    pub handshake_slots: HandshakeSlots,
    /// Refusals per address and second: beyond ten, summarised (SPEC §3).
    pub refusals: Refusals,
    /// This instance's membership of a fleet (`cluster`, SPEC §10); fixed at start.
    pub fleet: Option<Arc<Fleet>>,
}

impl Shared {
    /// `/readyz` (SPEC §7): listening, not draining, and every `jwks_url` of the config
    /// in service fetched once (before that, tokens signed by its keys would be refused).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self.config.load().jwks_urls.iter().all(|k| k.is_fetched())
    }
}
