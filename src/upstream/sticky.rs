//! The sticky key of a connection (SPEC §2 `sticky.key`): read from the client IP, a
//! header, a cookie, a query parameter or a validated token claim. A missing or empty
//! value falls back to the client IP, and the access log says so (the key's kind and the
//! fallback, never its value).

use std::net::IpAddr;

use http::request;
use serde_json::Value;

use crate::config::StickyKey;
use crate::http_util;

/// A connection's key: the bytes hashed, and what the access log shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub bytes: Vec<u8>,
    pub log: KeyLog,
}

/// `"sticky":{"key":"cookie","fallback":false}` in the access log.
pub use crate::observe::access_log::StickyLog as KeyLog;

/// The key for a request. `claim` is the value of the configured claim (see
/// [`claim_text`]), when the route validated a token.
pub fn key(sticky: &StickyKey, parts: &request::Parts, claim: Option<&str>, ip: IpAddr) -> Key {
    let found: Option<String> = match sticky {
        StickyKey::Ip => None,
        StickyKey::Header(name) => parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_owned()),
        StickyKey::Cookie(name) => http_util::cookie(&parts.headers, name).map(str::to_owned),
        StickyKey::Query(name) => parts
            .uri
            .query()
            .and_then(|q| http_util::query_param(q, name))
            .map(|v| v.into_owned()),
        StickyKey::Claim(_) => claim.map(str::to_owned),
    };
    let kind = sticky.kind();
    match found.filter(|v| !v.is_empty()) {
        Some(v) => Key {
            bytes: v.into_bytes(),
            log: KeyLog {
                key: kind,
                fallback: false,
            },
        },
        None => Key {
            bytes: ip.to_string().into_bytes(),
            log: KeyLog {
                key: kind,
                fallback: *sticky != StickyKey::Ip,
            },
        },
    }
}

/// A claim as key text: strings as they are, numbers and booleans as JSON text, arrays
/// and objects as compact JSON; `None` when absent or null.
pub fn claim_text(claims: &Value, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut req = http::Request::builder().uri(uri);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

    #[track_caller]
    fn check(
        sticky: StickyKey,
        p: &request::Parts,
        claim: Option<&str>,
        want: &str,
        fallback: bool,
    ) {
        let k = key(&sticky, p, claim, IP);
        assert_eq!(String::from_utf8(k.bytes).unwrap(), want);
        assert_eq!(
            k.log,
            KeyLog {
                key: sticky.kind(),
                fallback
            }
        );
    }

    #[test]
    fn each_source_gives_its_value() {
        let p = parts(
            "/ws?room=r%201&x=2",
            &[("x-user", " u-42 "), ("cookie", "a=1; sid=\"s-9\"")],
        );
        check(StickyKey::Ip, &p, None, "203.0.113.7", false);
        check(
            StickyKey::Header(http::HeaderName::from_static("x-user")),
            &p,
            None,
            "u-42",
            false,
        );
        check(StickyKey::Cookie("sid".into()), &p, None, "s-9", false);
        check(StickyKey::Query("room".into()), &p, None, "r 1", false);
        check(
            StickyKey::Claim("sub".into()),
            &p,
            Some("user-1"),
            "user-1",
            false,
        );
    }

    #[test]
    fn missing_or_empty_values_fall_back_to_the_client_ip() {
        let p = parts("/ws?room=", &[("x-user", "")]);
        check(
            StickyKey::Header(http::HeaderName::from_static("x-user")),
            &p,
            None,
            "203.0.113.7",
            true,
        );
        check(
            StickyKey::Header(http::HeaderName::from_static("x-other")),
            &p,
            None,
            "203.0.113.7",
            true,
        );
        check(
            StickyKey::Cookie("sid".into()),
            &p,
            None,
            "203.0.113.7",
            true,
        );
        check(
            StickyKey::Query("room".into()),
            &p,
            None,
            "203.0.113.7",
            true,
        );
        check(
            StickyKey::Claim("sub".into()),
            &p,
            None,
            "203.0.113.7",
            true,
        );
    }

    #[test]
    fn claims_become_text() {
        let claims = serde_json::json!({"sub": "u1", "n": 7, "b": true, "t": ["a"], "z": null});
        assert_eq!(claim_text(&claims, "sub").as_deref(), Some("u1"));
        assert_eq!(claim_text(&claims, "n").as_deref(), Some("7"));
        assert_eq!(claim_text(&claims, "b").as_deref(), Some("true"));
        assert_eq!(claim_text(&claims, "t").as_deref(), Some("[\"a\"]"));
        assert_eq!(claim_text(&claims, "z"), None);
        assert_eq!(claim_text(&claims, "missing"), None);
    }
}
