//! Tokens at the handshake (SPEC §2 `routes[].auth`; refusal 401 `token` with
//! `WWW-Authenticate`): JWTs from the configured sources, API keys against SHA-256 hashes,
//! where the credential was found (so it can be stripped from the upstream request), and
//! redaction of token query parameters for logs (SPEC §6).
//!
//! Token values never leave this file in an error, a `Debug` output or a log-ready string:
//! refusals carry a fixed word (`expired`, `bad_signature`, …) only.
//!
//! ## JWT rules
//! - The algorithm comes from the configured key, never from the token: each key is
//!   stored with the one algorithm it may verify, and a token whose `alg` differs is not
//!   even tried against it. So an RSA public key can never be used as an HMAC secret, and
//!   `alg: none` (which `jsonwebtoken` cannot even parse as an algorithm) never verifies.
//! - Key choice: a token whose `kid` names configured keys is tried against those keys
//!   only; a token with an unknown `kid` against keys without a `kid` (e.g. `secret`
//!   entries); a token without `kid` against every key of its `alg`.
//! - `exp`, `nbf`, `iss`, `aud` are checked here against a caller-supplied clock (so they
//!   are testable), with `leeway` on both time bounds. `exp` is required by default: a
//!   token without one would be valid forever. `aud` is only checked when `audience` is
//!   configured (Envoy's behaviour, not RFC 7519 §4.1.3's strict reading).
//! - `require_claims` compares string, number and bool claims for equality. A string claim
//!   also matches when the expected value is one of its space-separated words (OAuth
//!   `scope: "chat admin"` satisfies `scope: chat`), and an array claim matches when any
//!   element does (`roles: ["chat"]`).

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::Refusal;

/// The word that replaces redacted query values in logged paths.
pub const REDACTED: &str = "REDACTED";

/// The subprotocol entry that announces a token in the next entry (SPEC §2).
pub const BEARER_PROTOCOL: &str = "bearer";

// ---------------------------------------------------------------------------------------
// Sources and where a token was found
// ---------------------------------------------------------------------------------------

/// One `auth.jwt.from` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `header:Authorization`: `Bearer <token>`, scheme case-insensitive.
    Bearer,
    /// `header:NAME` for any other header: the whole value is the token.
    Header(HeaderName),
    /// `query:NAME`.
    Query(String),
    /// `cookie:NAME`.
    Cookie(String),
    /// `subprotocol`: `Sec-WebSocket-Protocol: bearer, <token>`.
    Subprotocol,
}

impl FromStr for TokenSource {
    type Err = String;

    /// Parses `header:NAME`, `query:NAME`, `cookie:NAME` or `subprotocol`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "subprotocol" {
            return Ok(TokenSource::Subprotocol);
        }
        let hint = "expected `header:NAME`, `query:NAME`, `cookie:NAME` or `subprotocol`";
        let (kind, name) = s.split_once(':').ok_or_else(|| format!("{s:?}: {hint}"))?;
        if name.is_empty() {
            return Err(format!("{s:?}: missing name after `{kind}:`"));
        }
        match kind {
            "header" => {
                let name = HeaderName::from_str(name)
                    .map_err(|_| format!("{s:?}: invalid header name"))?;
                Ok(if name == header::AUTHORIZATION {
                    TokenSource::Bearer
                } else {
                    TokenSource::Header(name)
                })
            }
            "query" => Ok(TokenSource::Query(name.to_string())),
            "cookie" => Ok(TokenSource::Cookie(name.to_string())),
            _ => Err(format!("{s:?}: {hint}")),
        }
    }
}

impl TokenSource {
    /// The query parameter this source reads, for [`redact_query`] and [`strip_query`].
    pub fn query_name(&self) -> Option<&str> {
        match self {
            TokenSource::Query(name) => Some(name),
            _ => None,
        }
    }

