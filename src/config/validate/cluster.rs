//! `cluster` (SPEC §2, §10): the Redis URL (parsed, never dialled: `--check` needs no
//! Redis), the instance name, prefix, lease, failure policy and the fleet-wide limits.

use super::super::file::{DEFAULT_CLUSTER_LEASE, DEFAULT_CLUSTER_PREFIX, FileCluster};
use super::super::units::{Text, fmt_duration};
use super::super::{Cluster, ClusterLimits, KeyPath, OnUnavailable};
use super::Validator;
use crate::admission::ip_limit::RatePolicy;
use std::time::Duration;

/// Shortest lease: the heartbeat renews it three times per lease, and a lease much below
/// a second would make a busy Redis drop live instances.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// Longest lease: a dead instance's counts stay that long.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Longest instance name or prefix (bytes): both are part of every key.
const MAX_NAME: usize = 128;

impl Validator<'_> {
    pub(super) fn cluster(&mut self, file: Option<FileCluster>, path: &KeyPath) -> Option<Cluster> {
        let file = file?;
        let url = file.redis.value.trim().to_owned();
        let at = path.key("redis");
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            self.issue(
                &at,
                format!(
                    "{} must be a redis:// or rediss:// (TLS) URL, e.g. `redis://127.0.0.1:6379/0`",
                    shown_url(&file.redis)
                ),
            );
        } else if let Err(e) = redis::Client::open(url.as_str()) {
            // The parser's message may quote the URL (and a password in it): not shown.
            let kind = format!("{:?}", e.kind());
            self.issue(
                &at,
                format!(
                    "{} is not a usable Redis URL ({kind}); write e.g. `redis://:${{REDIS_PASSWORD}}@redis:6379/0`",
                    shown_url(&file.redis)
                ),
            );
        }
        let instance = file.instance.as_ref().and_then(|t| {
            let at = path.key("instance");
            let name = self.non_empty(t, &at, "cluster.instance")?;
            self.name_ok(&name, &at).then_some(name)
        });
        let prefix = match &file.prefix {
            Some(t) => {
                let at = path.key("prefix");
                let p = self.non_empty(t, &at, "cluster.prefix").unwrap_or_default();
                self.name_ok(&p, &at);
                p
            }
            None => DEFAULT_CLUSTER_PREFIX.to_owned(),
        };
        let lease = file.lease.map_or(DEFAULT_CLUSTER_LEASE, |d| d.0);
        if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
            self.issue(
                &path.key("lease"),
                format!(
                    "lease {} must be between {} and {}: a dead instance's counts are dropped after it; e.g. `15s`",
                    fmt_duration(lease),
                    fmt_duration(MIN_LEASE),
                    fmt_duration(MAX_LEASE)
                ),
            );
        }
        let on_unavailable = match file.on_unavailable.as_ref().map(|t| t.value.trim()) {
            None | Some("local") => OnUnavailable::Local,
            Some("refuse") => OnUnavailable::Refuse,
            Some(_) => {
                let shown = file
                    .on_unavailable
                    .as_ref()
                    .map(|t| t.shown())
                    .unwrap_or_default();
                self.issue(
                    &path.key("on_unavailable"),
                    format!("{shown} must be `local` (per-process limits go on) or `refuse` (503 cluster)"),
                );
                OnUnavailable::Local
            }
        };
        let mut limits = ClusterLimits::default();
        if let Some(l) = file.limits {
            let at = path.key("limits");
            limits.max_connections_per_ip = l.max_connections_per_ip.unwrap_or(0);
            limits.max_connections_per_subject = l.max_connections_per_subject.unwrap_or(0);
            if let Some(rate) = l.handshakes_per_ip {
                let policy = RatePolicy {
                    rate: rate.rate,
                    per: rate.per.0,
                    burst: rate.burst.unwrap_or(rate.rate),
                };
                match policy.quota() {
                    Ok(_) => limits.handshakes_per_ip = Some(policy),
                    Err(e) => self.issue(&at.key("handshakes_per_ip"), e),
                }
            }
        }
        Some(Cluster {
            redis: url,
            instance,
            prefix,
            lease,
            on_unavailable,
            limits,
        })
    }

    /// Names that become part of Redis keys: printable, no spaces, bounded.
    fn name_ok(&mut self, name: &str, at: &KeyPath) -> bool {
        let ok = name.len() <= MAX_NAME && name.chars().all(|c| c.is_ascii_graphic());
        if !ok {
            self.issue(
                at,
                format!("must be at most {MAX_NAME} printable ASCII characters without spaces (it is part of every Redis key)"),
            );
        }
        ok
    }
}

