//! The outcome vocabulary (SPEC §3, §5, §6): how a handshake is refused and how a relayed
//! connection ends. Every stage speaks it and none is imported here, so the status of a
//! refusal, the close code each side gets and the words the log and metrics use are decided
//! in this one file:
//! - [`Refusal`]: a refused handshake, with its status, body, headers and reason word;
//! - [`By`]: who closed a connection;
//! - [`Ending`]: why the proxy ended a connection, with [`Ending::to_client`] and
//!   [`Ending::to_upstream`] following SPEC §5 row by row, and its [`ProxyReason`].

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

/// Why a handshake was refused. The reason word is the same in the body, the access log
/// and the metric label (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a well-formed upgrade (method, version, headers, path), or a head that could not
    /// be parsed.
    #[error("bad upgrade request")]
    BadUpgrade,
    /// A request head over the proxy's bound: 431, logged as `bad_upgrade`.
    #[error("request head too large")]
    HeadTooLarge,
    #[error("unsupported WebSocket version")]
    BadVersion,
    /// Plain HTTP to a WebSocket route.
    #[error("upgrade required")]
    UpgradeRequired,
    #[error("no route")]
    NoRoute,
    #[error("subprotocol not allowed")]
    Subprotocol,
    /// Whole-process connection cap reached.
    #[error("process connection cap reached")]
    Capacity,
    /// Shutting down (SPEC §8).
    #[error("draining")]
    Draining,
    /// Every backend of the upstream is down or draining (or none resolved).
    #[error("no backend")]
    NoBackend,
    /// Waited for a place in a backend's `max_pending` queue past `queue_timeout`; retry
    /// after this many seconds (jittered, so the refused do not come back in step).
    #[error("queued past queue_timeout, retry after {retry_after_secs}s")]
    QueueTimeout { retry_after_secs: u64 },
    #[error("upstream connect failed")]
    UpstreamConnect,
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The upstream answered with this status instead of 101; its response is relayed.
    #[error("upstream answered {0}")]
    UpstreamStatus(u16),
    /// The head did not arrive within `handshake_timeout`.
    #[error("handshake timeout")]
    HandshakeTimeout,
    /// `Origin` not in the route's allowlist, or missing when required.
    #[error("origin not allowed")]
    Origin,
    /// Token or API key missing, invalid, expired or with mismatching claims. `error` is a
    /// fixed word for the operational log (`missing`, `expired`, …); never the token.
    #[error("token refused: {error}")]
    Token { error: &'static str },
    /// Per-IP concurrent connection cap reached.
    #[error("per-IP connection cap reached")]
    IpCap,
    /// Per-IP handshake rate exceeded; retry after this many seconds.
    #[error("per-IP handshake rate exceeded, retry after {retry_after_secs}s")]
    IpRate { retry_after_secs: u64 },
    /// Per-subject concurrent connection cap reached (`max_connections_per_subject`).
    #[error("per-subject connection cap reached")]
    SubjectCap,
    /// The token's subject or id was revoked through the admin API (SPEC §7).
    #[error("subject or token revoked")]
    Revoked,
    /// A plain HTTP request's body over `max_request_body` (`http: proxy` routes): 413.
    #[error("request body too large")]
    BodyTooLarge,
    /// The fleet store (SPEC §10) is unusable and `cluster.on_unavailable` is `refuse`.
    #[error("fleet store unavailable")]
    Cluster,
}

impl Refusal {
    /// The HTTP status of the refusal (SPEC §3).
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadUpgrade | Refusal::Subprotocol => StatusCode::BAD_REQUEST,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::BadVersion | Refusal::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::Capacity
            | Refusal::Draining
            | Refusal::NoBackend
            | Refusal::Cluster
            | Refusal::QueueTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamConnect => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::UpstreamStatus(s) => {
                StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            Refusal::HandshakeTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Origin | Refusal::Revoked => StatusCode::FORBIDDEN,
            Refusal::Token { .. } => StatusCode::UNAUTHORIZED,
            Refusal::IpCap | Refusal::IpRate { .. } | Refusal::SubjectCap => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// The SPEC §3 reason word: body, access log `proxy_reason` and metric label.
    pub fn reason(self) -> &'static str {
        self.body().trim_end()
    }

