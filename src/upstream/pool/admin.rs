//! The admin listener's upstream routes, answered from the pools alone:
//! - `GET /upstreams` → every pool's backends and their state (JSON);
//! - `POST /upstreams/{name}/backends/{addr}/drain[?close_within=30s]` → no new
//!   connections to that backend (`addr` is a resolved `ip:port`, or a configured entry
//!   such as `chat-2.internal:9001` for all its addresses); the reply carries a
//!   [`DrainOrder`] for whoever closes the established connections;
//! - `POST /upstreams/{name}/backends/{addr}/undrain` → new connections again.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use super::Pools;
use crate::config::units::{fmt_duration, parse_duration};
use crate::http_util;

/// Longest `close_within`: spreading closes over more than an hour helps nobody.
const MAX_CLOSE_WITHIN: Duration = Duration::from_secs(3600);

/// What an admin drain asks of the established connections to the drained backends:
/// close them with 1012, spread over `close_within` (`None`: leave them be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOrder {
    pub upstream: String,
    /// Resolved identities (`ip:port`) of the drained backends.
    pub backends: Vec<String>,
    pub close_within: Option<Duration>,
}

/// An answer to an admin request, and the drain to carry out, if any.
#[derive(Debug)]
pub struct AdminReply {
    pub status: StatusCode,
    /// JSON (or a one-line text error).
    pub body: String,
    /// Set on a successful drain.
    pub drain: Option<DrainOrder>,
    /// Set on a successful undrain: closes a drain scheduled are called off.
    pub undrain: Option<DrainOrder>,
    json: bool,
}

impl AdminReply {
    fn json(body: &impl Serialize) -> AdminReply {
        AdminReply {
            status: StatusCode::OK,
            body: serde_json::to_string(body).unwrap_or_default() + "\n",
            drain: None,
            undrain: None,
            json: true,
        }
    }

    fn error(status: StatusCode, message: String) -> AdminReply {
        AdminReply {
            status,
            body: message + "\n",
            drain: None,
            undrain: None,
            json: false,
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(self.body)));
        *resp.status_mut() = self.status;
        let kind = if self.json {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        };
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        resp
    }
}

#[derive(Serialize)]
struct DrainBody<'a> {
    upstream: &'a str,
    backends: Vec<DrainedBackend>,
    /// Echoes `close_within` (`null` when absent or on undrain).
    close_within: Option<String>,
}

#[derive(Serialize)]
struct DrainedBackend {
    addr: String,
    draining: bool,
    active: u64,
}

/// Answers `/upstreams` routes; `None` for any other path.
pub fn admin(
    method: &Method,
    path: &str,
    query: Option<&str>,
    pools: &Pools,
) -> Option<AdminReply> {
    let rest = path.strip_prefix("/upstreams")?;
    if rest.is_empty() || rest == "/" {
        return Some(match *method {
            Method::GET => AdminReply::json(&pools.snapshot()),
            _ => AdminReply::error(StatusCode::METHOD_NOT_ALLOWED, "use GET".into()),
        });
    }
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let [name, "backends", addr, action] = parts.as_slice() else {
        return Some(AdminReply::error(StatusCode::NOT_FOUND, "not found".into()));
    };
    let on = match *action {
        "drain" => true,
        "undrain" => false,
        _ => return Some(AdminReply::error(StatusCode::NOT_FOUND, "not found".into())),
    };
    if method != Method::POST {
        return Some(AdminReply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST".into(),
        ));
    }
    let close_within = match close_within(query) {
        Ok(d) => d.filter(|_| on),
        Err(e) => return Some(AdminReply::error(StatusCode::BAD_REQUEST, e)),
    };
    Some(drain(
        pools,
        &http_util::percent_decode(name),
        &http_util::percent_decode(addr),
        on,
        close_within,
    ))
}

fn drain(
    pools: &Pools,
    name: &str,
    addr: &str,
    on: bool,
    close_within: Option<Duration>,
) -> AdminReply {
    let Some(pool) = pools.get(name) else {
        return AdminReply::error(StatusCode::NOT_FOUND, format!("no upstream named `{name}`"));
    };
    let named = pool.set_drain(addr, on);
    if named.is_empty() {
        return AdminReply::error(
            StatusCode::NOT_FOUND,
            format!("upstream `{name}` has no backend `{addr}`; GET /upstreams lists them"),
        );
    }
    let body = DrainBody {
        upstream: name,
        backends: named
            .iter()
            .map(|b| DrainedBackend {
                addr: b.identity.clone(),
                draining: b.is_draining(),
                active: b.active(),
            })
            .collect(),
        close_within: close_within.map(fmt_duration),
    };
    let mut reply = AdminReply::json(&body);
    let order = DrainOrder {
        upstream: name.to_owned(),
        backends: named.iter().map(|b| b.identity.clone()).collect(),
        close_within,
    };
    if on {
        reply.drain = Some(order);
    } else {
        reply.undrain = Some(order);
    }
    reply
}

/// `close_within=30s` from the query, checked.
fn close_within(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(value) = query.and_then(|q| http_util::query_param(q, "close_within")) else {
        return Ok(None);
    };
    let d = parse_duration(&value).map_err(|e| format!("close_within: {e}"))?;
    if d > MAX_CLOSE_WITHIN {
        return Err(format!(
            "close_within: at most {}",
            fmt_duration(MAX_CLOSE_WITHIN)
        ));
    }
    Ok(Some(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_within_parses_and_is_bounded() {
        assert_eq!(close_within(None), Ok(None));
        assert_eq!(close_within(Some("x=1")), Ok(None));
        assert_eq!(
            close_within(Some("close_within=30s")),
            Ok(Some(Duration::from_secs(30)))
        );
        assert!(close_within(Some("close_within=soon")).is_err());
        assert!(close_within(Some("close_within=2h")).is_err());
    }
}
