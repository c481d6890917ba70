//! The upgrade itself: route matching and the RFC 6455 checks of SPEC §3. Pure functions
//! over the parsed request head; no I/O, so every rule is unit tested and fuzzed without
//! sockets.

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Version, request};

use crate::config::{HttpMode, Route};
use crate::http_util::has_token;
use crate::outcome::Refusal;

/// An upgrade request that passed every check, with what the upstream request needs.
#[derive(Debug)]
pub struct Upgrade<'r> {
    pub route: &'r Route,
    /// Host as the client sent it (port included), for `X-Forwarded-Host`.
    pub host: String,
    /// Path and query to send upstream (after `upstream_path` rewriting).
    pub upstream_target: String,
    /// The client's subprotocol offers after the route's allowlist, comma-joined.
    pub protocols: Option<String>,
    /// A plain HTTP request (no upgrade) on an `http: proxy` route: relayed as it is.
    pub plain: bool,
}

impl Upgrade<'_> {
    /// What the upstream request carries of it.
    pub fn target(&self) -> crate::upstream::Target<'_> {
        crate::upstream::Target {
            upstream: &self.route.upstream,
            host: &self.host,
            path: &self.upstream_target,
            protocols: self.protocols.as_deref(),
        }
    }
}

/// Picks the route and checks the upgrade (SPEC §3), in this order: route, plain HTTP
/// (admitted as `plain` on an `http: proxy` route, else 426),
/// method and version, `Connection`/`Upgrade` tokens, WebSocket version, key, body,
/// subprotocol allowlist.
pub fn check<'r>(req: &request::Parts, routes: &'r [Route]) -> Result<Upgrade<'r>, Refusal> {
    let RequestHost { sent: host, name } = request_host(req).ok_or(Refusal::BadUpgrade)?;
    let name = name.as_str();
    let path = req.uri.path();
    // As an upstream may read the path: decoded once, for both checks below.
    let decoded = crate::http_util::percent_decode(path);
    if has_dot_segment(&decoded) || has_empty_segment_or_parameter(&decoded) {
        return Err(Refusal::BadUpgrade);
    }
    let route = find_route(routes, name, path).ok_or(Refusal::NoRoute)?;
    // `/ws/%61dmin` must not pass route `/ws`'s checks to be served as `/ws/admin`.
    if decoded != path
        && !find_route(routes, name, &decoded).is_some_and(|r| std::ptr::eq(r, route))
    {
        return Err(Refusal::BadUpgrade);
    }
    let h = &req.headers;
    let looks_websocket = h.contains_key(header::UPGRADE)
        || h.keys().any(|k| k.as_str().starts_with("sec-websocket-"));
    if !looks_websocket {
        if route.http == HttpMode::Proxy {
            return Ok(Upgrade {
                route,
                upstream_target: upstream_target(route, req),
                host,
                protocols: None,
                plain: true,
            });
        }
        return Err(Refusal::UpgradeRequired);
    }
    if req.method != Method::GET || req.version != Version::HTTP_11 {
        return Err(Refusal::BadUpgrade);
    }
    if !has_token(h, &header::CONNECTION, "upgrade") || !has_token(h, &header::UPGRADE, "websocket")
    {
        return Err(Refusal::BadUpgrade);
    }
    if single(h, &header::SEC_WEBSOCKET_VERSION) != Some(b"13".as_slice()) {
        return Err(Refusal::BadVersion);
    }
    if !single(h, &header::SEC_WEBSOCKET_KEY).is_some_and(valid_key) {
        return Err(Refusal::BadUpgrade);
    }
    if has_body(h) {
        return Err(Refusal::BadUpgrade);
    }
    // With the token in the subprotocol list, the allowlist applies once the token's
    // entries are taken out (see `listener`).
    let allow = if route.admission.jwt.as_ref().is_some_and(|j| j.subprotocol) {
        None
    } else {
        route.subprotocols.as_deref()
    };
    let protocols = allowed_protocols(h, allow)?;
    Ok(Upgrade {
        route,
        upstream_target: upstream_target(route, req),
        host,
        protocols,
        plain: false,
    })
}