    /// The one-word plain-text body: the reason word and a newline.
    fn body(self) -> &'static str {
        match self {
            Refusal::BadUpgrade | Refusal::HeadTooLarge => "bad_upgrade\n",
            Refusal::BadVersion => "bad_version\n",
            Refusal::UpgradeRequired => "upgrade_required\n",
            Refusal::NoRoute => "no_route\n",
            Refusal::Subprotocol => "subprotocol\n",
            Refusal::Capacity => "capacity\n",
            Refusal::Draining => "draining\n",
            Refusal::NoBackend => "no_backend\n",
            Refusal::QueueTimeout { .. } => "queue_timeout\n",
            Refusal::UpstreamConnect => "upstream_connect\n",
            Refusal::UpstreamTimeout => "upstream_timeout\n",
            Refusal::UpstreamStatus(_) => "upstream_status\n",
            Refusal::HandshakeTimeout => "handshake_timeout\n",
            Refusal::Origin => "origin\n",
            Refusal::Token { .. } => "token\n",
            Refusal::IpCap => "ip_cap\n",
            Refusal::IpRate { .. } => "ip_rate\n",
            Refusal::SubjectCap => "subject_cap\n",
            Refusal::Revoked => "revoked\n",
            Refusal::BodyTooLarge => "body_too_large\n",
            Refusal::Cluster => "cluster\n",
        }
    }

    /// The header this refusal carries beyond the common ones, if any: the version a
    /// server speaks (RFC 6455 §4.4), the protocol to upgrade to (RFC 9110 §15.5.22),
    /// `WWW-Authenticate` (RFC 6750 §3) and `Retry-After` (RFC 9110 §10.2.3).
    pub fn extra_header(self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            Refusal::BadVersion => Some((
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            )),
            Refusal::UpgradeRequired => {
                Some((header::UPGRADE, HeaderValue::from_static("websocket")))
            }
            Refusal::Token { .. } => Some((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            )),
            Refusal::IpRate { retry_after_secs } | Refusal::QueueTimeout { retry_after_secs } => {
                Some((
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs.max(1)),
                ))
            }
            _ => None,
        }
    }

    /// The proxy's own refusal: the status, the one-word body, `Connection: close` and the
    /// [`extra_header`](Self::extra_header). Never echoes request data.
    pub fn response<B: From<&'static str>>(self) -> Response<B> {
        self.respond(B::from(self.body()))
    }

    /// [`Self::response`] with a second line saying what to change, e.g. `origin` then
    /// `origin not allowed: https://x (allowed: ...)`. The reason word stays the first
    /// line; the caller keeps secrets (tokens, query values) out of `hint`.
    pub fn response_with_hint<B: From<String>>(self, hint: &str) -> Response<B> {
        let hint: String = hint
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_HINT)
            .collect();
        self.respond(B::from(format!("{}{hint}\n", self.body())))
    }

    fn respond<B>(self, body: B) -> Response<B> {
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if let Some((name, value)) = self.extra_header() {
            h.insert(name, value);
        }
        resp
    }

    /// The same answer as bytes on the wire, for a request the HTTP server never handed
    /// over (a head that did not parse, was too large, or never finished).
    pub fn raw_response(self) -> Vec<u8> {
        let status = self.status();
        let body = self.body();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        if let Some((name, value)) = self.extra_header() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        out
    }
}

/// Characters of a refusal's hint line at most (it may quote a client's `Origin` or host).
const MAX_HINT: usize = 600;

/// Who ended a connection (SPEC §6 `close.by`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Client,
    Upstream,
    Proxy,
}

impl By {
    pub fn as_str(self) -> &'static str {
        match self {
            By::Client => "client",
            By::Upstream => "upstream",
            By::Proxy => "proxy",
        }
    }
}

/// A relayed connection's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// What a peer broke (SPEC §4), which decides its close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breach {
    /// RFC 6455 framing rules.
    Protocol,
    /// A text message or close reason that is not UTF-8.
    InvalidUtf8,
    /// A frame or message over the configured size limit.
    TooBig,
}

/// Why the proxy ended a relayed connection: one value per row of SPEC §5 that the proxy
/// emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client broke a rule.
    ClientViolation(Breach),
    /// A fragmented message was not finished within `fragment_timeout`.
    FragmentTimeout,
    /// The message rate was exceeded with `on_exceed: close`.
    RateLimit,
    /// A client's fragmented message had more frames than `max_fragments`.
    TooManyFragments,
    /// The token expired mid-connection (`close_on_expiry`).
    TokenExpired,
    /// The connection reached its `max_connection_age` (jittered).
    MaxAge,
    /// No pong within `pong_timeout`: that side's TCP is closed, no frame possible.
    DeadPeer(Side),
    /// No data frame either way for `idle_timeout`.
    Idle,
    /// That side's TCP closed without a close frame.
    Vanished(Side),
    /// The upstream broke a rule.
    UpstreamViolation(Breach),
    /// Shutdown, or a reload that removed the route.
    Drain,
    /// A write to that side stalled past `send_timeout`: it is cut off.
    SlowConsumer(Side),
    /// Closed through the admin API (`/connections/close`, `/revoke`): `code` to the
    /// client (4003 unless the request named another), 1001 to the upstream.
    Revoked { code: u16 },
    /// The relay failed or panicked.
    Internal,
}

