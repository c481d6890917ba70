//! Small pieces of HTTP/1.1 request text shared by admission, sticky hashing, the admin
//! API and the handshake: cookie lookup and removal, query-parameter lookup, counting,
//! removal and redaction for logs, and `%XX` decoding.
//!
//! A leaf: it imports nothing of wsgate, and knows nothing of tokens (which parameter or
//! cookie carries a credential is the caller's business). Malformed input never panics:
//! bad escapes stay as they are, invalid UTF-8 becomes U+FFFD.

use std::borrow::Cow;

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// The word that replaces redacted query values in logged paths.
pub const REDACTED: &str = "REDACTED";

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
pub fn cookie_count(headers: &HeaderMap, name: &str) -> usize {
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
pub fn query_param_count(query: &str, name: &str) -> usize {
    query_values(query, name).count()
}

/// The path with the values of the named query parameters replaced by `REDACTED`, for
/// logs: `/ws?access_token=abc&x=1` → `/ws?access_token=REDACTED&x=1`.
pub fn redact_query<'p, S: AsRef<str>>(path_and_query: &'p str, names: &[S]) -> Cow<'p, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    let hit = |n: &str| {
        let n = percent_decode(n);
        names.iter().any(|name| name.as_ref() == n)
    };
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

/// Whether a comma-separated header contains `token` (case-insensitive), across all of
/// its lines. A substring match would accept `Connection: not-upgrade`.
pub fn has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redact_query_values() {
        assert_eq!(
            redact_query("/ws?access_token=abc&x=1", &["access_token"]),
            "/ws?access_token=REDACTED&x=1"
        );
        assert_eq!(
            redact_query(
                "/ws?a=1&access_token=abc&access_token=def",
                &["access_token", "key"]
            ),
            "/ws?a=1&access_token=REDACTED&access_token=REDACTED"
        );
        assert_eq!(
            redact_query("/ws?access%5Ftoken=abc", &["access_token"]),
            "/ws?access%5Ftoken=REDACTED"
        );
        assert!(matches!(
            redact_query("/ws?x=1", &["access_token"]),
            Cow::Borrowed(_)
        ));
        assert_eq!(redact_query("/ws", &["access_token"]), "/ws");
    }

    #[test]
    fn strip_query_params() {
        assert_eq!(
            strip_query("access_token=abc&x=1", &["access_token"]),
            Some("x=1".to_string())
        );
        assert_eq!(
            strip_query("access_token=abc&access_token", &["access_token"]),
            None
        );
        assert_eq!(strip_query("a=1&&b=2", &[]), Some("a=1&b=2".to_string()));
        assert_eq!(query_param("a=1&b=%41%zz", "b").as_deref(), Some("A%zz"));
        assert_eq!(query_param("a", "a"), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,80}") {
            let _ = percent_decode(&s);
            let _ = query_param(&s, "t");
            let _ = redact_query(&s, &["t"]);
            let _ = strip_query(&s, &["t"]);
            if let Ok(hv) = HeaderValue::from_str(&s) {
                let mut h = HeaderMap::new();
                h.insert(header::COOKIE, hv);
                strip_cookie(&mut h, "t");
            }
        }

        #[test]
        fn redaction_removes_every_named_value(
            pairs in proptest::collection::vec(("[a-z_]{1,6}", "[A-Za-z0-9._-]{0,12}"), 0..8),
            secret in "[A-Z]{20}",
        ) {
            let mut q: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
            q.insert(q.len() / 2, format!("access_token={secret}"));
            let path = format!("/ws?{}", q.join("&"));
            let redacted = redact_query(&path, &["access_token"]);
            prop_assert!(!redacted.contains(&secret));
            prop_assert_eq!(redacted.matches("=").count(), path.matches("=").count());
            let stripped = strip_query(&q.join("&"), &["access_token"]).unwrap_or_default();
            prop_assert!(!stripped.contains(&secret));
            prop_assert!(!stripped.split('&').any(|p| p.starts_with("access_token=")));
            let kept: Vec<String> = pairs.iter()
                .filter(|(n, _)| n != "access_token")
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            prop_assert_eq!(stripped, kept.join("&"));
        }
    }
}
