//! The `Origin` allowlist of a route (SPEC §2 `routes[].origins`, `allow_missing_origin`;
//! refusal 403 `origin`).
//!
//! An origin is `scheme://host[:port]` (RFC 6454). Scheme and port are significant, the
//! host is case-insensitive, and a default port (80 for `http`/`ws`, 443 for
//! `https`/`wss`) is the same as no port. An entry `scheme://*.suffix[:port]` matches any
//! host with at least one more label in front of `suffix` (so `https://*.example.com`
//! matches `https://a.b.example.com` but not `https://example.com`). The opaque `null`
//! origin (sandboxed iframes, `file:` pages) matches only an explicit `null` entry, never a
//! wildcard: it names no site, so no site-based rule can vouch for it.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::HeaderMap;
use http::header::{self, HeaderValue};

use super::Refusal;

/// A route's origin rule, built once from the config and checked per handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPolicy {
    /// `None` = `origins` absent: any origin, and none, is accepted.
    list: Option<List>,
    allow_missing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct List {
    exact: Vec<Origin>,
    wildcards: Vec<Wildcard>,
    allow_null: bool,
    /// The entries as configured, for a refusal's hint.
    shown: Vec<String>,
}

/// A parsed, normalised tuple origin.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Origin {
    /// Lower case.
    scheme: String,
    host: Host,
    /// `None` when absent or the scheme's default port.
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    /// Lower-case DNS name (punycode for IDNs, as browsers send it).
    Name(String),
    /// IPv4 or IPv6 literal, compared by value so `[0::1]` equals `[::1]`.
    Ip(std::net::IpAddr),
}

/// `scheme://*.suffix[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Wildcard {
    scheme: String,
    /// Lower case, without the leading `*.`; matched as `.suffix` at the end of the host.
    suffix: String,
    port: Option<u16>,
}

impl OriginPolicy {
    /// The policy when `origins` is absent: every origin, and a missing one, is accepted.
    pub fn any() -> Self {
        OriginPolicy {
            list: None,
            allow_missing: true,
        }
    }

    /// Validates the configured list. Errors name the entry (`origins[i]`) and say how to
    /// fix it; the caller prefixes the route's key path.
    pub fn new(origins: &[String], allow_missing: bool) -> Result<Self, String> {
        let mut list = List {
            exact: Vec::new(),
            wildcards: Vec::new(),
            allow_null: false,
            shown: origins.to_vec(),
        };
        for (i, entry) in origins.iter().enumerate() {
            add_entry(&mut list, entry).map_err(|e| format!("origins[{i}] {entry:?}: {e}"))?;
        }
        Ok(OriginPolicy {
            list: Some(list),
            allow_missing,
        })
    }

    /// The configured entries (`None`: any origin) and whether a missing `Origin` passes,
    /// for the hint of an `origin` refusal.
    pub fn allowed(&self) -> (Option<&[String]>, bool) {
        (
            self.list.as_ref().map(|l| l.shown.as_slice()),
            self.allow_missing,
        )
    }

    /// Decides on the request's `Origin` header (`None` when the client sent none).
    pub fn check(&self, origin: Option<&HeaderValue>) -> Result<(), Refusal> {
        let Some(list) = &self.list else {
            return Ok(());
        };
        let Some(value) = origin else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(Refusal::Origin)
            };
        };
        let text = value.to_str().map_err(|_| Refusal::Origin)?;
        if list.allows(text) {
            Ok(())
        } else {
            Err(Refusal::Origin)
        }
    }

    /// [`check`](Self::check) over the whole header map: more than one `Origin` header is
    /// refused, because which one a browser meant is unknowable.
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let mut values = headers.get_all(header::ORIGIN).iter();
        let first = values.next();
        if self.list.is_some() && values.next().is_some() {
            return Err(Refusal::Origin);
        }
        self.check(first)
    }
}

impl List {
    fn allows(&self, text: &str) -> bool {
        if text == "null" {
            return self.allow_null;
        }
        let Ok(origin) = parse_origin(text) else {
            return false;
        };
        self.exact.contains(&origin) || self.wildcards.iter().any(|w| w.matches(&origin))
    }
}

impl Wildcard {
    fn matches(&self, origin: &Origin) -> bool {
        let Host::Name(host) = &origin.host else {
            return false;
        };
        // Hosts are validated to have no empty label, so a `.suffix` ending with more
        // bytes in front always means at least one more label.
        self.scheme == origin.scheme
            && self.port == origin.port
            && host.len() > self.suffix.len() + 1
            && host.ends_with(&self.suffix)
            && host.as_bytes()[host.len() - self.suffix.len() - 1] == b'.'
    }
}

