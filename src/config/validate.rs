//! Turns the file form into the typed [`Config`]: applies defaults, checks ranges, names
//! and cross references, and refuses keys of features not built yet. Collects every
//! problem (not just the first) as an [`Issue`] with a key path; positions are added by
//! the caller. Never sees YAML text.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::file::{
    DEFAULT_BUFFER_SIZE, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_SPREAD, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_FRAGMENT_TIMEOUT, DEFAULT_HANDSHAKE_BURST, DEFAULT_HANDSHAKE_PER,
    DEFAULT_HANDSHAKE_RATE, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_TIMEOUT, DEFAULT_HEALTHY_AFTER, DEFAULT_IDLE_TIMEOUT, DEFAULT_LOG_ACCESS,
    DEFAULT_LOG_FORMAT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MESSAGE_BURST, DEFAULT_MESSAGE_PER,
    DEFAULT_MESSAGE_RATE, DEFAULT_PING_INTERVAL, DEFAULT_PONG_TIMEOUT, DEFAULT_SEND_TIMEOUT,
    DEFAULT_UNHEALTHY_AFTER, DEFAULT_UPSTREAM_PING_INTERVAL, DEFAULT_WEIGHT, FileApiKeys, FileAuth,
    FileBackend, FileBalance, FileConfig, FileHealthCheck, FileJwt, FileLimits, FileListener,
    FileListenerTls, FileMessageRate, FileRoute, FileSticky, FileUpstream, FileUpstreamTls,
};
use super::units::{DurationValue, Text, fmt_duration, fmt_size};
use super::{
    AccessTarget, Admin, Backend, Config, Drain, HealthCheck, JwtAuth, Keepalive, KeyPath, Limits,
    Listener, ListenerTls, Log, LogFormat, MessageRate, OnExceed, Route, RouteAdmission, StickyKey,
    Upstream, UpstreamKind, UpstreamTls,
};
use crate::admission::client_ip::TrustedProxies;
use crate::admission::ip_limit::RatePolicy;
use crate::admission::origin::OriginPolicy;
use crate::admission::token::{
    ApiKeySource, ApiKeyVerifier, ApiKeys, JwtKeys, JwtRules, JwtVerifier, TokenSource,
};
use crate::tls::{self, MinVersion};
use std::path::Path;

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

/// Smallest relay buffer: below this a relay spends its time in syscalls.
pub const MIN_BUFFER_SIZE: u64 = 1 << 10;
/// Largest relay buffer: `buffer_size` is paid twice per connection, so it bounds memory.
pub const MAX_BUFFER_SIZE: u64 = 1 << 20;
/// Smallest frame limit: control frames may carry 125 bytes (RFC 6455 §5.5).
pub const MIN_FRAME_SIZE: u64 = 125;

/// One problem, at a key path of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: KeyPath,
    pub message: String,
}

/// Validates `file`, returning the typed config or every problem found.
pub fn validate(file: FileConfig) -> Result<Config, Vec<Issue>> {
    let mut v = Validator::default();
    let root = KeyPath::root();

    let listeners = v.listeners(file.listeners.unwrap_or_default(), &root.key("listeners"));
    let admin = file.admin.and_then(|admin| {
        let path = root.key("admin").key("bind");
        let bind = v.socket_addr(&admin.bind, &path)?;
        if let Some(i) = listeners
            .iter()
            .position(|l| l.bind == bind && bind.port() != 0)
        {
            v.issue(
                &path,
                format!(
                    "admin bind {bind} is also used by listeners[{i}]; give admin its own port"
                ),
            );
        }
        Some(Admin { bind })
    });
    let log = v.log(file.log, &root.key("log"));

    let drain = v.drain(file.drain, &root.key("drain"));
    let proxy_texts = file.trusted_proxies.unwrap_or_default();
    let proxies: Vec<String> = proxy_texts
        .iter()
        .map(|t| t.value.trim().to_owned())
        .collect();
    let trusted_proxies = TrustedProxies::new(&proxies).unwrap_or_else(|(i, e)| {
        v.issue(
            &root.key("trusted_proxies").index(i),
            format!("{}: {e}", proxy_texts[i].shown()),
        );
        TrustedProxies::default()
    });
    let keepalive = v.keepalive(file.keepalive, &root.key("keepalive"));

    let defaults = Limits {
        max_connections: DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        max_frame_size: DEFAULT_MAX_FRAME_SIZE,
        max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        send_timeout: DEFAULT_SEND_TIMEOUT,
        buffer_size: DEFAULT_BUFFER_SIZE,
        messages: MessageRate {
            rate: nonzero(DEFAULT_MESSAGE_RATE),
            per: DEFAULT_MESSAGE_PER,
            burst: nonzero(DEFAULT_MESSAGE_BURST),
            on_exceed: OnExceed::Close,
        },
        fragment_timeout: DEFAULT_FRAGMENT_TIMEOUT,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
        max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
        ipv6_prefix: crate::admission::client_ip::DEFAULT_V6_PREFIX,
        handshakes_per_ip: RatePolicy {
            rate: DEFAULT_HANDSHAKE_RATE,
            per: DEFAULT_HANDSHAKE_PER,
            burst: DEFAULT_HANDSHAKE_BURST,
        },
    };
    let limits = v.limits(&defaults, file.limits.as_ref(), &root.key("limits"), true);

    let upstream_entries = file.upstreams.map(|m| m.0).unwrap_or_default();
    let defined: Vec<String> = upstream_entries.iter().map(|(n, _)| n.clone()).collect();
    let mut upstreams = BTreeMap::new();
    for (name, upstream) in upstream_entries {
        let path = root.key("upstreams").key(&name);
        if let Some(upstream) = v.upstream(&name, upstream, &path) {
            upstreams.insert(name, Arc::new(upstream));
        }
    }

    let routes = v.routes(
        file.routes.unwrap_or_default(),
        &root.key("routes"),
        &limits,
        &upstreams,
        &defined,
    );

    if v.issues.is_empty() {
        Ok(Config {
            listeners,
            admin,
            log,
            drain,
            limits,
            keepalive,
            trusted_proxies,
            warnings: v.warnings,
            upstreams,
            routes,
        })
    } else {
        Err(v.issues)
    }
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
    warnings: Vec<String>,
}

impl Validator {
    fn issue(&mut self, path: &KeyPath, message: String) {
        self.issues.push(Issue {
            path: path.clone(),
            message,
        });
    }