    /// Whether the request carries this source's credential more than once (two
    /// `Authorization` lines, a repeated query parameter or cookie, two `bearer` offers):
    /// only one of them would be verified, and an upstream that reads another one would
    /// trust what nobody checked.
    fn is_repeated(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        match self {
            TokenSource::Bearer => headers.get_all(header::AUTHORIZATION).iter().count() > 1,
            TokenSource::Header(name) => headers.get_all(name).iter().count() > 1,
            TokenSource::Query(name) => query.is_some_and(|q| query_param_count(q, name) > 1),
            TokenSource::Cookie(name) => cookie_count(headers, name) > 1,
            TokenSource::Subprotocol => {
                protocol_offers(headers)
                    .iter()
                    .filter(|o| **o == BEARER_PROTOCOL)
                    .count()
                    > 1
            }
        }
    }

    /// What removes this source's credential from the upstream request (`strip_token`).
    /// The subprotocol's entries are always removed (see [`offers_without_bearer`]).
    fn stripped(&self) -> Option<Stripped> {
        match self {
            TokenSource::Bearer => Some(Stripped::Header(header::AUTHORIZATION)),
            TokenSource::Header(name) => Some(Stripped::Header(name.clone())),
            TokenSource::Query(name) => Some(Stripped::Query(name.clone())),
            TokenSource::Cookie(name) => Some(Stripped::Cookie(name.clone())),
            TokenSource::Subprotocol => None,
        }
    }

    /// The token this source finds in the request, if any.
    fn find(&self, headers: &HeaderMap, query: Option<&str>) -> Option<Found> {
        match self {
            TokenSource::Bearer => {
                let token = bearer_token(headers.get(header::AUTHORIZATION)?)?;
                Some(Found::new(token, Stripped::Header(header::AUTHORIZATION)))
            }
            TokenSource::Header(name) => {
                let token = headers.get(name)?.to_str().ok()?.trim();
                (!token.is_empty())
                    .then(|| Found::new(token.to_string(), Stripped::Header(name.clone())))
            }
            TokenSource::Query(name) => {
                let token = query_param(query?, name)?;
                (!token.is_empty())
                    .then(|| Found::new(token.into_owned(), Stripped::Query(name.clone())))
            }
            TokenSource::Cookie(name) => {
                let token = cookie(headers, name)?;
                (!token.is_empty())
                    .then(|| Found::new(token.to_string(), Stripped::Cookie(name.clone())))
            }
            TokenSource::Subprotocol => {
                let (token, remaining) = bearer_subprotocol(headers)?;
                let answer_bearer = remaining.is_empty();
                Some(Found::new(
                    token,
                    Stripped::Subprotocol {
                        remaining,
                        answer_bearer,
                    },
                ))
            }
        }
    }
}

/// Where a credential was found: what to remove from the upstream request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stripped {
    /// Remove this header.
    Header(HeaderName),
    /// Remove this query parameter (every occurrence; see [`strip_query`]).
    Query(String),
    /// Remove this cookie from `Cookie` (see [`strip_cookie`]).
    Cookie(String),
    /// Forward only `remaining` as the `Sec-WebSocket-Protocol` offers (none: drop the
    /// header), and answer the client `bearer` when `answer_bearer` (the client offered
    /// nothing else, so it expects that exact answer).
    Subprotocol {
        remaining: Vec<String>,
        answer_bearer: bool,
    },
}

impl Stripped {
    /// Removes the credential from the headers to be sent upstream. A query parameter is
    /// not in the headers: build the upstream target with [`strip_query`].
    pub fn apply_to_headers(&self, headers: &mut HeaderMap) {
        match self {
            Stripped::Header(name) => {
                headers.remove(name);
            }
            Stripped::Query(_) => {}
            Stripped::Cookie(name) => strip_cookie(headers, name),
            Stripped::Subprotocol { remaining, .. } => {
                headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
                if !remaining.is_empty()
                    && let Ok(v) = HeaderValue::from_str(&remaining.join(", "))
                {
                    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
                }
            }
        }
    }
}

/// A token found in a request. `Debug` never shows the value.
struct Found {
    token: String,
    stripped: Stripped,
}

impl Found {
    fn new(token: String, stripped: Stripped) -> Self {
        Found { token, stripped }
    }
}

/// The first token any source finds, in source order. A later source is not consulted
/// when an earlier one found something, even if that token turns out invalid: which
/// credential counts must not depend on which one verifies.
fn find_token(sources: &[TokenSource], headers: &HeaderMap, query: Option<&str>) -> Option<Found> {
    sources.iter().find_map(|s| s.find(headers, query))
}