fn add_entry(list: &mut List, entry: &str) -> Result<(), String> {
    if entry == "null" {
        list.allow_null = true;
        return Ok(());
    }
    if entry == "*" {
        return Err("`*` is not an origin; omit `origins` to allow any origin".into());
    }
    let (scheme, rest) = split_scheme(entry)?;
    if let Some(suffix_and_port) = rest.strip_prefix("*.") {
        let (suffix, port) = split_port(suffix_and_port)?;
        let Host::Name(suffix) = parse_host(suffix)? else {
            return Err("a wildcard needs a DNS name after `*.`, not an IP address".into());
        };
        list.wildcards.push(Wildcard {
            port: normalise_port(&scheme, port),
            scheme,
            suffix,
        });
        return Ok(());
    }
    if rest.contains('*') {
        return Err(
            "`*` is only allowed as the whole first label, as in `https://*.example.com`".into(),
        );
    }
    list.exact.push(parse_origin(entry)?);
    Ok(())
}

/// Parses `scheme://host[:port]` into its normalised form.
fn parse_origin(text: &str) -> Result<Origin, String> {
    let (scheme, rest) = split_scheme(text)?;
    let (host, port) = split_port(rest)?;
    let host = parse_host(host)?;
    Ok(Origin {
        port: normalise_port(&scheme, port),
        scheme,
        host,
    })
}

fn split_scheme(text: &str) -> Result<(String, &str), String> {
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err("an origin is `scheme://host[:port]`, e.g. `https://app.example.com`".into());
    };
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid {
        return Err(format!("invalid scheme {scheme:?}"));
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(format!(
            "an origin has no path; write `{scheme}://{}`",
            rest.split(['/', '?', '#']).next().unwrap_or_default()
        ));
    }
    if rest.contains('@') {
        return Err("an origin has no user name or password".into());
    }
    Ok((scheme.to_ascii_lowercase(), rest))
}

/// Splits `host[:port]`, where host may be a bracketed IPv6 literal.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => (&authority[..=end], &authority[end + 1..]),
            None => return Err("unterminated `[` in IPv6 host".into()),
        }
    } else {
        match authority.rfind(':') {
            Some(colon) => (&authority[..colon], &authority[colon..]),
            None => (authority, ""),
        }
    };
    if port.is_empty() {
        return Ok((host, None));
    }
    let digits = port
        .strip_prefix(':')
        .ok_or_else(|| "unexpected text after the host".to_string())?;
    let valid =
        !digits.is_empty() && digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit());
    match digits.parse::<u16>() {
        Ok(p) if valid && p != 0 => Ok((host, Some(p))),
        _ => Err(format!("invalid port {digits:?}")),
    }
}

fn parse_host(host: &str) -> Result<Host, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(ip.into()))
            .map_err(|_| format!("invalid IPv6 address {inner:?}"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(ip.into()));
    }
    if host.is_empty() {
        return Err("missing host".into());
    }
    if !host.is_ascii() {
        return Err("non-ASCII host: use its punycode (`xn--…`) form, as browsers send".into());
    }
    let labels_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !labels_ok {
        return Err(format!("invalid host {host:?}"));
    }
    Ok(Host::Name(host.to_ascii_lowercase()))
}