    fn socket_addr(&mut self, text: &Text, path: &KeyPath) -> Option<SocketAddr> {
        match text.value.trim().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.issue(
                    path,
                    format!(
                        "{} is not an IP:port address; write e.g. `0.0.0.0:8080` or `[::1]:9090` (host names are not resolved here)",
                        text.shown()
                    ),
                );
                None
            }
        }
    }

    fn non_empty(&mut self, text: &Text, path: &KeyPath, what: &str) -> Option<String> {
        let value = text.value.trim();
        if value.is_empty() {
            self.issue(path, format!("{what} must not be empty"));
            return None;
        }
        Some(value.to_string())
    }

    // === listeners, admin, log ===

    fn listeners(&mut self, file: Vec<FileListener>, path: &KeyPath) -> Vec<Listener> {
        if file.is_empty() {
            self.issue(
                path,
                "at least one listener is required, e.g. `listeners: [{ bind: \"0.0.0.0:8080\" }]`"
                    .into(),
            );
        }
        let mut listeners: Vec<Listener> = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, listener) in file.into_iter().enumerate() {
            let path = path.index(i);
            let tls = listener
                .tls
                .and_then(|t| self.listener_tls(t, &path.key("tls")));
            let proxy_protocol = listener.proxy_protocol.unwrap_or(false);
            let Some(bind) = self.socket_addr(&listener.bind, &path.key("bind")) else {
                continue;
            };
            let (name, name_path) = match &listener.name {
                Some(name) => match self.non_empty(name, &path.key("name"), "listener name") {
                    Some(name) => (name, path.key("name")),
                    None => continue,
                },
                None => (bind.to_string(), path.key("bind")),
            };
            // Port 0 asks the OS for a fresh port, so it never collides.
            if let Some(first) = binds.get(&bind).filter(|_| bind.port() != 0) {
                self.issue(
                    &path.key("bind"),
                    format!("bind address {bind} is already used by listeners[{first}]; each listener needs its own address"),
                );
            } else {
                binds.insert(bind, i);
            }
            if let Some(first) = names.get(&name) {
                self.issue(
                    &name_path,
                    format!("listener name `{name}` is already used by listeners[{first}]; names must be unique"),
                );
            } else {
                names.insert(name.clone(), i);
            }
            listeners.push(Listener {
                name,
                bind,
                tls,
                proxy_protocol,
            });
        }
        listeners
    }

    fn log(&mut self, file: Option<super::file::FileLog>, path: &KeyPath) -> Log {
        let (access, format) = file.map(|l| (l.access, l.format)).unwrap_or_default();
        let access_text = access.unwrap_or_else(|| Text::literal(DEFAULT_LOG_ACCESS));
        let access = match access_text.value.trim() {
            "stdout" => AccessTarget::Stdout,
            "stderr" => AccessTarget::Stderr,
            "" => {
                self.issue(
                    &path.key("access"),
                    "log.access must not be empty; use stdout, stderr or a file path".into(),
                );
                AccessTarget::Stdout
            }
            file => AccessTarget::File(PathBuf::from(file)),
        };
        let format_text = format.unwrap_or_else(|| Text::literal(DEFAULT_LOG_FORMAT));
        let format = match format_text.value.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                self.issue(
                    &path.key("format"),
                    format!(
                        "unknown log format {}; use text or json",
                        format_text.shown()
                    ),
                );
                LogFormat::Text
            }
        };
        Log { access, format }
    }

    // === limits ===

    /// Applies `file` over `base`. At top level (`top`) `max_connections` may be set;
    /// in a route it may not. Only keys set at this level are range-checked: inherited
    /// values were checked where they were set.
    fn limits(
        &mut self,
        base: &Limits,
        file: Option<&FileLimits>,
        path: &KeyPath,
        top: bool,
    ) -> Limits {
        let mut limits = base.clone();
        let Some(file) = file else {
            return limits;
        };
        if let Some(n) = file.max_connections {
            if !top {
                self.issue(
                    &path.key("max_connections"),
                    "max_connections is process-wide; set it in the top-level `limits`, not in a route".into(),
                );
            } else if n == 0 {
                self.issue(
                    &path.key("max_connections"),
                    "max_connections must be at least 1".into(),
                );
            } else {
                limits.max_connections = n;
            }
        }
        if let Some(n) = file.max_connections_per_ip {
            match u32::try_from(n) {
                Ok(n) if n >= 1 => limits.max_connections_per_ip = n,
                _ => self.issue(
                    &path.key("max_connections_per_ip"),
                    "max_connections_per_ip must be between 1 and 4294967295".into(),
                ),
            }
        }
        if let Some(prefix) = file.ipv6_prefix {
            let at = path.key("ipv6_prefix");
            if !top {
                self.issue(
                    &at,
                    "ipv6_prefix is process-wide; set it in the top-level `limits`".into(),
                );
            } else if (1..=128).contains(&prefix) {
                limits.ipv6_prefix = prefix;
            } else {
                self.issue(
                    &at,
                    "ipv6_prefix must be between 1 and 128 (64 keys a client by its /64)".into(),
                );
            }
        }
        if let Some(rate) = &file.handshakes_per_ip {
            let at = path.key("handshakes_per_ip");
            if !top {
                self.issue(&at, "handshakes_per_ip is counted per client across the process; set it in the top-level `limits`, not in a route".into());
            } else {
                let policy = RatePolicy {
                    rate: rate.rate,
                    per: rate.per.0,
                    burst: rate.burst.unwrap_or(rate.rate),
                };
                match policy.quota() {
                    Ok(_) => limits.handshakes_per_ip = policy,
                    Err(e) => self.issue(&at, e),
                }
            }
        }
        if let Some(d) = file.idle_timeout {
            limits.idle_timeout = d.0;
        }
        if let Some(d) = file.fragment_timeout {
            limits.fragment_timeout = d.0;
        }
        if let Some(m) = &file.messages
            && let Some(rate) = self.message_rate(m, &path.key("messages"))
        {
            limits.messages = rate;
        }

        if let Some(d) = file.handshake_timeout {
            limits.handshake_timeout = self.positive(d, &path.key("handshake_timeout"));
        }
        if let Some(d) = file.send_timeout {
            limits.send_timeout = self.positive(d, &path.key("send_timeout"));
        }
        if let Some(size) = file.buffer_size {
            let size = size.0;
            if (MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&size) {
                limits.buffer_size = usize::try_from(size).unwrap_or(DEFAULT_BUFFER_SIZE);
            } else {
                self.issue(
                    &path.key("buffer_size"),
                    format!(
                        "buffer_size {} is out of range; use {}..={}",
                        fmt_size(size),
                        fmt_size(MIN_BUFFER_SIZE),
                        fmt_size(MAX_BUFFER_SIZE)
                    ),
                );
            }
        }
        let mut frame_ok = true;
        if let Some(size) = file.max_frame_size {
            if size.0 < MIN_FRAME_SIZE {
                frame_ok = false;
                self.issue(
                    &path.key("max_frame_size"),
                    format!(
                        "max_frame_size {} is below {MIN_FRAME_SIZE}B, the size of a control frame (RFC 6455 §5.5); raise it",
                        fmt_size(size.0)
                    ),
                );
            } else {
                limits.max_frame_size = size.0;
            }
        }
        if let Some(size) = file.max_message_size {
            limits.max_message_size = size.0;
        }
        let touched = file.max_frame_size.is_some() || file.max_message_size.is_some();
        if frame_ok && touched && limits.max_message_size < limits.max_frame_size {
            let key = if file.max_message_size.is_some() {
                "max_message_size"
            } else {
                "max_frame_size"
            };
            self.issue(
                &path.key(key),
                format!(
                    "max_message_size ({}) must be at least max_frame_size ({}); raise max_message_size or lower max_frame_size",
                    fmt_size(limits.max_message_size),
                    fmt_size(limits.max_frame_size)
                ),
            );
        }
        limits
    }

    /// `limits.messages`: rate ≥ 1, per > 0, burst ≥ 1 (default: rate), on_exceed.
    fn message_rate(&mut self, m: &FileMessageRate, path: &KeyPath) -> Option<MessageRate> {
        let before = self.issues.len();
        let rate = std::num::NonZeroU32::new(m.rate);
        if rate.is_none() {
            self.issue(
                &path.key("rate"),
                "rate must be at least 1; to allow more, raise it".into(),
            );
        }
        let per = self.positive(m.per, &path.key("per"));
        let burst = std::num::NonZeroU32::new(m.burst.unwrap_or(m.rate));
        if burst.is_none() {
            self.issue(&path.key("burst"), "burst must be at least 1".into());
        }
        if let Err(e) = super::check_refill_span(m.per.0, m.rate, m.burst.unwrap_or(m.rate)) {
            self.issue(path, e);
        }
        let on_exceed = match m.on_exceed.as_ref().map(|t| t.value.trim()) {
            None | Some("close") => OnExceed::Close,
            Some("throttle") => OnExceed::Throttle,
            Some(_) => {
                self.issue(
                    &path.key("on_exceed"),
                    "on_exceed must be `close` (1008) or `throttle` (stop reading until a token is free)".into(),
                );
                OnExceed::Close
            }
        };
        match (rate, burst) {
            (Some(rate), Some(burst)) if self.issues.len() == before => Some(MessageRate {
                rate,
                per,
                burst,
                on_exceed,
            }),
            _ => None,
        }
    }

    /// `drain`: how shutdown and reload close connections (SPEC §8).
    fn drain(&mut self, file: Option<super::file::FileDrain>, path: &KeyPath) -> Drain {
        let mut d = Drain {
            spread: DEFAULT_DRAIN_SPREAD,
            timeout: DEFAULT_DRAIN_TIMEOUT,
        };
        let Some(file) = file else {
            return d;
        };
        if let Some(spread) = file.spread {
            d.spread = spread.0;
        }
        if let Some(timeout) = file.timeout {
            d.timeout = self.positive(timeout, &path.key("timeout"));
        }
        if d.spread > d.timeout {
            self.issue(
                &path.key("spread"),
                format!(
                    "`spread` ({}) must not exceed `timeout` ({}): closes scheduled after the timeout would never be sent",
                    fmt_duration(d.spread),
                    fmt_duration(d.timeout)
                ),
            );
        }
        d
    }

    /// `keepalive`: process-wide ping settings.
    fn keepalive(&mut self, file: Option<super::file::FileKeepalive>, path: &KeyPath) -> Keepalive {
        let mut k = Keepalive {
            ping_interval: DEFAULT_PING_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            upstream_ping_interval: DEFAULT_UPSTREAM_PING_INTERVAL,
        };
        let Some(file) = file else {
            return k;
        };
        if let Some(d) = file.ping_interval {
            k.ping_interval = d.0;
        }
        if let Some(d) = file.upstream_ping_interval {
            k.upstream_ping_interval = d.0;
        }
        if let Some(d) = file.pong_timeout {
            k.pong_timeout = self.positive(d, &path.key("pong_timeout"));
        }
        k
    }

    // === admission ===

    fn route_admission(
        &mut self,
        origins: Option<&[Text]>,
        allow_missing: Option<bool>,
        auth: Option<FileAuth>,
        path: &KeyPath,
    ) -> RouteAdmission {
        let origins = match origins {
            None => OriginPolicy::any(),
            Some(list) => {
                let list: Vec<String> = list.iter().map(|t| t.value.trim().to_owned()).collect();
                OriginPolicy::new(&list, allow_missing.unwrap_or(false)).unwrap_or_else(|e| {
                    self.issue(&path.key("origins"), e);
                    OriginPolicy::any()
                })
            }
        };
        let (jwt, api_keys) = match auth {
            None => (None, None),
            Some(auth) => {
                let jwt = auth
                    .jwt
                    .and_then(|j| self.jwt(j, &path.key("auth").key("jwt")));
                let keys = auth
                    .api_keys
                    .and_then(|k| self.api_keys(k, &path.key("auth").key("api_keys")));
                (jwt, keys)
            }
        };
        RouteAdmission {
            origins,
            jwt,
            api_keys,
        }
    }

    fn jwt(&mut self, file: FileJwt, path: &KeyPath) -> Option<JwtAuth> {
        let before = self.issues.len();
        let from = file
            .from
            .unwrap_or_else(|| vec![Text::literal("header:Authorization")]);
        let mut sources = Vec::new();
        for (i, t) in from.iter().enumerate() {
            match t.value.trim().parse::<TokenSource>() {
                Ok(s) => sources.push(s),
                Err(e) => self.issue(&path.key("from").index(i), e),
            }
        }
        let mut keys = JwtKeys::new();
        for (i, k) in file.keys.unwrap_or_default().iter().enumerate() {
            let at = path.key("keys").index(i);
            match (&k.secret, &k.jwks_file) {
                (Some(secret), None) => {
                    let alg = k.alg.as_ref().map_or("HS256", |a| a.value.trim());
                    if let Err(e) = keys.add_secret(alg, secret.value.as_bytes()) {
                        self.issue(&at, e);
                    }
                }
                (None, Some(file)) => {
                    let loaded = std::fs::read_to_string(file.value.trim())
                        .map_err(|e| format!("cannot read JWKS file {}: {e}", file.value.trim()))
                        .and_then(|json| keys.add_jwks(&json));
                    match loaded {
                        Ok(load) => {
                            for skipped in load.skipped {
                                self.warnings.push(format!("{at}: {skipped}"));
                            }
                        }
                        Err(e) => self.issue(&at.key("jwks_file"), e),
                    }
                }
                _ => self.issue(
                    &at,
                    "a key is either `{ alg, secret }` or `{ jwks_file }`".into(),
                ),
            }
        }
        if keys.is_empty() && self.issues.len() == before {
            self.issue(&path.key("keys"), "jwt needs at least one key: `{ alg: HS256, secret: \"${JWT_SECRET}\" }` or `{ jwks_file: ... }`".into());
        }
        let rules = JwtRules {
            issuer: file.issuer.map(|t| t.value.trim().to_owned()),
            audience: file.audience.map(|t| t.value.trim().to_owned()),
            leeway: file.leeway.map_or(Duration::ZERO, |d| d.0),
            require_claims: file
                .require_claims
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v.value)))
                .collect(),
            require_exp: true,
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in file.forward_claims.unwrap_or_default() {
            match http::HeaderName::from_bytes(header.value.trim().as_bytes()) {
                Ok(h) => forward_claims.push((claim, h)),
                Err(_) => self.issue(
                    &path.key("forward_claims").key(&claim),
                    format!("{} is not a valid header name", header.shown()),
                ),
            }
        }
        if self.issues.len() != before {
            return None;
        }
        let subprotocol = sources.contains(&TokenSource::Subprotocol);
        match JwtVerifier::new(sources, keys, rules) {
            Ok(verifier) => Some(JwtAuth {
                subprotocol,
                verifier,
                close_on_expiry: file.close_on_expiry.unwrap_or(false),
                forward_claims,
                strip_token: file.strip_token.unwrap_or(false),
            }),
            Err(e) => {
                self.issue(path, e);
                None
            }
        }
    }

    fn api_keys(&mut self, file: FileApiKeys, path: &KeyPath) -> Option<ApiKeyVerifier> {
        let source = match (&file.header, &file.query) {
            (Some(h), None) => format!("header:{}", h.value.trim()),
            (None, Some(q)) => format!("query:{}", q.value.trim()),
            _ => {
                self.issue(
                    path,
                    "api_keys needs exactly one of `header: NAME` or `query: NAME`".into(),
                );
                return None;
            }
        };
        let source = match source.parse::<ApiKeySource>() {
            Ok(s) => s,
            Err(e) => {
                self.issue(path, e);
                return None;
            }
        };
        let Some(file_path) = file.keys_file else {
            self.issue(
                &path.key("keys_file"),
                "api_keys needs `keys_file`: one SHA-256 hex digest per line".into(),
            );
            return None;
        };
        let keys = std::fs::read_to_string(file_path.value.trim())
            .map_err(|e| format!("cannot read {}: {e}", file_path.value.trim()))
            .and_then(|text| ApiKeys::parse(&text));
        match keys {
            Ok(keys) => Some(ApiKeyVerifier::new(source, keys)),
            Err(e) => {
                self.issue(&path.key("keys_file"), e);
                None
            }
        }
    }

    // === TLS ===

    /// Loads and checks a listener's certificates now, so that `--check` and reload catch
    /// a broken file before it is served.
    fn listener_tls(&mut self, file: FileListenerTls, path: &KeyPath) -> Option<ListenerTls> {
        let before = self.issues.len();
        let min = match file.min_version.as_ref().map(|t| t.value.trim()) {
            None | Some("1.2") => MinVersion::Tls12,
            Some("1.3") => MinVersion::Tls13,
            Some(_) => {
                self.issue(
                    &path.key("min_version"),
                    "min_version must be \"1.2\" or \"1.3\"".into(),
                );
                MinVersion::Tls12
            }
        };
        let self_signed = file.self_signed == Some(true);
        let mut certificates = Vec::new();
        for (i, c) in file.certificates.unwrap_or_default().iter().enumerate() {
            let at = path.key("certificates").index(i);
            match tls::load_pair(
                Path::new(c.cert.value.trim()),
                Path::new(c.key.value.trim()),
            ) {
                Ok(loaded) => {
                    if let Some(w) = loaded.expiry_warning() {
                        self.warnings.push(format!("{at}: {w}"));
                    }
                    certificates.push(loaded);
                }
                Err(e) => self.issue(&at.key("cert"), e),
            }
        }
        if self_signed {
            match tls::self_signed() {
                Ok(c) => certificates.push(c),
                Err(e) => self.issue(&path.key("self_signed"), e),
            }
            self.warnings.push(format!(
                "{path}: serving a generated self-signed certificate for localhost; clients will not trust it; use real certificates in production (see certs/README.md)"
            ));
        }
        if certificates.is_empty() && self.issues.len() == before {
            self.issue(
                path,
                "tls needs `certificates: [{ cert: ..., key: ... }]` or `self_signed: true`".into(),
            );
        }
        let client_ca = file.client_ca.as_ref().and_then(|ca| {
            tls::load_roots(Path::new(ca.value.trim()))
                .map_err(|e| self.issue(&path.key("client_ca"), e))
                .ok()
        });
        if self.issues.len() != before {
            return None;
        }
        match tls::server_config(&certificates, min, client_ca.as_ref()) {
            Ok(server) => Some(ListenerTls {
                server,
                certificates,
                self_signed,
                mtls: client_ca.is_some(),
            }),
            Err(e) => {
                self.issue(path, e);
                None
            }
        }
    }

    fn upstream_tls(&mut self, file: FileUpstreamTls, path: &KeyPath) -> Option<UpstreamTls> {
        let before = self.issues.len();
        let roots = file.ca.as_ref().and_then(|ca| {
            tls::load_roots(Path::new(ca.value.trim()))
                .map_err(|e| self.issue(&path.key("ca"), e))
                .ok()
        });
        let identity = file.client_cert.as_ref().and_then(|c| {
            tls::load_client_identity(
                Path::new(c.cert.value.trim()),
                Path::new(c.key.value.trim()),
            )
            .map_err(|e| self.issue(&path.key("client_cert").key("cert"), e))
            .ok()
        });
        let sni = file.sni.as_ref().map(|s| s.value.trim().to_owned());
        if let (Some(name), Some(text)) = (&sni, &file.sni)
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            self.issue(
                &path.key("sni"),
                format!("{} is not a valid TLS server name", text.shown()),
            );
        }
        if self.issues.len() != before {
            return None;
        }
        match tls::client_config(roots, identity) {
            Ok(client) => Some(UpstreamTls { client, sni }),
            Err(e) => {
                self.issue(path, e);
                None
            }
        }
    }

    fn positive(&mut self, d: DurationValue, path: &KeyPath) -> Duration {
        if d.0.is_zero() {
            self.issue(
                path,
                format!(
                    "`{}` must be greater than 0s; e.g. `{}`",
                    last_key(path),
                    fmt_duration(Duration::from_secs(10))
                ),
            );
        }
        d.0
    }

    // === upstreams ===

    fn upstream(&mut self, name: &str, file: FileUpstream, path: &KeyPath) -> Option<Upstream> {
        let before = self.issues.len();
        if name.trim().is_empty() {
            self.issue(path, "upstream name must not be empty".into());
        }
        let sticky = file
            .sticky
            .map(|st| self.sticky(st, &path.key("sticky").key("key")))
            .unwrap_or_default();
        let bounded_load = file
            .balance
            .and_then(|b| self.balance(b, &path.key("balance").key("bounded_load")));
        let health_check = file
            .health_check
            .map(|h| self.health_check(h, &path.key("health_check")));
        let connect_timeout = match file.connect_timeout {
            Some(d) => self.positive(d, &path.key("connect_timeout")),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let kind = match (file.backends, file.builtin) {
            (Some(_), Some(_)) => {
                self.issue(path, "set either `backends` or `builtin`, not both".into());
                None
            }
            (None, None) => {
                self.issue(
                    path,
                    "an upstream needs `backends: [{ addr: \"host:port\" }]` or `builtin: echo`"
                        .into(),
                );
                None
            }
            (Some(backends), None) => self.backends(backends, &path.key("backends")),
            (None, Some(builtin)) => match builtin.value.trim() {
                "echo" => Some(UpstreamKind::BuiltinEcho),
                _ => {
                    self.issue(
                        &path.key("builtin"),
                        format!(
                            "unknown builtin {}; the only builtin is `echo`",
                            builtin.shown()
                        ),
                    );
                    None
                }
            },
        };
        let kind = kind?;
        let tls = match file.tls {
            Some(_) if kind == UpstreamKind::BuiltinEcho => {
                self.issue(
                    &path.key("tls"),
                    "the builtin echo speaks plain ws://; remove `tls`".into(),
                );
                None
            }
            Some(t) => self.upstream_tls(t, &path.key("tls")),
            None => None,
        };
        (self.issues.len() == before).then(|| Upstream {
            name: name.to_string(),
            kind,
            tls,
            connect_timeout,
            sticky,
            bounded_load,
            health_check,
        })
    }

    fn sticky(&mut self, file: FileSticky, path: &KeyPath) -> StickyKey {
        match parse_sticky(file.key.value.trim()) {
            Ok(key) => key,
            Err(rule) => {
                self.issue(
                    path,
                    format!(
                        "{} is not a sticky key: {rule}; write `ip`, `header:NAME`, `cookie:NAME`, `query:NAME` or `claim:NAME`",
                        file.key.shown()
                    ),
                );
                StickyKey::Ip
            }
        }
    }

    fn balance(&mut self, file: FileBalance, path: &KeyPath) -> Option<f64> {
        let c = file.bounded_load?;
        if !c.is_finite() || !(1.0..=100.0).contains(&c) {
            self.issue(
                path,
                format!("bounded_load {c} is out of range: it must be between 1 and 100 (1.25 is usual); below 1 no backend could take the next connection"),
            );
            return None;
        }
        Some(c)
    }

    fn health_check(&mut self, file: FileHealthCheck, path: &KeyPath) -> HealthCheck {
        let interval = match file.interval {
            Some(d) => self.positive(d, &path.key("interval")),
            None => DEFAULT_HEALTH_INTERVAL,
        };
        let timeout = match file.timeout {
            Some(d) => self.positive(d, &path.key("timeout")),
            None => DEFAULT_HEALTH_TIMEOUT.min(interval),
        };
        if timeout > interval {
            self.issue(
                &path.key("timeout"),
                format!(
                    "timeout ({}) must not exceed interval ({}); a check must end before the next begins",
                    fmt_duration(timeout),
                    fmt_duration(interval)
                ),
            );
        }
        let path_value = file
            .path
            .as_ref()
            .and_then(|p| self.uri_path(p, &path.key("path"), true));
        let mut threshold = |value: Option<u32>, default: u32, key: &str| {
            let n = value.unwrap_or(default);
            if !(1..=100).contains(&n) {
                self.issue(
                    &path.key(key),
                    format!("`{key}` must be in 1..=100, got {n}"),
                );
            }
            n
        };
        let unhealthy_after = threshold(
            file.unhealthy_after,
            DEFAULT_UNHEALTHY_AFTER,
            "unhealthy_after",
        );
        let healthy_after = threshold(file.healthy_after, DEFAULT_HEALTHY_AFTER, "healthy_after");
        HealthCheck {
            interval,
            timeout,
            path: path_value,
            unhealthy_after,
            healthy_after,
        }
    }

    fn backends(&mut self, file: Vec<FileBackend>, path: &KeyPath) -> Option<UpstreamKind> {
        if file.is_empty() {
            self.issue(
                path,
                "backends must not be empty; add `- { addr: \"host:port\" }` or use `builtin: echo`"
                    .into(),
            );
            return None;
        }
        let mut backends: Vec<Backend> = Vec::new();
        for (i, backend) in file.into_iter().enumerate() {
            let path = path.index(i);
            let addr = self.backend_addr(&backend.addr, &path.key("addr"));
            let weight = backend.weight.unwrap_or(DEFAULT_WEIGHT);
            if weight == 0 {
                self.issue(&path.key("weight"), "weight must be at least 1".into());
            }
            if let Some(first) = addr
                .as_ref()
                .and_then(|a| backends.iter().position(|b| &b.addr == a))
            {
                self.issue(
                    &path.key("addr"),
                    format!("this address is already backends[{first}]; list each backend once (use `weight` for a bigger share)"),
                );
                continue;
            }
            if let Some(addr) = addr {
                backends.push(Backend { addr, weight });
            }
        }
        Some(UpstreamKind::Backends(backends))
    }

    fn backend_addr(&mut self, text: &Text, path: &KeyPath) -> Option<String> {
        let addr = text.value.trim();
        match check_host_port(addr) {
            Ok(()) => Some(addr.to_string()),
            Err(rule) => {
                self.issue(
                    path,
                    format!(
                        "{} is not a backend address: {rule}; write `host:port`, e.g. `127.0.0.1:9001` or `[::1]:9001`",
                        text.shown()
                    ),
                );
                None
            }
        }
    }

    // === routes ===

    fn routes(
        &mut self,
        file: Vec<FileRoute>,
        path: &KeyPath,
        limits: &Limits,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        defined: &[String],
    ) -> Vec<Route> {
        if file.is_empty() {
            self.issue(
                path,
                "at least one route is required, e.g. `routes: [{ name: echo, match: { path_prefix: /echo }, upstream: echo }]`".into(),
            );
        }
        let mut routes = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut matches: HashMap<(Option<String>, String), usize> = HashMap::new();
        for (i, route) in file.into_iter().enumerate() {
            let path = path.index(i);
            let before = self.issues.len();
            let name = self.non_empty(&route.name, &path.key("name"), "route name");
            if let Some(name) = &name {
                if let Some(first) = names.get(name) {
                    self.issue(
                        &path.key("name"),
                        format!("route name `{name}` is already used by routes[{first}]; names must be unique"),
                    );
                } else {
                    names.insert(name.clone(), i);
                }
            }
            let match_path = path.key("match");
            let host = route
                .matcher
                .host
                .as_ref()
                .and_then(|host| self.host(host, &match_path.key("host")));
            let path_prefix = self.uri_path(
                &route.matcher.path_prefix,
                &match_path.key("path_prefix"),
                false,
            );
            if let Some(prefix) = &path_prefix {
                let key = (host.clone(), prefix.clone());
                if let Some(first) = matches.get(&key) {
                    self.issue(
                        &match_path,
                        format!("routes[{first}] has the same match, so this route can never be chosen; change host or path_prefix"),
                    );
                } else {
                    matches.insert(key, i);
                }
            }
            let upstream =
                self.route_upstream(&route.upstream, &path.key("upstream"), upstreams, defined);
            let upstream_path = route
                .upstream_path
                .as_ref()
                .and_then(|p| self.uri_path(p, &path.key("upstream_path"), false));
            let admission = self.route_admission(
                route.origins.as_deref(),
                route.allow_missing_origin,
                route.auth,
                &path,
            );
            let subprotocols = route.subprotocols.map(|list| {
                let list_path = path.key("subprotocols");
                list.iter()
                    .enumerate()
                    .filter_map(|(j, p)| {
                        let value = p.value.trim();
                        if is_token(value) {
                            Some(value.to_string())
                        } else {
                            self.issue(
                                &list_path.index(j),
                                format!("subprotocol {} is not an RFC 7230 token (letters, digits and !#$%&'*+-.^_`|~, no spaces or separators)", p.shown()),
                            );
                            None
                        }
                    })
                    .collect()
            });
            if let Some(StickyKey::Claim(claim)) = upstream.as_ref().map(|u| &u.sticky)
                && admission.jwt.is_none()
            {
                self.issue(
                    &path.key("upstream"),
                    format!("upstream {} is sticky by `claim:{claim}`, which needs a validated token: add `auth.jwt` to this route or use another sticky key", route.upstream.shown()),
                );
            }
            let route_limits =
                self.limits(limits, route.limits.as_ref(), &path.key("limits"), false);
            if self.issues.len() != before {
                continue;
            }
            if let (Some(name), Some(path_prefix), Some(upstream)) = (name, path_prefix, upstream) {
                routes.push(Route {
                    name,
                    host,
                    path_prefix,
                    upstream,
                    upstream_path,
                    subprotocols,
                    admission: Arc::new(admission),
                    limits: route_limits,
                });
            }
        }
        routes
    }

    fn route_upstream(
        &mut self,
        text: &Text,
        path: &KeyPath,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        defined: &[String],
    ) -> Option<Arc<Upstream>> {
        let name = text.value.trim();
        if let Some(upstream) = upstreams.get(name) {
            return Some(upstream.clone());
        }
        if defined.iter().any(|d| d == name) {
            // Defined but invalid: its own errors are already reported.
            return None;
        }
        let known = if defined.is_empty() {
            "no upstreams are defined; add one under `upstreams:`".to_string()
        } else {
            let mut sorted = defined.to_vec();
            sorted.sort();
            format!("defined upstreams: {}", sorted.join(", "))
        };
        self.issue(path, format!("unknown upstream {}; {known}", text.shown()));
        None
    }

    fn host(&mut self, text: &Text, path: &KeyPath) -> Option<String> {
        let host = text.value.trim().to_ascii_lowercase();
        let rule = if host.is_empty() {
            Some("must not be empty; remove `host` to match any host")
        } else if host.starts_with('[') {
            (!host.ends_with(']') || host.len() < 3)
                .then_some("an IPv6 host must be written `[addr]` without a port")
        } else if host.contains(':') {
            Some("must not contain a port; the port is the listener's")
        } else if host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@'))
        {
            Some("must be a bare host name, without scheme, path or spaces")
        } else {
            None
        };
        match rule {
            Some(rule) => {
                self.issue(path, format!("host {} {rule}", text.shown()));
                None
            }
            None => Some(host),
        }
    }

    /// A path for a request line: starts with `/` and is a valid URI path, with a query
    /// only where one makes sense (`with_query`), never a fragment.
    fn uri_path(&mut self, text: &Text, path: &KeyPath, with_query: bool) -> Option<String> {
        let value = text.value.trim();
        if value.starts_with('/') {
            let clean = !value.contains('#') && (with_query || !value.contains('?'));
            if clean && http::uri::PathAndQuery::try_from(value).is_ok() {
                return Some(value.to_string());
            }
            self.issue(
                path,
                format!(
                    "{} is not a valid URI path (no fragment{}); percent-encode spaces and other special characters (e.g. `%20`)",
                    text.shown(),
                    if with_query { "" } else { ", no query" }
                ),
            );
            None
        } else {
            self.issue(
                path,
                format!(
                    "{} must start with `/`, e.g. `/{}`",
                    text.shown(),
                    if text.template.is_some() { "ws" } else { value }
                ),
            );
            None
        }
    }
}

