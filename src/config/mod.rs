//! Gateway configuration: the validated, typed [`Config`] the runtime uses, and loading.
//!
//! Pipeline: YAML text → [`file::parse`] (serde into `File*` structs that mirror the YAML;
//! `${NAME}` replaced, durations and sizes parsed, unknown keys refused) →
//! [`validate::validate`] (defaults, ranges, cross references, not-yet-supported keys) →
//! [`Config`]. Every error names file, line, column and key path; errors found after
//! deserialization get their position from [`file::locate`]. Nothing here binds or opens
//! anything besides reading the config file itself: files the config names (certificates,
//! keys, JWKS, API keys) are read through an injected [`files::ReadFile`], so
//! [`Config::from_yaml_str_with`] is a pure function of text, environment and reader.

pub mod file;
pub mod files;
pub mod units;
pub mod validate;

pub use crate::observe::LogFormat;
pub use crate::observe::access_log::AccessTarget;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

// === validated config ===

/// The validated configuration. Only [`validate::validate`] builds one.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listeners, in file order; at least one; names and binds unique.
    pub listeners: Vec<Listener>,
    /// Admin listener; `None` when the file has no `admin` block.
    pub admin: Option<Admin>,
    pub log: Log,
    pub drain: Drain,
    /// Top-level limits with defaults applied; routes start from these.
    pub limits: Limits,
    pub keepalive: Keepalive,
    /// Peers whose `X-Forwarded-For` is believed, and (when not empty) the only peers whose
    /// PROXY header is.
    pub trusted_proxies: crate::admission::client_ip::TrustedProxies,
    /// Client headers removed from every request before forwarding, on every route (SPEC
    /// §3): the `strip_headers` entries and every route's `forward_claims` headers, so a
    /// client cannot forge a claim on a route that sets none. (`X-Forwarded-*`,
    /// `X-Request-Id` and names containing `_` go by rule, in `handshake::forward` and
    /// `upstream`.)
    pub strip_headers: Vec<http::HeaderName>,
    /// Query parameters any route reads a token or API key from: their values are
    /// redacted from every log line, whichever route the request takes (SPEC §6).
    pub secret_query_names: Vec<String>,
    /// Things that work but deserve attention (certificates about to expire, a generated
    /// development certificate); shown by `--check` and logged at start.
    pub warnings: Vec<String>,
    /// Every distinct `jwks_url` of every route (routes hold clones of these `Arc`s): the
    /// gateway fetches each, and `/readyz` waits for each to be fetched once.
    pub jwks_urls: Vec<Arc<crate::admission::token::RemoteKeys>>,
    /// Upstreams by name; routes hold clones of the same `Arc`s.
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Routes in file order; the first match wins.
    pub routes: Vec<Route>,
    /// `cluster`: the fleet's shared store and limits (SPEC §10); `None` → per process.
    pub cluster: Option<Cluster>,
}

/// `cluster` (SPEC §2, §10), validated: the URL parses, the lease is sane.
#[derive(Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The Redis URL as configured (it may carry a password: never logged, see `Debug`).
    pub redis: String,
    /// `None` → `hostname:pid`, decided at start.
    pub instance: Option<String>,
    pub prefix: String,
    pub lease: Duration,
    pub on_unavailable: OnUnavailable,
    pub limits: ClusterLimits,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &"<redacted>")
            .field("instance", &self.instance)
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("on_unavailable", &self.on_unavailable)
            .field("limits", &self.limits)
            .finish()
    }
}

/// What handshakes meet while the fleet store is unusable (SPEC §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Per-process limits only.
    Local,
    /// 503 `cluster`.
    Refuse,
}

/// `cluster.limits`: 0 / `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterLimits {
    pub max_connections_per_ip: u32,
    pub max_connections_per_subject: u32,
    pub handshakes_per_ip: Option<crate::admission::ip_limit::RatePolicy>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    /// Label for logs and metrics; defaults to the bind address.
    pub name: String,
    pub bind: SocketAddr,
    /// `None` → plain ws://.
    pub tls: Option<ListenerTls>,
    /// Every connection starts with a PROXY v1/v2 header naming the real client.
    pub proxy_protocol: bool,
    /// HTTP/2 beside HTTP/1.1: ALPN `h2` on TLS, h2c with prior knowledge on plain.
    pub http2: bool,
}

/// A listener's TLS, with its certificates already loaded and checked.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub certificates: Vec<crate::tls::LoadedCert>,
    /// Serves a generated localhost certificate (development only).
    pub self_signed: bool,
    /// Client certificates are required and verified (mTLS).
    pub mtls: bool,
}

impl ListenerTls {
    /// The same, offering HTTP/2 by ALPN (`h2` first, then `http/1.1`).
    pub fn offering_h2(mut self) -> ListenerTls {
        let mut server = (*self.server).clone();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        self.server = Arc::new(server);
        self
    }
}

