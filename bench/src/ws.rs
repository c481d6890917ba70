//! The little of RFC 6455 the load generator and the echo backend need: the upgrade
//! request and response, `Sec-WebSocket-Accept`, masking, and frame headers.
//!
//! Written for speed and boundedness rather than completeness: frames are built into a
//! caller's buffer, headers are parsed from a byte slice without copying, and every length
//! is checked against a caller-given cap before any buffer grows.

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 §1.3.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest HTTP head either side accepts.
pub const MAX_HEAD: usize = 8 * 1024;

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A small, fast, non-cryptographic generator (xorshift64*) for masks and keys: a
/// benchmark needs variety, not secrecy.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        // Never all-zero: a zero mask would make unmasking a no-op for the proxies.
        let m = (self.next_u64() as u32) | 0x0101_0101;
        m.to_le_bytes()
    }
}

/// The client's upgrade request for `path` on `host`.
pub fn upgrade_request(host: &str, path: &str, rng: &mut Rng) -> Vec<u8> {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    key[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}\r\n\r\n"
    )
    .into_bytes()
}

/// Where the HTTP head in `buf` ends (index just past `\r\n\r\n`), if it is complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The status code of an HTTP/1.x response head.
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let code = line.split(|&b| b == b' ').nth(1)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The value of header `name` (case-insensitive) in an HTTP head.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (k, v) = line.split_at(colon);
        if k.eq_ignore_ascii_case(name.as_bytes()) {
            Some(v.get(1..)?.trim_ascii())
        } else {
            None
        }
    })
}

/// The backend's `101 Switching Protocols` for a client key.
pub fn upgrade_response(key: &[u8]) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )
    .into_bytes()
}

/// XORs `data` with `mask`, the first byte of `data` being at `offset` in the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset % 4);
    let word = u32::from_ne_bytes(m);
    let wide = u64::from(word) | (u64::from(word) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(b) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Appends one frame to `out`: masked when `mask` is given (client side).
pub fn push_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let b0 = if fin { 0x80 } else { 0 } | opcode;
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    let n = payload.len();
    if n < 126 {
        out.push(mbit | n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(mbit | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let start = out.len() + if mask.is_some() { 4 } else { 0 };
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Header bytes on the wire.
    pub len: usize,
    pub payload_len: usize,
}

/// Why a frame cannot be handled.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    TooBig(u64),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooBig(n) => write!(f, "frame of {n} bytes is over the cap"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses the frame header at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    let (ext, len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (2, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                (8, u64::from_be_bytes(a))
            }
            None => return Ok(None),
        },
        n => (0, u64::from(n)),
    };
    if len > max_payload as u64 {
        return Err(FrameError::TooBig(len));
    }
    let masked = b1 & 0x80 != 0;
    let mask = if masked {
        match buf.get(2 + ext..6 + ext) {
            Some(m) => Some([m[0], m[1], m[2], m[3]]),
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        len: 2 + ext + if masked { 4 } else { 0 },
        payload_len: len as usize,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip() {
        let mut rng = Rng::new(7);
        for n in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mask = rng.mask();
            let mut out = Vec::new();
            push_frame(&mut out, true, OP_BINARY, &payload, Some(mask));
            let h = parse_header(&out, 1 << 20).ok().flatten();
            let Some(h) = h else {
                panic!("no header for {n}");
            };
            assert_eq!(h.payload_len, n);
            let mut body = out[h.len..].to_vec();
            apply_mask(&mut body, mask, 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn mask_offsets_compose() {
        let mask = [1, 2, 3, 4];
        let mut whole: Vec<u8> = (0..37).collect();
        let mut split = whole.clone();
        apply_mask(&mut whole, mask, 0);
        let (a, b) = split.split_at_mut(11);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 11);
        assert_eq!(whole, split);
    }

    #[test]
    fn head_helpers() {
        let head = b"HTTP/1.1 101 Switching\r\nSec-WebSocket-Key: abc \r\n\r\n";
        assert_eq!(head_end(head), Some(head.len()));
        assert_eq!(status_code(head), Some(101));
        assert_eq!(header(head, "sec-websocket-key"), Some(&b"abc"[..]));
    }
}
