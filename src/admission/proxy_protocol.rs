//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, v1 text and v2 binary) that
//! an L4 load balancer puts in front of the byte stream when `listeners[].proxy_protocol`
//! is on. Parsing is the `ppp` crate's; this file adds the bounds and the one answer the
//! listener needs: how many bytes to consume and who the client is.
//!
//! The caller reads into a buffer, calls [`parse`] after each read, and keeps reading
//! while it says [`Parse::Incomplete`] (within `handshake_timeout`). On
//! [`Parse::Invalid`], the connection is refused; a PROXY listener never falls back to
//! treating the bytes as HTTP, or any client could skip the header and claim the load
//! balancer's address.

use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};

/// Longest v1 header, `\r\n` included (the protocol's own bound).
pub const V1_MAX: usize = 107;

/// Longest v2 header we accept: 16 fixed bytes plus addresses and TLVs. The format allows
/// 64 KiB of TLVs; real load balancers send well under 1 KiB, and refusing more keeps a
/// hostile peer from making us buffer 64 KiB per connection before any check.
pub const V2_MAX: usize = 4096;

/// Bytes a reader needs before it can be sure of a result: the most [`parse`] can ask for.
pub const MAX_HEADER: usize = V2_MAX;

const V2_SIGNATURE: &[u8] = v2::PROTOCOL_PREFIX;
const V2_FIXED: usize = 16;

/// What a byte prefix holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A valid header may still follow: read more.
    Incomplete,
    /// A complete header of `len` bytes; the stream after it is the client's.
    /// `client` is `None` for v2 `LOCAL` (health checks from the balancer itself), v1
    /// `UNKNOWN`, and address families with no IP (unspecified, unix): the caller then
    /// uses the peer address.
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
    /// Not a PROXY header, malformed, or over the bounds: refuse the connection.
    Invalid,
}

/// Parses a PROXY v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parse {
    if buf.is_empty() {
        return Parse::Incomplete;
    }
    if is_v2_prefix(buf) {
        return parse_v2(buf);
    }
    parse_v1(buf)
}

/// `buf` starts like a v2 header (the whole 12-byte signature, or a prefix of it).
fn is_v2_prefix(buf: &[u8]) -> bool {
    let n = buf.len().min(V2_SIGNATURE.len());
    buf[..n] == V2_SIGNATURE[..n]
}

fn parse_v2(buf: &[u8]) -> Parse {
    if buf.len() >= V2_FIXED {
        // Checked before ppp looks at the length, so an absurd header is refused at once
        // instead of after the peer has sent (and we have buffered) all of it.
        let declared = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if V2_FIXED + declared > V2_MAX {
            return Parse::Invalid;
        }
    }
    let result = v2::Header::try_from(buf);
    if result.is_incomplete() {
        return Parse::Incomplete;
    }
    match result {
        Ok(h) => Parse::Header {
            len: h.len(),
            client: v2_client(&h),
        },
        Err(_) => Parse::Invalid,
    }
}

