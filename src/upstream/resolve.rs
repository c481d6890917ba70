//! Turning configured backend entries (`host:port`) into socket addresses. Owns the
//! [`Resolver`] seam (tests inject their own records) and the rules for one entry: a
//! literal IP is used as is, a name becomes one backend per A/AAAA record. Does not
//! decide when to resolve; the pool's refresh task does.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

/// Most addresses taken from one name: a runaway DNS answer must not grow a pool without
/// bound (and rendezvous cost is linear in the pool size).
pub const MAX_ADDRS_PER_NAME: usize = 256;

/// Budget of one lookup; past it the previous addresses stay in use.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often names are looked up again (literal IPs never are).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);

/// The future a [`Resolver`] returns.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Name lookup, injectable for tests.
pub trait Resolver: Send + Sync + 'static {
    /// All addresses of `host` (never an IP literal) with `port`.
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// The system resolver, through `tokio::net::lookup_host` (getaddrinfo on a blocking
/// thread): it honours `/etc/hosts` and `resolv.conf` like any other program on the host.
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// A configured backend entry split for resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Literal(SocketAddr),
    Name { host: String, port: u16 },
}

impl Entry {
    /// Splits a validated `host:port` (IPv6 in brackets); `None` if it does not parse.
    pub fn parse(addr: &str) -> Option<Entry> {
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            return Some(Entry::Literal(sa));
        }
        let (host, port) = addr.rsplit_once(':')?;
        let port = port.parse::<u16>().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(Entry::Literal(SocketAddr::new(ip, port)));
        }
        Some(Entry::Name {
            host: host.to_owned(),
            port,
        })
    }
}

/// The addresses of one entry, sorted and deduplicated, at most [`MAX_ADDRS_PER_NAME`].
/// `Err` when a name cannot be resolved (or resolves to nothing) within the budget.
pub async fn resolve(resolver: &dyn Resolver, entry: &Entry) -> Result<Vec<SocketAddr>, String> {
    match entry {
        Entry::Literal(sa) => Ok(vec![*sa]),
        Entry::Name { host, port } => {
            let found = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(host, *port)).await;
            let mut addrs = match found {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("lookup timed out".into()),
            };
            addrs.sort();
            addrs.dedup();
            addrs.truncate(MAX_ADDRS_PER_NAME);
            if addrs.is_empty() {
                return Err("no addresses".into());
            }
            Ok(addrs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_split_into_literals_and_names() {
        assert_eq!(
            Entry::parse("10.0.0.1:80"),
            Some(Entry::Literal("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            Entry::parse("[::1]:9001"),
            Some(Entry::Literal("[::1]:9001".parse().unwrap()))
        );
        assert_eq!(
            Entry::parse("chat-2.internal:9001"),
            Some(Entry::Name {
                host: "chat-2.internal".into(),
                port: 9001
            })
        );
        assert_eq!(Entry::parse("nohost"), None);
    }

    struct Many;
    impl Resolver for Many {
        fn lookup<'a>(&'a self, _: &'a str, port: u16) -> Lookup<'a> {
            Box::pin(async move {
                Ok((0..1000u32)
                    .rev()
                    .map(|i| SocketAddr::new(IpAddr::from(i.to_be_bytes()), port))
                    .chain(std::iter::once(SocketAddr::from(([0, 0, 0, 1], port))))
                    .collect())
            })
        }
    }

    #[tokio::test]
    async fn answers_are_sorted_deduplicated_and_capped() {
        let entry = Entry::Name {
            host: "x".into(),
            port: 1,
        };
        let addrs = resolve(&Many, &entry).await.unwrap();
        assert_eq!(addrs.len(), MAX_ADDRS_PER_NAME);
        assert!(addrs.windows(2).all(|w| w[0] < w[1]));
    }
}
