//! `upstreams`: backends (addresses, weights) or the builtin echo, `sticky.key`,
//! `balance`, `health_check`, `connect_timeout`, `max_ejected`, `max_pending`,
//! `queue_timeout` and `slow_start`.

use super::{Validator, is_token};
use crate::config::file::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_HEALTHY_AFTER, DEFAULT_MAX_EJECTED_PERCENT, DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_UNHEALTHY_AFTER, DEFAULT_WEIGHT, FileBackend, FileBalance, FileHealthCheck, FileSticky,
    FileUpstream,
};
use crate::config::units::{Text, fmt_duration};
use crate::config::{Backend, HealthCheck, KeyPath, StickyKey, Upstream, UpstreamKind};

impl Validator<'_> {
    pub(super) fn upstream(
        &mut self,
        name: &str,
        file: FileUpstream,
        path: &KeyPath,
    ) -> Option<Upstream> {
        let before = self.issues.len();
        if name.trim().is_empty() {
            self.issue(path, "upstream name must not be empty".into());
        }
        let sticky = file
            .sticky
            .map(|st| self.sticky(st, &path.key("sticky").key("key")))
            .unwrap_or_default();
        let bounded_load = file
            .balance
            .and_then(|b| self.balance(b, &path.key("balance").key("bounded_load")));
        let health_check = file
            .health_check
            .map(|h| self.health_check(h, &path.key("health_check")));
        let connect_timeout = match file.connect_timeout {
            Some(d) => self.positive(d, &path.key("connect_timeout")),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let max_ejected = match &file.max_ejected {
            Some(text) => self.percent(text, &path.key("max_ejected")),
            None => DEFAULT_MAX_EJECTED_PERCENT,
        };
        let queue_timeout = match file.queue_timeout {
            Some(d) => self.positive(d, &path.key("queue_timeout")),
            None => DEFAULT_QUEUE_TIMEOUT,
        };
        let slow_start = file.slow_start.map_or(std::time::Duration::ZERO, |d| d.0);
        let kind = match (file.backends, file.builtin) {
            (Some(_), Some(_)) => {
                self.issue(path, "set either `backends` or `builtin`, not both".into());
                None
            }
            (None, None) => {
                self.issue(
                    path,
                    "an upstream needs `backends: [{ addr: \"host:port\" }]` or `builtin: echo`"
                        .into(),
                );
                None
            }
            (Some(backends), None) => self.backends(backends, &path.key("backends")),
            (None, Some(builtin)) => match builtin.value.trim() {
                "echo" => Some(UpstreamKind::BuiltinEcho),
                _ => {
                    self.issue(
                        &path.key("builtin"),
                        format!(
                            "unknown builtin {}; the only builtin is `echo`",
                            builtin.shown()
                        ),
                    );
                    None
                }
            },
        };
        let kind = kind?;
        let tls = match file.tls {
            Some(_) if kind == UpstreamKind::BuiltinEcho => {
                self.issue(
                    &path.key("tls"),
                    "the builtin echo speaks plain ws://; remove `tls`".into(),
                );
                None
            }
            Some(t) => self.upstream_tls(t, &path.key("tls")),
            None => None,
        };
        (self.issues.len() == before).then(|| Upstream {
            name: name.to_string(),
            kind,
            tls,
            connect_timeout,
            sticky,
            bounded_load,
            health_check,
            max_ejected,
            max_pending: file.max_pending.unwrap_or(0),
            queue_timeout,
            slow_start,
        })
    }

    /// A share written `N%` (N a whole number, 0..=100).
    fn percent(&mut self, text: &Text, path: &KeyPath) -> u8 {
        let parsed = text
            .value
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u8>().ok())
            .filter(|n| *n <= 100);
        parsed.unwrap_or_else(|| {
            self.issue(
                path,
                format!(
                    "{} is not a share of the backends; write a whole percentage from `0%` (passive detection never takes a backend out) to `100%` (no bound), e.g. `50%`",
                    text.shown()
                ),
            );
            DEFAULT_MAX_EJECTED_PERCENT
        })
    }

    fn sticky(&mut self, file: FileSticky, path: &KeyPath) -> StickyKey {
        match parse_sticky(file.key.value.trim()) {
            Ok(key) => key,
            Err(rule) => {
                self.issue(
                    path,
                    format!(
                        "{} is not a sticky key: {rule}; write `ip`, `header:NAME`, `cookie:NAME`, `query:NAME` or `claim:NAME`",
                        file.key.shown()
                    ),
                );
                StickyKey::Ip
            }
        }
    }

    fn balance(&mut self, file: FileBalance, path: &KeyPath) -> Option<f64> {
        let c = file.bounded_load?;
        if !c.is_finite() || !(1.0..=100.0).contains(&c) {
            self.issue(
                path,
                format!("bounded_load {c} is out of range: it must be between 1 and 100 (1.25 is usual); below 1 no backend could take the next connection"),
            );
            return None;
        }
        Some(c)
    }

    fn health_check(&mut self, file: FileHealthCheck, path: &KeyPath) -> HealthCheck {
        let interval = match file.interval {
            Some(d) => self.positive(d, &path.key("interval")),
            None => DEFAULT_HEALTH_INTERVAL,
        };
        let timeout = match file.timeout {
            Some(d) => self.positive(d, &path.key("timeout")),
            None => DEFAULT_HEALTH_TIMEOUT.min(interval),
        };
        if timeout > interval {
            self.issue(
                &path.key("timeout"),
                format!(
                    "timeout ({}) must not exceed interval ({}); a check must end before the next begins",
                    fmt_duration(timeout),
                    fmt_duration(interval)
                ),
            );
        }
        let path_value = file
            .path
            .as_ref()
            .and_then(|p| self.uri_path(p, &path.key("path"), true));
        let mut threshold = |value: Option<u32>, default: u32, key: &str| {
            let n = value.unwrap_or(default);
            if !(1..=100).contains(&n) {
                self.issue(
                    &path.key(key),
                    format!("`{key}` must be in 1..=100, got {n}"),
                );
            }
            n
        };
        let unhealthy_after = threshold(
            file.unhealthy_after,
            DEFAULT_UNHEALTHY_AFTER,
            "unhealthy_after",
        );
        let healthy_after = threshold(file.healthy_after, DEFAULT_HEALTHY_AFTER, "healthy_after");
        HealthCheck {
            interval,
            timeout,
            path: path_value,
            unhealthy_after,
            healthy_after,
        }
    }

    fn backends(&mut self, file: Vec<FileBackend>, path: &KeyPath) -> Option<UpstreamKind> {
        if file.is_empty() {
            self.issue(
                path,
                "backends must not be empty; add `- { addr: \"host:port\" }` or use `builtin: echo`"
                    .into(),
            );
            return None;
        }
        let mut backends: Vec<Backend> = Vec::new();
        for (i, backend) in file.into_iter().enumerate() {
            let path = path.index(i);
            let addr = self.backend_addr(&backend.addr, &path.key("addr"));
            let weight = backend.weight.unwrap_or(DEFAULT_WEIGHT);
            if weight == 0 {
                self.issue(&path.key("weight"), "weight must be at least 1".into());
            }
            if let Some(first) = addr
                .as_ref()
                .and_then(|a| backends.iter().position(|b| &b.addr == a))
            {
                self.issue(
                    &path.key("addr"),
                    format!("this address is already backends[{first}]; list each backend once (use `weight` for a bigger share)"),
                );
                continue;
            }
            if let Some(addr) = addr {
                backends.push(Backend { addr, weight });
            }
        }
        Some(UpstreamKind::Backends(backends))
    }

    fn backend_addr(&mut self, text: &Text, path: &KeyPath) -> Option<String> {
        let addr = text.value.trim();
        match check_host_port(addr) {
            Ok(()) => Some(addr.to_string()),
            Err(rule) => {
                self.issue(
                    path,
                    format!(
                        "{} is not a backend address: {rule}; write `host:port`, e.g. `127.0.0.1:9001` or `[::1]:9001`",
                        text.shown()
                    ),
                );
                None
            }
        }
    }
}

