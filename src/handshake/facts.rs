//! What the access log says about a connection (SPEC §6): the request's facts as they are
//! learnt during the handshake ([`Facts`]), and the frozen copy a relayed connection keeps
//! for its `ws_close` line ([`LogFacts`]).

use std::sync::Arc;

use http::header;
use http::request;
use tokio::time::Instant;

use crate::admission::client_ip::ip_text;
use crate::observe::access_log::TlsInfo;
use crate::observe::access_log::{Record, now_rfc3339};
use crate::shared::Shared;
use crate::upstream::sticky;

/// Who a connection is, for its log lines: fixed at accept.
pub(super) struct ConnInfo {
    pub(super) shared: Arc<Shared>,
    pub(super) listener: Arc<str>,
    pub(super) conn_id: String,
    /// The TCP peer, or the client a PROXY header named.
    pub(super) peer: std::net::SocketAddr,
    pub(super) started: Instant,
    pub(super) tls: Option<TlsInfo>,
    /// The client's HTTP version as the log writes it: `"1.1"` or `"2"`.
    pub(super) http: &'static str,
}

/// What the access log says about a request, gathered as it is decided.
#[derive(Default)]
pub struct Facts {
    pub host: Option<String>,
    /// Path and query, token query values redacted once the route is known.
    pub path: Option<String>,
    pub origin: Option<String>,
    /// How many `Origin` headers the request carried (an `origin` refusal's hint tells
    /// two apart from one that is not text).
    pub origin_headers: usize,
    pub user_agent: Option<String>,
    pub route: Option<String>,
    /// The real client (PROXY header or trusted `X-Forwarded-For`), when not the peer.
    pub client_ip: Option<std::net::IpAddr>,
    /// The token's `sub` claim.
    pub subject: Option<String>,
    /// The client's own `X-Request-Id`, when syntactically valid.
    pub request_id: Option<String>,
    /// The route's upstream name.
    pub upstream: Option<String>,
    /// The sticky key's kind and whether it fell back to the client IP.
    pub sticky: Option<sticky::KeyLog>,
}

impl Facts {
    pub fn from_parts(parts: &request::Parts) -> Facts {
        let text = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Facts {
            host: text(header::HOST),
            origin: text(header::ORIGIN),
            origin_headers: parts.headers.get_all(header::ORIGIN).iter().count(),
            user_agent: text(header::USER_AGENT),
            // The query is left out until the route says which of its values are secret.
            path: Some(parts.uri.path().to_owned()),
            ..Facts::default()
        }
    }

    /// Names the route and logs the path with the query, the values of `secret_names`
    /// redacted: every query name any route reads a token or API key from, since a client
    /// may send its token to a route that does not read it.
    pub(super) fn route_known(
        &mut self,
        route: &crate::config::Route,
        uri: &http::Uri,
        secret_names: &[String],
    ) {
        self.route = Some(route.name.clone());
        self.upstream = Some(route.upstream.name.clone());
        if let Some(full) = uri.path_and_query() {
            let path = crate::http_util::redact_query(full.as_str(), secret_names);
            self.path = Some(path.into_owned());
        }
    }
}

/// The strings of a `ws_close` line, in [`LogFacts::text`] order.
#[derive(Clone, Copy)]
enum Text {
    ConnId,
    RequestId,
    Route,
    Host,
    Path,
    Origin,
    UserAgent,
    Subject,
    Backend,
}

const TEXTS: usize = Text::Backend as usize + 1;

/// What a relayed connection's `ws_close` line needs, frozen at the upgrade (the request,
/// the connection, the backend). Every string sits in one allocation: an idle connection
/// would otherwise keep a dozen small ones, each rounded up by the allocator, plus the
/// handshake's whole [`Conn`].
pub(super) struct LogFacts {
    pub(super) shared: Arc<Shared>,
    listener: Arc<str>,
    /// The [`Text`] strings, back to back.
    text: Box<str>,
    /// Where each [`Text`] string ends in `text`.
    ends: [u32; TEXTS],
    /// Bit `i` set: [`Text`] `i` is present (an absent one is empty).
    present: u16,
    client_ip: std::net::IpAddr,
    client_port: u16,
    started: Instant,
    tls: Option<Box<TlsInfo>>,
    sticky: Option<sticky::KeyLog>,
    http: &'static str,
}

impl LogFacts {
    pub(super) fn new(conn: &ConnInfo, info: &Facts, backend: &str) -> LogFacts {
        let texts: [Option<&str>; TEXTS] = [
            Some(&conn.conn_id),
            info.request_id.as_deref(),
            info.route.as_deref(),
            info.host.as_deref(),
            info.path.as_deref(),
            info.origin.as_deref(),
            info.user_agent.as_deref(),
            info.subject.as_deref(),
            Some(backend),
        ];
        let mut text = String::with_capacity(texts.iter().flatten().map(|t| t.len()).sum());
        let mut ends = [0; TEXTS];
        let mut present = 0;
        for (i, t) in texts.iter().enumerate() {
            if let Some(t) = t {
                text.push_str(t);
                present |= 1 << i;
            }
            // Request heads are at most MAX_HEAD bytes and names come from the config.
            ends[i] = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        LogFacts {
            shared: conn.shared.clone(),
            listener: conn.listener.clone(),
            text: text.into_boxed_str(),
            ends,
            present,
            client_ip: info.client_ip.unwrap_or(conn.peer.ip()),
            client_port: conn.peer.port(),
            started: conn.started,
            tls: conn.tls.clone().map(Box::new),
            sticky: info.sticky,
            http: conn.http,
        }
    }

    fn get(&self, t: Text) -> Option<&str> {
        let i = t as usize;
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize)
    }

    pub(super) fn record(&self, event: &'static str, status: u16) -> Record<'_> {
        Record {
            ts: now_rfc3339(),
            event,
            conn_id: self.get(Text::ConnId),
            request_id: self.get(Text::RequestId),
            listener: &self.listener,
            route: self.get(Text::Route),
            client_ip: ip_text(self.client_ip),
            client_port: self.client_port,
            tls: self.tls.as_deref(),
            host: self.get(Text::Host),
            path: self.get(Text::Path),
            origin: self.get(Text::Origin),
            user_agent: self.get(Text::UserAgent),
            subject: self.get(Text::Subject),
            upstream: self.get(Text::Backend),
            status,
            duration_ms: self.started.elapsed().as_millis() as u64,
            sticky: self.sticky,
            http: Some(self.http),
            ..Record::default()
        }
    }
}

/// A client's `X-Request-Id`, kept for the log when it is short and plain (the proxy's own
/// id still goes upstream): at most 128 bytes of letters, digits and `-_.:/+=`.
pub(super) fn request_id(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get("x-request-id")?.to_str().ok()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.:/+=".contains(c);
    (!v.is_empty() && v.len() <= 128 && v.chars().all(plain)).then(|| v.to_owned())
}