fn v2_client(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match h.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

fn parse_v1(buf: &[u8]) -> Parse {
    let window = &buf[..buf.len().min(V1_MAX)];
    let result = HeaderResult::parse(window);
    let HeaderResult::V1(result) = result else {
        // The v2 signature was ruled out above; ppp only answers V2 for that.
        return Parse::Invalid;
    };
    if result.is_incomplete() || ends_between_fields(window) {
        // A prefix that is already V1_MAX bytes long can never complete.
        return if window.len() >= V1_MAX {
            Parse::Invalid
        } else {
            Parse::Incomplete
        };
    }
    match result {
        Ok(h) => Parse::Header {
            len: h.header.len(),
            client: v1_client(&h.addresses),
        },
        Err(_) => Parse::Invalid,
    }
}

/// ppp reads an empty field after the last space as a bad port (`PROXY TCP4 a b 1 ` fails
/// instead of asking for more), so a prefix cut right after a separator is probed with one
/// more digit: if that is still a valid prefix, so is this.
fn ends_between_fields(window: &[u8]) -> bool {
    if window.last() != Some(&b' ') || window.contains(&b'\r') || window.len() >= V1_MAX {
        return false;
    }
    let mut probe = window.to_vec();
    probe.push(b'0');
    v1::Header::try_from(probe.as_slice()).is_incomplete()
}

fn v1_client(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match *addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test addr")
    }

    fn v2_header(src: SocketAddr, dst: SocketAddr, tlv: &[u8]) -> Vec<u8> {
        let mut b = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (src, dst),
        );
        if !tlv.is_empty() {
            b = b.write_tlv(v2::Type::NoOp, tlv).expect("tlv");
        }
        b.build().expect("header")
    }

    fn v2_local() -> Vec<u8> {
        v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .expect("header")
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Parse::Header {
                len: 43,
                client: Some(sa("203.0.113.7:51234"))
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(h),
            Parse::Header {
                len: h.len(),
                client: Some(sa("[2001:db8::1]:4000"))
            }
        );
        // The spec lets UNKNOWN carry (ignored) addresses.
        let u = b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n";
        assert_eq!(
            parse(u),
            Parse::Header {
                len: u.len(),
                client: None
            }
        );
        let h = b"PROXY UNKNOWN\r\nrest";
        assert_eq!(
            parse(h),
            Parse::Header {
                len: 15,
                client: None
            }
        );
    }

    #[test]
    fn v2_proxy_and_local() {
        let src = sa("203.0.113.7:51234");
        let mut h = v2_header(src, sa("10.0.0.1:443"), b"");
        let len = h.len();
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&h),
            Parse::Header {
                len,
                client: Some(src)
            }
        );
        let src6 = sa("[2001:db8::7]:9");
        let h = v2_header(src6, sa("[2001:db8::1]:443"), &[1, 2, 3]);
        assert_eq!(
            parse(&h),
            Parse::Header {
                len: h.len(),
                client: Some(src6)
            }
        );
        let h = v2_local();
        assert_eq!(
            parse(&h),
            Parse::Header {
                len: h.len(),
                client: None
            }
        );
    }

    #[test]
    fn non_proxy_and_malformed_input_is_invalid() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert_eq!(
                parse(bad),
                Parse::Invalid,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn v1_without_crlf_is_invalid_once_past_the_bound() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX - 1, b'x');
        assert_eq!(parse(&long), Parse::Incomplete);
        long.push(b'x');
        assert_eq!(parse(&long), Parse::Invalid);
        long.resize(1000, b'x');
        assert_eq!(parse(&long), Parse::Invalid);
    }

    #[test]
    fn v2_over_the_bound_is_refused_from_its_fixed_part() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&h), Parse::Invalid);
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&((V2_MAX - V2_FIXED) as u16).to_be_bytes());
        assert_eq!(parse(&h), Parse::Incomplete);
    }

    #[test]
    fn v2_bad_version_or_short_address_is_invalid() {
        let mut h = v2_header(sa("1.2.3.4:1"), sa("5.6.7.8:2"), b"");
        h[12] = 0x11;
        assert_eq!(parse(&h), Parse::Invalid);
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert_eq!(parse(&h), Parse::Invalid);
    }

    #[test]
    fn empty_and_short_prefixes_are_incomplete() {
        assert_eq!(parse(b""), Parse::Incomplete);
        assert_eq!(parse(b"PRO"), Parse::Incomplete);
        assert_eq!(parse(&V2_SIGNATURE[..5]), Parse::Incomplete);
    }

    fn valid_headers() -> impl Strategy<Value = (Vec<u8>, Option<SocketAddr>)> {
        let v4 = (
            any::<Ipv4Addr>(),
            any::<u16>(),
            any::<Ipv4Addr>(),
            any::<u16>(),
        );
        let v6 = (
            any::<Ipv6Addr>(),
            any::<u16>(),
            any::<Ipv6Addr>(),
            any::<u16>(),
        );
        prop_oneof![
            v4.clone().prop_map(|(s, sp, d, dp)| (
                format!("PROXY TCP4 {s} {d} {sp} {dp}\r\n").into_bytes(),
                Some(SocketAddr::from((s, sp)))
            )),
            v6.clone().prop_map(|(s, sp, d, dp)| (
                format!("PROXY TCP6 {s} {d} {sp} {dp}\r\n").into_bytes(),
                Some(SocketAddr::from((s, sp)))
            )),
            Just((b"PROXY UNKNOWN\r\n".to_vec(), None)),
            (v4, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
                |((s, sp, d, dp), tlv)| {
                    let src = SocketAddr::from((s, sp));
                    (v2_header(src, SocketAddr::from((d, dp)), &tlv), Some(src))
                }
            ),
            v6.prop_map(|(s, sp, d, dp)| {
                let src = SocketAddr::from((s, sp));
                (v2_header(src, SocketAddr::from((d, dp)), b""), Some(src))
            }),
            Just((v2_local(), None)),
        ]
    }

    proptest! {
        #[test]
        fn never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&buf);
        }

        #[test]
        fn never_panics_after_a_valid_signature(
            rest in proptest::collection::vec(any::<u8>(), 0..300),
            v1 in any::<bool>(),
        ) {
            let mut buf = if v1 { b"PROXY ".to_vec() } else { V2_SIGNATURE.to_vec() };
            buf.extend_from_slice(&rest);
            if let Parse::Header { len, .. } = parse(&buf) {
                prop_assert!(len <= buf.len());
            }
        }

        #[test]
        fn every_split_is_incomplete_then_the_header(
            (header, client) in valid_headers(),
            trailer in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            for cut in 0..header.len() {
                prop_assert_eq!(parse(&header[..cut]), Parse::Incomplete, "cut at {}", cut);
            }
            let mut full = header.clone();
            prop_assert_eq!(parse(&full), Parse::Header { len: header.len(), client });
            full.extend_from_slice(&trailer);
            prop_assert_eq!(parse(&full), Parse::Header { len: header.len(), client });
        }
    }
}