fn bearer_token(value: &HeaderValue) -> Option<String> {
    let value = value.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

/// The subprotocol offers, in order, across every `Sec-WebSocket-Protocol` line.
fn protocol_offers(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The client's subprotocol offers without the bearer trick's entries (`bearer` and the
/// token after it): what the allowlist judges and the upstream sees.
pub fn offers_without_bearer(headers: &HeaderMap) -> Vec<String> {
    match bearer_subprotocol(headers) {
        Some((_, remaining)) => remaining,
        None => protocol_offers(headers)
            .into_iter()
            .filter(|o| *o != BEARER_PROTOCOL)
            .map(str::to_owned)
            .collect(),
    }
}

/// `bearer, <token>` among the offers (subprotocol names are case-sensitive, RFC 6455
/// §11.3.4, so only lower-case `bearer`): the token and the other offers.
fn bearer_subprotocol(headers: &HeaderMap) -> Option<(String, Vec<String>)> {
    let offers = protocol_offers(headers);
    let at = offers.iter().position(|o| *o == BEARER_PROTOCOL)?;
    let token = offers.get(at + 1)?.to_string();
    let remaining = offers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != at && *i != at + 1)
        .map(|(_, o)| o.to_string())
        .collect();
    Some((token, remaining))
}

// ---------------------------------------------------------------------------------------
// Cookies and query strings
// ---------------------------------------------------------------------------------------

/// The values of cookie `name`, in order, across all `Cookie` header lines.
fn cookies_named<'h>(headers: &'h HeaderMap, name: &str) -> impl Iterator<Item = &'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// The value of cookie `name` across all `Cookie` header lines.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    cookies_named(headers, name).next()
}

/// How many times cookie `name` appears across all `Cookie` header lines.
fn cookie_count(headers: &HeaderMap, name: &str) -> usize {
    cookies_named(headers, name).count()
}

/// Rewrites the `Cookie` header without cookie `name` (all lines joined into one, as
/// RFC 6265 §5.4 says a request carries; dropped entirely when nothing is left).
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| pair.split_once('=').is_none_or(|(n, _)| n.trim() != name))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// The first value of query parameter `name` (names and values percent-decoded; `+` is
/// left alone because tokens never mean a space by it).
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query_values(query, name).next().map(percent_decode)
}

/// The raw values of query parameter `name`, in order.
fn query_values<'q>(query: &'q str, name: &str) -> impl Iterator<Item = &'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(move |(n, _)| percent_decode(n) == name)
        .map(|(_, v)| v)
}

/// How many times query parameter `name` appears.
fn query_param_count(query: &str, name: &str) -> usize {
    query_values(query, name).count()
}

/// The path with the values of the named query parameters replaced by `REDACTED`, for
/// logs: `/ws?access_token=abc&x=1` → `/ws?access_token=REDACTED&x=1`.
pub fn redact_query<'p>(path_and_query: &'p str, names: &[&str]) -> Cow<'p, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    let hit = |n: &str| names.contains(&percent_decode(n).as_ref());
    if !query
        .split('&')
        .any(|p| p.split_once('=').is_some_and(|(n, _)| hit(n)))
    {
        return Cow::Borrowed(path_and_query);
    }
    let pairs: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((n, _)) if hit(n) => Cow::Owned(format!("{n}={REDACTED}")),
            _ => Cow::Borrowed(pair),
        })
        .collect();
    Cow::Owned(format!("{path}?{}", pairs.join("&")))
}

/// The query string for the upstream request without the named parameters (every
/// occurrence, with or without a value); `None` when nothing is left.
pub fn strip_query(query: &str, names: &[&str]) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !names.contains(&percent_decode(name).as_ref())
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// `%XX` decoding; malformed escapes stay as they are, invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

// ---------------------------------------------------------------------------------------
// JWT keys
// ---------------------------------------------------------------------------------------

/// Verification keys, each bound to the one algorithm it may verify.
#[derive(Clone, Default)]
pub struct JwtKeys {
    keys: Vec<JwtKey>,
}