/// A close frame's code and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: &'static str,
}

/// Close codes that are facts of the wire rather than choices (RFC 6455 §7.4.1).
pub mod code {
    /// A normal closure; also what a close without a status is answered with.
    pub const NORMAL: u16 = 1000;
    /// A close frame without a status code (never sent on the wire).
    pub const NO_STATUS: u16 = 1005;
    /// The connection closed without a close frame (never sent on the wire).
    pub const ABNORMAL: u16 = 1006;
}

impl CloseFrame {
    /// 1011 both ways (SPEC §5 "internal error").
    pub const INTERNAL: CloseFrame = CloseFrame {
        code: 1011,
        reason: "internal error",
    };
}

const fn close(code: u16, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame { code, reason })
}

impl Ending {
    /// The client's close code of an admin close unless the request names another (SPEC
    /// §5: 4003 `revoked`).
    pub const REVOKED_CODE: u16 = 4003;
    /// An admin close with the default code.
    pub const REVOKED: Ending = Ending::Revoked {
        code: Ending::REVOKED_CODE,
    };

    /// What the client is sent (SPEC §5 "to client"); `None`: its TCP is closed, or gone.
    pub fn to_client(self) -> Option<CloseFrame> {
        match self {
            Ending::ClientViolation(Breach::Protocol) => close(1002, "protocol error"),
            Ending::ClientViolation(Breach::InvalidUtf8) => close(1007, "invalid UTF-8"),
            Ending::ClientViolation(Breach::TooBig) => close(1009, "message too big"),
            Ending::FragmentTimeout => close(1008, "fragment timeout"),
            Ending::RateLimit => close(1008, "rate limit"),
            Ending::TooManyFragments => close(1008, "too many fragments"),
            Ending::TokenExpired => close(4001, "token expired"),
            Ending::MaxAge => close(1001, "max age"),
            Ending::Idle => close(1000, "idle"),
            Ending::UpstreamViolation(_) => close(1014, "upstream error"),
            Ending::Vanished(Side::Upstream) | Ending::DeadPeer(Side::Upstream) => close(1014, ""),
            Ending::SlowConsumer(Side::Upstream) => close(1014, ""),
            Ending::Drain => close(1012, "service restart"),
            Ending::Revoked { code } => close(code, "revoked"),
            Ending::Internal => Some(CloseFrame::INTERNAL),
            Ending::DeadPeer(Side::Client)
            | Ending::Vanished(Side::Client)
            | Ending::SlowConsumer(Side::Client) => None,
        }
    }

    /// What the upstream is sent (SPEC §5 "to upstream"); `None`: its TCP is closed, or
    /// gone.
    pub fn to_upstream(self) -> Option<CloseFrame> {
        match self {
            Ending::ClientViolation(_)
            | Ending::FragmentTimeout
            | Ending::RateLimit
            | Ending::TooManyFragments
            | Ending::TokenExpired
            | Ending::MaxAge
            | Ending::Drain
            | Ending::Revoked { .. }
            | Ending::DeadPeer(Side::Client)
            | Ending::Vanished(Side::Client)
            | Ending::SlowConsumer(Side::Client) => close(1001, ""),
            Ending::Idle => close(1000, "idle"),
            Ending::UpstreamViolation(Breach::TooBig) => close(1009, ""),
            Ending::UpstreamViolation(_) => close(1002, ""),
            Ending::Internal => Some(CloseFrame::INTERNAL),
            Ending::DeadPeer(Side::Upstream)
            | Ending::Vanished(Side::Upstream)
            | Ending::SlowConsumer(Side::Upstream) => None,
        }
    }