/// TLS towards an upstream's backends (wss://).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub client: Arc<rustls::ClientConfig>,
    /// Name sent as SNI and verified; default: the backend's host.
    pub sni: Option<String>,
}

/// SPEC §8: closes with 1012 spread over `spread`; the rest is cut at `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub spread: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub bind: SocketAddr,
    /// `admin.token`: what `Authorization: Bearer` must carry on state-changing endpoints.
    pub token: Option<AdminToken>,
}

impl Admin {
    /// Whether state-changing endpoints may be served: with a token, or on loopback only.
    pub fn changes_allowed(&self) -> bool {
        self.token.is_some() || self.bind.ip().is_loopback()
    }
}

/// The admin token, kept only as its SHA-256 digest: it cannot reach a log or a `Debug`
/// output, and comparing digests hides the token's length as well as its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        use sha2::Digest;
        AdminToken(sha2::Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `presented` is the token, in constant time (`subtle`).
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let digest: [u8; 32] = sha2::Sha256::digest(presented).into();
        digest.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(redacted)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Where access-log JSON lines go.
    pub access: AccessTarget,
    /// Format of operational (tracing) logs on stderr.
    pub format: LogFormat,
}

/// Resource limits, resolved (defaults and overrides applied, ranges checked).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Process-wide connection cap (only settable at top level); beyond → 503.
    pub max_connections: u64,
    /// Connections between accept and relay, process-wide (top level only); beyond,
    /// accepts wait in the kernel's queue.
    pub max_pending_handshakes: u64,
    /// Full request head must arrive within this; > 0.
    pub handshake_timeout: Duration,
    /// Bytes per frame, either direction; ≥ 125.
    pub max_frame_size: u64,
    /// Bytes per message summed over fragments; ≥ `max_frame_size`.
    pub max_message_size: u64,
    /// A write stalled this long closes the connection; > 0.
    pub send_timeout: Duration,
    /// Relay buffer bytes per direction per connection; 1 KiB..=1 MiB.
    pub buffer_size: usize,
    /// Client→upstream data-message rate (a fragmented message counts once).
    pub messages: MessageRate,
    /// Frames in one fragmented client message; beyond → close 1008; ≥ 1.
    pub max_fragments: u32,
    /// A fragmented client message must complete within this; zero = off.
    pub fragment_timeout: Duration,
    /// No data frame either way for this long → close 1000; zero = off.
    pub idle_timeout: Duration,
    /// A connection this old (±10 % jitter) → close 1001 `max age`; zero = off.
    pub max_connection_age: Duration,
    /// Established + in-handshake connections per client IP (IPv6 by /64) → 429 `ip_cap`.
    pub max_connections_per_ip: u32,
    /// Connections per subject (JWT `sub`, or API key) → 429 `subject_cap`; 0 = off.
    pub max_connections_per_subject: u32,
    /// Handshakes per client IP → 429 `ip_rate` (process-wide; top level only).
    pub handshakes_per_ip: crate::admission::ip_limit::RatePolicy,
    /// IPv6 clients are counted per network of this prefix length (default /64); top
    /// level only.
    pub ipv6_prefix: u8,
    /// Largest plain HTTP request body on `http: proxy` routes; beyond → 413.
    pub max_request_body: u64,
    /// A whole plain HTTP exchange on `http: proxy` routes; > 0.
    pub http_timeout: Duration,
}

/// A route's admission policy (SPEC §2 `origins`, `auth`), compiled at load.
#[derive(Debug, Clone)]
pub struct RouteAdmission {
    pub origins: crate::admission::origin::OriginPolicy,
    pub jwt: Option<JwtAuth>,
    pub api_keys: Option<crate::admission::token::ApiKeyVerifier>,
}

/// `auth.jwt`, with its keys loaded.
#[derive(Debug, Clone)]
pub struct JwtAuth {
    pub verifier: crate::admission::token::JwtVerifier,
    pub close_on_expiry: bool,
    /// Claim name → upstream request header.
    pub forward_claims: Vec<(String, http::HeaderName)>,
    pub strip_token: bool,
    /// One of the sources is the `bearer, <token>` subprotocol trick.
    pub subprotocol: bool,
}

impl RouteAdmission {
    /// Query parameters that carry tokens on this route: redacted in logs.
    pub fn secret_query_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .jwt
            .iter()
            .flat_map(|j| j.verifier.query_names())
            .collect();
        names.extend(self.api_keys.iter().filter_map(|k| k.query_name()));
        names
    }
}

// The refill bound lives with the limiter it protects, so admission never imports config;
// message rates (validated here, enforced in `relay`) obey the same bound.
pub use crate::admission::ip_limit::{MAX_REFILL_SPAN, check_refill_span};