/// The route a request would take, judged as [`check`] judges it (the `Host` header, or
/// an absolute-form target's authority); for naming refusals before the upgrade checks.
pub fn route_of<'r>(req: &request::Parts, routes: &'r [Route]) -> Option<&'r Route> {
    let host = request_host(req)?;
    find_route(routes, &host.name, req.uri.path())
}

/// Whether a (percent-decoded) path has an empty segment (`//`), a `;` parameter or a `\`:
/// `/ws//admin` and `/ws;x=1/admin` take a route by their prefix, but servers that merge
/// slashes or drop parameters serve them as `/ws/admin`; and URL parsers that follow the
/// WHATWG rules (Node's `URL`, browsers) read `/ws\admin` as `/ws/admin` too.
fn has_empty_segment_or_parameter(decoded: &str) -> bool {
    decoded.contains([';', '\\']) || decoded.contains("//")
}

/// Whether a (percent-decoded) path has a `.` or `..` segment, as any upstream might read
/// it: with `\` as a separator too, and a segment's `;` parameters left out (`..;` is `..`
/// to some servers). Routes match the raw path, so such a path could be admitted by one
/// route and served by another; so could one whose decoded form takes another route.
fn has_dot_segment(decoded: &str) -> bool {
    decoded.split(['/', '\\']).any(|segment| {
        let name = segment.split(';').next().unwrap_or(segment);
        name == "." || name == ".."
    })
}

/// First route whose host (if any) and path prefix match.
pub fn find_route<'r>(routes: &'r [Route], host: &str, path: &str) -> Option<&'r Route> {
    routes.iter().find(|r| {
        r.host
            .as_deref()
            .is_none_or(|h| h.eq_ignore_ascii_case(host))
            && path.starts_with(r.path_prefix.as_str())
    })
}

/// The host a request names.
struct RequestHost {
    /// As the client sent it (port included): `X-Forwarded-Host` and the upstream `Host`.
    sent: String,
    /// What routes match: lower case, without the port and one trailing dot.
    name: String,
}

/// The request's host: the `Host` header, or the authority of an absolute-form target
/// (both present: they must name the same host). `None` when it is missing, repeated, or
/// not a valid `host[:port]`.
fn request_host(req: &request::Parts) -> Option<RequestHost> {
    let from_header = match req
        .headers
        .get_all(header::HOST)
        .iter()
        .collect::<Vec<_>>()
        .as_slice()
    {
        [one] => Some(one.to_str().ok()?.to_owned()),
        [] => None,
        _ => return None,
    };
    let from_target = req.uri.authority().map(|a| a.as_str().to_owned());
    let target_name = match &from_target {
        Some(authority) => Some(host_name(authority)?),
        None => None,
    };
    let sent = from_header.or(from_target)?;
    let name = host_name(&sent)?;
    // RFC 9112 §3.2.2: the target's authority wins over `Host`; the upstream gets `Host`
    // (and routes match it), so the two must agree.
    if target_name.is_some_and(|t| t != name) {
        return None;
    }
    Some(RequestHost { sent, name })
}

