//! Prometheus metrics (SPEC §7), served as text on the admin listener's `/metrics`.
//!
//! Owns the registry and every metric's name and labels. Label values come only from the
//! config (route and upstream names, backend addresses) or from small fixed sets (reasons,
//! close codes bucketed into the known ones plus `other`, directions): never client IPs or
//! paths, so cardinality is bounded by the config.
//!
//! The hot path never looks up a label set: each route's handles are resolved once
//! ([`Metrics::route`]) and a connection keeps an `Arc` to them, adding its counts with
//! relaxed atomics when its relay wakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod striped;

use crate::observe::report::Report;
use crate::outcome::{By, ProxyReason, Refusal};

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Close codes that get their own label value; any other code is counted as `other`.
const KNOWN_CODES: [u16; 17] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 4000, 4001,
    4003,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    route: String,
    code: String,
    by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    route: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReason {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerResumed {
    listener: String,
    resumed: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    upstream: String,
    backend: String,
}

/// One backend's state at scrape time (`wsgate_backend_*`).
#[derive(Clone, Debug)]
pub struct BackendSample {
    pub upstream: String,
    pub backend: String,
    pub up: bool,
    pub connections: u64,
    pub connect_errors: u64,
}

/// One upstream's `max_pending` queues at scrape time (`wsgate_upstream_queue*`).
#[derive(Debug)]
pub struct QueueSample {
    pub upstream: String,
    /// Upgrades waiting for a place now.
    pub waiting: i64,
    /// Seconds each admitted or timed-out upgrade waited (the pool's own histogram).
    pub seconds: Histogram,
}

/// Something that can list backends at scrape time (the upstream pools).
pub trait BackendSource: Send + Sync + 'static {
    fn backend_samples(&self) -> Vec<BackendSample>;

    fn queue_samples(&self) -> Vec<QueueSample> {
        Vec::new()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

/// Counts that live elsewhere and are read at scrape time.
#[derive(Default)]
struct Sources {
    log_dropped: Option<Arc<AtomicU64>>,
    /// `cluster`: the fleet store's state and the handshakes decided without it.
    cluster: Option<(Arc<AtomicBool>, Arc<AtomicU64>)>,
    backends: Option<Arc<dyn BackendSource>>,
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    active: Family<RouteLabel, Gauge>,
    connections: Family<RouteLabel, Counter>,
    rejected: Family<RejectLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    messages: Family<DirLabels, FlowCounter>,
    bytes: Family<DirLabels, FlowCounter>,
    stalls: StallFamilies,
    rate_limited: Family<RouteLabel, Counter>,
    dead_peers: Family<RouteLabel, Counter>,
    pings: Counter,
    ping_rtt: Histogram,
    reload_failures: Counter,
    revocations: Counter,
    jwks_refreshes: Family<ResultLabel, Counter>,
    tls_handshakes: Family<ListenerResumed, Counter>,
    accept: AcceptFamilies,
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    sources: Arc<Mutex<Sources>>,
    /// Connections refused for a bad or missing PROXY header.
    proxy_protocol_failures: Arc<AtomicU64>,
    tls_handshake_failures: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// TLS handshakes that failed since start.
    pub fn tls_handshake_failures(&self) -> u64 {
        self.tls_handshake_failures.load(Ordering::Relaxed)
    }

    /// Counts a failed TLS handshake; returns the total so far.
    /// Counts a completed TLS handshake of `listener`, resumed (a ticket) or full.
    pub fn tls_handshake(&self, listener: &str, resumed: bool) {
        self.tls_handshakes
            .get_or_create(&ListenerResumed {
                listener: listener.to_owned(),
                resumed: if resumed { "true" } else { "false" },
            })
            .inc();
    }

    pub fn tls_handshake_failed(&self) -> u64 {
        self.tls_handshake_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a connection refused for its PROXY header; returns the total so far.
    pub fn proxy_protocol_failed(&self) -> u64 {
        self.proxy_protocol_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let active = Family::<RouteLabel, Gauge>::default();
        let connections = Family::<RouteLabel, Counter>::default();
        let rejected = Family::<RejectLabels, Counter>::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let closes = Family::<CloseLabels, Counter>::default();
        let messages = Family::<DirLabels, FlowCounter>::default();
        let bytes = Family::<DirLabels, FlowCounter>::default();
        let rate_limited = Family::<RouteLabel, Counter>::default();
        let dead_peers = Family::<RouteLabel, Counter>::default();
        let pings = Counter::default();
        // 0.5 ms … 8 s: loopback to intercontinental mobile links.
        let ping_rtt = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        let reload_failures = Counter::default();
        let revocations = Counter::default();
        let jwks_refreshes = Family::<ResultLabel, Counter>::default();
        for result in ["ok", "error"] {
            // Both series exist from the start, so an alert on `error` sees a 0 first.
            drop(jwks_refreshes.get_or_create(&ResultLabel { result }));
        }
        let tls_handshakes = Family::<ListenerResumed, Counter>::default();
        registry.register(
            "wsgate_tls_handshakes",
            "TLS handshakes completed, by listener and whether the session was resumed",
            tls_handshakes.clone(),
        );
        let sources = Arc::new(Mutex::new(Sources::default()));
        let accept = AcceptFamilies::register(&mut registry);
        registry.register(
            "wsgate_connections_active",
            "WebSocket connections being relayed",
            active.clone(),
        );
        registry.register(
            "wsgate_connections",
            "WebSocket connections upgraded (101 sent)",
            connections.clone(),
        );
        registry.register(
            "wsgate_handshake_rejected",
            "Handshakes refused, by SPEC reason",
            rejected.clone(),
        );
        registry.register(
            "wsgate_http_requests",
            "Plain HTTP requests relayed on `http: proxy` routes, by status sent to the client",
            http_requests.clone(),
        );
        registry.register(
            "wsgate_closes",
            "Relayed connections ended, by close code sent to the client and who closed",
            closes.clone(),
        );
        registry.register(
            "wsgate_messages",
            "Data messages relayed, by direction (c2u = client to upstream)",
            messages.clone(),
        );
        registry.register(
            "wsgate_bytes",
            "Bytes relayed (frames on the wire), by direction",
            bytes.clone(),
        );
        let stalls = StallFamilies::register(&mut registry);
        registry.register(
            "wsgate_rate_limited",
            "Client messages over the route's message rate (closed or throttled)",
            rate_limited.clone(),
        );
        registry.register(
            "wsgate_pings",
            "Keepalive pings the proxy sent to clients",
            pings.clone(),
        );
        registry.register(
            "wsgate_ping_rtt_seconds",
            "Round trip of the proxy's pings to clients",
            ping_rtt.clone(),
        );
        registry.register(
            "wsgate_dead_peers",
            "Connections closed because a peer stopped answering pings",
            dead_peers.clone(),
        );
        registry.register(
            "wsgate_reload_failures",
            "SIGHUP reloads refused because the new configuration was invalid",
            reload_failures.clone(),
        );
        registry.register(
            "wsgate_revocations",
            "Subjects and token ids revoked through the admin API (POST /revoke)",
            revocations.clone(),
        );
        registry.register(
            "wsgate_jwks_refresh",
            "Fetches of `jwks_url` key sets, by result (ok: keys replaced; error: the last good set kept)",
            jwks_refreshes.clone(),
        );
        let proxy_protocol_failures = Arc::new(AtomicU64::new(0));
        let tls_handshake_failures = Arc::new(AtomicU64::new(0));
        registry.register_collector(Box::new(ScrapeTime {
            sources: sources.clone(),
            proxy_protocol_failures: proxy_protocol_failures.clone(),
            tls_handshake_failures: tls_handshake_failures.clone(),
        }));
        Metrics {
            registry,
            proxy_protocol_failures,
            tls_handshake_failures,
            active,
            connections,
            rejected,
            http_requests,
            closes,
            messages,
            bytes,
            stalls,
            rate_limited,
            dead_peers,
            pings,
            ping_rtt,
            reload_failures,
            revocations,
            jwks_refreshes,
            tls_handshakes,
            accept,
            routes: Mutex::new(HashMap::new()),
            sources,
        }
    }

    /// Reads the access log's drop counter at scrape time.
    pub fn watch_log_drops(&self, dropped: Arc<AtomicU64>) {
        if let Ok(mut s) = self.sources.lock() {
            s.log_dropped = Some(dropped);
        }
    }

    /// Reads the fleet's state at scrape time (`wsgate_cluster_up`,
    /// `wsgate_cluster_fallbacks_total`; absent without `cluster`).
    pub fn watch_cluster(&self, up: Arc<AtomicBool>, fallbacks: Arc<AtomicU64>) {
        if let Ok(mut s) = self.sources.lock() {
            s.cluster = Some((up, fallbacks));
        }
    }

    /// Lists backends at scrape time.
    pub fn watch_backends(&self, source: Arc<dyn BackendSource>) {
        if let Ok(mut s) = self.sources.lock() {
            s.backends = Some(source);
        }
    }

    /// The handles of one route (resolved once per route, then shared by its connections).
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        let Ok(mut routes) = self.routes.lock() else {
            return Arc::new(self.resolve(route));
        };
        routes
            .entry(route.to_owned())
            .or_insert_with(|| Arc::new(self.resolve(route)))
            .clone()
    }

    fn resolve(&self, route: &str) -> RouteMetrics {
        let r = RouteLabel {
            route: route.to_owned(),
        };
        let dir = |family: &Family<DirLabels, FlowCounter>, direction: &str| {
            family
                .get_or_create(&DirLabels {
                    route: route.to_owned(),
                    direction: direction.to_owned(),
                })
                .clone()
        };
        RouteMetrics {
            route: route.to_owned(),
            active: self.active.get_or_create(&r).clone(),
            connections: self.connections.get_or_create(&r).clone(),
            c2u_messages: dir(&self.messages, "c2u"),
            c2u_bytes: dir(&self.bytes, "c2u"),
            u2c_messages: dir(&self.messages, "u2c"),
            u2c_bytes: dir(&self.bytes, "u2c"),
            stalls: self.stalls.route(route),
            rate_limited: self.rate_limited.get_or_create(&r).clone(),
            dead_peers: self.dead_peers.get_or_create(&r).clone(),
            pings: self.pings.clone(),
            ping_rtt: self.ping_rtt.clone(),
            closes: self.closes.clone(),
        }
    }

    /// The handles a listener counts its refusals at accept with.
    pub fn accept_refusals(&self, listener: &str) -> AcceptRefusals {
        let at_accept = |reason: &'static str| {
            self.accept
                .refused
                .get_or_create(&ListenerReason {
                    listener: listener.to_owned(),
                    reason,
                })
                .clone()
        };
        let rejected = |reason: &str| {
            self.rejected
                .get_or_create(&RejectLabels {
                    route: String::new(),
                    reason: reason.to_owned(),
                })
                .clone()
        };
        let both = |r: Refusal| (at_accept(r.reason()), rejected(r.reason()));
        AcceptRefusals {
            capacity: both(Refusal::Capacity),
            ip_rate: both(Refusal::IpRate {
                retry_after_secs: 1,
            }),
            ip_cap: both(Refusal::IpCap),
        }
    }

    /// Connections between accept and relay (`wsgate_handshakes_pending`).
    pub fn handshakes_pending(&self) -> Gauge {
        self.accept.pending.clone()
    }

    /// A refused handshake; `route` is empty when no route matched (yet).
    pub fn rejected(&self, route: Option<&str>, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabels {
                route: route.unwrap_or("").to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A plain HTTP request relayed (or refused after admission) on an `http: proxy`
    /// route, by the status the client got.
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                code: status.to_string(),
            })
            .inc();
    }

    pub fn reload_failed(&self) {
        self.reload_failures.inc();
    }

    /// A subject or token id was revoked through the admin API.
    pub fn revoked(&self) {
        self.revocations.inc();
    }

    /// A fetch of a `jwks_url` ended: `ok` when its keys were taken, else `error`.
    pub fn jwks_refreshed(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.jwks_refreshes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The exposition text (OpenMetrics, which Prometheus scrapes natively).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The metrics of admission at accept (SPEC §3 "Admission before work").
struct AcceptFamilies {
    refused: Family<ListenerReason, Counter>,
    pending: Gauge,
}

impl AcceptFamilies {
    fn register(registry: &mut Registry) -> AcceptFamilies {
        let refused = Family::<ListenerReason, Counter>::default();
        let pending = Gauge::default();
        registry.register(
            "wsgate_refused_at_accept",
            "Connections refused at accept, before TLS and the request head, by reason",
            refused.clone(),
        );
        registry.register(
            "wsgate_handshakes_pending",
            "Connections between accept and relay (PROXY header, TLS, head, upstream handshake)",
            pending.clone(),
        );
        AcceptFamilies { refused, pending }
    }
}

/// One listener's counters of refusals at accept: `wsgate_refused_at_accept_total` and
/// `wsgate_handshake_rejected_total{route=""}`, resolved once.
#[derive(Clone, Debug)]
pub struct AcceptRefusals {
    capacity: (Counter, Counter),
    ip_rate: (Counter, Counter),
    ip_cap: (Counter, Counter),
}

impl AcceptRefusals {
    /// Counts one refusal (only the three judged at accept have handles).
    pub fn count(&self, refusal: Refusal) {
        let (at_accept, rejected) = match refusal {
            Refusal::Capacity => &self.capacity,
            Refusal::IpRate { .. } => &self.ip_rate,
            Refusal::IpCap => &self.ip_cap,
            _ => return,
        };
        at_accept.inc();
        rejected.inc();
    }
}

/// The relay's per-message counters: striped, so workers do not share a cache line.
type FlowCounter = Counter<u64, striped::Striped>;

/// One route's metric handles. Cloning a handle shares its atomic.
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    active: Gauge,
    connections: Counter,
    c2u_messages: FlowCounter,
    c2u_bytes: FlowCounter,
    u2c_messages: FlowCounter,
    u2c_bytes: FlowCounter,
    stalls: RouteStalls,
    rate_limited: Counter,
    dead_peers: Counter,
    pings: Counter,
    ping_rtt: Histogram,
    closes: Family<CloseLabels, Counter>,
}

/// What the relay adds as it goes: messages and bytes per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub c2u_messages: u64,
    pub c2u_bytes: u64,
    pub u2c_messages: u64,
    pub u2c_bytes: u64,
}