/// A token bucket: `rate` messages per `per`, holding up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageRate {
    pub rate: std::num::NonZeroU32,
    pub per: Duration,
    pub burst: std::num::NonZeroU32,
    pub on_exceed: OnExceed,
}

/// What exceeding the message rate does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExceed {
    /// Close 1008 `rate limit`.
    Close,
    /// Stop reading from the client until a token is free (TCP backpressure).
    Throttle,
}

/// Proxy pings (SPEC §2 `keepalive`), process-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Zero = off.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// Zero = off.
    pub upstream_ping_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub kind: UpstreamKind,
    pub tls: Option<UpstreamTls>,
    /// Budget for TCP connect plus the upstream WebSocket handshake, per backend tried; > 0.
    pub connect_timeout: Duration,
    /// Where a connection's sticky key comes from (`sticky.key`); default the client IP.
    pub sticky: StickyKey,
    /// `balance.bounded_load`: a backend holding `c` × its weighted share of the mean is
    /// skipped; `None` = plain rendezvous. Always ≥ 1 (so some backend always has room).
    pub bounded_load: Option<f64>,
    /// Active checks; `None` = only passive failure detection.
    pub health_check: Option<HealthCheck>,
    /// `max_ejected`, in percent (0..=100): passive failure detection takes a backend out
    /// only while that leaves at most this share of the backends out.
    pub max_ejected: u8,
    /// `max_pending`: upstream handshakes in flight per backend; 0 = unlimited.
    pub max_pending: u32,
    /// `queue_timeout`: the longest wait for a `max_pending` place; > 0.
    pub queue_timeout: Duration,
    /// `slow_start`: a backend back up (or added) gets its share ramped over this; 0 = off.
    pub slow_start: Duration,
}

/// SPEC §2 `sticky.key`. A missing value falls back to the client IP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StickyKey {
    #[default]
    Ip,
    Header(http::HeaderName),
    Cookie(String),
    Query(String),
    /// A claim of the route's validated JWT; validation requires `auth.jwt` on every route
    /// using the upstream.
    Claim(String),
}

impl StickyKey {
    /// The key's kind for the access log (never its value).
    pub fn kind(&self) -> &'static str {
        match self {
            StickyKey::Ip => "ip",
            StickyKey::Header(_) => "header",
            StickyKey::Cookie(_) => "cookie",
            StickyKey::Query(_) => "query",
            StickyKey::Claim(_) => "claim",
        }
    }
}

/// SPEC §2 `health_check`, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between two checks of a backend; > 0.
    pub interval: Duration,
    /// Budget of one check (connect, and the GET when `path` is set); 0 < timeout ≤ interval.
    pub timeout: Duration,
    /// `Some` → HTTP GET expecting 2xx; `None` → TCP connect.
    pub path: Option<String>,
    /// Consecutive failures that mark an up backend down; 1..=100.
    pub unhealthy_after: u32,
    /// Consecutive successes that mark a down backend up; 1..=100.
    pub healthy_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// A pool: each entry may be a name that resolves to several addresses.
    Backends(Vec<Backend>),
    /// wsgate's in-process echo server (`builtin: echo`), for demos and tests.
    BuiltinEcho,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `host:port`: a non-empty host (IPv6 in brackets) and a port 1..=65535. Names are
    /// resolved by the pool (and re-resolved periodically), not here.
    pub addr: String,
    /// ≥ 1.
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Lower-cased, without port; `None` matches any host.
    pub host: Option<String>,
    /// Starts with `/`.
    pub path_prefix: String,
    pub upstream: Arc<Upstream>,
    /// Path sent upstream instead of the client's; starts with `/`.
    pub upstream_path: Option<String>,
    /// Allowlist of offered subprotocols, each an RFC 7230 token; `None` allows any.
    pub subprotocols: Option<Vec<String>>,
    /// Top-level limits with this route's overrides applied.
    pub limits: Limits,
    /// Who may use the route: Origin allowlist and token checks.
    pub admission: Arc<RouteAdmission>,
    /// What the proxy does with permessage-deflate (SPEC §2 `deflate`).
    pub deflate: Deflate,
    /// What the proxy does with plain HTTP requests (SPEC §2 `http`).
    pub http: HttpMode,
}

/// A route's `http` key: plain HTTP requests (no upgrade) on a WebSocket route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpMode {
    /// 426 `upgrade_required`.
    #[default]
    Refuse,
    /// Admitted like an upgrade and relayed to the route's upstream (SPEC §3 "HTTP
    /// alongside WebSockets").
    Proxy,
}