    /// The access log's `proxy_reason` (SPEC §6); `None` when a peer ended it.
    pub fn proxy_reason(self) -> Option<ProxyReason> {
        Some(match self {
            Ending::ClientViolation(b) | Ending::UpstreamViolation(b) => match b {
                Breach::TooBig => ProxyReason::TooBig,
                Breach::Protocol | Breach::InvalidUtf8 => ProxyReason::Protocol,
            },
            Ending::FragmentTimeout => ProxyReason::FragmentTimeout,
            Ending::RateLimit => ProxyReason::RateLimit,
            Ending::TooManyFragments => ProxyReason::Fragments,
            Ending::TokenExpired => ProxyReason::TokenExpired,
            Ending::MaxAge => ProxyReason::MaxAge,
            Ending::DeadPeer(_) => ProxyReason::DeadPeer,
            Ending::Idle => ProxyReason::Idle,
            Ending::Drain => ProxyReason::Drain,
            Ending::Revoked { .. } => ProxyReason::Revoked,
            Ending::SlowConsumer(_) => ProxyReason::SlowConsumer,
            Ending::Internal => ProxyReason::Internal,
            Ending::Vanished(_) => return None,
        })
    }
}

/// Why the proxy closed a relayed connection (SPEC §6 `proxy_reason` of a `ws_close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyReason {
    Protocol,
    TooBig,
    FragmentTimeout,
    RateLimit,
    /// Too many fragments (SPEC §6 `fragments`).
    Fragments,
    TokenExpired,
    DeadPeer,
    Idle,
    Drain,
    SlowConsumer,
    Internal,
    Revoked,
    MaxAge,
}