impl RouteMetrics {
    /// A connection was upgraded; the returned guard counts it active until dropped.
    pub fn opened(self: &Arc<Self>) -> ActiveConnection {
        self.connections.inc();
        self.active.inc();
        ActiveConnection(self.clone())
    }

    /// Adds what was relayed since the last call (`now - before`, per field).
    pub fn add_flow(&self, now: &Flow, before: &Flow) {
        let add = |c: &FlowCounter, n: u64, b: u64| {
            if n > b {
                c.inc_by(n - b);
            }
        };
        add(&self.c2u_messages, now.c2u_messages, before.c2u_messages);
        add(&self.c2u_bytes, now.c2u_bytes, before.c2u_bytes);
        add(&self.u2c_messages, now.u2c_messages, before.u2c_messages);
        add(&self.u2c_bytes, now.u2c_bytes, before.u2c_bytes);
    }

    pub fn ping_sent(&self) {
        self.pings.inc();
    }

    pub fn ping_answered(&self, rtt: Duration) {
        self.ping_rtt.observe(rtt.as_secs_f64());
    }

    /// The connection's end: close code and side, rate limiting, dead peers.
    pub fn closed(&self, report: &Report) {
        let (code, by) = report
            .close
            .as_ref()
            .map_or((1006, By::Proxy), |c| (c.code, c.by));
        self.closes
            .get_or_create(&CloseLabels {
                route: self.route.clone(),
                code: code_label(code),
                by: by.as_str().to_owned(),
            })
            .inc();
        if report.c2u.rate_limited > 0 {
            self.rate_limited.inc_by(report.c2u.rate_limited);
        }
        if report.proxy_reason == Some(ProxyReason::DeadPeer) {
            self.dead_peers.inc();
        }
    }
}

