//! The second line of a refusal's body: what to change so that the request passes (issue
//! 22: a newcomer's `403 origin` said nothing of `allow_missing_origin`). It may quote
//! what the client sent that is not secret (its `Origin`, host and path without the
//! query) and the route's public rules (allowed origins and subprotocols, key names);
//! never a token, key, cookie or query value.

use crate::config::{Config, Route};
use crate::outcome::Refusal;

use super::facts::Facts;

/// The hint for refusal `r` of the request described by `facts`, if there is one.
pub(super) fn hint(r: Refusal, facts: &Facts, config: &Config) -> Option<String> {
    let route = facts
        .route
        .as_deref()
        .and_then(|name| config.routes.iter().find(|r| r.name == name));
    Some(match r {
        Refusal::Origin => origin(facts, route?),
        Refusal::NoRoute => format!(
            "no route matches host {} and path {} (routes match on match.host, when set, and match.path_prefix; the first match wins)",
            facts.host.as_deref().unwrap_or("(none)"),
            facts
                .path
                .as_deref()
                .map_or("(none)", |p| p.split('?').next().unwrap_or(p))
        ),
        Refusal::UpgradeRequired => {
            "this path is a WebSocket route: connect with a WebSocket client, or set `http: proxy` on the route to relay plain HTTP".into()
        }
        Refusal::BadVersion => "send Sec-WebSocket-Version: 13".into(),
        Refusal::Subprotocol => match route.and_then(|r| r.subprotocols.as_ref()) {
            Some(allowed) => format!(
                "none of the offered subprotocols is allowed (allowed: {})",
                allowed.join(", ")
            ),
            None => return None,
        },
        Refusal::Token { error } => format!(
            "token {error}: send a valid token or API key where the route's auth reads it (auth.jwt.from, auth.api_keys)"
        ),
        Refusal::IpCap => {
            "too many connections from this address (limits.max_connections_per_ip, or cluster.limits across a fleet)".into()
        }
        Refusal::IpRate { retry_after_secs } => format!(
            "too many handshakes from this address (limits.handshakes_per_ip, or cluster.limits across a fleet); retry in {retry_after_secs} s"
        ),
        Refusal::SubjectCap => {
            "too many connections for this subject (limits.max_connections_per_subject, or cluster.limits across a fleet)".into()
        }
        Refusal::Capacity => "the gateway is full (limits.max_connections)".into(),
        Refusal::NoBackend => {
            "no backend of this route's upstream is up (health checks, drained backends)".into()
        }
        Refusal::UpstreamConnect | Refusal::UpstreamTimeout => {
            "the backend could not be reached; the gateway's access log says why (upstream_error)".into()
        }
        _ => return None,
    })
}

fn origin(facts: &Facts, route: &Route) -> String {
    let (list, _) = route.admission.origins.allowed();
    let allowed = list.map_or("any".to_owned(), |l| l.join(", "));
    match (&facts.origin, facts.origin_headers) {
        (_, 2..) => format!(
            "more than one Origin header: send exactly one (a browser does; which one was meant is unknowable) (allowed: {allowed})"
        ),
        (Some(origin), _) => format!(
            "origin not allowed: {origin} (allowed: {allowed}; non-browser clients send no Origin: allow_missing_origin)"
        ),
        (None, 1) => format!(
            "the Origin header is not valid text (visible ASCII): send a serialized origin such as https://app.example.com (allowed: {allowed})"
        ),
        (None, _) => format!(
            "no Origin header, and route {} requires one (allowed: {allowed}); for non-browser clients set allow_missing_origin: true",
            route.name
        ),
    }
}