/// Maps a scheme's default port to "no port", so `https://a:443` equals `https://a`.
fn normalise_port(scheme: &str, port: Option<u16>) -> Option<u16> {
    let default = match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    port.filter(|p| Some(*p) != default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(list: &[&str], allow_missing: bool) -> OriginPolicy {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&list, allow_missing).expect("valid test policy")
    }

    fn allows(p: &OriginPolicy, origin: &str) -> bool {
        p.check(Some(&HeaderValue::from_str(origin).expect("header")))
            .is_ok()
    }

    #[test]
    fn exact_origin_matches_with_case_insensitive_host_and_default_port() {
        let p = policy(&["https://App.Example.com"], false);
        assert!(allows(&p, "https://app.example.com"));
        assert!(allows(&p, "HTTPS://APP.EXAMPLE.COM"));
        assert!(allows(&p, "https://app.example.com:443"));
        assert!(!allows(&p, "http://app.example.com"));
        assert!(!allows(&p, "https://app.example.com:8443"));
        assert!(!allows(&p, "https://other.example.com"));
        assert!(!allows(&p, "https://app.example.com.evil.net"));
    }

    #[test]
    fn explicit_port_is_significant() {
        let p = policy(&["http://localhost:3000"], false);
        assert!(allows(&p, "http://localhost:3000"));
        assert!(!allows(&p, "http://localhost"));
        assert!(!allows(&p, "http://localhost:3001"));
        let p = policy(&["http://localhost:80"], false);
        assert!(allows(&p, "http://localhost"));
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let p = policy(&["https://*.example.com"], false);
        assert!(allows(&p, "https://a.example.com"));
        assert!(allows(&p, "https://a.b.example.com"));
        assert!(allows(&p, "https://A.Example.COM:443"));
        assert!(!allows(&p, "https://example.com"));
        assert!(!allows(&p, "https://badexample.com"));
        assert!(!allows(&p, "http://a.example.com"));
        assert!(!allows(&p, "https://a.example.com:8443"));
        assert!(!allows(&p, "https://a.example.com.evil.net"));
        assert!(!allows(&p, "https://.example.com"));
    }

    #[test]
    fn wildcard_with_port() {
        let p = policy(&["http://*.test:8080"], false);
        assert!(allows(&p, "http://a.test:8080"));
        assert!(!allows(&p, "http://a.test"));
    }

    #[test]
    fn null_matches_only_an_explicit_null_entry() {
        let p = policy(&["https://*.example.com", "https://example.com"], false);
        assert!(!allows(&p, "null"));
        let p = policy(&["null"], false);
        assert!(allows(&p, "null"));
        assert!(!allows(&p, "https://example.com"));
    }

    #[test]
    fn ip_literals_compare_by_value() {
        let p = policy(&["http://[::1]:8080", "http://127.0.0.1"], false);
        assert!(allows(&p, "http://[0:0::1]:8080"));
        assert!(allows(&p, "http://127.0.0.1:80"));
        assert!(!allows(&p, "http://[::2]:8080"));
    }

    #[test]
    fn missing_origin_follows_allow_missing() {
        assert_eq!(
            policy(&["https://a.com"], false).check(None),
            Err(Refusal::Origin)
        );
        assert_eq!(policy(&["https://a.com"], true).check(None), Ok(()));
        assert_eq!(OriginPolicy::any().check(None), Ok(()));
        let any = OriginPolicy::any();
        assert!(allows(&any, "null"));
        assert!(allows(&any, "https://whatever.example"));
    }

    #[test]
    fn malformed_or_non_utf8_origin_is_refused() {
        let p = policy(&["https://a.com"], true);
        for bad in ["a.com", "https://", "https://a.com/", "https://a.com:x", ""] {
            assert!(!allows(&p, bad), "{bad}");
        }
        let bytes = HeaderValue::from_bytes(b"https://a.com\xff").expect("opaque bytes");
        assert_eq!(p.check(Some(&bytes)), Err(Refusal::Origin));
    }

    #[test]
    fn two_origin_headers_are_refused() {
        let p = policy(&["https://a.com"], false);
        let mut h = HeaderMap::new();
        h.append(header::ORIGIN, HeaderValue::from_static("https://a.com"));
        assert_eq!(p.check_headers(&h), Ok(()));
        h.append(header::ORIGIN, HeaderValue::from_static("https://a.com"));
        assert_eq!(p.check_headers(&h), Err(Refusal::Origin));
        assert_eq!(OriginPolicy::any().check_headers(&h), Ok(()));
    }

    #[test]
    fn config_errors_name_the_entry_and_the_fix() {
        let cases = [
            ("*", "omit `origins`"),
            ("app.example.com", "scheme://host"),
            (
                "https://app.example.com/",
                "write `https://app.example.com`",
            ),
            ("https://a.*.example.com", "whole first label"),
            ("https://*.1.2.3.4", "not an IP address"),
            ("https://bücher.de", "punycode"),
            ("https://a.com:0", "invalid port"),
            ("https://a.com:99999", "invalid port"),
            ("https://user@a.com", "user name"),
            ("1https://a.com", "invalid scheme"),
            ("https://a..com", "invalid host"),
        ];
        for (entry, needle) in cases {
            let err = OriginPolicy::new(&["https://ok.com".into(), entry.into()], false)
                .expect_err(entry);
            assert!(err.starts_with("origins[1] "), "{err}");
            assert!(err.contains(needle), "{entry}: {err}");
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,64}") {
            let _ = parse_origin(&s);
            let _ = OriginPolicy::new(std::slice::from_ref(&s), false);
            if let Ok(v) = HeaderValue::from_str(&s) {
                let _ = policy(&["https://*.example.com", "null"], false).check(Some(&v));
            }
        }

        #[test]
        fn wildcard_accepts_any_subdomain_label_sequence(
            labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", 1..4)
        ) {
            let p = policy(&["https://*.example.com"], false);
            let host = format!("https://{}.example.com", labels.join("."));
            prop_assert!(allows(&p, &host));
            let suffix_only = format!("https://{}example.com", labels.join(""));
            prop_assert!(!allows(&p, &suffix_only));
        }

        #[test]
        fn exact_match_is_case_insensitive_in_host(host in "[a-z][a-z0-9]{0,10}\\.[a-z]{2,4}", port in 1u16..) {
            let entry = format!("https://{host}:{port}");
            let p = policy(&[entry.as_str()], false);
            let upper = format!("https://{}:{port}", host.to_ascii_uppercase());
            prop_assert!(allows(&p, &upper));
        }
    }
}