/// The URL as an error message may quote it: credentials (user info) and the query
/// hidden, since a literal password may be written there.
fn shown_url(url: &Text) -> String {
    if url.template.is_some() {
        return url.shown();
    }
    let v = url.value.trim();
    let v = v.split(['?', '#']).next().unwrap_or("");
    let (scheme, rest) = v.split_once("://").unwrap_or(("", v));
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let sep = if scheme.is_empty() { "" } else { "://" };
    Text::literal(&format!("{scheme}{sep}{host}{path}")).shown()
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, OnUnavailable};

    const BASE: &str = "listeners: [{ name: p, bind: \"127.0.0.1:0\" }]\nupstreams: { e: { backends: [{ addr: \"127.0.0.1:9\" }] } }\nroutes: [{ name: r, match: { path_prefix: / }, upstream: e }]\n";

    fn load(extra: &str) -> Result<Config, String> {
        Config::from_yaml_str(&format!("{BASE}{extra}"), "t.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn the_spec_example_validates_with_its_defaults() {
        let c = load("cluster: { redis: \"redis://127.0.0.1:6379/0\", limits: { max_connections_per_ip: 256, max_connections_per_subject: 10, handshakes_per_ip: { rate: 50, per: 1s, burst: 100 } } }\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let cluster = c.cluster.unwrap_or_else(|| panic!("no cluster"));
        assert_eq!(cluster.prefix, "wsgate:");
        assert_eq!(cluster.lease, std::time::Duration::from_secs(15));
        assert_eq!(cluster.on_unavailable, OnUnavailable::Local);
        assert_eq!(cluster.limits.max_connections_per_ip, 256);
        assert!(cluster.limits.handshakes_per_ip.is_some());
        assert!(
            !format!("{cluster:?}").contains("127.0.0.1:6379"),
            "the URL is redacted"
        );
        assert!(load("").unwrap_or_else(|e| panic!("{e}")).cluster.is_none());
    }

    #[test]
    fn bad_cluster_values_name_their_key() {
        for (yaml, key) in [
            ("cluster: { redis: \"http://x\" }\n", "cluster.redis"),
            (
                "cluster: { redis: \"redis://h\", lease: 100ms }\n",
                "cluster.lease",
            ),
            (
                "cluster: { redis: \"redis://h\", on_unavailable: maybe }\n",
                "cluster.on_unavailable",
            ),
            (
                "cluster: { redis: \"redis://h\", instance: \"a b\" }\n",
                "cluster.instance",
            ),
            (
                "cluster: { redis: \"redis://h\", limits: { handshakes_per_ip: { rate: 0, per: 1s } } }\n",
                "cluster.limits.handshakes_per_ip",
            ),
            ("cluster: { redis: \"redis://h\", limit: {} }\n", "cluster"),
        ] {
            let err = load(yaml).err().unwrap_or_else(|| panic!("{yaml} passed"));
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn a_password_in_a_bad_url_is_never_shown() {
        for yaml in [
            "cluster: { redis: \"redis://:hunter2@localhost:6379/notadb\" }\n",
            "cluster: { redis: \"http://user:hunter2@localhost:6379/0\" }\n",
            "cluster: { redis: \"redis://u:hunter2@h:6379/x?password=hunter2\" }\n",
        ] {
            let err = load(yaml).err().unwrap_or_else(|| panic!("{yaml} passed"));
            assert!(err.contains("cluster.redis"), "{err}");
            assert!(!err.contains("hunter2"), "the password is shown: {err}");
            assert!(err.contains("***@"), "{err}");
        }
    }
}