/// Keeps `wsgate_connections_active` up for as long as it lives.
#[derive(Debug)]
pub struct ActiveConnection(Arc<RouteMetrics>);

impl ActiveConnection {
    /// Counts the connection's close; it stops counting as active right after.
    pub fn closed(self, report: &Report) {
        self.0.closed(report);
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}

// === stalls: `wsgate_stall_seconds_total`, `wsgate_connections_stalled` (SPEC §7) ===

/// Which way a stalled write goes: `U2c` waits on the client (a slow client), `C2u` on
/// the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallDirection {
    U2c,
    C2u,
}

impl StallDirection {
    fn label(self) -> &'static str {
        match self {
            StallDirection::U2c => "u2c",
            StallDirection::C2u => "c2u",
        }
    }
}

/// The stall families, registered once.
struct StallFamilies {
    seconds: Family<DirLabels, Counter<f64, AtomicU64>>,
    stalled: Family<DirLabels, Gauge>,
}

impl StallFamilies {
    fn register(registry: &mut Registry) -> StallFamilies {
        let seconds = Family::<DirLabels, Counter<f64, AtomicU64>>::default();
        let stalled = Family::<DirLabels, Gauge>::default();
        registry.register(
            "wsgate_stall_seconds",
            "Time relayed writes waited on a peer whose socket was full, by direction (u2c = a slow client); added as each stall ends",
            seconds.clone(),
        );
        registry.register(
            "wsgate_connections_stalled",
            "Connections now blocked on a full peer, by direction (u2c = waiting on the client)",
            stalled.clone(),
        );
        StallFamilies { seconds, stalled }
    }

