//! The YAML layer: `File*` structs that mirror SPEC §2 key for key (`deny_unknown_fields`,
//! no defaults applied, no cross-field rules), the `DEFAULT_*` values, and the only code
//! that touches `serde_norway`: [`parse`] and [`locate`] (line and column of a key path).
//! Keys of features not built yet are recognised here and refused in `validate`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_norway::Value;

use super::KeyPath;
use super::units::{
    DurationValue, EnvScope, Piece, SizeValue, Text, opt_scalar, scalar, split_template,
};

// === defaults (SPEC §2) ===

/// `limits.max_connections`: whole-process cap on client connections.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 50_000;
/// `limits.max_pending_handshakes` default.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: u64 = 4096;
/// `limits.handshake_timeout`: the request head (and TLS) must arrive within this.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `limits.max_frame_size`: largest frame accepted in either direction (1 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: u64 = 1 << 20;
/// `limits.max_message_size`: largest message, summed over its fragments (4 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 4 << 20;
/// `limits.send_timeout`: a write stalled this long marks a slow consumer.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// `limits.buffer_size`: relay buffer per direction per connection (16 KiB).
pub const DEFAULT_BUFFER_SIZE: usize = 16 << 10;
/// `limits.max_request_body`: largest plain HTTP request body on `http: proxy` routes (1 MiB).
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 1 << 20;
/// `limits.http_timeout`: a whole plain HTTP request/response exchange (long polls fit).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections per client IP (established + in handshake).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 64;
/// Handshakes per client IP: `rate` per `per`, with `burst`.
pub const DEFAULT_HANDSHAKE_RATE: u32 = 10;
pub const DEFAULT_HANDSHAKE_PER: Duration = Duration::from_secs(1);
pub const DEFAULT_HANDSHAKE_BURST: u32 = 20;
/// Client→upstream data messages allowed per `per` (SPEC §2 `limits.messages`).
pub const DEFAULT_MESSAGE_RATE: u32 = 100;
/// Refill period of the message rate.
pub const DEFAULT_MESSAGE_PER: Duration = Duration::from_secs(1);
/// Message burst allowance.
pub const DEFAULT_MESSAGE_BURST: u32 = 200;
/// `limits.max_fragments`: frames in one fragmented client message; beyond → close 1008.
pub const DEFAULT_MAX_FRAGMENTS: u32 = 256;
/// A fragmented client message must complete within this (0 = off).
pub const DEFAULT_FRAGMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// No data frames either way for this long closes the connection (0 = off).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::ZERO;
/// Proxy → client ping period, counted from the last frame sent to the client (0 = off).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
/// A proxy ping unanswered this long marks the peer dead.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Proxy → upstream ping period (0 = off).
pub const DEFAULT_UPSTREAM_PING_INTERVAL: Duration = Duration::ZERO;
/// SPEC §8: drain closes are spread over this window.
pub const DEFAULT_DRAIN_SPREAD: Duration = Duration::from_secs(10);
/// SPEC §8: whatever is still open this long after SIGTERM is closed.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `upstreams.*.connect_timeout`: TCP connect plus upstream handshake budget.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `upstreams.*.max_ejected`: passive failure detection never takes more than this
/// percentage of an upstream's backends out.
pub const DEFAULT_MAX_EJECTED_PERCENT: u8 = 50;
/// `upstreams.*.queue_timeout`: an upgrade queued for a backend's `max_pending` this long
/// is refused 503 `queue_timeout`.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// `upstreams.*.backends[].weight`: relative share of a backend.
pub const DEFAULT_WEIGHT: u32 = 1;
/// `upstreams.*.health_check.interval`: time between two checks of a backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// `upstreams.*.health_check.timeout`: budget of one check.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// `upstreams.*.health_check.unhealthy_after`: consecutive failures that mark a backend down.
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
/// `upstreams.*.health_check.healthy_after`: consecutive successes that mark it up again.
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// `strip_headers`: client headers removed before forwarding, besides those the proxy sets.
pub const DEFAULT_STRIP_HEADERS: [&str; 2] = ["Forwarded", "X-Real-IP"];
/// `log.access`: where access-log JSON lines go.
pub const DEFAULT_LOG_ACCESS: &str = "stdout";
/// `log.format`: format of operational logs on stderr.
pub const DEFAULT_LOG_FORMAT: &str = "text";
/// `cluster.prefix`: instances sharing one Redis and this prefix form one fleet.
pub const DEFAULT_CLUSTER_PREFIX: &str = "wsgate:";
/// `cluster.lease`: an instance silent this long has its counts dropped.
pub const DEFAULT_CLUSTER_LEASE: Duration = Duration::from_secs(15);