fn last_key(path: &KeyPath) -> String {
    match path.0.last() {
        Some(super::Segment::Key(key)) => key.clone(),
        _ => path.to_string(),
    }
}

/// `host:port` with a non-empty host (IPv6 in brackets) and a port in 1..=65535.
fn check_host_port(addr: &str) -> Result<(), &'static str> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("missing `:port`");
    };
    if host.is_empty() {
        return Err("missing host");
    }
    if let Some(inner) = host.strip_prefix('[') {
        if !inner.ends_with(']') || inner.len() < 2 {
            return Err("unbalanced `[` in the host");
        }
    } else if host.contains(':') {
        return Err("an IPv6 host must be in brackets");
    }
    if host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err("the host must not contain spaces or `/` (no scheme or path)");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be a number in 1..=65535"),
        Ok(_) => Ok(()),
    }
}

/// `ip` | `header:NAME` | `cookie:NAME` | `query:NAME` | `claim:NAME`.
fn parse_sticky(text: &str) -> Result<StickyKey, &'static str> {
    if text == "ip" {
        return Ok(StickyKey::Ip);
    }
    let Some((kind, name)) = text.split_once(':') else {
        return Err("unknown kind");
    };
    if name.is_empty() {
        return Err("the NAME after `:` is missing");
    }
    match kind {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(StickyKey::Header)
            .map_err(|_| "not a valid header name"),
        "cookie" if is_token(name) => Ok(StickyKey::Cookie(name.to_owned())),
        "cookie" => Err("a cookie name is an RFC 7230 token"),
        "query" if !name.contains(['&', '=', '#', ' ']) => Ok(StickyKey::Query(name.to_owned())),
        "query" => Err("a query parameter name cannot contain `&`, `=`, `#` or spaces"),
        "claim" => Ok(StickyKey::Claim(name.to_owned())),
        _ => Err("unknown kind"),
    }
}