/// The name routes match in a `host[:port]` (RFC 3986 §3.2.2; a registered name's labels
/// are letters, digits, `-` and `_`), lower case, without one trailing dot; `None` when
/// `host` is not a valid `host[:port]`.
fn host_name(host: &str) -> Option<String> {
    let (name, port) = if host.starts_with('[') {
        // [v6] or [v6]:port; the brackets stay, as routes write them.
        let end = host.find(']')?;
        let (v6, rest) = host.split_at(end + 1);
        v6[1..end].parse::<std::net::Ipv6Addr>().ok()?;
        let port = match rest {
            "" => None,
            rest => Some(rest.strip_prefix(':')?),
        };
        (v6, port)
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err())
    {
        return None;
    }
    if name.starts_with('[') {
        return Some(name.to_ascii_lowercase());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (name.len() <= 253 && name.split('.').all(label)).then(|| name.to_ascii_lowercase())
}

/// The path (and query) sent upstream: the matched prefix replaced by `upstream_path`.
fn upstream_target(route: &Route, req: &request::Parts) -> String {
    let path = req.uri.path();
    let mut target = match &route.upstream_path {
        None => path.to_owned(),
        Some(base) => {
            let rest = &path[route.path_prefix.len().min(path.len())..];
            match (base.ends_with('/'), rest.starts_with('/')) {
                (true, true) => format!("{base}{}", &rest[1..]),
                (false, false) if !rest.is_empty() => format!("{base}/{rest}"),
                _ => format!("{base}{rest}"),
            }
        }
    };
    if let Some(q) = req.uri.query() {
        target.push('?');
        target.push_str(q);
    }
    target
}

/// Exactly one value for a header that must appear once.
fn single<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    let mut values = h.get_all(name).iter();
    let first = values.next()?;
    values
        .next()
        .is_none()
        .then(|| first.as_bytes().trim_ascii())
}

