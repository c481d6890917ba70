//! `limits` (top level and per-route overrides), `limits.messages`, `drain` and
//! `keepalive`: defaults applied, ranges and process-wide-only keys checked.

use super::Validator;
use crate::admission::ip_limit::RatePolicy;
use crate::config::file::{
    DEFAULT_BUFFER_SIZE, DEFAULT_DRAIN_SPREAD, DEFAULT_DRAIN_TIMEOUT, DEFAULT_PING_INTERVAL,
    DEFAULT_PONG_TIMEOUT, DEFAULT_UPSTREAM_PING_INTERVAL, FileDrain, FileKeepalive, FileLimits,
    FileMessageRate,
};
use crate::config::units::{fmt_duration, fmt_size};
use crate::config::{Drain, Keepalive, KeyPath, Limits, MessageRate, OnExceed, check_refill_span};

/// Smallest relay buffer: below this a relay spends its time in syscalls.
pub const MIN_BUFFER_SIZE: u64 = 1 << 10;
/// Largest relay buffer: `buffer_size` is paid twice per connection, so it bounds memory.
pub const MAX_BUFFER_SIZE: u64 = 1 << 20;
/// Largest `max_pending_handshakes`: far beyond any file-descriptor limit.
pub const MAX_PENDING_HANDSHAKES: u64 = 1 << 24;
/// Smallest frame limit: control frames may carry 125 bytes (RFC 6455 §5.5).
pub const MIN_FRAME_SIZE: u64 = 125;