// === File* structs ===
//
// Every field is optional at this layer unless the YAML cannot mean anything without it;
// `null` is the same as absent. Durations and sizes are parsed (and `${NAME}` replaced)
// while deserializing, so their errors carry the value's own line and column.

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Public listeners; at least one.
    pub listeners: Option<Vec<FileListener>>,
    /// Admin listener (/healthz, /readyz, /metrics); absent → none.
    pub admin: Option<FileAdmin>,
    /// Access and operational logs.
    pub log: Option<FileLog>,
    /// Shutdown and reload drain (SPEC §8).
    pub drain: Option<FileDrain>,
    /// CIDRs whose X-Forwarded-For (and PROXY header) is believed.
    pub trusted_proxies: Option<Vec<Text>>,
    /// Client headers always removed before forwarding; default [`DEFAULT_STRIP_HEADERS`].
    pub strip_headers: Option<Vec<Text>>,
    /// Defaults for every route.
    pub limits: Option<FileLimits>,
    /// Proxy pings to clients and upstreams, and the dead-peer timeout.
    pub keepalive: Option<FileKeepalive>,
    /// Upstreams by name, in file order.
    pub upstreams: Option<NamedMap<FileUpstream>>,
    /// Routes; first match wins.
    pub routes: Option<Vec<FileRoute>>,
    /// A fleet sharing limits and revocations through Redis (SPEC §10); absent → per process.
    pub cluster: Option<FileCluster>,
}

/// `cluster` (SPEC §2, §10).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// `redis://` or `rediss://` (TLS) URL; `${NAME}` for credentials.
    pub redis: Text,
    /// This instance's unique name in the fleet; default `hostname:pid`.
    pub instance: Option<Text>,
    /// Key prefix; instances sharing Redis and prefix form one fleet. Default `wsgate:`.
    pub prefix: Option<Text>,
    /// An instance silent this long has its counts dropped. Default 15s.
    pub lease: Option<DurationValue>,
    /// `local` (per-process limits go on) or `refuse` (503 `cluster`) while Redis is unusable.
    pub on_unavailable: Option<Text>,
    /// Limits judged across the fleet, on top of the per-process ones; each absent → off.
    pub limits: Option<FileClusterLimits>,
}