/// RFC 6455 §4.1: a base64 encoding of 16 bytes, i.e. 22 base64 characters and `==`.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The client's offers filtered by the route's allowlist. Offers but none allowed → 400.
pub fn allowed_protocols(
    h: &HeaderMap,
    allow: Option<&[String]>,
) -> Result<Option<String>, Refusal> {
    let offers: Vec<&str> = h
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offers.is_empty() {
        return Ok(None);
    }
    let kept: Vec<&str> = match allow {
        None => offers,
        Some(allow) => offers
            .into_iter()
            .filter(|p| allow.iter().any(|a| a == p))
            .collect(),
    };
    if kept.is_empty() {
        return Err(Refusal::Subprotocol);
    }
    Ok(Some(kept.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::Response;

    const YAML: &str = r#"
listeners: [{ name: public, bind: "127.0.0.1:0" }]
upstreams:
  echo: { builtin: echo }
routes:
  - { name: chat, match: { host: chat.example.com, path_prefix: /ws }, upstream: echo, upstream_path: /socket, subprotocols: [v1.chat] }
  - { name: any, match: { path_prefix: /ws }, upstream: echo }
"#;

    fn routes() -> Vec<Route> {
        match Config::from_yaml_str(YAML, "test.yaml") {
            Ok(c) => c.routes,
            Err(e) => panic!("{e}"),
        }
    }

    fn upgrade(host: &str, path: &str) -> http::request::Builder {
        http::Request::get(path)
            .header("host", host)
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    fn parts(b: http::request::Builder) -> request::Parts {
        match b.body(()) {
            Ok(r) => r.into_parts().0,
            Err(e) => panic!("{e}"),
        }
    }

    /// A percent-encoded path must not take a route its decoded form would not.
    #[test]
    fn encoded_paths_cannot_switch_routes() {
        let yaml = YAML.replace(
            "  - { name: any, match: { path_prefix: /ws }, upstream: echo }",
            "  - { name: admin, match: { path_prefix: /ws/admin }, upstream: echo }\n  - { name: any, match: { path_prefix: /ws }, upstream: echo }",
        );
        let routes = match Config::from_yaml_str(&yaml, "test.yaml") {
            Ok(c) => c.routes,
            Err(e) => panic!("{e}"),
        };
        for path in ["/ws/%61dmin", "/ws%2Fadmin", "/ws/%61dmin/x"] {
            let refused = check(&parts(upgrade("a", path)), &routes).err();
            assert_eq!(refused.map(|r| r.reason()), Some("bad_upgrade"), "{path}");
        }
        for (path, route) in [("/ws/room%20one", "any"), ("/ws/admin/%61", "admin")] {
            let admitted = check(&parts(upgrade("a", path)), &routes);
            assert_eq!(
                admitted.map(|a| a.route.name.clone()).ok().as_deref(),
                Some(route)
            );
        }
    }

    #[test]
    fn paths_with_dot_segments_are_bad_upgrades() {
        let routes = routes();
        for path in [
            "/ws/../admin",
            "/ws/./x",
            "/ws/..",
            "/ws/%2e%2e/admin",
            "/ws/%2E./admin",
            "/ws/..;/admin",
            "/ws/.%2e;x=1/admin",
            "/ws/%2e%2e%2fadmin",
            "/ws/..%5cadmin",
        ] {
            let refused = check(&parts(upgrade("a", path)), &routes).err();
            assert_eq!(refused.map(|r| r.reason()), Some("bad_upgrade"), "{path}");
        }
        for path in [
            "/ws/...",
            "/ws/.well-known",
            "/ws/a..b",
            "/ws/x.",
            "/ws/%2e%2e%2e",
        ] {
            assert!(check(&parts(upgrade("a", path)), &routes).is_ok(), "{path}");
        }
    }

    #[test]
    fn paths_with_empty_segments_or_parameters_are_bad_upgrades() {
        let routes = routes();
        for path in [
            "/ws//admin",
            "//ws",
            "/ws;x=1/admin",
            "/ws/admin;",
            "/ws/%2F/admin",
            "/ws%2F%2Fadmin",
            "/ws/%3Bx",
            "/ws/%5C/x",
            "/ws\\admin",
            "/ws%5Cadmin",
            "/ws%5cadmin",
        ] {
            let refused = check(&parts(upgrade("a", path)), &routes).err();
            assert_eq!(refused.map(|r| r.reason()), Some("bad_upgrade"), "{path}");
        }
        for path in ["/ws/", "/ws/a/b/", "/ws/a,b=c"] {
            assert!(check(&parts(upgrade("a", path)), &routes).is_ok(), "{path}");
        }
    }

    #[test]
    fn hosts_are_valid_host_and_port_matched_without_case_or_one_trailing_dot() {
        for (host, name) in [
            ("Chat.Example.COM", "chat.example.com"),
            ("chat.example.com.", "chat.example.com"),
            ("chat.example.com.:8443", "chat.example.com"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
            ("under_score.internal", "under_score.internal"),
            ("localhost", "localhost"),
        ] {
            assert_eq!(host_name(host).as_deref(), Some(name), "{host}");
        }
        for host in [
            "", ".", "a..b", ".a", "a.b..", "a b", "a:", "a:x", "a:65536", "a:1:2", "u@a", "a/b",
            "[::1", "[::1]x", "[zz::1]", "::1", "a%2eb",
        ] {
            assert_eq!(host_name(host), None, "{host}");
        }
        let routes = routes();
        let chosen = |host: &str| {
            check(&parts(upgrade(host, "/ws")), &routes)
                .map(|a| (a.route.name.clone(), a.host))
                .map_err(|r| r.reason())
        };
        assert_eq!(
            chosen("CHAT.example.com."),
            Ok(("chat".to_owned(), "CHAT.example.com.".to_owned()))
        );
        assert_eq!(chosen("chat.example.com..").err(), Some("bad_upgrade"));
        assert_eq!(chosen("chat.example.com:x").err(), Some("bad_upgrade"));
    }

    #[test]
    fn an_absolute_form_target_and_host_must_agree() {
        let routes = routes();
        let req = |host: &str| {
            http::Request::get("http://chat.example.com/ws")
                .header("host", host)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        };
        let agreed = check(&parts(req("Chat.Example.com")), &routes);
        assert_eq!(agreed.map(|a| a.route.name.clone()), Ok("chat".to_owned()));
        let split = check(&parts(req("other.example.com")), &routes);
        assert_eq!(split.map(|_| ()), Err(Refusal::BadUpgrade));
    }

    /// The early guess that names a refusal's route reads the host as `admit` does.
    #[test]
    fn route_of_reads_an_absolute_form_target() {
        let routes = routes();
        let req = http::Request::get("http://chat.example.com/ws/x?t=1")
            .header("upgrade", "websocket")
            .body(())
            .map(|r| r.into_parts().0);
        let route = req
            .ok()
            .and_then(|p| route_of(&p, &routes).map(|r| r.name.clone()));
        assert_eq!(route.as_deref(), Some("chat"));
    }

    #[test]
    fn first_matching_route_wins_and_host_is_case_insensitive() {
        let routes = routes();
        let a = check(
            &parts(upgrade("Chat.Example.com:443", "/ws/room?x=1")),
            &routes,
        );
        let a = a.map_err(|r| r.reason());
        assert_eq!(a.as_ref().map(|a| a.route.name.as_str()), Ok("chat"));
        assert_eq!(
            a.map(|a| a.upstream_target),
            Ok("/socket/room?x=1".to_owned())
        );
        let b = check(&parts(upgrade("other", "/ws")), &routes).map(|a| a.route.name.clone());
        assert_eq!(b, Ok("any".to_owned()));
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let routes = routes();
        let cases: Vec<(http::request::Builder, Refusal)> = vec![
            (upgrade("h", "/nope"), Refusal::NoRoute),
            (
                http::Request::get("/ws").header("host", "h"),
                Refusal::UpgradeRequired,
            ),
            (upgrade("h", "/ws").method("POST"), Refusal::BadUpgrade),
            (
                upgrade("h", "/ws").version(Version::HTTP_10),
                Refusal::BadUpgrade,
            ),
            (
                upgrade("h", "/ws").header("sec-websocket-version", "8"),
                Refusal::BadVersion,
            ),
            (
                http::Request::get("/ws")
                    .header("host", "h")
                    .header("connection", "not-upgrade")
                    .header("upgrade", "websocket"),
                Refusal::BadUpgrade,
            ),
            (
                http::Request::get("/ws")
                    .header("host", "h")
                    .header("upgrade", "websocket"),
                Refusal::BadUpgrade,
            ),
            (
                upgrade("h", "/ws").header("content-length", "5"),
                Refusal::BadUpgrade,
            ),
            (
                upgrade("chat.example.com", "/ws").header("sec-websocket-protocol", "v2.chat"),
                Refusal::Subprotocol,
            ),
        ];
        for (i, (req, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                check(&parts(req), &routes).map(|_| ()),
                Err(want),
                "case {i}"
            );
        }
    }

    #[test]
    fn bad_keys_are_refused() {
        let routes = routes();
        for key in [
            "",
            "short==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25j!Q==",
        ] {
            let req = http::Request::get("/ws")
                .header("host", "h")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", key);
            assert_eq!(
                check(&parts(req), &routes).map(|_| ()),
                Err(Refusal::BadUpgrade),
                "{key}"
            );
        }
    }

    #[test]
    fn allowlist_filters_offers() {
        let routes = routes();
        let req =
            upgrade("chat.example.com", "/ws").header("sec-websocket-protocol", "v2.chat, v1.chat");
        assert_eq!(
            check(&parts(req), &routes).map(|a| a.protocols),
            Ok(Some("v1.chat".to_owned()))
        );
    }

    #[test]
    fn refusals_carry_the_headers_rfcs_ask_for() {
        let r: Response<String> = Refusal::BadVersion.response();
        assert_eq!(r.status(), 426);
        assert_eq!(r.headers()["sec-websocket-version"], "13");
        assert_eq!(r.body(), "bad_version\n");
        let r: Response<String> = Refusal::UpstreamStatus(403).response();
        assert_eq!(r.status(), 403);
    }
}
