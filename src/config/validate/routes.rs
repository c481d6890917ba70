//! `routes`: names, `match` (host, path prefix; no shadowed routes), the upstream
//! reference, `upstream_path`, `subprotocols` and per-route limits and admission.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Validator, is_token};
use crate::config::file::FileRoute;
use crate::config::units::Text;
use crate::config::{Deflate, HttpMode, KeyPath, Limits, Route, StickyKey, Upstream};

impl Validator<'_> {
    pub(super) fn routes(
        &mut self,
        file: Vec<FileRoute>,
        path: &KeyPath,
        limits: &Limits,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        defined: &[String],
    ) -> Vec<Route> {
        if file.is_empty() {
            self.issue(
                path,
                "at least one route is required, e.g. `routes: [{ name: echo, match: { path_prefix: /echo }, upstream: echo }]`".into(),
            );
        }
        let mut routes = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut matches: HashMap<(Option<String>, String), usize> = HashMap::new();
        for (i, route) in file.into_iter().enumerate() {
            let path = path.index(i);
            let before = self.issues.len();
            let name = self.non_empty(&route.name, &path.key("name"), "route name");
            if let Some(name) = &name {
                if let Some(first) = names.get(name) {
                    self.issue(
                        &path.key("name"),
                        format!("route name `{name}` is already used by routes[{first}]; names must be unique"),
                    );
                } else {
                    names.insert(name.clone(), i);
                }
            }
            let match_path = path.key("match");
            let host = route
                .matcher
                .host
                .as_ref()
                .and_then(|host| self.host(host, &match_path.key("host")));
            let path_prefix = self.uri_path(
                &route.matcher.path_prefix,
                &match_path.key("path_prefix"),
                false,
            );
            if let Some(prefix) = &path_prefix {
                let key = (host.clone(), prefix.clone());
                if let Some(first) = matches.get(&key) {
                    self.issue(
                        &match_path,
                        format!("routes[{first}] has the same match, so this route can never be chosen; change host or path_prefix"),
                    );
                } else {
                    matches.insert(key, i);
                }
            }
            let upstream =
                self.route_upstream(&route.upstream, &path.key("upstream"), upstreams, defined);
            let upstream_path = route
                .upstream_path
                .as_ref()
                .and_then(|p| self.uri_path(p, &path.key("upstream_path"), false));
            let admission = self.route_admission(
                route.origins.as_deref(),
                route.allow_missing_origin,
                route.auth,
                &path,
            );
            let subprotocols = route.subprotocols.map(|list| {
                let list_path = path.key("subprotocols");
                list.iter()
                    .enumerate()
                    .filter_map(|(j, p)| {
                        let value = p.value.trim();
                        if is_token(value) {
                            Some(value.to_string())
                        } else {
                            self.issue(
                                &list_path.index(j),
                                format!("subprotocol {} is not an RFC 7230 token (letters, digits and !#$%&'*+-.^_`|~, no spaces or separators)", p.shown()),
                            );
                            None
                        }
                    })
                    .collect()
            });
            if let Some(StickyKey::Claim(claim)) = upstream.as_ref().map(|u| &u.sticky)
                && admission.jwt.is_none()
            {
                self.issue(
                    &path.key("upstream"),
                    format!("upstream {} is sticky by `claim:{claim}`, which needs a validated token: add `auth.jwt` to this route or use another sticky key", route.upstream.shown()),
                );
            }
            let deflate = match route.deflate.as_ref().map(|t| t.value.trim()) {
                None | Some("pass") => Deflate::Pass,
                Some("strip") => Deflate::Strip,
                Some("inspect") => Deflate::Inspect,
                Some(_) => {
                    self.issue(
                        &path.key("deflate"),
                        "deflate must be `pass` (limits count compressed bytes), `strip` (never negotiated) or `inspect` (limits and UTF-8 judged inflated)".into(),
                    );
                    Deflate::Pass
                }
            };
            let http = match route.http.as_ref().map(|t| t.value.trim()) {
                None | Some("refuse") => HttpMode::Refuse,
                Some("proxy") => HttpMode::Proxy,
                Some(_) => {
                    self.issue(
                        &path.key("http"),
                        "http must be `refuse` (plain HTTP requests get 426 upgrade_required) or `proxy` (relayed to the route's upstream)".into(),
                    );
                    HttpMode::Refuse
                }
            };
            let route_limits =
                self.limits(limits, route.limits.as_ref(), &path.key("limits"), false);
            if self.issues.len() != before {
                continue;
            }
            if let (Some(name), Some(path_prefix), Some(upstream)) = (name, path_prefix, upstream) {
                routes.push(Route {
                    name,
                    host,
                    path_prefix,
                    upstream,
                    upstream_path,
                    subprotocols,
                    admission: Arc::new(admission),
                    limits: route_limits,
                    deflate,
                    http,
                });
            }
        }
        routes
    }

    fn route_upstream(
        &mut self,
        text: &Text,
        path: &KeyPath,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        defined: &[String],
    ) -> Option<Arc<Upstream>> {
        let name = text.value.trim();
        if let Some(upstream) = upstreams.get(name) {
            return Some(upstream.clone());
        }
        if defined.iter().any(|d| d == name) {
            // Defined but invalid: its own errors are already reported.
            return None;
        }
        let known = if defined.is_empty() {
            "no upstreams are defined; add one under `upstreams:`".to_string()
        } else {
            let mut sorted = defined.to_vec();
            sorted.sort();
            format!("defined upstreams: {}", sorted.join(", "))
        };
        self.issue(path, format!("unknown upstream {}; {known}", text.shown()));
        None
    }

    fn host(&mut self, text: &Text, path: &KeyPath) -> Option<String> {
        let host = text.value.trim().to_ascii_lowercase();
        let rule = if host.is_empty() {
            Some("must not be empty; remove `host` to match any host")
        } else if host.starts_with('[') {
            (!host.ends_with(']') || host.len() < 3)
                .then_some("an IPv6 host must be written `[addr]` without a port")
        } else if host.contains(':') {
            Some("must not contain a port; the port is the listener's")
        } else if host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@'))
        {
            Some("must be a bare host name, without scheme, path or spaces")
        } else {
            None
        };
        match rule {
            Some(rule) => {
                self.issue(path, format!("host {} {rule}", text.shown()));
                None
            }
            // Matched as requests' hosts are: `example.com.` is `example.com`.
            None => Some(match host.strip_suffix('.') {
                Some(name) if !name.is_empty() => name.to_owned(),
                _ => host,
            }),
        }
    }

    /// A path for a request line: starts with `/` and is a valid URI path, with a query
    /// only where one makes sense (`with_query`), never a fragment.
    pub(super) fn uri_path(
        &mut self,
        text: &Text,
        path: &KeyPath,
        with_query: bool,
    ) -> Option<String> {
        let value = text.value.trim();
        if value.starts_with('/') {
            let clean = !value.contains('#') && (with_query || !value.contains('?'));
            if clean && http::uri::PathAndQuery::try_from(value).is_ok() {
                return Some(value.to_string());
            }
            self.issue(
                path,
                format!(
                    "{} is not a valid URI path (no fragment{}); percent-encode spaces and other special characters (e.g. `%20`)",
                    text.shown(),
                    if with_query { "" } else { ", no query" }
                ),
            );
            None
        } else {
            self.issue(
                path,
                format!(
                    "{} must start with `/`, e.g. `/{}`",
                    text.shown(),
                    if text.template.is_some() { "ws" } else { value }
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    #[test]
    fn unknown_upstream_is_located_and_lists_the_defined_ones() {
        let text = MINIMAL.replace("    upstream: echo", "    upstream: ehco")
            + "  - { name: b, match: { path_prefix: /b }, upstream: echo }\n";
        assert_one_error(
            &text,
            "routes[0].upstream",
            8,
            15,
            "unknown upstream `ehco`; defined upstreams: echo",
        );
    }

    #[test]
    fn claim_stickiness_needs_jwt_on_the_route() {
        let text = MINIMAL.replace(
            "{ builtin: echo }",
            "{ builtin: echo, sticky: { key: \"claim:sub\" } }",
        );
        assert_one_error(
            &text,
            "routes[0].upstream",
            8,
            15,
            "needs a validated token",
        );
    }

    #[test]
    fn duplicate_route_names_and_shadowed_routes_are_refused() {
        let text = with("  - { name: echo, match: { path_prefix: /echo }, upstream: echo }\n");
        let errors = errors_of(&text);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["routes[1].name", "routes[1].match"]);
    }

    #[test]
    fn route_paths_hosts_and_subprotocols_are_checked() {
        let cases = [
            (
                "path_prefix: /echo",
                "path_prefix: echo",
                "routes[0].match.path_prefix",
            ),
            (
                "path_prefix: /echo",
                "path_prefix: /echo, host: \"a.com:443\"",
                "routes[0].match.host",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    upstream_path: ws",
                "routes[0].upstream_path",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    upstream_path: \"/a b\"",
                "routes[0].upstream_path",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    upstream_path: \"/ws#x\"",
                "routes[0].upstream_path",
            ),
            (
                "path_prefix: /echo",
                "path_prefix: \"/echo?a=1\"",
                "routes[0].match.path_prefix",
            ),
            (
                "path_prefix: /echo",
                "path_prefix: \"/ec\\tho\"",
                "routes[0].match.path_prefix",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    subprotocols: [ok, \"not ok\"]",
                "routes[0].subprotocols[1]",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    deflate: compress",
                "routes[0].deflate",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    http: allow",
                "routes[0].http",
            ),
            (
                "    upstream: echo",
                "    upstream: echo\n    limits: { http_timeout: 0s }",
                "routes[0].limits.http_timeout",
            ),
        ];
        for (from, to, path) in cases {
            let errors = errors_of(&MINIMAL.replace(from, to));
            assert_eq!(errors.len(), 1, "{to}: {errors:#?}");
            assert_eq!(errors[0].path, path);
        }
        let ok = MINIMAL.replace(
            "    upstream: echo",
            "    upstream: echo\n    subprotocols: [graphql-ws, v1.chat]\n    upstream_path: /ws",
        );
        let config = load(&ok).unwrap();
        assert_eq!(
            config.routes[0].subprotocols.as_deref(),
            Some(&["graphql-ws".to_string(), "v1.chat".to_string()][..])
        );
        assert_eq!(config.routes[0].upstream_path.as_deref(), Some("/ws"));
        assert_eq!(config.routes[0].deflate, crate::config::Deflate::Pass);
        for (word, want) in [
            ("pass", crate::config::Deflate::Pass),
            ("strip", crate::config::Deflate::Strip),
            ("inspect", crate::config::Deflate::Inspect),
        ] {
            let text = MINIMAL.replace(
                "    upstream: echo",
                &format!("    upstream: echo\n    deflate: {word}"),
            );
            assert_eq!(load(&text).unwrap().routes[0].deflate, want, "{word}");
        }
        assert_eq!(config.routes[0].http, crate::config::HttpMode::Refuse);
        let text = MINIMAL.replace(
            "    upstream: echo",
            "    upstream: echo\n    http: proxy\n    limits: { max_request_body: 64KiB, http_timeout: 90s }",
        );
        let proxied = load(&text).unwrap();
        assert_eq!(proxied.routes[0].http, crate::config::HttpMode::Proxy);
        assert_eq!(proxied.routes[0].limits.max_request_body, 64 << 10);
        assert_eq!(
            proxied.routes[0].limits.http_timeout,
            std::time::Duration::from_secs(90)
        );
    }
}
