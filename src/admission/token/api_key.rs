//! API keys (`auth.api_keys`): the keys file of SHA-256 hashes, and the route's check of
//! a presented key in constant time.

use std::borrow::Cow;
use std::str::FromStr;

use http::HeaderMap;
use http::header::HeaderName;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use super::Refusal;
use super::sources::Stripped;
use crate::http_util::{query_param, query_param_count};

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

/// SHA-256 hashes of the accepted API keys (`keys_file`), each with its line number. A
/// key's identity for `max_connections_per_subject` is its hash, not its line: line 1 of
/// two routes' files are two keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    hashes: Vec<([u8; 32], u32)>,
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
            hashes.push((hash, u32::try_from(i + 1).unwrap_or(u32::MAX)));
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
        self.line_of(presented).is_some()
    }

    /// The line of the keys file whose hash `presented` matches, in constant time like
    /// [`matches`](Self::matches): the line is selected without a branch.
    pub fn line_of(&self, presented: &[u8]) -> Option<u32> {
        self.find(presented).map(|(_, line)| line)
    }

    /// The SHA-256 of `presented` when it is one of the keys: the key's identity for
    /// `max_connections_per_subject`, the same in every keys file that lists it. Constant
    /// time like [`matches`](Self::matches).
    pub fn digest_of(&self, presented: &[u8]) -> Option<[u8; 32]> {
        self.find(presented).map(|(digest, _)| digest)
    }

    fn find(&self, presented: &[u8]) -> Option<([u8; 32], u32)> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = Choice::from(0);
        let mut line = 0u32;
        for (hash, at) in &self.hashes {
            let eq = digest.ct_eq(hash);
            line = u32::conditional_select(&line, at, eq);
            found |= eq;
        }
        bool::from(found).then_some((digest, line))
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

    /// The query parameter that carries the key, for [`redact_query`](crate::http_util::redact_query) / [`strip_query`](crate::http_util::strip_query).
    pub fn query_name(&self) -> Option<&str> {
        match &self.source {
            ApiKeySource::Query(name) => Some(name),
            ApiKeySource::Header(_) => None,
        }
    }

    /// Finds and checks the key; on success, where it was (to strip it upstream).
    pub fn check(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Stripped, Refusal> {
        self.identify(headers, query).map(|(stripped, _)| stripped)
    }

    /// [`check`](Self::check), with the key's SHA-256 (its identity: the same key in two
    /// keys files is one key, two keys on line 1 of two files are two).
    pub fn identify(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(Stripped, [u8; 32]), Refusal> {
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
        if let Some(digest) = self.keys.digest_of(&presented) {
            Ok((stripped, digest))
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
