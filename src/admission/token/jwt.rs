//! JWT verification: the route's check ([`JwtVerifier`]) from source to verified claims,
//! the time and claim rules, and the header values of forwarded claims.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use http::header::HeaderValue;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use super::Refusal;
use super::jwks::{JwtKey, JwtKeys};
use super::remote::RemoteKeys;
use super::sources::{Stripped, TokenSource, find_token};

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

/// A route's JWT check: sources, keys (configured ones, and the sets of its `jwks_url`
/// entries) and rules.
#[derive(Clone, Debug)]
pub struct JwtVerifier {
    sources: Vec<TokenSource>,
    keys: JwtKeys,
    remote: Vec<Arc<RemoteKeys>>,
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
        JwtVerifier::with_remote(sources, keys, Vec::new(), rules)
    }

    /// [`JwtVerifier::new`] with `jwks_url` key sets besides the configured keys.
    pub fn with_remote(
        sources: Vec<TokenSource>,
        keys: JwtKeys,
        remote: Vec<Arc<RemoteKeys>>,
        rules: JwtRules,
    ) -> Result<Self, String> {
        if sources.is_empty() {
            return Err("`from` is empty: list at least one token source".into());
        }
        if keys.is_empty() && remote.is_empty() {
            return Err("`keys` is empty: add a `secret`, a `jwks_file` or a `jwks_url`".into());
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
            remote,
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

    /// The query parameters that carry tokens, for [`redact_query`](crate::http_util::redact_query) / [`strip_query`](crate::http_util::strip_query).
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

    /// The `jwks_url` sources this route reads keys from.
    pub fn remote_keys(&self) -> &[Arc<RemoteKeys>] {
        &self.remote
    }

    fn verify_signature(&self, token: &str) -> Result<Value, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| header_error(&e))?;
        let kid = header.kid.as_deref();
        // The sets in service now (lock-free loads; empty when there is no `jwks_url`).
        let remote: Vec<_> = self.remote.iter().map(|r| r.keys()).collect();
        let sets = || std::iter::once(&self.keys).chain(remote.iter().map(|g| &***g));
        let kid_known = kid.is_some_and(|k| sets().any(|set| set.has_kid(k)));
        let mut tried = false;
        for set in sets() {
            for key in set.candidates(header.alg, kid, kid_known) {
                tried = true;
                if let Some(verified) = try_key(token, key)? {
                    return Ok(verified);
                }
            }
        }
        if kid.is_some() && !kid_known {
            // Perhaps the issuer rotated its keys: refetch in the background (rate
            // limited per source); this token is refused now all the same.
            let now = Instant::now();
            for source in &self.remote {
                source.kid_missed(now);
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

/// One key against the token: `Some(claims)` when it verifies, `None` for a signature
/// it did not make, an error word when the token is malformed.
fn try_key(token: &str, key: &JwtKey) -> Result<Option<Value>, &'static str> {
    match jsonwebtoken::decode::<Value>(token, &key.key, &signature_only(key.alg)) {
        Ok(data) => Ok(Some(data.claims)),
        Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => Ok(None),
        Err(_) => Err("malformed"),
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
pub(super) fn claim_matches(actual: &Value, expected: &Value) -> bool {
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