impl Validator<'_> {
    /// Applies `file` over `base`. At top level (`top`) `max_connections` may be set;
    /// in a route it may not. Only keys set at this level are range-checked: inherited
    /// values were checked where they were set.
    pub(super) fn limits(
        &mut self,
        base: &Limits,
        file: Option<&FileLimits>,
        path: &KeyPath,
        top: bool,
    ) -> Limits {
        let mut limits = base.clone();
        let Some(file) = file else {
            return limits;
        };
        if let Some(n) = file.max_connections {
            if !top {
                self.issue(
                    &path.key("max_connections"),
                    "max_connections is process-wide; set it in the top-level `limits`, not in a route".into(),
                );
            } else if n == 0 {
                self.issue(
                    &path.key("max_connections"),
                    "max_connections must be at least 1".into(),
                );
            } else {
                limits.max_connections = n;
            }
        }
        if let Some(n) = file.max_pending_handshakes {
            let at = path.key("max_pending_handshakes");
            if !top {
                self.issue(
                    &at,
                    "max_pending_handshakes is process-wide; set it in the top-level `limits`, not in a route".into(),
                );
            } else if !(1..=MAX_PENDING_HANDSHAKES).contains(&n) {
                self.issue(
                    &at,
                    format!(
                        "max_pending_handshakes must be between 1 and {MAX_PENDING_HANDSHAKES}"
                    ),
                );
            } else {
                limits.max_pending_handshakes = n;
            }
        }
        if let Some(n) = file.max_connections_per_ip {
            match u32::try_from(n) {
                Ok(n) if n >= 1 => limits.max_connections_per_ip = n,
                _ => self.issue(
                    &path.key("max_connections_per_ip"),
                    "max_connections_per_ip must be between 1 and 4294967295".into(),
                ),
            }
        }
        if let Some(n) = file.max_connections_per_subject {
            match u32::try_from(n) {
                Ok(n) => limits.max_connections_per_subject = n,
                Err(_) => self.issue(
                    &path.key("max_connections_per_subject"),
                    "max_connections_per_subject must be between 0 (off) and 4294967295".into(),
                ),
            }
        }
        if let Some(prefix) = file.ipv6_prefix {
            let at = path.key("ipv6_prefix");
            if !top {
                self.issue(
                    &at,
                    "ipv6_prefix is process-wide; set it in the top-level `limits`".into(),
                );
            } else if (1..=128).contains(&prefix) {
                limits.ipv6_prefix = prefix;
            } else {
                self.issue(
                    &at,
                    "ipv6_prefix must be between 1 and 128 (64 keys a client by its /64)".into(),
                );
            }
        }
        if let Some(rate) = &file.handshakes_per_ip {
            let at = path.key("handshakes_per_ip");
            if !top {
                self.issue(&at, "handshakes_per_ip is counted per client across the process; set it in the top-level `limits`, not in a route".into());
            } else {
                let policy = RatePolicy {
                    rate: rate.rate,
                    per: rate.per.0,
                    burst: rate.burst.unwrap_or(rate.rate),
                };
                match policy.quota() {
                    Ok(_) => limits.handshakes_per_ip = policy,
                    Err(e) => self.issue(&at, e),
                }
            }
        }
        if let Some(d) = file.idle_timeout {
            limits.idle_timeout = d.0;
        }
        if let Some(d) = file.max_connection_age {
            limits.max_connection_age = d.0;
        }
        if let Some(d) = file.fragment_timeout {
            limits.fragment_timeout = d.0;
        }
        if let Some(n) = file.max_fragments {
            match u32::try_from(n) {
                Ok(n) if n >= 1 => limits.max_fragments = n,
                _ => self.issue(
                    &path.key("max_fragments"),
                    format!("max_fragments {n} is out of range; use 1..=4294967295 (1 refuses every fragmented message)"),
                ),
            }
        }
        if let Some(m) = &file.messages
            && let Some(rate) = self.message_rate(m, &path.key("messages"))
        {
            limits.messages = rate;
        }

        if let Some(d) = file.handshake_timeout {
            limits.handshake_timeout = self.positive(d, &path.key("handshake_timeout"));
        }
        if let Some(d) = file.send_timeout {
            limits.send_timeout = self.positive(d, &path.key("send_timeout"));
        }
        if let Some(d) = file.http_timeout {
            limits.http_timeout = self.positive(d, &path.key("http_timeout"));
        }
        if let Some(size) = file.max_request_body {
            limits.max_request_body = size.0;
        }
        if let Some(size) = file.buffer_size {
            let size = size.0;
            if (MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&size) {
                limits.buffer_size = usize::try_from(size).unwrap_or(DEFAULT_BUFFER_SIZE);
            } else {
                self.issue(
                    &path.key("buffer_size"),
                    format!(
                        "buffer_size {} is out of range; use {}..={}",
                        fmt_size(size),
                        fmt_size(MIN_BUFFER_SIZE),
                        fmt_size(MAX_BUFFER_SIZE)
                    ),
                );
            }
        }
        let mut frame_ok = true;
        if let Some(size) = file.max_frame_size {
            if size.0 < MIN_FRAME_SIZE {
                frame_ok = false;
                self.issue(
                    &path.key("max_frame_size"),
                    format!(
                        "max_frame_size {} is below {MIN_FRAME_SIZE}B, the size of a control frame (RFC 6455 §5.5); raise it",
                        fmt_size(size.0)
                    ),
                );
            } else {
                limits.max_frame_size = size.0;
            }
        }
        if let Some(size) = file.max_message_size {
            limits.max_message_size = size.0;
        }
        let touched = file.max_frame_size.is_some() || file.max_message_size.is_some();
        if frame_ok && touched && limits.max_message_size < limits.max_frame_size {
            let key = if file.max_message_size.is_some() {
                "max_message_size"
            } else {
                "max_frame_size"
            };
            self.issue(
                &path.key(key),
                format!(
                    "max_message_size ({}) must be at least max_frame_size ({}); raise max_message_size or lower max_frame_size",
                    fmt_size(limits.max_message_size),
                    fmt_size(limits.max_frame_size)
                ),
            );
        }
        limits
    }

    /// `limits.messages`: rate ≥ 1, per > 0, burst ≥ 1 (default: rate), on_exceed.
    fn message_rate(&mut self, m: &FileMessageRate, path: &KeyPath) -> Option<MessageRate> {
        let before = self.issues.len();
        let rate = std::num::NonZeroU32::new(m.rate);
        if rate.is_none() {
            self.issue(
                &path.key("rate"),
                "rate must be at least 1; to allow more, raise it".into(),
            );
        }
        let per = self.positive(m.per, &path.key("per"));
        let burst = std::num::NonZeroU32::new(m.burst.unwrap_or(m.rate));
        if burst.is_none() {
            self.issue(&path.key("burst"), "burst must be at least 1".into());
        }
        if let Err(e) = check_refill_span(m.per.0, m.rate, m.burst.unwrap_or(m.rate)) {
            self.issue(path, e);
        }
        let on_exceed = match m.on_exceed.as_ref().map(|t| t.value.trim()) {
            None | Some("close") => OnExceed::Close,
            Some("throttle") => OnExceed::Throttle,
            Some(_) => {
                self.issue(
                    &path.key("on_exceed"),
                    "on_exceed must be `close` (1008) or `throttle` (stop reading until a token is free)".into(),
                );
                OnExceed::Close
            }
        };
        match (rate, burst) {
            (Some(rate), Some(burst)) if self.issues.len() == before => Some(MessageRate {
                rate,
                per,
                burst,
                on_exceed,
            }),
            _ => None,
        }
    }

    /// `drain`: how shutdown and reload close connections (SPEC §8).
    pub(super) fn drain(&mut self, file: Option<FileDrain>, path: &KeyPath) -> Drain {
        let mut d = Drain {
            spread: DEFAULT_DRAIN_SPREAD,
            timeout: DEFAULT_DRAIN_TIMEOUT,
        };
        let Some(file) = file else {
            return d;
        };
        if let Some(spread) = file.spread {
            d.spread = spread.0;
        }
        if let Some(timeout) = file.timeout {
            d.timeout = self.positive(timeout, &path.key("timeout"));
        }
        if d.spread > d.timeout {
            self.issue(
                &path.key("spread"),
                format!(
                    "`spread` ({}) must not exceed `timeout` ({}): closes scheduled after the timeout would never be sent",
                    fmt_duration(d.spread),
                    fmt_duration(d.timeout)
                ),
            );
        }
        d
    }

    /// `keepalive`: process-wide ping settings.
    pub(super) fn keepalive(&mut self, file: Option<FileKeepalive>, path: &KeyPath) -> Keepalive {
        let mut k = Keepalive {
            ping_interval: DEFAULT_PING_INTERVAL,
            pong_timeout: DEFAULT_PONG_TIMEOUT,
            upstream_ping_interval: DEFAULT_UPSTREAM_PING_INTERVAL,
        };
        let Some(file) = file else {
            return k;
        };
        if let Some(d) = file.ping_interval {
            k.ping_interval = d.0;
        }
        if let Some(d) = file.upstream_ping_interval {
            k.upstream_ping_interval = d.0;
        }
        if let Some(d) = file.pong_timeout {
            k.pong_timeout = self.positive(d, &path.key("pong_timeout"));
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;

    #[test]
    fn route_overrides_apply_on_top_of_top_level_limits() {
        let text = MINIMAL.replace(
            "    upstream: echo\n",
            "    upstream: echo\n    limits: { max_frame_size: 64KiB, send_timeout: 5s, max_fragments: 8 }\n",
        ) + "limits: { buffer_size: 32KiB, max_connections: 10 }\n";
        let config = load(&text).unwrap();
        assert_eq!(config.limits.buffer_size, 32 << 10);
        let route = &config.routes[0].limits;
        assert_eq!(
            (
                route.buffer_size,
                route.max_connections,
                route.max_frame_size
            ),
            (32 << 10, 10, 64 << 10)
        );
        assert_eq!(route.send_timeout, Duration::from_secs(5));
        assert_eq!(route.max_message_size, 4 << 20);
        assert_eq!(route.max_fragments, 8);
        assert_eq!(config.limits.max_fragments, 256);
    }

    #[test]
    fn frame_policy_keys_parse_and_routes_override_them() {
        let text = with(
            "limits: { messages: { rate: 5, per: 2s, on_exceed: throttle }, max_fragments: 1000, fragment_timeout: 0s, idle_timeout: 5m }\nkeepalive: { ping_interval: 15s, pong_timeout: 5s, upstream_ping_interval: 30s }\n",
        );
        let config = load(&text).unwrap();
        let m = config.limits.messages;
        assert_eq!(
            (m.rate.get(), m.per, m.burst.get()),
            (5, Duration::from_secs(2), 5)
        );
        assert_eq!(m.on_exceed, OnExceed::Throttle);
        assert_eq!(config.limits.fragment_timeout, Duration::ZERO);
        assert_eq!(config.limits.max_fragments, 1000);
        assert_eq!(config.routes[0].limits.max_fragments, 1000);
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(config.keepalive.ping_interval, Duration::from_secs(15));
        assert_eq!(
            config.keepalive.upstream_ping_interval,
            Duration::from_secs(30)
        );
        assert_eq!(config.routes[0].limits.messages, m);
        let bad =
            with("limits: { messages: { rate: 0, per: 1s, on_exceed: drop }, max_fragments: 0 }\n");
        let mut paths: Vec<String> = errors_of(&bad).iter().map(|e| e.path.clone()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "limits.max_fragments",
                "limits.messages.burst",
                "limits.messages.on_exceed",
                "limits.messages.rate"
            ]
        );
    }

    /// governor keeps time in u64 nanoseconds: spans past that would panic at start-up
    /// or in every connection, so they are config errors.
    #[test]
    fn rate_refill_spans_are_bounded() {
        for (text, path) in [
            (
                "limits: { handshakes_per_ip: { rate: 1, per: 6000000h } }\n",
                "limits.handshakes_per_ip",
            ),
            (
                "limits: { messages: { rate: 1, per: 6000000h } }\n",
                "limits.messages",
            ),
            (
                "limits: { messages: { rate: 1, per: 24h, burst: 4000000000 } }\n",
                "limits.messages",
            ),
        ] {
            let errors = errors_of(&with(text));
            assert_eq!(errors.len(), 1, "{text}: {errors:#?}");
            assert_eq!(errors[0].path, path);
            assert!(errors[0].message.contains("refill"), "{}", errors[0]);
        }
        let year = with(
            "limits: { handshakes_per_ip: { rate: 1, per: 24h, burst: 365 }, messages: { rate: 1, per: 24h, burst: 365 } }\n",
        );
        let config = load(&year).unwrap_or_else(|e| panic!("{e}"));
        let gate = crate::admission::ip_limit::HandshakeRate::new(config.limits.handshakes_per_ip);
        assert!(gate.is_ok());
    }

    #[test]
    fn per_ip_keys_parse_and_stay_top_level() {
        let config = load(&with(
            "limits: { max_connections_per_ip: 5, ipv6_prefix: 56 }\n",
        ))
        .unwrap();
        assert_eq!(
            (
                config.limits.max_connections_per_ip,
                config.limits.ipv6_prefix
            ),
            (5, 56)
        );
        let bad = errors_of(&with("limits: { ipv6_prefix: 0 }\n"));
        assert_eq!(bad[0].path, "limits.ipv6_prefix");
        let in_route = MINIMAL.replace(
            "    upstream: echo\n",
            "    upstream: echo\n    limits: { ipv6_prefix: 48, handshakes_per_ip: { rate: 1, per: 1s } }\n",
        );
        let mut paths: Vec<String> = errors_of(&in_route)
            .iter()
            .map(|e| e.path.clone())
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "routes[0].limits.handshakes_per_ip",
                "routes[0].limits.ipv6_prefix"
            ]
        );
    }

    #[test]
    fn drain_defaults_and_bounds() {
        let config = load(&with("")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.drain.spread, Duration::from_secs(10));
        assert_eq!(config.drain.timeout, Duration::from_secs(30));
        let config =
            load(&with("drain: { spread: 2s, timeout: 5s }\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.drain.spread, Duration::from_secs(2));
        let errors = errors_of(&with("drain: { spread: 20s, timeout: 5s }\n"));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].path, "drain.spread");
        assert!(errors[0].line >= 9, "{}", errors[0]);
    }

    #[test]
    fn max_connections_in_a_route_is_refused_as_process_wide() {
        let text = MINIMAL.replace(
            "    upstream: echo",
            "    upstream: echo\n    limits: { max_connections: 5 }",
        );
        assert_one_error(
            &text,
            "routes[0].limits.max_connections",
            9,
            32,
            "process-wide",
        );
    }

    #[test]
    fn message_size_below_frame_size_is_refused() {
        assert_one_error(
            &with("limits: { max_frame_size: 8MiB }\n"),
            "limits.max_frame_size",
            9,
            27,
            "max_message_size (4MiB) must be at least max_frame_size (8MiB)",
        );
        let errors = errors_of(&with("limits: { max_frame_size: 100 }\n"));
        assert!(errors[0].message.contains("125B"), "{}", errors[0]);
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let errors = errors_of(&MINIMAL.replace(
            "{ builtin: echo }",
            "{ builtin: echo, connect_timeout: 0s }",
        ));
        assert_eq!(errors[0].path, "upstreams.echo.connect_timeout");
        assert!(errors[0].message.contains("greater than 0s"));
        assert_eq!(
            errors_of(&with("limits: { handshake_timeout: 0ms }\n"))[0].path,
            "limits.handshake_timeout"
        );
        assert_eq!(
            errors_of(&with("limits: { max_connections: 0 }\n"))[0].path,
            "limits.max_connections"
        );
    }

    #[test]
    fn max_pending_handshakes_is_process_wide_and_at_least_one() {
        assert_eq!(
            errors_of(&with("limits: { max_pending_handshakes: 0 }\n"))[0].path,
            "limits.max_pending_handshakes"
        );
        let in_route = MINIMAL.replace(
            "    upstream: echo",
            "    upstream: echo\n    limits: { max_pending_handshakes: 5 }",
        );
        assert_one_error(
            &in_route,
            "routes[0].limits.max_pending_handshakes",
            9,
            39,
            "process-wide",
        );
        match load(&with("limits: { max_pending_handshakes: 7 }\n")) {
            Ok(config) => assert_eq!(config.limits.max_pending_handshakes, 7),
            Err(e) => panic!("{e}"),
        }
    }
}
