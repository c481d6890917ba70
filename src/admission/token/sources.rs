//! Where a token is looked for (`auth.jwt.from`), the first one found, whether a source
//! is repeated, and what removing it from the upstream request means ([`Stripped`]),
//! including the `bearer` subprotocol trick.

use std::str::FromStr;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

use crate::http_util::{cookie, cookie_count, query_param, query_param_count, strip_cookie};

/// The subprotocol entry that announces a token in the next entry (SPEC §2).
pub const BEARER_PROTOCOL: &str = "bearer";

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
    /// The query parameter this source reads, for [`redact_query`](crate::http_util::redact_query) and [`strip_query`](crate::http_util::strip_query).
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
    pub(super) fn is_repeated(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
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
    pub(super) fn stripped(&self) -> Option<Stripped> {
        match self {
            TokenSource::Bearer => Some(Stripped::Header(header::AUTHORIZATION)),
            TokenSource::Header(name) => Some(Stripped::Header(name.clone())),
            TokenSource::Query(name) => Some(Stripped::Query(name.clone())),
            TokenSource::Cookie(name) => Some(Stripped::Cookie(name.clone())),
            TokenSource::Subprotocol => None,
        }
    }

    /// The token this source finds in the request, if any.
    pub(super) fn find(&self, headers: &HeaderMap, query: Option<&str>) -> Option<Found> {
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
    /// Remove this query parameter (every occurrence; see [`strip_query`](crate::http_util::strip_query)).
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
    /// not in the headers: build the upstream target with [`strip_query`](crate::http_util::strip_query).
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
pub(super) struct Found {
    pub(super) token: String,
    pub(super) stripped: Stripped,
}

impl Found {
    fn new(token: String, stripped: Stripped) -> Self {
        Found { token, stripped }
    }
}

/// The first token any source finds, in source order. A later source is not consulted
/// when an earlier one found something, even if that token turns out invalid: which
/// credential counts must not depend on which one verifies.
pub(super) fn find_token(
    sources: &[TokenSource],
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<Found> {
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
pub(super) fn bearer_subprotocol(headers: &HeaderMap) -> Option<(String, Vec<String>)> {
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
