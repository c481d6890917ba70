//! `strip_headers`, and what every route's settings add to the client headers removed
//! before forwarding and to the query names redacted in logs (SPEC §3, §6): a rule of one
//! route applies to requests on every route.

use http::HeaderName;

use super::Validator;
use crate::config::file::DEFAULT_STRIP_HEADERS;
use crate::config::units::Text;
use crate::config::{KeyPath, Route};

impl Validator<'_> {
    /// The `strip_headers` entries (default `[Forwarded, X-Real-IP]`): valid header names,
    /// none the upgrade itself needs.
    pub(super) fn strip_headers(
        &mut self,
        file: Option<Vec<Text>>,
        path: &KeyPath,
    ) -> Vec<HeaderName> {
        let Some(entries) = file else {
            return DEFAULT_STRIP_HEADERS
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect();
        };
        let mut names = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let Ok(name) = HeaderName::from_bytes(entry.value.trim().as_bytes()) else {
                self.issue(
                    &path.index(i),
                    format!("{} is not a valid header name", entry.shown()),
                );
                continue;
            };
            if is_upgrade_header(&name) {
                self.issue(
                    &path.index(i),
                    format!(
                        "{} is needed by the WebSocket upgrade itself and cannot be stripped",
                        entry.shown()
                    ),
                );
                continue;
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// `Host`, `Connection`, `Upgrade` and `Sec-WebSocket-*`: the proxy reads and sends them
/// for the upgrade.
fn is_upgrade_header(name: &HeaderName) -> bool {
    name == http::header::HOST
        || name == http::header::CONNECTION
        || name == http::header::UPGRADE
        || name.as_str().starts_with("sec-websocket-")
}

/// The `strip_headers` entries plus every route's `forward_claims` headers, once each.
pub(super) fn removed_headers(
    mut configured: Vec<HeaderName>,
    routes: &[Route],
) -> Vec<HeaderName> {
    let claims = routes
        .iter()
        .filter_map(|r| r.admission.jwt.as_ref())
        .flat_map(|j| j.forward_claims.iter().map(|(_, h)| h));
    for header in claims {
        if !configured.contains(header) {
            configured.push(header.clone());
        }
    }
    configured
}

/// Every query parameter any route reads a token or API key from, once each.
pub(super) fn secret_query_names(routes: &[Route]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for route in routes {
        for name in route.admission.secret_query_names() {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::files::MemoryFiles;

    fn config(top: &str) -> Result<Config, String> {
        let yaml = format!(
            r#"
listeners: [{{ bind: "127.0.0.1:0" }}]
{top}
upstreams: {{ echo: {{ builtin: echo }} }}
routes:
  - name: private
    match: {{ path_prefix: /private }}
    upstream: echo
    auth:
      jwt:
        from: ["query:access_token"]
        keys: [{{ alg: HS256, secret: "a-test-secret-of-at-least-32-bytes!!" }}]
        forward_claims: {{ sub: X-User-Id, tier: X-Tier }}
  - name: keyed
    match: {{ path_prefix: /keyed }}
    upstream: echo
    auth: {{ api_keys: {{ query: api_key, keys_file: /in-memory/keys.txt }} }}
  - {{ name: public, match: {{ path_prefix: / }}, upstream: echo }}
"#
        );
        let files = MemoryFiles::new().with("/in-memory/keys.txt", "ab".repeat(32));
        Config::from_yaml_str_with(&yaml, "t.yaml", &|_| None, &|p| files.read(p))
            .map_err(|e| e.to_string())
    }

    fn names(c: &Config) -> Vec<&str> {
        c.strip_headers.iter().map(|h| h.as_str()).collect()
    }

    #[test]
    fn every_routes_claim_headers_are_stripped_with_the_default_list() {
        let c = config("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["forwarded", "x-real-ip", "x-user-id", "x-tier"]);
        assert_eq!(c.secret_query_names, ["access_token", "api_key"]);
    }

    #[test]
    fn a_configured_list_replaces_the_default() {
        let c = config("strip_headers: [X-Internal, x-internal, X-Tier]")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["x-internal", "x-tier", "x-user-id"]);
        let c = config("strip_headers: []").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&c), ["x-user-id", "x-tier"]);
    }

    #[test]
    fn headers_the_upgrade_needs_and_invalid_names_are_refused() {
        for bad in [
            "Host",
            "Sec-WebSocket-Key",
            "Connection",
            "Upgrade",
            "\"a b\"",
        ] {
            let err = config(&format!("strip_headers: [X-Ok, {bad}]")).err();
            let err = err.unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.contains("strip_headers[1]"), "{err}");
        }
    }

    #[test]
    fn proxy_protocol_without_trusted_proxies_is_a_warning() {
        let yaml = |top: &str| {
            format!(
                "listeners: [{{ bind: \"127.0.0.1:0\", proxy_protocol: true }}]\n{top}\nupstreams: {{ echo: {{ builtin: echo }} }}\nroutes: [{{ name: r, match: {{ path_prefix: / }}, upstream: echo }}]\n"
            )
        };
        let load = |top: &str| {
            Config::from_yaml_str_with_env(&yaml(top), "t.yaml", &|_| None)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let warned = load("");
        assert!(
            warned
                .warnings
                .iter()
                .any(|w| w.contains("listeners[0].proxy_protocol") && w.contains("trusted_proxies")),
            "{:?}",
            warned.warnings
        );
        let trusted = load("trusted_proxies: [10.0.0.0/8]");
        assert!(trusted.warnings.is_empty(), "{:?}", trusted.warnings);
    }
}