    /// One route's handles, in [`StallDirection`] order (`u2c`, `c2u`).
    fn route(&self, route: &str) -> RouteStalls {
        let labels = |d: StallDirection| DirLabels {
            route: route.to_owned(),
            direction: d.label().to_owned(),
        };
        let dirs = [StallDirection::U2c, StallDirection::C2u];
        RouteStalls {
            seconds: dirs.map(|d| self.seconds.get_or_create(&labels(d)).clone()),
            stalled: dirs.map(|d| self.stalled.get_or_create(&labels(d)).clone()),
        }
    }
}

#[derive(Debug)]
struct RouteStalls {
    seconds: [Counter<f64, AtomicU64>; 2],
    stalled: [Gauge; 2],
}

impl RouteMetrics {
    /// A connection's writes in `dir` wait on a full peer: it counts in
    /// `wsgate_connections_stalled` until the guard is dropped (whatever ends the relay).
    pub fn stall_started(&self, dir: StallDirection) -> StalledConnection {
        let gauge = &self.stalls.stalled[dir as usize];
        gauge.inc();
        StalledConnection(gauge.clone())
    }

    /// Adds the length of stalls that ended to `wsgate_stall_seconds_total`.
    pub fn stalled_for(&self, dir: StallDirection, time: Duration) {
        self.stalls.seconds[dir as usize].inc_by(time.as_secs_f64());
    }
}