/// RFC 7230 §3.2.6 `token`: one or more tchar.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, ConfigErrors};
    use super::*;
    use proptest::prelude::*;

    const MINIMAL: &str = "\
listeners:
  - bind: 127.0.0.1:8080
upstreams:
  echo: { builtin: echo }
routes:
  - name: echo
    match: { path_prefix: /echo }
    upstream: echo
";

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8443".into()),
            "SECRET" => Some("hunter2".into()),
            "BACKEND" => Some("10.0.0.7:9001".into()),
            "TIMEOUT" => Some("7s".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml_str_with_env(text, "test.yaml", &env)
    }

    fn errors_of(text: &str) -> Vec<ConfigError> {
        match load(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(errors) => errors.0,
        }
    }

    /// The single error, which must be at `path`, `line`:`column` and mention `words`.
    #[track_caller]
    fn assert_one_error(text: &str, path: &str, line: usize, column: usize, words: &str) {
        let errors = errors_of(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = &errors[0];
        assert_eq!(
            (e.path.as_str(), e.line, e.column),
            (path, line, column),
            "{e}"
        );
        assert!(e.message.contains(words), "{e}");
        assert_eq!(e.file, "test.yaml");
    }

    /// MINIMAL with `extra` appended.
    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    // --- happy paths ---

    #[test]
    fn minimal_config_gets_every_default() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.listeners[0].name, "127.0.0.1:8080");
        assert!(config.admin.is_none());
        assert_eq!(config.log.access, AccessTarget::Stdout);
        assert_eq!(config.log.format, LogFormat::Text);
        let want = Limits {
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            max_frame_size: 1 << 20,
            max_message_size: 4 << 20,
            send_timeout: Duration::from_secs(30),
            buffer_size: 16 << 10,
            messages: MessageRate {
                rate: std::num::NonZeroU32::new(100).unwrap(),
                per: Duration::from_secs(1),
                burst: std::num::NonZeroU32::new(200).unwrap(),
                on_exceed: OnExceed::Close,
            },
            fragment_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            max_connections_per_ip: 64,
            ipv6_prefix: 64,
            handshakes_per_ip: RatePolicy {
                rate: 10,
                per: Duration::from_secs(1),
                burst: 20,
            },
        };
        assert_eq!(config.limits, want);
        assert_eq!(
            config.keepalive,
            Keepalive {
                ping_interval: Duration::from_secs(20),
                pong_timeout: Duration::from_secs(10),
                upstream_ping_interval: Duration::ZERO,
            }
        );
        assert_eq!(config.routes[0].limits, want);
        let upstream = &config.upstreams["echo"];
        assert_eq!(upstream.kind, UpstreamKind::BuiltinEcho);
        assert_eq!(upstream.connect_timeout, Duration::from_secs(3));
        assert!(Arc::ptr_eq(upstream, &config.routes[0].upstream));
    }

    #[test]
    fn default_config_file_loads() {
        let config = load(include_str!("../../conf/wsgate.yaml")).unwrap();
        assert_eq!(config.listeners[0].name, "public");
        assert_eq!(
            config.admin.unwrap().bind,
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(config.routes[0].path_prefix, "/echo");
        assert_eq!(config.routes[0].upstream.kind, UpstreamKind::BuiltinEcho);
    }

    #[test]
    fn full_example_file_loads() {
        let config = Config::from_yaml_str_with_env(
            include_str!("../../conf/example-full.yaml"),
            "example-full.yaml",
            &|_| None,
        )
        .unwrap();
        assert!(config.routes.len() >= 2);
        assert!(config.upstreams.len() >= 2);
    }

    /// The SPEC §2 example uses every key. Every key must be recognised (no unknown-field
    /// error), and the only complaints must be about its certificate and JWKS files, which
    /// this repository does not ship.
    #[test]
    fn spec_example_fails_only_on_files_this_repository_lacks() {
        let errors = Config::from_yaml_str_with_env(
            include_str!("testdata/spec-section-2.yaml"),
            "spec.yaml",
            &|name| (name == "JWT_SECRET").then(|| "s3cret".to_string()),
        )
        .unwrap_err()
        .0;
        for e in &errors {
            let missing_file = e
                .message
                .contains("cannot read certificates from certs/example.crt")
                || e.message.contains("cannot read JWKS file certs/jwks.json");
            assert!(missing_file, "{e}");
            assert!(e.line > 0 && !e.to_string().contains("s3cret"), "{e}");
        }
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "listeners[0].tls.certificates[0].cert",
                "routes[0].auth.jwt.keys[1].jwks_file",
            ]
        );
    }

    #[test]
    fn route_overrides_apply_on_top_of_top_level_limits() {
        let text = MINIMAL.replace(
            "    upstream: echo\n",
            "    upstream: echo\n    limits: { max_frame_size: 64KiB, send_timeout: 5s }\n",
        ) + "limits: { buffer_size: 32KiB, max_connections: 10 }\n";
        let config = load(&text).unwrap();
        assert_eq!(config.limits.buffer_size, 32 << 10);
        let route = &config.routes[0].limits;
        assert_eq!(
            (
                route.buffer_size,
                route.max_connections,
                route.max_frame_size
            ),
            (32 << 10, 10, 64 << 10)
        );
        assert_eq!(route.send_timeout, Duration::from_secs(5));
        assert_eq!(route.max_message_size, 4 << 20);
    }

    #[test]
    fn env_variables_fill_any_string_value() {
        let text = "\
listeners:
  - bind: \"0.0.0.0:${PORT}\"
limits: { send_timeout: \"${TIMEOUT}\" }
upstreams:
  chat: { backends: [{ addr: \"${BACKEND}\" }] }
routes:
  - { name: chat, match: { path_prefix: /chat, host: Chat.Example.COM }, upstream: chat }
";
        let config = load(text).unwrap();
        assert_eq!(config.listeners[0].bind, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(config.limits.send_timeout, Duration::from_secs(7));
        assert_eq!(
            config.upstreams["chat"].kind,
            UpstreamKind::Backends(vec![Backend {
                addr: "10.0.0.7:9001".into(),
                weight: 1
            }])
        );
        assert_eq!(config.routes[0].host.as_deref(), Some("chat.example.com"));
    }

    #[test]
    fn env_values_cannot_inject_yaml_structure() {
        let text = MINIMAL.replace("name: echo", "name: \"${INJECT}\"");
        let config = Config::from_yaml_str_with_env(&text, "t", &|_| {
            Some("x\nupstream: evil\n  - [".into())
        })
        .unwrap();
        assert_eq!(config.routes[0].name, "x\nupstream: evil\n  - [");
    }

    #[test]
    fn explicitly_off_values_are_accepted() {
        let text = with(
            "trusted_proxies: []\ndrain: null\nkeepalive: { ping_interval: 0s, pong_timeout: 10s, upstream_ping_interval: 0s }\nlimits: { idle_timeout: 0s }\n",
        )
        .replace(
            "  - bind: 127.0.0.1:8080\n",
            "  - bind: 127.0.0.1:8080\n    tls: null\n    proxy_protocol: false\n",
        );
        load(&text).unwrap();
    }

    #[test]
    fn log_targets_and_formats_parse() {
        let config = load(&with(
            "log: { access: /var/log/wsgate.log, format: json }\n",
        ))
        .unwrap();
        assert_eq!(
            config.log.access,
            AccessTarget::File("/var/log/wsgate.log".into())
        );
        assert_eq!(config.log.format, LogFormat::Json);
    }

    // --- error locations ---

    #[test]
    fn unknown_key_is_located_and_named() {
        let text = MINIMAL.replace("  - bind:", "  - tsl: x\n    bind:");
        assert_one_error(&text, "listeners[0].tsl", 2, 5, "unknown field `tsl`");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        assert_one_error(&with("limts: {}\n"), "limts", 9, 1, "unknown field `limts`");
    }

    #[test]
    fn bad_duration_is_located() {
        assert_one_error(
            &with("limits:\n  send_timeout: 30\n"),
            "limits.send_timeout",
            10,
            17,
            "needs a unit",
        );
    }

    #[test]
    fn bad_size_is_located() {
        assert_one_error(
            &with("limits: { buffer_size: 16Kb }\n"),
            "limits.buffer_size",
            9,
            24,
            "unknown size unit",
        );
    }

    #[test]
    fn missing_env_var_is_located_and_named() {
        let text = MINIMAL.replace(
            "bind: 127.0.0.1:8080",
            "bind: \"127.0.0.1:${NO_SUCH_PORT}\"",
        );
        assert_one_error(
            &text,
            "listeners[0].bind",
            2,
            11,
            "`NO_SUCH_PORT` is not set",
        );
    }

    #[test]
    fn missing_env_var_inside_a_duration_is_located() {
        assert_one_error(
            &with("limits: { send_timeout: \"${NOPE}\" }\n"),
            "limits.send_timeout",
            9,
            25,
            "`NOPE` is not set",
        );
    }

    #[test]
    fn unknown_upstream_is_located_and_lists_the_defined_ones() {
        let text = MINIMAL.replace("    upstream: echo", "    upstream: ehco")
            + "  - { name: b, match: { path_prefix: /b }, upstream: echo }\n";
        assert_one_error(
            &text,
            "routes[0].upstream",
            8,
            15,
            "unknown upstream `ehco`; defined upstreams: echo",
        );
    }

    #[test]
    fn not_supported_key_is_located() {
        let text = MINIMAL.replace(
            "  - bind: 127.0.0.1:8080\n",
            "  - bind: 127.0.0.1:8080\n    tls:\n      min_version: \"1.3\"\n",
        );
        assert_one_error(&text, "listeners[0].tls", 4, 7, "tls needs `certificates");
    }

    #[test]
    fn type_error_is_located() {
        let text = MINIMAL.replace(
            "  echo: { builtin: echo }",
            "  echo: { builtin: echo, connect_timeout: [1] }",
        );
        let e = &errors_of(&text)[0];
        assert_eq!(
            (e.path.as_str(), e.line),
            ("upstreams.echo.connect_timeout", 4),
            "{e}"
        );
    }

    #[test]
    fn yaml_syntax_error_has_a_position() {
        let e = &errors_of("listeners: [\n  - {")[0];
        assert!(e.line > 0 && e.column > 0, "{e}");
        let e = &errors_of("log: {}\n---\nlog: {}\n")[0];
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        assert!(e.message.contains("more than one YAML document"), "{e}");
    }

    #[test]
    fn display_is_file_line_column_path_message() {
        let text = with("limits: { buffer_size: 100 }\n");
        let shown = load(&text).unwrap_err().to_string();
        assert!(
            shown.starts_with(
                "test.yaml:9:24: limits.buffer_size: buffer_size 100B is out of range"
            ),
            "{shown}"
        );
    }

    // --- semantic rules ---

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let text = with("limits: { buffer_size: 2MiB, send_timeout: 0s }\nadmin: { bind: nope }\n");
        let errors = errors_of(&text);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["limits.buffer_size", "limits.send_timeout", "admin.bind"],
            "{errors:#?}"
        );
    }

    #[test]
    fn frame_policy_keys_parse_and_routes_override_them() {
        let text = with(
            "limits: { messages: { rate: 5, per: 2s, on_exceed: throttle }, fragment_timeout: 0s, idle_timeout: 5m }\nkeepalive: { ping_interval: 15s, pong_timeout: 5s, upstream_ping_interval: 30s }\n",
        );
        let config = load(&text).unwrap();
        let m = config.limits.messages;
        assert_eq!(
            (m.rate.get(), m.per, m.burst.get()),
            (5, Duration::from_secs(2), 5)
        );
        assert_eq!(m.on_exceed, OnExceed::Throttle);
        assert_eq!(config.limits.fragment_timeout, Duration::ZERO);
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(config.keepalive.ping_interval, Duration::from_secs(15));
        assert_eq!(
            config.keepalive.upstream_ping_interval,
            Duration::from_secs(30)
        );
        assert_eq!(config.routes[0].limits.messages, m);
        let bad = with("limits: { messages: { rate: 0, per: 1s, on_exceed: drop } }\n");
        let mut paths: Vec<String> = errors_of(&bad).iter().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "limits.messages.burst",
                "limits.messages.on_exceed",
                "limits.messages.rate"
            ]
        );
    }

    /// governor keeps time in u64 nanoseconds: spans past that would panic at start-up
    /// or in every connection, so they are config errors.
    #[test]
    fn rate_refill_spans_are_bounded() {
        for (text, path) in [
            (
                "limits: { handshakes_per_ip: { rate: 1, per: 6000000h } }\n",
                "limits.handshakes_per_ip",
            ),
            (
                "limits: { messages: { rate: 1, per: 6000000h } }\n",
                "limits.messages",
            ),
            (
                "limits: { messages: { rate: 1, per: 24h, burst: 4000000000 } }\n",
                "limits.messages",
            ),
        ] {
            let errors = errors_of(&with(text));
            assert_eq!(errors.len(), 1, "{text}: {errors:#?}");
            assert_eq!(errors[0].path, path);
            assert!(errors[0].message.contains("refill"), "{}", errors[0]);
        }
        let year = with(
            "limits: { handshakes_per_ip: { rate: 1, per: 24h, burst: 365 }, messages: { rate: 1, per: 24h, burst: 365 } }\n",
        );
        let config = load(&year).unwrap_or_else(|e| panic!("{e}"));
        let gate = crate::admission::ip_limit::HandshakeRate::new(config.limits.handshakes_per_ip);
        assert!(gate.is_ok());
    }

    #[test]
    fn per_ip_keys_parse_and_stay_top_level() {
        let config = load(&with(
            "limits: { max_connections_per_ip: 5, ipv6_prefix: 56 }\n",
        ))
        .unwrap();
        assert_eq!(
            (
                config.limits.max_connections_per_ip,
                config.limits.ipv6_prefix
            ),
            (5, 56)
        );
        let bad = errors_of(&with("limits: { ipv6_prefix: 0 }\n"));
        assert_eq!(bad[0].path, "limits.ipv6_prefix");
        let in_route = MINIMAL.replace(
            "    upstream: echo\n",
            "    upstream: echo\n    limits: { ipv6_prefix: 48, handshakes_per_ip: { rate: 1, per: 1s } }\n",
        );
        let mut paths: Vec<String> = errors_of(&in_route)
            .iter()
            .map(|e| e.path.clone())
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "routes[0].limits.handshakes_per_ip",
                "routes[0].limits.ipv6_prefix"
            ]
        );
    }

    #[test]
    fn drain_defaults_and_bounds() {
        let config = load(&with("")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.drain.spread, Duration::from_secs(10));
        assert_eq!(config.drain.timeout, Duration::from_secs(30));
        let config =
            load(&with("drain: { spread: 2s, timeout: 5s }\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.drain.spread, Duration::from_secs(2));
        let errors = errors_of(&with("drain: { spread: 20s, timeout: 5s }\n"));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].path, "drain.spread");
        assert!(errors[0].line >= 9, "{}", errors[0]);
    }

    #[test]
    fn pools_with_sticky_balance_and_health_checks_load() {
        let text = MINIMAL.replace(
            "{ builtin: echo }",
            "{ backends: [{ addr: \"a:1\", weight: 2 }, { addr: \"[::1]:2\" }], sticky: { key: \"cookie:sid\" }, balance: { bounded_load: 1.25 }, health_check: { interval: 1s, path: /health, healthy_after: 1 } }",
        );
        let config = load(&text).unwrap();
        let up = &config.upstreams["echo"];
        assert_eq!(
            up.kind,
            UpstreamKind::Backends(vec![
                Backend {
                    addr: "a:1".into(),
                    weight: 2
                },
                Backend {
                    addr: "[::1]:2".into(),
                    weight: 1
                }
            ])
        );
        assert_eq!(up.sticky, StickyKey::Cookie("sid".into()));
        assert_eq!(up.bounded_load, Some(1.25));
        assert_eq!(
            up.health_check,
            Some(HealthCheck {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                path: Some("/health".into()),
                unhealthy_after: 3,
                healthy_after: 1,
            })
        );
        let plain = load(MINIMAL).unwrap();
        let up = &plain.upstreams["echo"];
        assert_eq!(
            (&up.sticky, up.bounded_load, &up.health_check),
            (&StickyKey::Ip, None, &None)
        );
    }

    #[test]
    fn sticky_keys_parse_every_kind_and_refuse_the_rest() {
        let ok = [
            ("ip", StickyKey::Ip),
            (
                "header:X-User",
                StickyKey::Header(http::HeaderName::from_static("x-user")),
            ),
            ("cookie:sid", StickyKey::Cookie("sid".into())),
            ("query:room", StickyKey::Query("room".into())),
            ("claim:sub", StickyKey::Claim("sub".into())),
        ];
        for (text, want) in ok {
            assert_eq!(parse_sticky(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "ipv6",
            "header:",
            "header:a b",
            "cookie:a;b",
            "query:a=b",
            "path:x",
            "claim:",
        ] {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ builtin: echo, sticky: {{ key: \"{bad}\" }} }}"),
            );
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{bad}: {errors:#?}");
            assert_eq!(errors[0].path, "upstreams.echo.sticky.key", "{bad}");
            assert!(
                errors[0].message.contains("not a sticky key"),
                "{}",
                errors[0]
            );
            assert!(errors[0].line > 0);
        }
    }

    #[test]
    fn claim_stickiness_needs_jwt_on_the_route() {
        let text = MINIMAL.replace(
            "{ builtin: echo }",
            "{ builtin: echo, sticky: { key: \"claim:sub\" } }",
        );
        assert_one_error(
            &text,
            "routes[0].upstream",
            8,
            15,
            "needs a validated token",
        );
    }

    #[test]
    fn balance_and_health_check_ranges_are_checked() {
        let cases = [
            (
                "balance: { bounded_load: 0.5 }",
                "upstreams.echo.balance.bounded_load",
            ),
            (
                "balance: { bounded_load: .nan }",
                "upstreams.echo.balance.bounded_load",
            ),
            (
                "health_check: { interval: 0s }",
                "upstreams.echo.health_check.interval",
            ),
            (
                "health_check: { interval: 1s, timeout: 2s }",
                "upstreams.echo.health_check.timeout",
            ),
            (
                "health_check: { path: health }",
                "upstreams.echo.health_check.path",
            ),
            (
                "health_check: { path: \"/he alth\" }",
                "upstreams.echo.health_check.path",
            ),
            (
                "health_check: { unhealthy_after: 0 }",
                "upstreams.echo.health_check.unhealthy_after",
            ),
            (
                "health_check: { healthy_after: 101 }",
                "upstreams.echo.health_check.healthy_after",
            ),
        ];
        for (extra, path) in cases {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ builtin: echo, {extra} }}"),
            );
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{extra}: {errors:#?}");
            assert_eq!(errors[0].path, path, "{extra}");
            assert!(errors[0].line > 0, "{}", errors[0]);
        }
        // `balance: {}` is plain rendezvous.
        let text = MINIMAL.replace("{ builtin: echo }", "{ builtin: echo, balance: {} }");
        assert_eq!(load(&text).unwrap().upstreams["echo"].bounded_load, None);
    }

    #[test]
    fn a_backend_listed_twice_is_refused() {
        let text = MINIMAL.replace(
            "{ builtin: echo }",
            "{ backends: [{ addr: \"a:1\" }, { addr: \"a:1\" }] }",
        );
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].path, "upstreams.echo.backends[1].addr");
        assert!(errors[0].message.contains("already backends[0]"));
    }

    #[test]
    fn max_connections_in_a_route_is_refused_as_process_wide() {
        let text = MINIMAL.replace(
            "    upstream: echo",
            "    upstream: echo\n    limits: { max_connections: 5 }",
        );
        assert_one_error(
            &text,
            "routes[0].limits.max_connections",
            9,
            32,
            "process-wide",
        );
    }

    #[test]
    fn message_size_below_frame_size_is_refused() {
        assert_one_error(
            &with("limits: { max_frame_size: 8MiB }\n"),
            "limits.max_frame_size",
            9,
            27,
            "max_message_size (4MiB) must be at least max_frame_size (8MiB)",
        );
        let errors = errors_of(&with("limits: { max_frame_size: 100 }\n"));
        assert!(errors[0].message.contains("125B"), "{}", errors[0]);
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let errors = errors_of(&MINIMAL.replace(
            "{ builtin: echo }",
            "{ builtin: echo, connect_timeout: 0s }",
        ));
        assert_eq!(errors[0].path, "upstreams.echo.connect_timeout");
        assert!(errors[0].message.contains("greater than 0s"));
        assert_eq!(
            errors_of(&with("limits: { handshake_timeout: 0ms }\n"))[0].path,
            "limits.handshake_timeout"
        );
        assert_eq!(
            errors_of(&with("limits: { max_connections: 0 }\n"))[0].path,
            "limits.max_connections"
        );
    }

    #[test]
    fn duplicate_listener_names_and_binds_are_refused() {
        let text = MINIMAL.replace(
            "  - bind: 127.0.0.1:8080\n",
            "  - { name: a, bind: 127.0.0.1:8080 }\n  - { name: a, bind: 127.0.0.1:8081 }\n  - { name: b, bind: 127.0.0.1:8080 }\n",
        );
        let errors = errors_of(&text);
        let got: Vec<(&str, usize)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [("listeners[1].name", 3), ("listeners[2].bind", 4)],
            "{errors:#?}"
        );
    }

    #[test]
    fn duplicate_route_names_and_shadowed_routes_are_refused() {
        let text = with("  - { name: echo, match: { path_prefix: /echo }, upstream: echo }\n");
        let errors = errors_of(&text);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["routes[1].name", "routes[1].match"]);
    }

    #[test]
    fn at_least_one_listener_and_route_are_required() {
        let errors = errors_of("upstreams: { echo: { builtin: echo } }\n");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["listeners", "routes"]);
        assert!(errors.iter().all(|e| e.line == 1 && e.column == 1));
        assert_eq!(errors_of("").len(), 2);
    }

    #[test]
    fn upstream_needs_exactly_one_of_backends_and_builtin() {
        let both = MINIMAL.replace(
            "{ builtin: echo }",
            "{ builtin: echo, backends: [{ addr: \"a:1\" }] }",
        );
        assert!(errors_of(&both)[0].message.contains("not both"));
        let neither = MINIMAL.replace("{ builtin: echo }", "{ connect_timeout: 1s }");
        assert_eq!(errors_of(&neither)[0].path, "upstreams.echo");
        let empty = MINIMAL.replace("{ builtin: echo }", "{ backends: [] }");
        assert_eq!(errors_of(&empty)[0].path, "upstreams.echo.backends");
        let unknown = MINIMAL.replace("{ builtin: echo }", "{ builtin: chat }");
        assert!(
            errors_of(&unknown)[0]
                .message
                .contains("the only builtin is `echo`")
        );
        // A route naming an invalid-but-defined upstream reports only the upstream's error.
        assert_eq!(errors_of(&unknown).len(), 1);
    }

    #[test]
    fn backend_addresses_and_weights_are_checked() {
        for bad in [
            "nohost",
            ":80",
            "h:0",
            "h:65536",
            "::1:80",
            "[::1:80",
            "h:x",
            "http://h:80",
        ] {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ backends: [{{ addr: \"{bad}\" }}] }}"),
            );
            assert_eq!(
                errors_of(&text)[0].path,
                "upstreams.echo.backends[0].addr",
                "{bad}"
            );
        }
        for good in [
            "h:80",
            "[::1]:9001",
            "chat-2.internal:9001",
            "10.0.0.1:65535",
        ] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        let zero = MINIMAL.replace(
            "{ builtin: echo }",
            "{ backends: [{ addr: \"h:1\", weight: 0 }] }",
        );
        assert_eq!(
            errors_of(&zero)[0].path,
            "upstreams.echo.backends[0].weight"
        );
    }

    #[test]
    fn route_paths_hosts_and_subprotocols_are_checked() {
        let cases = [
            (
                "path_prefix: /echo",
                "path_prefix: echo",
                "routes[0].match.path_prefix",
            ),
            (
                "path_prefix: /echo",
                "path_prefix: /echo, host: \"a.com:443\"",
                "routes[0].match.host",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    upstream_path: ws",
                "routes[0].upstream_path",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    upstream_path: \"/a b\"",
                "routes[0].upstream_path",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    upstream_path: \"/ws#x\"",
                "routes[0].upstream_path",
            ),
            (
                "path_prefix: /echo",
                "path_prefix: \"/echo?a=1\"",
                "routes[0].match.path_prefix",
            ),
            (
                "path_prefix: /echo",
                "path_prefix: \"/ec\\tho\"",
                "routes[0].match.path_prefix",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    subprotocols: [ok, \"not ok\"]",
                "routes[0].subprotocols[1]",
            ),
        ];
        for (from, to, path) in cases {
            let errors = errors_of(&MINIMAL.replace(from, to));
            assert_eq!(errors.len(), 1, "{to}: {errors:#?}");
            assert_eq!(errors[0].path, path);
        }
        let ok = MINIMAL.replace(
            "    upstream: echo",
            "    upstream: echo\n    subprotocols: [graphql-ws, v1.chat]\n    upstream_path: /ws",
        );
        let config = load(&ok).unwrap();
        assert_eq!(
            config.routes[0].subprotocols.as_deref(),
            Some(&["graphql-ws".to_string(), "v1.chat".to_string()][..])
        );
        assert_eq!(config.routes[0].upstream_path.as_deref(), Some("/ws"));
    }

    /// SPEC §2: `${NAME}` works in every value, numbers and booleans written as strings
    /// included; a bad one is reported by its template, never by the value.
    #[test]
    fn numbers_and_booleans_may_come_from_the_environment() {
        let env = |name: &str| match name {
            "CONNS" => Some("7".to_string()),
            "PROXY" => Some(" true ".to_string()),
            "LOAD" => Some("1.5".to_string()),
            "SECRET" => Some("hunter2".to_string()),
            _ => None,
        };
        let text = MINIMAL
            .replace(
                "  - bind: 127.0.0.1:8080",
                "  - { bind: 127.0.0.1:8080, proxy_protocol: \"${PROXY}\" }",
            )
            .replace(
                "echo: { builtin: echo }",
                "echo: { backends: [{ addr: \"a:1\", weight: \"${CONNS}\" }], balance: { bounded_load: \"${LOAD}\" } }",
            )
            + "limits: { max_connections: \"${CONNS}\", messages: { rate: \"${CONNS}\", per: 1s } }\n";
        let config = Config::from_yaml_str_with_env(&text, "test.yaml", &env)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.limits.max_connections, 7);
        assert_eq!(config.limits.messages.rate.get(), 7);
        assert!(config.listeners[0].proxy_protocol);
        assert_eq!(config.upstreams["echo"].bounded_load, Some(1.5));
        for bad in [
            with("limits: { max_connections: \"${SECRET}\" }\n"),
            with("limits: { max_connections_per_ip: \"-${CONNS}\" }\n"),
            MINIMAL.replace(
                "  - bind: 127.0.0.1:8080",
                "  - { bind: 127.0.0.1:8080, proxy_protocol: \"${SECRET}\" }",
            ),
        ] {
            let shown = Config::from_yaml_str_with_env(&bad, "test.yaml", &env)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(shown.contains("(from the environment) is not"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        let plain = errors_of(&with("limits: { max_connections: 1.5 }\n"));
        assert_eq!(plain[0].path, "limits.max_connections");
    }

    #[test]
    fn env_substituted_values_are_never_echoed() {
        let cases = [
            MINIMAL.replace("bind: 127.0.0.1:8080", "bind: \"${SECRET}\""),
            with("limits: { send_timeout: \"${SECRET}\" }\n"),
            with("limits: { buffer_size: \"${SECRET}\" }\n"),
            MINIMAL.replace("    upstream: echo", "    upstream: \"${SECRET}\""),
            MINIMAL.replace("path_prefix: /echo", "path_prefix: \"${SECRET}\""),
            with("log: { format: \"${SECRET}\" }\n"),
            with("trusted_proxies: [10.0.0.0/8, \"${SECRET}\"]\n"),
            MINIMAL.replace(
                "echo: { builtin: echo }",
                "echo: { backends: [{ addr: \"a:1\" }], tls: { sni: \"${SECRET} y\" } }",
            ),
        ];
        for text in cases {
            let shown = load(&text).unwrap_err().to_string();
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("${SECRET}"), "{shown}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*") {
            let _ = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None);
        }

        #[test]
        fn yaml_shaped_text_never_panics(text in "[a-z_:{}\\[\\],\\-\n #$\"'0-9./&*!]{0,200}") {
            let _ = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None);
        }

        #[test]
        fn mutated_valid_config_never_panics(cut in 0usize..200, insert in "[a-z:{}\\[\\] \n$0-9-]{0,6}") {
            let mut text = MINIMAL.to_string();
            let at = cut.min(text.len());
            text.insert_str(at, &insert);
            let _ = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None);
        }

        #[test]
        fn errors_always_carry_a_position(text in "[a-z_:{}\\[\\]\\-\n 0-9]{1,120}") {
            if let Err(errors) = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None) {
                for e in errors.0 {
                    prop_assert!(e.line > 0 && e.column > 0, "{}", e);
                }
            }
        }
    }
}
