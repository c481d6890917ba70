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
//! - [`ip_limit`]: per-IP connection caps as RAII permits (the keyed counter that
//!   [`subject`] reuses), and the per-IP handshake rate (governor keyed limiter).
//! - [`subject`]: the per-subject connection cap (JWT `sub` or API key).
//!
//! What admission refuses is one [`Refusal`] of the outcome vocabulary
//! ([`crate::outcome`]), where its status, reason word and headers are decided.

pub mod client_ip;
pub mod ip_limit;
pub mod origin;
pub mod pending;
pub mod proxy_protocol;
pub mod subject;
pub mod token;

pub use crate::outcome::Refusal;

#[cfg(test)]
mod tests {
    use super::*;

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
        shared::<subject::SubjectLimiter>();
        movable::<subject::SubjectPermit>();
        movable::<token::Authorized>();
    }
}