/// A route's `deflate` key: what the proxy does with permessage-deflate (RFC 7692).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Deflate {
    /// Negotiated end to end when both sides agree; limits count compressed bytes.
    #[default]
    Pass,
    /// Taken out of the client's offer, so it is never negotiated.
    Strip,
    /// Negotiated end to end; client messages are inflated (and discarded) so limits and
    /// UTF-8 are judged on what the upstream will see.
    Inspect,
}

// === errors ===

/// One config problem. `line`/`column` are 1-based; 0 only when the position is unknown
/// (e.g. the file could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Key path such as `routes[1].match.path_prefix`; `(root)` for the whole document.
    pub path: String,
    /// The rule broken and how to fix it; never contains env-substituted text.
    pub message: String,
}

/// `FILE:LINE:COLUMN: key.path: message`; a problem with no position (the file could not
/// be read) is `FILE: message`.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file, self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.path, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// All problems found; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Path shown for problems with the document as a whole.
const ROOT_PATH: &str = "(root)";

/// A YAML key path built by validation, located in the text afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn root() -> KeyPath {
        KeyPath(Vec::new())
    }

    pub fn key(&self, key: &str) -> KeyPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_string()));
        KeyPath(segments)
    }

    pub fn index(&self, index: usize) -> KeyPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        KeyPath(segments)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(ROOT_PATH);
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

// === loading ===

impl Config {
    /// Reads and validates the file at `path` (start, `--check` and reload all come here):
    /// `${NAME}` comes from the process environment and named files from disk.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let env = |name: &str| std::env::var(name).ok();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_yaml_str_with(&text, &file, &env, &files::disk),
            Err(err) => Err(ConfigErrors(vec![ConfigError {
                file,
                line: 0,
                column: 0,
                path: ROOT_PATH.to_string(),
                message: format!(
                    "cannot read the config file: {err}; give one with --config FILE (the default, conf/wsgate.yaml, is relative to the working directory: run from the repository root), or run without a file: wsgate proxy --listen 127.0.0.1:8080 --to 127.0.0.1:9001"
                ),
            }])),
        }
    }

    /// Validates YAML `text`; `file` is only used in error messages. `${NAME}` comes from
    /// the process environment and named files from disk.
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml_str_with_env(text, file, &|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_yaml_str`] with `${NAME}` looked up in `env` (for tests); named
    /// files still come from disk.
    pub fn from_yaml_str_with_env(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Config::from_yaml_str_with(text, file, env, &files::disk)
    }

    /// Validates YAML `text` with `${NAME}` looked up in `env` and every file the config
    /// names (certificates, keys, JWKS, API keys) read through `read`: no other I/O, so
    /// tests can serve files from memory ([`files::MemoryFiles`]) and fuzzing can refuse
    /// them all ([`files::no_files`]).
    pub fn from_yaml_str_with(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
        read: &files::ReadFile<'_>,
    ) -> Result<Config, ConfigErrors> {
        let parsed = file::parse(text, env).map_err(|err| {
            let (line, column) = err.location.unwrap_or((0, 0));
            ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                column,
                path: if err.path.is_empty() {
                    ROOT_PATH.to_string()
                } else {
                    err.path
                },
                message: err.message,
            }])
        })?;
        validate::validate(parsed, read).map_err(|issues| {
            let mut errors: Vec<ConfigError> = issues
                .into_iter()
                .map(|issue| {
                    let (line, column) = file::locate(text, &issue.path).unwrap_or((0, 0));
                    ConfigError {
                        file: file.to_string(),
                        line,
                        column,
                        path: issue.path.to_string(),
                        message: issue.message,
                    }
                })
                .collect();
            // Report in file order, as a reader goes through the file.
            errors.sort_by_key(|e| (e.line == 0, e.line, e.column));
            ConfigErrors(errors)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_display_like_the_yaml() {
        let path = KeyPath::root()
            .key("routes")
            .index(1)
            .key("match")
            .key("path_prefix");
        assert_eq!(path.to_string(), "routes[1].match.path_prefix");
        assert_eq!(KeyPath::root().to_string(), "(root)");
    }

    #[test]
    fn errors_display_one_per_line_with_position_and_path() {
        let err = |line| ConfigError {
            file: "f.yaml".into(),
            line,
            column: 3,
            path: "limits.buffer_size".into(),
            message: "too small".into(),
        };
        let errors = ConfigErrors(vec![err(1), err(2)]);
        assert_eq!(
            errors.to_string(),
            "f.yaml:1:3: limits.buffer_size: too small\nf.yaml:2:3: limits.buffer_size: too small"
        );
    }

    #[test]
    fn unreadable_file_is_an_error_with_unknown_position() {
        let errors = Config::load(Path::new("/nonexistent/wsgate.yaml")).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!((errors.0[0].line, errors.0[0].column), (0, 0));
        assert!(errors.0[0].message.contains("cannot read"));
    }
}