#[derive(Clone)]
struct JwtKey {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// What [`JwtKeys::add_jwks`] did: how many keys it took, and which it skipped and why
/// (for an operational log line; key ids only, never key material).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksLoad {
    pub loaded: usize,
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets must not reach a log through `{:?}`: algorithms and key ids only.
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.alg, k.kid.as_deref())))
            .finish()
    }
}

impl JwtKeys {
    /// No keys yet.
    pub fn new() -> Self {
        JwtKeys::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no key (then nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds an HMAC secret (`{ alg: HS256, secret: … }`); `alg` must be HS256/384/512.
    pub fn add_secret(&mut self, alg: &str, secret: &[u8]) -> Result<(), String> {
        let alg = match alg {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            _ => {
                return Err(format!(
                    "`secret` keys are HMAC: alg must be HS256, HS384 or HS512, not {alg:?} \
                     (put public keys in a `jwks_file`)"
                ));
            }
        };
        if secret.is_empty() {
            return Err("empty secret (is the environment variable set?)".into());
        }
        self.keys.push(JwtKey {
            alg,
            kid: None,
            key: DecodingKey::from_secret(secret),
        });
        Ok(())
    }

    /// Adds the signature keys of a JWKS document (RS256/384/512, PS256/384/512, ES256,
    /// ES384, EdDSA). Encryption keys and unsupported algorithms are skipped and reported;
    /// symmetric (`oct`) keys are refused, as is a document with no usable key.
    pub fn add_jwks(&mut self, json: &str) -> Result<JwksLoad, String> {
        let set: JwkSet = serde_json::from_str(json)
            .map_err(|e| format!("not a JWKS document (`{{\"keys\": [...]}}`): {e}"))?;
        let mut load = JwksLoad::default();
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = jwk
                .common
                .key_id
                .clone()
                .unwrap_or_else(|| format!("keys[{i}]"));
            match jwk_key(jwk).map_err(|e| format!("key {name}: {e}"))? {
                Some(key) => {
                    self.keys.push(key);
                    load.loaded += 1;
                }
                None => load.skipped.push(name),
            }
        }
        if load.loaded == 0 {
            return Err("no usable signature key in the JWKS document".into());
        }
        Ok(load)
    }

    /// The keys a token with this header may be tried against (see the module doc).
    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> impl Iterator<Item = &JwtKey> {
        let kid_known =
            kid.is_some_and(|k| self.keys.iter().any(|key| key.kid.as_deref() == Some(k)));
        self.keys.iter().filter(move |key| {
            let kid_ok = match (kid, kid_known) {
                (Some(k), true) => key.kid.as_deref() == Some(k),
                (Some(_), false) => key.kid.is_none(),
                (None, _) => true,
            };
            kid_ok && key.alg == alg
        })
    }
}

/// One JWK → a key bound to its algorithm; `Ok(None)` for keys that are not ours to use
/// (encryption keys, unsupported curves or algorithms).
fn jwk_key(jwk: &Jwk) -> Result<Option<JwtKey>, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Ok(None);
    }
    let alg = match jwk.common.key_algorithm {
        Some(a) => match Algorithm::try_from(a) {
            Ok(alg) => Some(alg),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    let Some(alg) = key_algorithm(&jwk.algorithm, alg)? else {
        return Ok(None);
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Some(JwtKey {
        alg,
        kid: jwk.common.key_id.clone(),
        key,
    }))
}

/// The algorithm a key may verify: the declared `alg` when it fits the key type, or the
/// one its type implies. A declared `alg` of another family (e.g. `HS256` on an RSA key)
/// is an error: that is exactly the algorithm-confusion attack.
fn key_algorithm(
    params: &AlgorithmParameters,
    declared: Option<Algorithm>,
) -> Result<Option<Algorithm>, String> {
    use Algorithm::*;
    let (fits, implied): (&[Algorithm], Option<Algorithm>) = match params {
        // RSA keys without `alg` (Azure AD publishes them so) are taken as RS256, the
        // algorithm every OIDC provider must support.
        AlgorithmParameters::RSA(_) => (&[RS256, RS384, RS512, PS256, PS384, PS512], Some(RS256)),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => (&[ES256], Some(ES256)),
            EllipticCurve::P384 => (&[ES384], Some(ES384)),
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => (&[EdDSA], Some(EdDSA)),
            _ => return Ok(None),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys do not belong in a JWKS file; \
                        configure them as `{ alg: HS256, secret: ... }`"
                .into());
        }
        _ => return Ok(None),
    };
    match declared {
        Some(alg) if fits.contains(&alg) => Ok(Some(alg)),
        Some(alg) => Err(format!("`alg` {alg:?} does not fit the key type")),
        None => Ok(implied),
    }
}

