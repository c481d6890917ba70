//! Turns the file form into the typed [`Config`]: applies defaults, checks ranges, names
//! and cross references, and refuses keys of features not built yet. Collects every
//! problem (not just the first) as an [`Issue`] with a key path; positions are added by
//! the caller. Never sees YAML text.
//!
//! This module holds the entry point, [`Issue`] and the checks every section shares; each
//! section of the file has its own submodule (`listeners`, `limits`, `auth`, `tls`,
//! `upstreams`, `routes`).

mod auth;
mod cluster;
mod headers;
mod limits;
mod listeners;
mod routes;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod tls;
mod upstreams;

pub use limits::{MAX_BUFFER_SIZE, MIN_BUFFER_SIZE, MIN_FRAME_SIZE};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::file::{
    DEFAULT_BUFFER_SIZE, DEFAULT_FRAGMENT_TIMEOUT, DEFAULT_HANDSHAKE_BURST, DEFAULT_HANDSHAKE_PER,
    DEFAULT_HANDSHAKE_RATE, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HTTP_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MAX_FRAGMENTS,
    DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_PENDING_HANDSHAKES,
    DEFAULT_MAX_REQUEST_BODY, DEFAULT_MESSAGE_BURST, DEFAULT_MESSAGE_PER, DEFAULT_MESSAGE_RATE,
    DEFAULT_SEND_TIMEOUT, FileConfig,
};
use super::files::ReadFile;
use super::units::{DurationValue, Text, fmt_duration};
use super::{Admin, AdminToken, Config, KeyPath, Limits, MessageRate, OnExceed, Segment};
use crate::admission::client_ip::TrustedProxies;
use crate::admission::ip_limit::RatePolicy;

/// Shortest `admin.token` taken without a warning (`--check`, start-up).
const MIN_ADMIN_TOKEN: usize = 16;

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

/// One problem, at a key path of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: KeyPath,
    pub message: String,
}

/// Validates `file`, returning the typed config or every problem found. Files the config
/// names are read only through `read`, so the result depends on nothing else.
pub fn validate(file: FileConfig, read: &ReadFile<'_>) -> Result<Config, Vec<Issue>> {
    let mut v = Validator {
        issues: Vec::new(),
        warnings: Vec::new(),
        read,
        jwks_urls: Vec::new(),
    };
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
        let token = admin.token.as_ref().and_then(|t| {
            let path = root.key("admin").key("token");
            let value = t.value.trim();
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                v.issue(
                    &path,
                    format!(
                        "{} must be a non-empty token without spaces (it is sent as `Authorization: Bearer <token>`); remove `token` to serve state-changing endpoints on loopback only",
                        t.shown()
                    ),
                );
                return None;
            }
            let length = value.chars().count();
            if length < MIN_ADMIN_TOKEN {
                v.warnings.push(format!(
                    "admin.token is {length} characters long: a short token can be guessed; use at least {MIN_ADMIN_TOKEN} random ones (e.g. `openssl rand -hex 32`)"
                ));
            }
            Some(AdminToken::new(value))
        });
        let admin = Admin { bind, token };
        if !admin.changes_allowed() {
            v.warnings.push(format!(
                "admin.bind {bind} is not a loopback address and admin.token is not set: \
                 drain, undrain, /connections/close and /revoke will be refused (403); \
                 set admin.token (e.g. \"${{WSGATE_ADMIN_TOKEN}}\") or bind admin to 127.0.0.1"
            ));
        }
        Some(admin)
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
    if trusted_proxies.is_empty() {
        for (i, l) in listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| l.proxy_protocol)
        {
            v.warnings.push(format!(
                "listeners[{i}].proxy_protocol: trusted_proxies is empty, so a PROXY header is believed from any peer (anyone reaching {} can claim any client address); list the load balancers' addresses in trusted_proxies",
                l.bind
            ));
        }
    }
    let configured_strip = v.strip_headers(file.strip_headers, &root.key("strip_headers"));
    let keepalive = v.keepalive(file.keepalive, &root.key("keepalive"));

    let defaults = Limits {
        max_connections: DEFAULT_MAX_CONNECTIONS,
        max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
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
        max_fragments: DEFAULT_MAX_FRAGMENTS,
        fragment_timeout: DEFAULT_FRAGMENT_TIMEOUT,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
        max_connection_age: Duration::ZERO,
        max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
        max_connections_per_subject: 0,
        ipv6_prefix: crate::admission::client_ip::DEFAULT_V6_PREFIX,
        max_request_body: DEFAULT_MAX_REQUEST_BODY,
        http_timeout: DEFAULT_HTTP_TIMEOUT,
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

    let cluster = v.cluster(file.cluster, &root.key("cluster"));
    let strip_headers = headers::removed_headers(configured_strip, &routes);
    let secret_query_names = headers::secret_query_names(&routes);

    if v.issues.is_empty() {
        Ok(Config {
            listeners,
            admin,
            log,
            drain,
            limits,
            keepalive,
            trusted_proxies,
            strip_headers,
            secret_query_names,
            warnings: v.warnings,
            jwks_urls: v.jwks_urls,
            upstreams,
            routes,
            cluster,
        })
    } else {
        Err(v.issues)
    }
}

struct Validator<'a> {
    issues: Vec<Issue>,
    warnings: Vec<String>,
    /// The only way to a file's contents (certificates, keys, JWKS, API keys).
    read: &'a ReadFile<'a>,
    /// Distinct `jwks_url` sources so far: routes naming the same one share it.
    jwks_urls: Vec<Arc<crate::admission::token::RemoteKeys>>,
}

impl Validator<'_> {
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
                let scheme = if text.value.contains("://") {
                    "an address is IP:port, without a scheme or path; "
                } else {
                    ""
                };
                self.issue(
                    path,
                    format!(
                        "{} is not an IP:port address; {scheme}write e.g. `0.0.0.0:8080` or `[::1]:9090` (host names are not resolved here)",
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
}

fn last_key(path: &KeyPath) -> String {
    match path.0.last() {
        Some(Segment::Key(key)) => key.clone(),
        _ => path.to_string(),
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