impl ProxyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyReason::Protocol => "protocol",
            ProxyReason::TooBig => "too_big",
            ProxyReason::FragmentTimeout => "fragment_timeout",
            ProxyReason::RateLimit => "rate_limit",
            ProxyReason::Fragments => "fragments",
            ProxyReason::TokenExpired => "token_expired",
            ProxyReason::DeadPeer => "dead_peer",
            ProxyReason::Idle => "idle",
            ProxyReason::Drain => "drain",
            ProxyReason::SlowConsumer => "slow_consumer",
            ProxyReason::Internal => "internal",
            ProxyReason::Revoked => "revoked",
            ProxyReason::MaxAge => "max_age",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reason_and_headers_follow_spec_table() {
        let cases = [
            (Refusal::Origin, 403, "origin", None),
            (
                Refusal::Token { error: "expired" },
                401,
                "token",
                Some(("www-authenticate", "Bearer error=\"invalid_token\"")),
            ),
            (Refusal::IpCap, 429, "ip_cap", None),
            (
                Refusal::IpRate {
                    retry_after_secs: 3,
                },
                429,
                "ip_rate",
                Some(("retry-after", "3")),
            ),
            (Refusal::Capacity, 503, "capacity", None),
            (Refusal::Cluster, 503, "cluster", None),
            (Refusal::BadUpgrade, 400, "bad_upgrade", None),
            (Refusal::HeadTooLarge, 431, "bad_upgrade", None),
            (
                Refusal::BadVersion,
                426,
                "bad_version",
                Some(("sec-websocket-version", "13")),
            ),
            (
                Refusal::UpgradeRequired,
                426,
                "upgrade_required",
                Some(("upgrade", "websocket")),
            ),
            (Refusal::NoRoute, 404, "no_route", None),
            (Refusal::Subprotocol, 400, "subprotocol", None),
            (Refusal::Draining, 503, "draining", None),
            (Refusal::NoBackend, 503, "no_backend", None),
            (
                Refusal::QueueTimeout {
                    retry_after_secs: 7,
                },
                503,
                "queue_timeout",
                Some(("retry-after", "7")),
            ),
            (Refusal::UpstreamConnect, 502, "upstream_connect", None),
            (Refusal::UpstreamTimeout, 504, "upstream_timeout", None),
            (Refusal::UpstreamStatus(418), 418, "upstream_status", None),
            (Refusal::HandshakeTimeout, 408, "handshake_timeout", None),
            (Refusal::SubjectCap, 429, "subject_cap", None),
            (Refusal::Revoked, 403, "revoked", None),
            (Refusal::BodyTooLarge, 413, "body_too_large", None),
        ];
        for (refusal, status, reason, extra) in cases {
            assert_eq!(refusal.status().as_u16(), status, "{refusal:?}");
            assert_eq!(refusal.reason(), reason);
            let got = refusal.extra_header();
            let got = got
                .as_ref()
                .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or("")));
            assert_eq!(got, extra, "{refusal:?}");
        }
    }

    #[test]
    fn token_refusal_display_never_holds_more_than_the_fixed_word() {
        let r = Refusal::Token { error: "expired" };
        assert_eq!(r.to_string(), "token refused: expired");
    }

    #[test]
    fn a_zero_retry_after_is_sent_as_one_second() {
        let r = Refusal::IpRate {
            retry_after_secs: 0,
        };
        let resp = r.response::<String>();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn raw_answers_match_the_served_ones() {
        let raw = |r: Refusal| String::from_utf8(r.raw_response()).unwrap_or_default();
        assert_eq!(
            raw(Refusal::BadUpgrade),
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad_upgrade\n"
        );
        assert_eq!(
            raw(Refusal::HeadTooLarge),
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nbad_upgrade\n"
        );
        assert_eq!(
            raw(Refusal::HandshakeTimeout),
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 18\r\nconnection: close\r\n\r\nhandshake_timeout\n"
        );
    }

    /// SPEC §5, row by row: (ending, to client, to upstream, proxy_reason).
    #[test]
    fn close_codes_follow_spec_section_5() {
        use Side::{Client, Upstream};
        let code = |c: Option<CloseFrame>| c.map(|c| (c.code, c.reason));
        type Close = Option<(u16, &'static str)>;
        let rows: [(Ending, Close, Close, Option<&str>); 20] = [
            (
                Ending::ClientViolation(Breach::Protocol),
                Some((1002, "protocol error")),
                Some((1001, "")),
                Some("protocol"),
            ),
            (
                Ending::ClientViolation(Breach::InvalidUtf8),
                Some((1007, "invalid UTF-8")),
                Some((1001, "")),
                Some("protocol"),
            ),
            (
                Ending::ClientViolation(Breach::TooBig),
                Some((1009, "message too big")),
                Some((1001, "")),
                Some("too_big"),
            ),
            (
                Ending::FragmentTimeout,
                Some((1008, "fragment timeout")),
                Some((1001, "")),
                Some("fragment_timeout"),
            ),
            (
                Ending::RateLimit,
                Some((1008, "rate limit")),
                Some((1001, "")),
                Some("rate_limit"),
            ),
            (
                Ending::TooManyFragments,
                Some((1008, "too many fragments")),
                Some((1001, "")),
                Some("fragments"),
            ),
            (
                Ending::TokenExpired,
                Some((4001, "token expired")),
                Some((1001, "")),
                Some("token_expired"),
            ),
            (
                Ending::DeadPeer(Client),
                None,
                Some((1001, "")),
                Some("dead_peer"),
            ),
            (
                Ending::DeadPeer(Upstream),
                Some((1014, "")),
                None,
                Some("dead_peer"),
            ),
            (
                Ending::Idle,
                Some((1000, "idle")),
                Some((1000, "idle")),
                Some("idle"),
            ),
            (Ending::Vanished(Client), None, Some((1001, "")), None),
            (
                Ending::UpstreamViolation(Breach::Protocol),
                Some((1014, "upstream error")),
                Some((1002, "")),
                Some("protocol"),
            ),
            (
                Ending::UpstreamViolation(Breach::InvalidUtf8),
                Some((1014, "upstream error")),
                Some((1002, "")),
                Some("protocol"),
            ),
            (
                Ending::UpstreamViolation(Breach::TooBig),
                Some((1014, "upstream error")),
                Some((1009, "")),
                Some("too_big"),
            ),
            (Ending::Vanished(Upstream), Some((1014, "")), None, None),
            (
                Ending::Drain,
                Some((1012, "service restart")),
                Some((1001, "")),
                Some("drain"),
            ),
            (
                Ending::Revoked { code: 4003 },
                Some((4003, "revoked")),
                Some((1001, "")),
                Some("revoked"),
            ),
            (
                Ending::SlowConsumer(Client),
                None,
                Some((1001, "")),
                Some("slow_consumer"),
            ),
            (
                Ending::SlowConsumer(Upstream),
                Some((1014, "")),
                None,
                Some("slow_consumer"),
            ),
            (
                Ending::Internal,
                Some((1011, "internal error")),
                Some((1011, "internal error")),
                Some("internal"),
            ),
        ];
        for (ending, client, upstream, reason) in rows {
            assert_eq!(code(ending.to_client()), client, "{ending:?} to client");
            assert_eq!(
                code(ending.to_upstream()),
                upstream,
                "{ending:?} to upstream"
            );
            assert_eq!(
                ending.proxy_reason().map(ProxyReason::as_str),
                reason,
                "{ending:?}"
            );
        }
    }
}
