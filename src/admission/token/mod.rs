//! Tokens at the handshake (SPEC §2 `routes[].auth`; refusal 401 `token` with
//! `WWW-Authenticate`): JWTs from the configured sources, API keys against SHA-256 hashes,
//! where the credential was found (so it can be stripped from the upstream request), and
//! which query parameters carry tokens (redacted in logs, SPEC §6, by
//! [`crate::http_util::redact_query`]).
//!
//! - `sources`: where a token is looked for, and what stripping it means;
//! - `jwks`: verification keys (secrets, JWKS documents), each bound to one algorithm;
//! - `remote`: the key set of a `jwks_url` (fetched by the gateway) and its kid-miss limit;
//! - `jwt`: the JWT check (signature, times, claims) and forwarded claim values;
//! - `api_key`: API keys against SHA-256 hashes.
//!
//! Token values never leave this module in an error, a `Debug` output or a log-ready string:
//! refusals carry a fixed word (`expired`, `bad_signature`, …) only.
//!
//! ## JWT rules
//! - The algorithm comes from the configured key, never from the token: each key is
//!   stored with the one algorithm it may verify, and a token whose `alg` differs is not
//!   even tried against it. So an RSA public key can never be used as an HMAC secret, and
//!   `alg: none` (which `jsonwebtoken` cannot even parse as an algorithm) never verifies.
//! - Key choice: a token whose `kid` names configured keys is tried against those keys
//!   only; a token with an unknown `kid` against keys without a `kid` (e.g. `secret`
//!   entries); a token without `kid` against every key of its `alg`. Keys of `jwks_url`
//!   entries count as configured keys from their first successful fetch on.
//! - A token whose `kid` is unknown and that does not verify is refused at once (401); it
//!   asks the route's `jwks_url` fetchers for a refetch, at most once per 30 s each
//!   (`remote::KID_MISS_EVERY`). Verification never waits on the network.
//! - `exp`, `nbf`, `iss`, `aud` are checked here against a caller-supplied clock (so they
//!   are testable), with `leeway` on both time bounds. `exp` is required by default: a
//!   token without one would be valid forever. `aud` is only checked when `audience` is
//!   configured (Envoy's behaviour, not RFC 7519 §4.1.3's strict reading).
//! - `require_claims` compares string, number and bool claims for equality. A string claim
//!   also matches when the expected value is one of its space-separated words (OAuth
//!   `scope: "chat admin"` satisfies `scope: chat`), and an array claim matches when any
//!   element does (`roles: ["chat"]`).

mod api_key;
mod jwks;
mod jwt;
mod remote;
mod sources;

pub use api_key::{ApiKeySource, ApiKeyVerifier, ApiKeys};
pub use jwks::{JwksLoad, JwtKeys};
pub use jwt::{Authorized, JwtRules, JwtVerifier, claim_header_value, unix_now};
pub use remote::{KID_MISS_EVERY, RefetchLimit, RemoteKeys};
pub use sources::{BEARER_PROTOCOL, Stripped, TokenSource, offers_without_bearer};

use super::Refusal;

#[cfg(test)]
mod tests;