// ---------------------------------------------------------------------------------------
// JWT verification
// ---------------------------------------------------------------------------------------

/// The claim rules of `auth.jwt`.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtRules {
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required among `aud` (string or array), when set.
    pub audience: Option<String>,
    /// Slack on `exp` and `nbf` for clock skew (whole seconds count).
    pub leeway: Duration,
    /// `require_claims`: name → expected string, number or bool.
    pub require_claims: Vec<(String, Value)>,
    /// Refuse tokens without `exp` (default `true`).
    pub require_exp: bool,
}

impl Default for JwtRules {
    fn default() -> Self {
        JwtRules {
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            require_claims: Vec::new(),
            require_exp: true,
        }
    }
}

/// A route's JWT check: sources, keys and rules.
#[derive(Clone, Debug)]
pub struct JwtVerifier {
    sources: Vec<TokenSource>,
    keys: JwtKeys,
    rules: JwtRules,
}

/// A request whose token verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Authorized {
    /// The token's claims (a JSON object), for `forward_claims` and `sticky: claim:NAME`.
    pub claims: Value,
    /// `exp` in Unix seconds; with `close_on_expiry` the connection closes at
    /// `exp` + [`JwtVerifier::leeway`].
    pub exp: Option<u64>,
    /// Where the token was, for `strip_token`.
    pub stripped: Stripped,
}

impl JwtVerifier {
    /// Checks the configuration as a whole: at least one source and one key, and only
    /// string, number or bool values in `require_claims`.
    pub fn new(sources: Vec<TokenSource>, keys: JwtKeys, rules: JwtRules) -> Result<Self, String> {
        if sources.is_empty() {
            return Err("`from` is empty: list at least one token source".into());
        }
        if keys.is_empty() {
            return Err("`keys` is empty: add a `secret` or a `jwks_file`".into());
        }
        for (name, value) in &rules.require_claims {
            if !(value.is_string() || value.is_number() || value.is_boolean()) {
                return Err(format!(
                    "require_claims.{name}: only a string, number or bool can be compared"
                ));
            }
        }
        Ok(JwtVerifier {
            sources,
            keys,
            rules,
        })
    }

    /// The configured leeway, to add to `exp` for `close_on_expiry`.
    pub fn leeway(&self) -> Duration {
        self.rules.leeway
    }

    /// What `strip_token` removes: every configured source, not only the one the token
    /// was found in, so that no unverified credential reaches the upstream.
    pub fn stripped_sources(&self) -> Vec<Stripped> {
        self.sources
            .iter()
            .filter_map(TokenSource::stripped)
            .collect()
    }

    /// The query parameters that carry tokens, for [`redact_query`] / [`strip_query`].
    pub fn query_names(&self) -> Vec<&str> {
        self.sources
            .iter()
            .filter_map(TokenSource::query_name)
            .collect()
    }

