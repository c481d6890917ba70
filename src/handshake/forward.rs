//! The request as the upstream sees it (SPEC §3): hop-by-hop headers dropped, the headers
//! any route's proxy could set and `strip_headers` removed (on every route, so a route
//! without a token cannot pass a forged claim), names containing `_` dropped, claim
//! headers set from the token, credentials stripped (API keys always, tokens when the route
//! says so), the `bearer` entries out of the subprotocol offers. `X-Forwarded-*`,
//! `X-Request-Id` and `Host` are written by [`upstream`] itself.

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, request};
use tokio::time::Instant;

use super::upgrade::{self, Upgrade};
use crate::admission::token;
use crate::config::Deflate;
use crate::outcome::Refusal;
use crate::upstream;

/// What admission learnt from the token (if the route wants one).
#[derive(Default)]
pub(super) struct Pass {
    pub(super) subject: Option<String>,
    /// `close_on_expiry`: when the live connection must end.
    pub(super) expires_at: Option<Instant>,
    /// The client offered only `bearer, <token>`: answer `bearer`.
    pub(super) answer_bearer: bool,
    /// Every place a token may be, when it must not reach the upstream (`strip_token`).
    pub(super) strip: Vec<token::Stripped>,
    /// The bearer trick's entries are always taken out of the forwarded offers.
    pub(super) subprotocols: Option<Vec<String>>,
    pub(super) claims: Vec<(HeaderName, HeaderValue)>,
    /// The upstream's `claim:NAME` sticky key, when the token has it.
    pub(super) sticky_claim: Option<String>,
}

impl Pass {
    /// The request as the upstream must see it: `removed` (the config's
    /// [`strip_headers`](crate::config::Config::strip_headers): every route's claim headers
    /// among them) and names containing `_` dropped, claims set, the credentials taken out,
    /// the bearer entries out of the offers.
    pub(super) fn upstream_parts(
        &self,
        parts: &request::Parts,
        checked: &mut Upgrade<'_>,
        removed: &[HeaderName],
    ) -> Result<request::Parts, Refusal> {
        // Hop-by-hop headers go first: a client's `Connection: X-User-Id` must not take
        // out the claim headers set below.
        let mut headers = upstream::end_to_end(&parts.headers);
        for name in removed {
            headers.remove(name);
        }
        // `X_User_Id` is `X-User-Id` to servers that map `-` to `_` (CGI, WSGI, PHP, nginx
        // with `underscores_in_headers`): such names are dropped, as nginx drops them.
        let underscored: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .cloned()
            .collect();
        for name in underscored {
            headers.remove(name);
        }
        for (name, value) in &self.claims {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(offers) = &self.subprotocols {
            headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
            if let Ok(v) = HeaderValue::from_str(&offers.join(", "))
                && !offers.is_empty()
            {
                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
            }
            checked.protocols =
                upgrade::allowed_protocols(&headers, checked.route.subprotocols.as_deref())?;
        }
        for strip in &self.strip {
            strip.apply_to_headers(&mut headers);
        }
        if checked.route.deflate == Deflate::Strip {
            strip_deflate_offers(&mut headers);
        }
        let query_names: Vec<&str> = self
            .strip
            .iter()
            .filter_map(|s| match s {
                token::Stripped::Query(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        if !query_names.is_empty()
            && let Some((path, query)) = checked.upstream_target.split_once('?')
        {
            checked.upstream_target = match crate::http_util::strip_query(query, &query_names) {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
        }
        let mut req = Request::new(());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = headers;
        Ok(req.into_parts().0)
    }
}

/// `deflate: strip`: the client's permessage-deflate offers are taken out of its
/// `Sec-WebSocket-Extensions`, so the upstream can never accept one; other extensions pass
/// as sent. A header left with no offer is dropped.
fn strip_deflate_offers(headers: &mut http::HeaderMap) {
    let mut kept: Vec<String> = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let Ok(value) = value.to_str() else {
            // Not text: no offer the proxy could read, so none it could keep.
            continue;
        };
        for offer in value.split(',') {
            let name = offer.split(';').next().unwrap_or("").trim();
            if !name.is_empty() && !name.eq_ignore_ascii_case("permessage-deflate") {
                kept.push(offer.trim().to_owned());
            }
        }
    }
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", "))
        && !kept.is_empty()
    {
        headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_takes_out_only_permessage_deflate() {
        let mut h = http::HeaderMap::new();
        h.append(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate; client_max_window_bits, x-foo; a=1"),
        );
        h.append(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("Permessage-Deflate"),
        );
        strip_deflate_offers(&mut h);
        let all: Vec<_> = h.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().collect();
        assert_eq!(all, [HeaderValue::from_static("x-foo; a=1")]);
        let mut h = http::HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        strip_deflate_offers(&mut h);
        assert!(h.get(header::SEC_WEBSOCKET_EXTENSIONS).is_none());
    }
}