/// Keeps one connection counted in `wsgate_connections_stalled` for as long as it lives.
#[derive(Debug)]
pub struct StalledConnection(Gauge);

impl Drop for StalledConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn code_label(code: u16) -> String {
    if KNOWN_CODES.contains(&code) {
        code.to_string()
    } else {
        "other".to_owned()
    }
}

/// Metrics read at scrape time: log drops, TLS failures, backends, the process.
struct ScrapeTime {
    sources: Arc<Mutex<Sources>>,
    proxy_protocol_failures: Arc<AtomicU64>,
    tls_handshake_failures: Arc<AtomicU64>,
}

impl std::fmt::Debug for ScrapeTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeTime")
    }
}

impl Collector for ScrapeTime {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (dropped, backends, cluster) = match self.sources.lock() {
            Ok(s) => (
                s.log_dropped.as_ref().map(|d| d.load(Ordering::Relaxed)),
                s.backends.clone(),
                s.cluster
                    .as_ref()
                    .map(|(up, f)| (up.load(Ordering::Acquire), f.load(Ordering::Relaxed))),
            ),
            Err(_) => (None, None, None),
        };
        if let Some((up, fallbacks)) = cluster {
            gauge(
                &mut enc,
                "wsgate_cluster_up",
                "1 while the fleet store (Redis) answers and holds this instance's registration",
                i64::from(up),
            )?;
            counter(
                &mut enc,
                "wsgate_cluster_fallbacks",
                "Handshakes decided without the fleet store (on_unavailable: local or refuse)",
                fallbacks,
            )?;
        }
        counter(
            &mut enc,
            "wsgate_log_dropped",
            "Access-log lines dropped because the writer fell behind",
            dropped.unwrap_or(0),
        )?;
        counter(
            &mut enc,
            "wsgate_tls_handshake_failures",
            "TLS handshakes that failed (never reached HTTP)",
            self.tls_handshake_failures.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "wsgate_proxy_protocol_failures",
            "Connections refused for a bad or missing PROXY protocol header",
            self.proxy_protocol_failures.load(Ordering::Relaxed),
        )?;
        if let Some(source) = backends {
            encode_backends(&mut enc, &source.backend_samples())?;
            encode_queues(&mut enc, &source.queue_samples())?;
        }
        encode_process(&mut enc)
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn encode_queues(
    enc: &mut DescriptorEncoder,
    samples: &[QueueSample],
) -> Result<(), std::fmt::Error> {
    let label = |s: &QueueSample| UpstreamLabel {
        upstream: s.upstream.clone(),
    };
    let mut family = enc.encode_descriptor(
        "wsgate_upstream_queue",
        "Upgrades waiting for a backend's max_pending place",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for s in samples {
        ConstGauge::new(s.waiting).encode(family.encode_family(&label(s))?)?;
    }
    let mut family = enc.encode_descriptor(
        "wsgate_upstream_queue_seconds",
        "Time upgrades waited for a backend's max_pending place",
        None,
        prometheus_client::metrics::MetricType::Histogram,
    )?;
    for s in samples {
        s.seconds.encode(family.encode_family(&label(s))?)?;
    }
    Ok(())
}

fn encode_backends(
    enc: &mut DescriptorEncoder,
    samples: &[BackendSample],
) -> Result<(), std::fmt::Error> {
    let labels = |s: &BackendSample| BackendLabels {
        upstream: s.upstream.clone(),
        backend: s.backend.clone(),
    };
    let mut family = enc.encode_descriptor(
        "wsgate_backend_up",
        "1 while the backend is considered healthy (a drained backend stays up)",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for s in samples {
        let g = ConstGauge::new(i64::from(s.up));
        g.encode(family.encode_family(&labels(s))?)?;
    }
    let mut family = enc.encode_descriptor(
        "wsgate_backend_connections",
        "Connections being relayed to the backend",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for s in samples {
        let g = ConstGauge::new(i64::try_from(s.connections).unwrap_or(i64::MAX));
        g.encode(family.encode_family(&labels(s))?)?;
    }
    let mut family = enc.encode_descriptor(
        "wsgate_upstream_connect_errors",
        "Failed connects or upstream handshakes, by backend",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for s in samples {
        let c = ConstCounter::new(s.connect_errors);
        c.encode(family.encode_family(&labels(s))?)?;
    }
    Ok(())
}

/// Process metrics from /proc (Linux); absent elsewhere.
fn encode_process(enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    if let Some(fds) = open_fds() {
        gauge(enc, "process_open_fds", "Open file descriptors", fds)?;
    }
    if let Some(rss) = resident_bytes() {
        gauge(
            enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            rss,
        )?;
    }
    Ok(())
}

fn open_fds() -> Option<i64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    i64::try_from(n).ok()
}

fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::report::CloseInfo;

    #[test]
    fn unknown_codes_share_one_label() {
        assert_eq!(code_label(1000), "1000");
        assert_eq!(code_label(4001), "4001");
        assert_eq!(code_label(3999), "other");
        assert_eq!(code_label(0), "other");
    }

    #[test]
    fn route_handles_are_shared_and_counted() {
        let m = Metrics::new();
        let a = m.route("chat");
        let b = m.route("chat");
        assert!(Arc::ptr_eq(&a, &b));
        let guard = a.opened();
        a.add_flow(
            &Flow {
                c2u_messages: 3,
                c2u_bytes: 30,
                u2c_messages: 1,
                u2c_bytes: 10,
            },
            &Flow::default(),
        );
        let text = m.encode();
        assert!(
            text.contains("wsgate_connections_active{route=\"chat\"} 1"),
            "{text}"
        );
        assert!(text.contains("wsgate_messages_total{route=\"chat\",direction=\"c2u\"} 3"));
        drop(guard);
        let report = Report {
            close: Some(CloseInfo {
                code: 3001,
                reason: String::new(),
                by: By::Upstream,
            }),
            ..Report::default()
        };
        a.closed(&report);
        let text = m.encode();
        assert!(text.contains("wsgate_connections_active{route=\"chat\"} 0"));
        assert!(
            text.contains("wsgate_closes_total{route=\"chat\",code=\"other\",by=\"upstream\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn stall_gauges_fall_when_their_guards_drop_and_seconds_add_up() {
        let m = Metrics::new();
        let r = m.route("chat");
        let slow_client = r.stall_started(StallDirection::U2c);
        let text = m.encode();
        let stalled = |dir: &str, n: u32| {
            format!("wsgate_connections_stalled{{route=\"chat\",direction=\"{dir}\"}} {n}")
        };
        assert!(text.contains(&stalled("u2c", 1)), "{text}");
        assert!(text.contains(&stalled("c2u", 0)), "{text}");
        assert!(
            text.contains("# TYPE wsgate_stall_seconds counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE wsgate_connections_stalled gauge"),
            "{text}"
        );
        r.stalled_for(StallDirection::U2c, Duration::from_millis(250));
        r.stalled_for(StallDirection::U2c, Duration::from_millis(500));
        drop(slow_client);
        let text = m.encode();
        assert!(text.contains(&stalled("u2c", 0)), "{text}");
        assert!(
            text.contains("wsgate_stall_seconds_total{route=\"chat\",direction=\"u2c\"} 0.75"),
            "{text}"
        );
    }

    #[test]
    fn scrape_time_metrics_are_listed() {
        let m = Metrics::new();
        m.watch_log_drops(Arc::new(AtomicU64::new(7)));
        let text = m.encode();
        assert!(text.contains("wsgate_log_dropped_total 7"), "{text}");
        assert!(text.contains("# TYPE wsgate_tls_handshake_failures counter"));
    }
}