/// `cluster.limits`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileClusterLimits {
    /// Connections per client address across the fleet (0 or absent = off).
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_connections_per_ip: Option<u32>,
    /// Connections per subject across the fleet (0 or absent = off).
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_connections_per_subject: Option<u32>,
    /// Handshakes per client address across the fleet (absent = off).
    pub handshakes_per_ip: Option<FileRate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    /// Label in logs and metrics; default: the bind address.
    pub name: Option<Text>,
    /// `IP:port` to listen on, e.g. `0.0.0.0:8080`, `[::]:8080`.
    pub bind: Text,
    /// TLS termination; absent → plain ws://.
    pub tls: Option<FileListenerTls>,
    /// Expect a PROXY v1/v2 header (default false).
    #[serde(default, deserialize_with = "opt_scalar")]
    pub proxy_protocol: Option<bool>,
    /// HTTP/2: ALPN `h2` on TLS (default true), h2c prior knowledge on plain (default false).
    #[serde(default, deserialize_with = "opt_scalar")]
    pub http2: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListenerTls {
    /// Certificate/key pairs; SNI picks by SAN; the first is the default.
    pub certificates: Option<Vec<FileCertificate>>,
    /// Generate an in-memory certificate for localhost at start (development only).
    #[serde(default, deserialize_with = "opt_scalar")]
    pub self_signed: Option<bool>,
    /// Lowest TLS version: "1.2" | "1.3".
    pub min_version: Option<Text>,
    /// CA bundle to require client certificates (mTLS).
    pub client_ca: Option<Text>,
    /// TLS resumption with stateless tickets; default true.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub session_tickets: Option<bool>,
    /// File of shared ticket keys (fleet-wide resumption); re-read on SIGHUP.
    pub ticket_keys: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    /// PEM certificate chain path.
    pub cert: Text,
    /// PEM private key path.
    pub key: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// `IP:port` of the admin listener, e.g. `127.0.0.1:9090`.
    pub bind: Text,
    /// Bearer token the state-changing endpoints (POST, DELETE) require, e.g.
    /// `"${WSGATE_ADMIN_TOKEN}"`; absent → those endpoints are served only on a loopback
    /// `bind`.
    pub token: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    /// `stdout` | `stderr` | a file path; default stdout.
    pub access: Option<Text>,
    /// Operational log format: `text` | `json`; default text.
    pub format: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDrain {
    /// Window over which drain closes are spread.
    pub spread: Option<DurationValue>,
    /// Hard deadline after which the rest is closed.
    pub timeout: Option<DurationValue>,
}

/// `limits` at top level and in `routes[].limits` (where each key overrides the top level).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Whole-process connection cap (top level only); default 50000.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_connections: Option<u64>,
    /// Handshakes in progress, process-wide (top level only); default 4096.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_pending_handshakes: Option<u64>,
    /// Per-client-IP connection cap, handshakes in progress included.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_connections_per_ip: Option<u64>,
    /// Per-subject (JWT `sub`, or API key) connection cap; default 0 = off.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_connections_per_subject: Option<u64>,
    /// Per-IP handshake rate; default 10 per 1s, burst 20; top level only.
    pub handshakes_per_ip: Option<FileRate>,
    /// IPv6 clients share per-IP limits by this prefix length; default 64; top level only.
    pub ipv6_prefix: Option<u8>,
    /// Time for the full request head; default 10s; must be > 0.
    pub handshake_timeout: Option<DurationValue>,
    /// Largest frame; default 1MiB; at least 125B.
    pub max_frame_size: Option<SizeValue>,
    /// Largest message; default 4MiB; at least max_frame_size.
    pub max_message_size: Option<SizeValue>,
    /// Client→upstream data-message rate; default 100 per 1s, burst 200, `close`.
    pub messages: Option<FileMessageRate>,
    /// Frames in one fragmented client message; default 256; at least 1.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_fragments: Option<u64>,
    /// Deadline for a fragmented client message; default 10s; `0s` = off.
    pub fragment_timeout: Option<DurationValue>,
    /// Close after this long without data frames either way; default `0s` = off.
    pub idle_timeout: Option<DurationValue>,
    /// Close 1001 `max age` at this age (±10 % jitter); default `0s` = off.
    pub max_connection_age: Option<DurationValue>,
    /// Slow-consumer write stall limit; default 30s; must be > 0.
    pub send_timeout: Option<DurationValue>,
    /// Relay buffer per direction; default 16KiB; 1KiB..=1MiB.
    pub buffer_size: Option<SizeValue>,
    /// Largest plain HTTP request body (`http: proxy` routes); default 1MiB.
    pub max_request_body: Option<SizeValue>,
    /// A whole plain HTTP exchange (`http: proxy` routes); default 60s; must be > 0.
    pub http_timeout: Option<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRate {
    /// Tokens added per `per`.
    #[serde(deserialize_with = "scalar")]
    pub rate: u32,
    /// Refill period.
    pub per: DurationValue,
    /// Bucket size; default `rate`.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMessageRate {
    /// Messages allowed per `per`.
    #[serde(deserialize_with = "scalar")]
    pub rate: u32,
    /// Refill period.
    pub per: DurationValue,
    /// Bucket size; default `rate`.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub burst: Option<u32>,
    /// `close` | `throttle`.
    pub on_exceed: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeepalive {
    /// Proxy → client ping period after the last frame sent; default 20s; `0s` = off.
    pub ping_interval: Option<DurationValue>,
    /// A proxy ping unanswered this long means a dead peer; default 10s; > 0.
    pub pong_timeout: Option<DurationValue>,
    /// Proxy → upstream ping period; default `0s` = off.
    pub upstream_ping_interval: Option<DurationValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// Backends of the pool; exclusive with `builtin`.
    pub backends: Option<Vec<FileBackend>>,
    /// wsgate-specific: `echo` runs an in-process echo server; exclusive with `backends`.
    pub builtin: Option<Text>,
    /// TLS to the upstream (wss://).
    pub tls: Option<FileUpstreamTls>,
    /// Sticky key; default `ip`.
    pub sticky: Option<FileSticky>,
    /// Bounded-load balancing; default off.
    pub balance: Option<FileBalance>,
    /// Connect + upstream handshake budget; default 3s; must be > 0.
    pub connect_timeout: Option<DurationValue>,
    /// Active health checks; absent → passive detection only.
    pub health_check: Option<FileHealthCheck>,
    /// Most backends passive detection may have out at once, as `N%` of the backends;
    /// default `50%`; `0%` = passive detection never takes one out.
    pub max_ejected: Option<Text>,
    /// Upstream handshakes in flight per backend; default 0 = unlimited; more wait in FIFO.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub max_pending: Option<u32>,
    /// Longest wait in a backend's queue; default 10s; > 0.
    pub queue_timeout: Option<DurationValue>,
    /// A backend that comes up (or is added) has its share ramped over this; default 0s = off.
    pub slow_start: Option<DurationValue>,
}

/// A backend: `{ addr: "host:port", weight: 2 }`, or just `"host:port"` (weight 1).
#[derive(Debug)]
pub struct FileBackend {
    /// `host:port`; IPv6 in brackets.
    pub addr: Text,
    /// Relative share; default 1; at least 1.
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackendMap {
    addr: Text,
    #[serde(default, deserialize_with = "opt_scalar")]
    weight: Option<u32>,
}

impl<'de> Deserialize<'de> for FileBackend {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<FileBackend, D::Error> {
        struct BackendVisitor;
        impl<'de> serde::de::Visitor<'de> for BackendVisitor {
            type Value = FileBackend;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a backend: \"host:port\" or { addr: \"host:port\", weight: N }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileBackend, E> {
                Ok(FileBackend {
                    addr: Text::from_raw(v)?,
                    weight: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileBackend, A::Error> {
                let m =
                    FileBackendMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(FileBackend {
                    addr: m.addr,
                    weight: m.weight,
                })
            }
        }
        deserializer.deserialize_any(BackendVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// CA bundle for the upstream certificate; absent → bundled webpki roots.
    pub ca: Option<Text>,
    /// SNI name sent upstream (and verified); default: the backend's host.
    pub sni: Option<Text>,
    /// Client certificate for upstream mTLS.
    pub client_cert: Option<FileCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSticky {
    /// `ip` | `header:NAME` | `cookie:NAME` | `query:NAME` | `claim:NAME`.
    pub key: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBalance {
    /// Cap a backend at this multiple (≥ 1) of its weighted share of the mean load.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub bounded_load: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    /// Time between checks; default 5s; > 0.
    pub interval: Option<DurationValue>,
    /// Per-check timeout; default 2s; at most `interval`.
    pub timeout: Option<DurationValue>,
    /// HTTP path (GET, 2xx = healthy); absent → TCP connect check.
    pub path: Option<Text>,
    /// Consecutive failures before marking down; default 3; 1..=100.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub unhealthy_after: Option<u32>,
    /// Consecutive successes before marking up; default 2; 1..=100.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub healthy_after: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// Label in logs and metrics; unique.
    pub name: Text,
    /// What requests this route takes.
    #[serde(rename = "match")]
    pub matcher: FileMatch,
    /// Name of an entry in `upstreams`.
    pub upstream: Text,
    /// Path sent upstream instead of the request path; starts with `/`.
    pub upstream_path: Option<Text>,
    /// Allowed Origins (absent: any).
    pub origins: Option<Vec<Text>>,
    /// Admit requests without Origin (default false).
    #[serde(default, deserialize_with = "opt_scalar")]
    pub allow_missing_origin: Option<bool>,
    /// Allowlist of subprotocols (RFC 7230 tokens); absent → any.
    pub subprotocols: Option<Vec<Text>>,
    /// Token checks (absent: no token needed).
    pub auth: Option<FileAuth>,
    /// permessage-deflate: `pass` (default), `strip` or `inspect`.
    pub deflate: Option<Text>,
    /// Plain HTTP requests: `refuse` (default, 426) or `proxy`.
    pub http: Option<Text>,
    /// Per-route overrides of the top-level limits.
    pub limits: Option<FileLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMatch {
    /// Host header to match (no port); absent → any host.
    pub host: Option<Text>,
    /// Request path prefix; starts with `/`.
    pub path_prefix: Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// JWT validation.
    pub jwt: Option<FileJwt>,
    /// Static API keys.
    pub api_keys: Option<FileApiKeys>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJwt {
    /// Token sources, tried in order.
    pub from: Option<Vec<Text>>,
    /// Verification keys.
    pub keys: Option<Vec<FileJwtKey>>,
    /// Required `iss`.
    pub issuer: Option<Text>,
    /// Required `aud`.
    pub audience: Option<Text>,
    /// Clock skew allowance.
    pub leeway: Option<DurationValue>,
    /// Claim equality checks.
    pub require_claims: Option<BTreeMap<String, Text>>,
    /// Close the connection when `exp` passes.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub close_on_expiry: Option<bool>,
    /// Claim → upstream request header.
    pub forward_claims: Option<BTreeMap<String, Text>>,
    /// Do not pass the token upstream.
    #[serde(default, deserialize_with = "opt_scalar")]
    pub strip_token: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJwtKey {
    /// Algorithm of an inline key, e.g. HS256.
    pub alg: Option<Text>,
    /// Inline shared secret (use `${ENV}`).
    pub secret: Option<Text>,
    /// Path of a JWKS file.
    pub jwks_file: Option<Text>,
    /// `https://` URL of a JWKS document: fetched at start, every `refresh`, and (at most
    /// every 30 s) when a token names an unknown `kid`.
    pub jwks_url: Option<Text>,
    /// With `jwks_url`: how often it is fetched; default 5m, at least 1s.
    pub refresh: Option<DurationValue>,
    /// With `jwks_url`: PEM CA bundle the JWKS server's certificate must chain to;
    /// default the bundled webpki (Mozilla) roots.
    pub ca: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApiKeys {
    /// Header carrying the key.
    pub header: Option<Text>,
    /// Query parameter carrying the key (instead of `header`).
    pub query: Option<Text>,
    /// File of SHA-256 hex digests, one per line.
    pub keys_file: Option<Text>,
}

/// A YAML mapping kept in file order, refusing duplicate keys (a `BTreeMap` would keep
/// the last one silently).
#[derive(Debug)]
pub struct NamedMap<V>(pub Vec<(String, V)>);

impl<V> Default for NamedMap<V> {
    fn default() -> Self {
        NamedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NamedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedMapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for NamedMapVisitor<V> {
            type Value = NamedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of names to definitions")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if entries.iter().any(|(seen, _)| *seen == name) {
                        return Err(de::Error::custom(format!(
                            "duplicate name `{}`; each name may be defined once",
                            name.escape_debug()
                        )));
                    }
                    let value = map.next_value()?;
                    entries.push((name, value));
                }
                Ok(NamedMap(entries))
            }
        }
        deserializer.deserialize_map(NamedMapVisitor(PhantomData))
    }
}

// === parsing ===

/// A failure to turn the text into [`FileConfig`]: where, which key, and why.
#[derive(Debug)]
pub struct ParseError {
    /// 1-based; `None` when serde_norway knows no position.
    pub location: Option<(usize, usize)>,
    pub path: String,
    pub message: String,
}

/// Deserializes `text`, replacing `${NAME}` in string values with `env(NAME)`.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<FileConfig, ParseError> {
    // First pass: find the variable names that string values reference, so the typed pass
    // can read them from a thread-local snapshot (serde passes no context to `Deserialize`).
    // Its errors are ignored: the typed pass meets the same text and reports them with a path.
    let mut names = Vec::new();
    let _ = NameCollector(&mut names).deserialize(serde_norway::Deserializer::from_str(text));
    let vars: HashMap<String, String> = names
        .into_iter()
        .filter_map(|name| env(&name).map(|value| (name, value)))
        .collect();
    let _scope = EnvScope::enter(vars);
    let deserializer = serde_norway::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, Option<FileConfig>>(deserializer) {
        // An empty file (or one holding only comments or `null`) is a config with nothing set.
        Ok(file) => Ok(file.unwrap_or_default()),
        Err(err) => {
            let path = err.path().to_string();
            let mut error = parse_error(err.inner(), path);
            if error.location.is_none() && error.message.contains("more than one document") {
                error.location = second_document(text);
                error.message =
                    "the file holds more than one YAML document; keep one (remove the `---` or `...` separators)".into();
            }
            Err(error)
        }
    }
}

/// Walks any YAML node and records the `${NAME}` names used in string values (not keys).
struct NameCollector<'a>(&'a mut Vec<String>);

impl<'de> DeserializeSeed<'de> for NameCollector<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NameCollector<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        for piece in split_template(v).unwrap_or_default() {
            if let Piece::Var(name) = piece
                && !self.0.iter().any(|n| n == name)
            {
                self.0.push(name.to_string());
            }
        }
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(NameCollector(&mut *self.0))?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(NameCollector(&mut *self.0))?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): look inside the value.
        let (_, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

fn parse_error(err: &serde_norway::Error, path: String) -> ParseError {
    let location = err.location().map(|l| (l.line(), l.column()));
    let mut message = err.to_string();
    // serde_norway appends the position and prefixes its own path; both are reported
    // in their own fields, so drop them from the message.
    if let Some((line, column)) = location {
        // Scanner errors put the position in the middle: "… at line 2 column 1, while …".
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    // serde_norway's path may be `path` or an ancestor of it (before the failing key).
    let mut prefixes: Vec<&str> = path
        .char_indices()
        .filter(|&(_, c)| c == '.' || c == '[')
        .map(|(i, _)| &path[..i])
        .collect();
    prefixes.push(&path);
    if let Some(stripped) = prefixes
        .iter()
        .rev()
        .find_map(|prefix| message.strip_prefix(&format!("{prefix}: ")))
    {
        message = stripped.to_string();
    }
    // An unknown key is reported by serde before the key joins the path: name it.
    let mut path = path;
    if let Some(key) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(key, _)| key.to_string())
    {
        // serde_path_to_error includes the key in some cases and not in others.
        if path.is_empty() || path == "." {
            path = key;
        } else if path != key && !path.ends_with(&format!(".{key}")) {
            path = format!("{path}.{key}");
        }
        message = format!("{message}; check the spelling (see conf/example-full.yaml)");
    }
    if path == "." {
        path.clear();
    }
    ParseError {
        location,
        path,
        message,
    }
}

// === locating a key path after the fact ===

/// Marks the error the locator raises on reaching its target, to tell it from others.
const LOCATOR_HIT: &str = "\u{0}wsgate-config-locator-hit\u{0}";

/// Returns the 1-based line and column of the value at `path` in `text`, or of its
/// deepest ancestor present in the file (a defaulted key has no position of its own).
///
/// How: the text is deserialized again with a seed that follows `path` through maps and
/// sequences and fails on purpose at the target node; serde_norway stamps the failing
/// node's position on the error, which is then read back with `location()`.
pub fn locate(text: &str, path: &KeyPath) -> Option<(usize, usize)> {
    (0..=path.0.len())
        .rev()
        .find_map(|len| locate_exact(text, &path.0[..len]))
}

fn locate_exact(text: &str, path: &[super::Segment]) -> Option<(usize, usize)> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    match (Locator { path }).deserialize(deserializer) {
        Err(err) if err.to_string().contains(LOCATOR_HIT) => {
            err.location().map(|l| (l.line(), l.column()))
        }
        _ => None,
    }
}

/// Position of the second document's root node, for the "more than one document" error,
/// which serde_norway reports without a position.
fn second_document(text: &str) -> Option<(usize, usize)> {
    let second = serde_norway::Deserializer::from_str(text).nth(1)?;
    match (Locator { path: &[] }).deserialize(second) {
        Err(err) => err.location().map(|l| (l.line(), l.column())),
        Ok(()) => None,
    }
}

struct Locator<'p> {
    path: &'p [super::Segment],
}

impl<'de> DeserializeSeed<'de> for Locator<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            deserializer.deserialize_any(Hit)
        } else {
            deserializer.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Locator<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map or sequence on the path")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((super::Segment::Key(want), rest)) = self.path.split_first() else {
            return Err(de::Error::custom("path expects a sequence here"));
        };
        while let Some(key) = map.next_key::<Value>()? {
            let matches = match &key {
                Value::String(s) => s == want,
                Value::Number(n) => n.to_string() == *want,
                Value::Bool(b) => b.to_string() == *want,
                _ => false,
            };
            if matches {
                map.next_value_seed(Locator { path: rest })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((super::Segment::Index(want), rest)) = self.path.split_first() else {
            return Err(de::Error::custom("path expects a map here"));
        };
        let mut index = 0;
        loop {
            let found = if index == *want {
                seq.next_element_seed(Locator { path: rest })?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if found.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }
}

/// Fails on whatever node it is given. Every `visit_*` left at its default reports
/// "invalid type ..., expected {expecting}", so writing the marker in `expecting`
/// makes all of them carry it.
struct Hit;

impl Visitor<'_> for Hit {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LOCATOR_HIT)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Segment;
    use super::*;

    fn path(segments: &[Segment]) -> KeyPath {
        KeyPath(segments.to_vec())
    }

    fn key(k: &str) -> Segment {
        Segment::Key(k.into())
    }

    const TEXT: &str = "\
listeners:
  - bind: 127.0.0.1:1
  - name: two
    bind: 127.0.0.1:2
routes: [{ name: a, match: { path_prefix: /a } }]
";

    #[test]
    fn locator_finds_scalars_maps_and_flow_nodes() {
        assert_eq!(
            locate(
                TEXT,
                &path(&[key("listeners"), Segment::Index(1), key("bind")])
            ),
            Some((4, 11))
        );
        assert_eq!(
            locate(TEXT, &path(&[key("listeners"), Segment::Index(0)])),
            Some((2, 5))
        );
        assert_eq!(
            locate(
                TEXT,
                &path(&[
                    key("routes"),
                    Segment::Index(0),
                    key("match"),
                    key("path_prefix")
                ])
            ),
            Some((5, 43))
        );
    }

    #[test]
    fn locator_falls_back_to_the_deepest_present_ancestor() {
        assert_eq!(
            locate(
                TEXT,
                &path(&[key("listeners"), Segment::Index(1), key("tls")])
            ),
            Some((3, 5))
        );
        assert_eq!(locate(TEXT, &path(&[key("limits")])), Some((1, 1)));
    }

    #[test]
    fn duplicate_upstream_names_are_refused() {
        let text = "upstreams:\n  a: { builtin: echo }\n  a: { builtin: echo }\n";
        let err = parse(text, &|_| None).unwrap_err();
        assert!(err.message.contains("duplicate name `a`"), "{err:?}");
    }

    #[test]
    fn empty_file_parses_as_nothing_set() {
        for text in ["", "# only a comment\n", "null"] {
            let file = parse(text, &|_| None).unwrap();
            assert!(file.listeners.is_none());
        }
    }
}