    /// Finds the token (first source that has one) and verifies it at `now_unix` seconds.
    /// `query` is the request's query string without the `?`.
    pub fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        now_unix: u64,
    ) -> Result<Authorized, Refusal> {
        if self.sources.iter().any(|s| s.is_repeated(headers, query)) {
            return Err(Refusal::Token { error: "repeated" });
        }
        let found =
            find_token(&self.sources, headers, query).ok_or(Refusal::Token { error: "missing" })?;
        let claims = self
            .verify(&found.token, now_unix)
            .map_err(|error| Refusal::Token { error })?;
        let exp = claims.get("exp").and_then(unix_seconds);
        Ok(Authorized {
            claims,
            exp,
            stripped: found.stripped,
        })
    }

    /// Verifies one token: signature, then the time and claim rules. The error is a fixed
    /// word for logs.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Value, &'static str> {
        let claims = self.verify_signature(token)?;
        if !claims.is_object() {
            return Err("malformed");
        }
        self.check_times(&claims, now_unix)?;
        self.check_claims(&claims)?;
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<Value, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| header_error(&e))?;
        let mut tried = false;
        for key in self.keys.candidates(header.alg, header.kid.as_deref()) {
            tried = true;
            match jsonwebtoken::decode::<Value>(token, &key.key, &signature_only(key.alg)) {
                Ok(data) => return Ok(data.claims),
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {}
                Err(_) => return Err("malformed"),
            }
        }
        Err(if tried {
            "bad_signature"
        } else {
            "unknown_key"
        })
    }

    fn check_times(&self, claims: &Value, now: u64) -> Result<(), &'static str> {
        let leeway = self.rules.leeway.as_secs();
        match claims.get("exp") {
            None if self.rules.require_exp => return Err("missing_exp"),
            None => {}
            Some(v) => {
                let exp = unix_seconds(v).ok_or("malformed")?;
                if now >= exp.saturating_add(leeway) {
                    return Err("expired");
                }
            }
        }
        if let Some(v) = claims.get("nbf") {
            let nbf = unix_seconds(v).ok_or("malformed")?;
            if now.saturating_add(leeway) < nbf {
                return Err("not_yet_valid");
            }
        }
        Ok(())
    }

    fn check_claims(&self, claims: &Value) -> Result<(), &'static str> {
        if let Some(iss) = &self.rules.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err("wrong_issuer");
        }
        if let Some(aud) = &self.rules.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => s == aud,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(aud.as_str())),
                _ => false,
            };
            if !ok {
                return Err("wrong_audience");
            }
        }
        for (name, expected) in &self.rules.require_claims {
            if !claims
                .get(name)
                .is_some_and(|actual| claim_matches(actual, expected))
            {
                return Err("claims_mismatch");
            }
        }
        Ok(())
    }
}

/// A validation that checks the signature and the algorithm only (times and claims are
/// checked by [`JwtVerifier`] against the caller's clock). The one algorithm allowed is
/// the key's.
fn signature_only(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.leeway = 0;
    v
}

fn header_error(e: &jsonwebtoken::errors::Error) -> &'static str {
    // `alg: none` and algorithms jsonwebtoken does not know fail as a header JSON error
    // naming the variant; report them as such rather than as garbage.
    if e.to_string().contains("unknown variant") {
        "bad_algorithm"
    } else {
        "malformed"
    }
}

/// A NumericDate (RFC 7519 §2): non-negative seconds, fractions allowed and truncated.
fn unix_seconds(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// `require_claims` matching (see the module doc).
fn claim_matches(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::String(a), Value::String(e)) => a == e || a.split(' ').any(|w| w == e),
        (Value::Number(a), Value::Number(e)) => match (a.as_i64(), e.as_i64()) {
            (Some(a), Some(e)) => a == e,
            _ => a.as_u64().zip(e.as_u64()).map_or_else(
                || a.as_f64().zip(e.as_f64()).is_some_and(|(a, e)| a == e),
                |(a, e)| a == e,
            ),
        },
        (Value::Bool(a), Value::Bool(e)) => a == e,
        // The config's expected values are YAML scalars read as text: `tier: 2` and
        // `email_verified: true` match a number claim by value and a bool claim by
        // its JSON text.
        (Value::Number(_), Value::String(e)) => e
            .parse::<serde_json::Number>()
            .is_ok_and(|n| claim_matches(actual, &Value::Number(n))),
        (Value::Bool(a), Value::String(e)) => e == if *a { "true" } else { "false" },
        (Value::Array(items), e) => items.iter().any(|a| !a.is_array() && claim_matches(a, e)),
        _ => false,
    }
}

