//! The real client's address (SPEC §2 `trusted_proxies`) and the key per-IP accounting
//! uses.
//!
//! The peer address is the client, unless the peer is a trusted proxy: then the client is
//! the right-most `X-Forwarded-For` address that is not itself trusted. Right-most, because
//! every hop appends the address it saw, so only the entries our trusted hops wrote are
//! facts; anything further left was written by the client and may be forged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use http::header::HeaderName;
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// An address as text (for the log and `X-Forwarded-For`): IPv4 digit by digit, as
/// `Display` costs ~2,000 instructions on every handshake; IPv6 through `Display`.
pub fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// The `trusted_proxies` CIDR list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `2001:db8::/32`) and bare addresses (a /32 or /128).
    /// An error gives the index of the bad entry and the fix; the caller quotes the entry
    /// (it may come from the environment and must not be echoed).
    pub fn new(entries: &[String]) -> Result<Self, (usize, String)> {
        let mut nets = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            nets.push(parse_net(entry.trim()).map_err(|e| (i, e))?);
        }
        Ok(TrustedProxies { nets })
    }

    /// No proxy is trusted (the default): `X-Forwarded-For` is never read.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = normalise(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

fn parse_net(entry: &str) -> Result<IpNet, String> {
    if entry.contains('/') {
        let net: IpNet = entry
            .parse()
            .map_err(|_| "not a CIDR; write e.g. `10.0.0.0/8` or `2001:db8::/32`".to_string())?;
        // `10.1.2.3/8` is almost always a typo for the network; trunc() keeps the intent
        // of "this /8" rather than refusing a config an operator meant.
        return Ok(match net {
            IpNet::V4(n) => IpNet::V4(n.trunc()),
            IpNet::V6(n) => match n.addr().to_ipv4_mapped() {
                Some(v4) if n.prefix_len() >= 96 => {
                    let len = n.prefix_len() - 96;
                    IpNet::V4(
                        ipnet::Ipv4Net::new(v4, len)
                            .map_err(|e| e.to_string())?
                            .trunc(),
                    )
                }
                _ => IpNet::V6(n.trunc()),
            },
        });
    }
    let ip: IpAddr = entry.parse().map_err(|_| {
        "not an IP address or CIDR; write e.g. `10.0.0.1` or `10.0.0.0/8`".to_string()
    })?;
    Ok(IpNet::from(normalise(ip)))
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, what a dual-stack socket reports) → IPv4, so one
/// client has one identity whichever socket family accepted it.
pub fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The client's address: `peer` itself, or, when `peer` is trusted, the right-most
/// untrusted `X-Forwarded-For` address (all header lines, in order, comma-separated).
///
/// If every listed address is trusted, the left-most one is the client. If an entry does
/// not parse, the walk stops there and the last trusted address seen is the client: the
/// garbage was handed to a trusted hop, so nothing left of it can be believed.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = normalise(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_addr(entry) else {
            return client;
        };
        client = ip;
        if !trusted.contains(ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]`
/// or `[2001:db8::1]:5678`; `None` for anything else (`unknown`, obfuscated names).
pub fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim().trim_matches('"');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(normalise(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        return port_ok
            .then(|| inside.parse::<Ipv6Addr>().ok())
            .flatten()
            .map(|v6| normalise(IpAddr::V6(v6)));
    }
    entry
        .parse::<SocketAddr>()
        .ok()
        .map(|sa| normalise(sa.ip()))
}

fn is_port(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u16>().is_ok()
}

/// The key of per-IP accounting: an IPv4 address, or an IPv6 address masked to a prefix
/// (/64 by default: one subscriber usually gets a whole /64, so keying by /128 would let
/// one client take 2^64 slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey(IpAddr);

impl IpKey {
    /// The key for `ip` with IPv6 masked to `v6_prefix` bits (clamped to 0..=128).
    pub fn new(ip: IpAddr, v6_prefix: u8) -> Self {
        match normalise(ip) {
            IpAddr::V4(v4) => IpKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => IpKey(IpAddr::V6(mask_v6(v6, v6_prefix))),
        }
    }

    /// The masked address (for logs and metrics: `2001:db8::` for a /64).
    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl From<Ipv4Addr> for IpKey {
    fn from(ip: Ipv4Addr) -> Self {
        IpKey(IpAddr::V4(ip))
    }
}

impl std::fmt::Display for IpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The default IPv6 prefix length for [`IpKey`].
pub const DEFAULT_V6_PREFIX: u8 = 64;

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let prefix = u32::from(prefix.min(128));
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        let v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        TrustedProxies::new(&v).expect("valid")
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(l).expect("hv"));
        }
        h
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_xff_says() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["1.1.1.1"]);
        assert_eq!(client_ip(ip("203.0.113.7"), &h, &t), ip("203.0.113.7"));
        assert_eq!(
            client_ip(ip("203.0.113.7"), &h, &TrustedProxies::default()),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_entry() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.1"]);
        let h = xff(&["6.6.6.6, 203.0.113.7", "192.168.1.1 ,10.1.1.1"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &t), ip("203.0.113.7"));
    }

    #[test]
    fn trusted_peer_without_xff_is_the_client() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &t),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn all_trusted_gives_leftmost() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &t), ip("10.9.9.9"));
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["1.2.3.4, unknown, 10.1.1.1"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &t), ip("10.1.1.1"));
        let h = xff(&["1.2.3.4, garbage"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &t), ip("10.0.0.2"));
    }

    #[test]
    fn entry_forms() {
        assert_eq!(parse_forwarded_addr("1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_forwarded_addr(" 1.2.3.4:5678 "), Some(ip("1.2.3.4")));
        assert_eq!(parse_forwarded_addr("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(
            parse_forwarded_addr("[2001:db8::1]"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            parse_forwarded_addr("[2001:db8::1]:443"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(parse_forwarded_addr("::ffff:1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_forwarded_addr("\"[::1]:80\""), Some(ip("::1")));
        for bad in [
            "unknown",
            "_hidden",
            "[::1",
            "[::1]x",
            "1.2.3.4:99999",
            "1.2.3",
            "",
        ] {
            assert_eq!(parse_forwarded_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn mapped_v6_peer_is_normalised_and_matches_v4_cidrs() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["203.0.113.7"]);
        assert_eq!(client_ip(ip("::ffff:10.0.0.2"), &h, &t), ip("203.0.113.7"));
        assert_eq!(
            client_ip(ip("::ffff:1.2.3.4"), &HeaderMap::new(), &t),
            ip("1.2.3.4")
        );
        let t = trusted(&["::ffff:10.0.0.0/104"]);
        assert!(t.contains(ip("10.2.3.4")));
    }

    #[test]
    fn trusted_proxies_config() {
        let t = trusted(&["10.0.0.1", "2001:db8::/32", "172.16.5.4/12"]);
        assert!(t.contains(ip("10.0.0.1")));
        assert!(!t.contains(ip("10.0.0.2")));
        assert!(t.contains(ip("2001:db8:ffff::1")));
        assert!(t.contains(ip("172.31.0.1")));
        let (i, _) = TrustedProxies::new(&["10.0.0.0/8".into(), "10.0.0.0/33".into()])
            .expect_err("bad prefix");
        assert_eq!(i, 1);
        let (_, err) = TrustedProxies::new(&["localhost".into()]).expect_err("name");
        assert!(err.contains("10.0.0.1"), "{err}");
    }

    #[test]
    fn keys_mask_v6_and_keep_v4() {
        assert_eq!(IpKey::new(ip("1.2.3.4"), 64).addr(), ip("1.2.3.4"));
        assert_eq!(
            IpKey::new(ip("2001:db8:1:2:aaaa::1"), DEFAULT_V6_PREFIX).addr(),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            IpKey::new(ip("2001:db8:1:2:aaaa::1"), 64),
            IpKey::new(ip("2001:db8:1:2:bbbb::9"), 64)
        );
        assert_eq!(IpKey::new(ip("2001:db8::1"), 128).addr(), ip("2001:db8::1"));
        assert_eq!(IpKey::new(ip("2001:db8::1"), 0).addr(), ip("::"));
        assert_eq!(IpKey::new(ip("2001:db8::1"), 200).addr(), ip("2001:db8::1"));
        assert_eq!(IpKey::new(ip("::ffff:1.2.3.4"), 64).addr(), ip("1.2.3.4"));
        assert_eq!(
            IpKey::new(ip("2001:db8:1:2::"), 64).to_string(),
            "2001:db8:1:2::"
        );
    }

    proptest! {
        #[test]
        fn forwarded_parser_never_panics(s in "\\PC{0,60}") {
            let _ = parse_forwarded_addr(&s);
            if let Ok(v) = HeaderValue::from_str(&s) {
                let mut h = HeaderMap::new();
                h.insert(X_FORWARDED_FOR, v);
                let _ = client_ip(ip("10.0.0.1"), &h, &trusted(&["10.0.0.0/8"]));
            }
        }

        #[test]
        fn forwarded_parser_roundtrips_socket_addrs(ip: IpAddr, port: u16) {
            let a = SocketAddr::new(ip, port);
            prop_assert_eq!(parse_forwarded_addr(&a.to_string()), Some(normalise(a.ip())));
            prop_assert_eq!(parse_forwarded_addr(&a.ip().to_string()), Some(normalise(a.ip())));
        }

        #[test]
        fn client_is_never_a_forged_left_entry(
            forged: std::net::Ipv4Addr, real in (1u8..=223, 0u8.., 0u8.., 1u8..)
        ) {
            let real = IpAddr::V4(Ipv4Addr::new(real.0, real.1, real.2, real.3));
            prop_assume!(!trusted(&["10.0.0.0/8"]).contains(real));
            let h = xff(&[&format!("{forged}, {real}")]);
            prop_assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted(&["10.0.0.0/8"])), real);
        }
    }
}
