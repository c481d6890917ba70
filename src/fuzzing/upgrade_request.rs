//! The `upgrade_request` target: an HTTP/1-like head through `admit` (SPEC §3) and the
//! hop-by-hop filter, with the oracle that nothing admitted is impossible to forward.

use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version, request};

use crate::config::{Config, Route};

/// Larger heads are cut here: hyper refuses heads over 16 KiB before `admit` sees them.
pub const UPGRADE_REQUEST_MAX_INPUT: usize = 16 * 1024;

/// At most this many headers are taken from one input.
const MAX_HEADERS: usize = 16;

/// Routes of [`upgrade_request`]: a host-bound route with a subprotocol allowlist and a
/// path rewrite, a prefix rewrite to `/`, and a catch-all for `/ws` on any host.
pub const UPGRADE_ROUTES_YAML: &str = r#"
listeners: [{ name: public, bind: "127.0.0.1:0" }]
upstreams:
  echo: { builtin: echo }
  app: { backends: [{ addr: "app.internal:9000" }] }
routes:
  - { name: chat, match: { host: chat.example.com, path_prefix: /chat }, upstream: app, upstream_path: /socket, subprotocols: [v1.chat, graphql-ws] }
  - { name: api, match: { path_prefix: /api/ }, upstream: app, upstream_path: /, subprotocols: [mqtt] }
  - { name: ws, match: { path_prefix: /ws }, upstream: echo }
"#;

/// The routes of [`UPGRADE_ROUTES_YAML`], built once; `None` if that config is refused
/// (a unit test makes sure it is not).
pub fn upgrade_routes() -> Option<&'static [Route]> {
    static ROUTES: OnceLock<Option<Vec<Route>>> = OnceLock::new();
    ROUTES
        .get_or_init(|| {
            Config::from_yaml_str_with_env(UPGRADE_ROUTES_YAML, "fuzz-routes.yaml", &|_| None)
                .ok()
                .map(|c| c.routes)
        })
        .as_deref()
}

/// Builds request parts from an HTTP/1-like head and runs `admit` and `end_to_end` on it.
///
/// Layout of `data`: lines split on `\n` (a trailing `\r` is dropped). The first line is
/// `METHOD TARGET VERSION`; the method is any token, the target anything `http::Uri`
/// accepts (otherwise the input is skipped), the version `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`
/// or `HTTP/3`, anything else meaning HTTP/0.9. Each further line is a `name: value`
/// header; lines `http` refuses are skipped, at most 16 headers are kept. So a real
/// upgrade head is a meaningful input as it is.
///
/// Oracles: an admitted request can be turned into the upstream request (its target
/// parses as a URI, host and subprotocols are valid header values), and `end_to_end`
/// keeps no hop-by-hop header.
pub fn upgrade_request(data: &[u8]) {
    let data = data.get(..UPGRADE_REQUEST_MAX_INPUT).unwrap_or(data);
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(parts) = lines.next().and_then(request_line) else {
        return;
    };
    let mut parts = parts;
    for line in lines {
        if parts.headers.len() == MAX_HEADERS {
            break;
        }
        if let Some((name, value)) = header_line(line) {
            parts.headers.append(name, value);
        }
    }

    let routes = upgrade_routes().unwrap_or(&[]);
    if let Ok(admitted) = crate::handshake::upgrade::check(&parts, routes) {
        if admitted.upstream_target.parse::<Uri>().is_err() {
            panic!(
                "admit() accepted a request whose upstream target {:?} is not a URI: \
                 the upstream request cannot be built",
                admitted.upstream_target
            );
        }
        if HeaderValue::from_str(&admitted.host).is_err() {
            panic!(
                "admit() accepted host {:?}, not a header value",
                admitted.host
            );
        }
        if let Some(p) = &admitted.protocols
            && HeaderValue::from_str(p).is_err()
        {
            panic!("admit() kept subprotocols {p:?}, not a header value");
        }
    }

    let forwarded = crate::upstream::end_to_end(&parts.headers);
    for hop in [
        "connection",
        "upgrade",
        "keep-alive",
        "transfer-encoding",
        "te",
    ] {
        if forwarded.contains_key(hop) {
            panic!("end_to_end() kept the hop-by-hop header {hop}");
        }
    }
}

fn request_line(line: &[u8]) -> Option<request::Parts> {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let method = Method::from_bytes(words.next()?).ok()?;
    let uri = Uri::try_from(words.next()?).ok()?;
    let version = match words.next().unwrap_or_default() {
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/1.0" => Version::HTTP_10,
        b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
        b"HTTP/3" | b"HTTP/3.0" => Version::HTTP_3,
        _ => Version::HTTP_09,
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    Some(req.into_parts().0)
}

fn header_line(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = line.split_at(colon);
    let value = value.get(1..)?.trim_ascii();
    Some((
        HeaderName::from_bytes(name).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_routes_config_loads() {
        let routes = upgrade_routes().unwrap_or_else(|| panic!("UPGRADE_ROUTES_YAML refused"));
        assert_eq!(routes.len(), 3);
        assert!(routes[0].host.is_some() && routes[0].subprotocols.is_some());
    }
}