/// The header value for `forward_claims`: strings as they are, numbers and bools as
/// JSON text, arrays and objects as compact JSON; `None` when the claim is absent or
/// cannot be a header value (control characters).
pub fn claim_header_value(claims: &Value, name: &str) -> Option<HeaderValue> {
    let text = match claims.get(name)? {
        Value::Null => return None,
        Value::String(s) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(other.to_string()),
    };
    HeaderValue::from_str(&text).ok()
}

/// Seconds since the Unix epoch, for [`JwtVerifier::check`].
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------

/// Where an API key is read (`api_keys.header` or `api_keys.query`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiKeySource {
    /// The whole header value (trimmed).
    Header(HeaderName),
    /// A query parameter.
    Query(String),
}

impl FromStr for ApiKeySource {
    type Err = String;

    /// Parses `header:NAME` or `query:NAME`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("header", name)) => HeaderName::from_str(name)
                .map(ApiKeySource::Header)
                .map_err(|_| format!("{s:?}: invalid header name")),
            Some(("query", name)) if !name.is_empty() => Ok(ApiKeySource::Query(name.into())),
            _ => Err(format!("{s:?}: expected `header:NAME` or `query:NAME`")),
        }
    }
}

/// SHA-256 hashes of the accepted API keys (`keys_file`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    hashes: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} hashes)", self.hashes.len())
    }
}

impl ApiKeys {
    /// Parses a keys file: one SHA-256 hex digest per line (64 hex digits, any case);
    /// blank lines and lines starting with `#` are ignored. Errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut hashes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let hash = parse_hex32(line).ok_or_else(|| {
                format!(
                    "line {}: expected the 64-hex-digit SHA-256 of a key \
                     (e.g. `printf %s \"$KEY\" | sha256sum`), not the key itself",
                    i + 1
                )
            })?;
            hashes.push(hash);
        }
        Ok(ApiKeys { hashes })
    }

    /// Number of accepted keys.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether no key is accepted.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `presented` hashes to one of the keys. Constant time in the key's value:
    /// every stored hash is compared in full (`subtle`), with no early exit on the first
    /// match or the first differing byte.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = Choice::from(0);
        for hash in &self.hashes {
            found |= digest.ct_eq(hash);
        }
        found.into()
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A route's API-key check.
#[derive(Clone, Debug)]
pub struct ApiKeyVerifier {
    source: ApiKeySource,
    keys: ApiKeys,
}

impl ApiKeyVerifier {
    /// The check for keys read from `source`.
    pub fn new(source: ApiKeySource, keys: ApiKeys) -> Self {
        ApiKeyVerifier { source, keys }
    }

    /// The query parameter that carries the key, for [`redact_query`] / [`strip_query`].
    pub fn query_name(&self) -> Option<&str> {
        match &self.source {
            ApiKeySource::Query(name) => Some(name),
            ApiKeySource::Header(_) => None,
        }
    }

    /// Finds and checks the key; on success, where it was (to strip it upstream).
    pub fn check(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Stripped, Refusal> {
        let repeated = match &self.source {
            ApiKeySource::Header(name) => headers.get_all(name).iter().count() > 1,
            ApiKeySource::Query(name) => query.is_some_and(|q| query_param_count(q, name) > 1),
        };
        if repeated {
            return Err(Refusal::Token { error: "repeated" });
        }
        let (presented, stripped): (Cow<'_, [u8]>, Stripped) = match &self.source {
            ApiKeySource::Header(name) => {
                let v = headers
                    .get(name)
                    .ok_or(Refusal::Token { error: "missing" })?;
                (
                    trim_bytes(v.as_bytes()).into(),
                    Stripped::Header(name.clone()),
                )
            }
            ApiKeySource::Query(name) => {
                let v = query
                    .and_then(|q| query_param(q, name))
                    .ok_or(Refusal::Token { error: "missing" })?;
                let bytes = match v {
                    Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
                    Cow::Owned(s) => Cow::Owned(s.into_bytes()),
                };
                (bytes, Stripped::Query(name.clone()))
            }
        };
        if presented.is_empty() {
            return Err(Refusal::Token { error: "missing" });
        }
        if self.keys.matches(&presented) {
            Ok(stripped)
        } else {
            Err(Refusal::Token {
                error: "bad_api_key",
            })
        }
    }
}

fn trim_bytes(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests;