/// `host:port` with a non-empty host (IPv6 in brackets) and a port in 1..=65535.
fn check_host_port(addr: &str) -> Result<(), &'static str> {
    if addr.contains("://") {
        return Err("an address is host:port, without a scheme (`ws://`, `http://`) or a path");
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("missing `:port`");
    };
    if host.is_empty() {
        return Err("missing host");
    }
    if let Some(inner) = host.strip_prefix('[') {
        if !inner.ends_with(']') || inner.len() < 2 {
            return Err("unbalanced `[` in the host");
        }
    } else if host.contains(':') {
        return Err("an IPv6 host must be in brackets");
    }
    if host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err("the host must not contain spaces or `/` (no scheme or path)");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be a number in 1..=65535"),
        Ok(_) => Ok(()),
    }
}

/// `ip` | `header:NAME` | `cookie:NAME` | `query:NAME` | `claim:NAME`.
fn parse_sticky(text: &str) -> Result<StickyKey, &'static str> {
    if text == "ip" {
        return Ok(StickyKey::Ip);
    }
    let Some((kind, name)) = text.split_once(':') else {
        return Err("unknown kind");
    };
    if name.is_empty() {
        return Err("the NAME after `:` is missing");
    }
    match kind {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(StickyKey::Header)
            .map_err(|_| "not a valid header name"),
        "cookie" if is_token(name) => Ok(StickyKey::Cookie(name.to_owned())),
        "cookie" => Err("a cookie name is an RFC 7230 token"),
        "query" if !name.contains(['&', '=', '#', ' ']) => Ok(StickyKey::Query(name.to_owned())),
        "query" => Err("a query parameter name cannot contain `&`, `=`, `#` or spaces"),
        "claim" => Ok(StickyKey::Claim(name.to_owned())),
        _ => Err("unknown kind"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;

    #[test]
    fn pools_with_sticky_balance_and_health_checks_load() {
        let text = MINIMAL.replace(
            "{ builtin: echo }",
            "{ backends: [{ addr: \"a:1\", weight: 2 }, { addr: \"[::1]:2\" }], sticky: { key: \"cookie:sid\" }, balance: { bounded_load: 1.25 }, health_check: { interval: 1s, path: /health, healthy_after: 1 }, max_ejected: 34% }",
        );
        let config = load(&text).unwrap();
        let up = &config.upstreams["echo"];
        assert_eq!(
            up.kind,
            UpstreamKind::Backends(vec![
                Backend {
                    addr: "a:1".into(),
                    weight: 2
                },
                Backend {
                    addr: "[::1]:2".into(),
                    weight: 1
                }
            ])
        );
        assert_eq!(up.sticky, StickyKey::Cookie("sid".into()));
        assert_eq!(up.bounded_load, Some(1.25));
        assert_eq!(up.max_ejected, 34);
        assert_eq!(
            up.health_check,
            Some(HealthCheck {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                path: Some("/health".into()),
                unhealthy_after: 3,
                healthy_after: 1,
            })
        );
        let plain = load(MINIMAL).unwrap();
        let up = &plain.upstreams["echo"];
        assert_eq!(
            (
                &up.sticky,
                up.bounded_load,
                &up.health_check,
                up.max_ejected
            ),
            (&StickyKey::Ip, None, &None, 50)
        );
    }

    #[test]
    fn sticky_keys_parse_every_kind_and_refuse_the_rest() {
        let ok = [
            ("ip", StickyKey::Ip),
            (
                "header:X-User",
                StickyKey::Header(http::HeaderName::from_static("x-user")),
            ),
            ("cookie:sid", StickyKey::Cookie("sid".into())),
            ("query:room", StickyKey::Query("room".into())),
            ("claim:sub", StickyKey::Claim("sub".into())),
        ];
        for (text, want) in ok {
            assert_eq!(parse_sticky(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "ipv6",
            "header:",
            "header:a b",
            "cookie:a;b",
            "query:a=b",
            "path:x",
            "claim:",
        ] {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ builtin: echo, sticky: {{ key: \"{bad}\" }} }}"),
            );
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{bad}: {errors:#?}");
            assert_eq!(errors[0].path, "upstreams.echo.sticky.key", "{bad}");
            assert!(
                errors[0].message.contains("not a sticky key"),
                "{}",
                errors[0]
            );
            assert!(errors[0].line > 0);
        }
    }

    #[test]
    fn balance_and_health_check_ranges_are_checked() {
        let cases = [
            (
                "balance: { bounded_load: 0.5 }",
                "upstreams.echo.balance.bounded_load",
            ),
            (
                "balance: { bounded_load: .nan }",
                "upstreams.echo.balance.bounded_load",
            ),
            (
                "health_check: { interval: 0s }",
                "upstreams.echo.health_check.interval",
            ),
            (
                "health_check: { interval: 1s, timeout: 2s }",
                "upstreams.echo.health_check.timeout",
            ),
            (
                "health_check: { path: health }",
                "upstreams.echo.health_check.path",
            ),
            (
                "health_check: { path: \"/he alth\" }",
                "upstreams.echo.health_check.path",
            ),
            (
                "health_check: { unhealthy_after: 0 }",
                "upstreams.echo.health_check.unhealthy_after",
            ),
            (
                "health_check: { healthy_after: 101 }",
                "upstreams.echo.health_check.healthy_after",
            ),
            ("max_ejected: 101%", "upstreams.echo.max_ejected"),
            ("max_ejected: 50", "upstreams.echo.max_ejected"),
            ("max_ejected: \"-1%\"", "upstreams.echo.max_ejected"),
        ];
        for (extra, path) in cases {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ builtin: echo, {extra} }}"),
            );
            let errors = errors_of(&text);
            assert_eq!(errors.len(), 1, "{extra}: {errors:#?}");
            assert_eq!(errors[0].path, path, "{extra}");
            assert!(errors[0].line > 0, "{}", errors[0]);
        }
        // `balance: {}` is plain rendezvous.
        let text = MINIMAL.replace("{ builtin: echo }", "{ builtin: echo, balance: {} }");
        assert_eq!(load(&text).unwrap().upstreams["echo"].bounded_load, None);
        for (share, want) in [("0%", 0), ("100%", 100), ("\" 25 %\"", 25)] {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ builtin: echo, max_ejected: {share} }}"),
            );
            assert_eq!(load(&text).unwrap().upstreams["echo"].max_ejected, want);
        }
    }

    #[test]
    fn a_backend_listed_twice_is_refused() {
        let text = MINIMAL.replace(
            "{ builtin: echo }",
            "{ backends: [{ addr: \"a:1\" }, { addr: \"a:1\" }] }",
        );
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].path, "upstreams.echo.backends[1].addr");
        assert!(errors[0].message.contains("already backends[0]"));
    }

    #[test]
    fn upstream_needs_exactly_one_of_backends_and_builtin() {
        let both = MINIMAL.replace(
            "{ builtin: echo }",
            "{ builtin: echo, backends: [{ addr: \"a:1\" }] }",
        );
        assert!(errors_of(&both)[0].message.contains("not both"));
        let neither = MINIMAL.replace("{ builtin: echo }", "{ connect_timeout: 1s }");
        assert_eq!(errors_of(&neither)[0].path, "upstreams.echo");
        let empty = MINIMAL.replace("{ builtin: echo }", "{ backends: [] }");
        assert_eq!(errors_of(&empty)[0].path, "upstreams.echo.backends");
        let unknown = MINIMAL.replace("{ builtin: echo }", "{ builtin: chat }");
        assert!(
            errors_of(&unknown)[0]
                .message
                .contains("the only builtin is `echo`")
        );
        // A route naming an invalid-but-defined upstream reports only the upstream's error.
        assert_eq!(errors_of(&unknown).len(), 1);
    }

    #[test]
    fn backend_addresses_and_weights_are_checked() {
        for bad in [
            "nohost",
            ":80",
            "h:0",
            "h:65536",
            "::1:80",
            "[::1:80",
            "h:x",
            "http://h:80",
        ] {
            let text = MINIMAL.replace(
                "{ builtin: echo }",
                &format!("{{ backends: [{{ addr: \"{bad}\" }}] }}"),
            );
            assert_eq!(
                errors_of(&text)[0].path,
                "upstreams.echo.backends[0].addr",
                "{bad}"
            );
        }
        for good in [
            "h:80",
            "[::1]:9001",
            "chat-2.internal:9001",
            "10.0.0.1:65535",
        ] {
            assert!(check_host_port(good).is_ok(), "{good}");
        }
        let zero = MINIMAL.replace(
            "{ builtin: echo }",
            "{ backends: [{ addr: \"h:1\", weight: 0 }] }",
        );
        assert_eq!(
            errors_of(&zero)[0].path,
            "upstreams.echo.backends[0].weight"
        );
    }
}
