//! Admission control: who gets in at the handshake (SPEC §2 `routes[].origins`,
//! `routes[].auth`, `limits`, `trusted_proxies`, `listeners[].proxy_protocol`; SPEC §3).
//!
//! Every file here holds **pure decisions, no I/O**: the caller reads bytes and headers,
//! these functions decide. That keeps each rule unit-tested and fuzzed without sockets, and
//! keeps this module free of any other wsgate module but the leaf [`crate::http_util`] (the
//! caller maps the config onto the small input types defined here).
//!
//! - [`origin`]: the `Origin` allowlist (exact and `*.` wildcard entries, `null`,
//!   `allow_missing_origin`).
//! - [`token`]: JWT and API-key checks, where the token was found (so it can be stripped
//!   from the upstream request), the `bearer` subprotocol trick, and which query
//!   parameters carry tokens (redacted in logs).
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 header in front of the byte stream.
//! - [`client_ip`]: the real client address (`trusted_proxies` + `X-Forwarded-For`) and
//!   the key per-IP accounting uses (IPv4 address, IPv6 /64 by default).
//! - [`ip_limit`]: per-IP connection caps as RAII permits, and the per-IP handshake
//!   rate (governor keyed limiter).
//!
//! What admission refuses is one [`Refusal`]; its status, reason word and extra headers
//! are decided here, in one place.

pub mod client_ip;
pub mod ip_limit;
pub mod origin;
pub mod proxy_protocol;
pub mod token;

use http::StatusCode;
use http::header::{self, HeaderName, HeaderValue};

/// Why admission refused a handshake. The reason word is the SPEC §3 word used in the
/// response body, the access log and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `Origin` not in the route's allowlist, or missing when required (403).
    #[error("origin not allowed")]
    Origin,
    /// Token or API key missing, invalid, expired or with mismatching claims (401).
    /// `error` is a fixed word for the operational log (`missing`, `expired`, …); it never
    /// contains the token.
    #[error("token refused: {error}")]
    Token { error: &'static str },
    /// Per-IP concurrent connection cap reached (429).
    #[error("per-IP connection cap reached")]
    IpCap,
    /// Per-IP handshake rate exceeded; retry after this many seconds (429).
    #[error("per-IP handshake rate exceeded, retry after {retry_after_secs}s")]
    IpRate { retry_after_secs: u64 },
    /// Whole-process connection cap reached (503).
    #[error("process connection cap reached")]
    Capacity,
}

impl Refusal {
    /// The HTTP status of the refusal (SPEC §3).
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Origin => StatusCode::FORBIDDEN,
            Refusal::Token { .. } => StatusCode::UNAUTHORIZED,
            Refusal::IpCap | Refusal::IpRate { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Capacity => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The SPEC §3 reason word: body, access log `proxy_reason` and metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Token { .. } => "token",
            Refusal::IpCap => "ip_cap",
            Refusal::IpRate { .. } => "ip_rate",
            Refusal::Capacity => "capacity",
        }
    }

    /// The header this refusal must carry beyond the common ones, if any:
    /// `WWW-Authenticate` for a token (RFC 6750 §3) and `Retry-After` for a rate refusal
    /// (RFC 9110 §10.2.3).
    pub fn extra_header(self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            Refusal::Token { .. } => Some((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            )),
            Refusal::IpRate { retry_after_secs } => {
                Some((header::RETRY_AFTER, HeaderValue::from(retry_after_secs)))
            }
            Refusal::Origin | Refusal::IpCap | Refusal::Capacity => None,
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
    fn shared_state_can_cross_tasks() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<origin::OriginPolicy>();
        shared::<token::JwtVerifier>();
        shared::<token::ApiKeyVerifier>();
        shared::<client_ip::TrustedProxies>();
        shared::<ip_limit::IpLimiter>();
        shared::<ip_limit::HandshakeRate>();
        movable::<ip_limit::IpPermit>();
        movable::<token::Authorized>();
    }

    #[test]
    fn token_refusal_display_never_holds_more_than_the_fixed_word() {
        let r = Refusal::Token { error: "expired" };
        assert_eq!(r.to_string(), "token refused: expired");
    }
}
