//! RFC 6455 frame headers and the per-direction validation rules of SPEC §4, without I/O.
//!
//! The relay forwards frame bytes verbatim, so this module only decides *what* a header
//! means and whether it is allowed; it never copies or unmasks data payloads. Parsing is
//! tungstenite's (`FrameHeader::parse`); the rules that a proxy must add on top live here.

use crate::outcome::{Breach, Ending, Side, code};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

/// Largest header: 2 bytes + 8 bytes of extended length + 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;
/// Largest control-frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Which way bytes flow; picks masking rules and the close codes of SPEC §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ClientToUpstream,
    UpstreamToClient,
}

impl Dir {
    pub fn label(self) -> &'static str {
        match self {
            Dir::ClientToUpstream => "c2u",
            Dir::UpstreamToClient => "u2c",
        }
    }
}

/// What kind of frame a header announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Text or binary: the first frame of a message.
    Start,
    /// A continuation frame of a fragmented message.
    Continuation,
    Close,
    Ping,
    Pong,
}

impl Kind {
    pub fn is_control(self) -> bool {
        matches!(self, Kind::Close | Kind::Ping | Kind::Pong)
    }
}

/// A parsed, validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub fin: bool,
    /// Bytes the header occupies on the wire (2..=14).
    pub len: usize,
    pub payload_len: u64,
    pub mask: Option<[u8; 4]>,
}

/// Why a peer's bytes were refused. Maps to the close codes of SPEC §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Any breach of RFC 6455 framing rules.
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8 (1007 when the client sent it).
    InvalidUtf8,
    /// Frame or message larger than the configured limit (1009).
    TooBig,
    /// A fragmented message of more frames than `limits.max_fragments` (client only).
    TooManyFragments,
}

impl Violation {
    /// What was broken, which decides the close code (SPEC §5). Too many fragments is
    /// only judged on client messages ([`Violation::ending`]); from an upstream it would be
    /// a protocol breach.
    pub fn breach(self) -> Breach {
        match self {
            Violation::Protocol(_) | Violation::TooManyFragments => Breach::Protocol,
            Violation::InvalidUtf8 => Breach::InvalidUtf8,
            Violation::TooBig => Breach::TooBig,
        }
    }

    /// How the connection ends when the peer on `side` committed this (SPEC §5 rows).
    pub fn ending(self, side: Side) -> Ending {
        match (self, side) {
            (Violation::TooManyFragments, Side::Client) => Ending::TooManyFragments,
            (v, Side::Client) => Ending::ClientViolation(v.breach()),
            (v, Side::Upstream) => Ending::UpstreamViolation(v.breach()),
        }
    }
}

/// Limits and negotiated options that shape validation for one direction.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub dir: Dir,
    pub max_frame_size: u64,
    pub max_message_size: u64,
    /// Most frames one fragmented message may have (`limits.max_fragments`, client side);
    /// `u32::MAX` when unbounded.
    pub max_fragments: u32,
    /// RSV bits a message's first frame may carry (0x40 when permessage-deflate was
    /// negotiated, all three for an extension the proxy does not know).
    pub rsv_first: u8,
    /// RSV bits continuation and control frames may carry.
    pub rsv_other: u8,
}

impl Rules {
    /// Rules for a direction given the extensions the upstream accepted (the value of its
    /// `Sec-WebSocket-Extensions` response header, if any); no bound on fragments until
    /// [`Rules::with_max_fragments`] sets one.
    pub fn new(dir: Dir, max_frame_size: u64, max_message_size: u64, extensions: &str) -> Rules {
        let (rsv_first, rsv_other) = rsv_allowed(extensions);
        Rules {
            dir,
            max_frame_size,
            max_message_size,
            max_fragments: u32::MAX,
            rsv_first,
            rsv_other,
        }
    }

    /// Bounds the frames of one fragmented message (a zero bound counts as one frame).
    pub fn with_max_fragments(self, max_fragments: u32) -> Rules {
        Rules {
            max_fragments: max_fragments.max(1),
            ..self
        }
    }
}

/// RSV bits allowed by the negotiated extensions. permessage-deflate (RFC 7692) uses RSV1
/// on a message's first frame only; any other extension is opaque to us, so we let its
/// bits through rather than break a protocol we cannot see into.
fn rsv_allowed(extensions: &str) -> (u8, u8) {
    let mut first = 0u8;
    let mut other = 0u8;
    for ext in extensions.split(',') {
        let name = ext.split(';').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if name.eq_ignore_ascii_case("permessage-deflate") {
            first |= 0x40;
        } else {
            first |= 0x70;
            other |= 0x70;
        }
    }
    (first, other)
}

/// The wire layout of a frame header, before any rule is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeader {
    pub fin: bool,
    /// RSV1..3 as the bits 0x40, 0x20, 0x10.
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Bytes the header occupies on the wire (2..=14).
    pub len: usize,
    pub payload_len: u64,
}

/// Parses the header at the start of `input`; `None` when more bytes are needed.
pub fn parse_raw(input: &[u8]) -> Option<RawHeader> {
    let (&b0, rest) = input.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let (ext, payload_len) = match b1 & 0x7F {
        126 => (
            2,
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    let masked = b1 & 0x80 != 0;
    let mask = if masked {
        Some(rest.get(ext..ext + 4)?.try_into().ok()?)
    } else {
        None
    };
    Some(RawHeader {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0F,
        mask,
        len: 2 + ext + if masked { 4 } else { 0 },
        payload_len,
    })
}

/// Result of feeding bytes to [`Validator::parse_header`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed; nothing was consumed.
    Incomplete,
    Header(Header),
    Invalid(Violation),
}

/// Message-level state of one direction: are we inside a fragmented message, how big has
/// it grown, and of how many frames.
#[derive(Clone, Debug, Default)]
pub struct Validator {
    in_message: bool,
    message_len: u64,
    /// Data frames of the open message so far (its first included).
    frames: u32,
}

impl Validator {
    /// Parses and validates the header at the start of `input`.
    pub fn parse_header(&mut self, rules: &Rules, input: &[u8]) -> Parse {
        let Some(raw) = parse_raw(input) else {
            return Parse::Incomplete;
        };
        match self.check(rules, &raw) {
            Ok(kind) => Parse::Header(Header {
                kind,
                fin: raw.fin,
                len: raw.len,
                payload_len: raw.payload_len,
                mask: raw.mask,
            }),
            Err(v) => Parse::Invalid(v),
        }
    }

    /// Applies SPEC §4's rules to one header; the message state advances only when the
    /// header is accepted.
    pub fn check(&mut self, rules: &Rules, h: &RawHeader) -> Result<Kind, Violation> {
        match (rules.dir, h.mask.is_some()) {
            (Dir::ClientToUpstream, false) => {
                return Err(Violation::Protocol("unmasked client frame"));
            }
            (Dir::UpstreamToClient, true) => {
                return Err(Violation::Protocol("masked server frame"));
            }
            _ => {}
        }
        if h.payload_len >> 63 != 0 {
            return Err(Violation::Protocol("payload length has its top bit set"));
        }
        let kind = match OpCode::from(h.opcode) {
            OpCode::Data(Data::Text | Data::Binary) => Kind::Start,
            OpCode::Data(Data::Continue) => Kind::Continuation,
            OpCode::Control(Control::Close) => Kind::Close,
            OpCode::Control(Control::Ping) => Kind::Ping,
            OpCode::Control(Control::Pong) => Kind::Pong,
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                return Err(Violation::Protocol("reserved opcode"));
            }
        };
        let allowed = if kind == Kind::Start {
            rules.rsv_first
        } else {
            rules.rsv_other
        };
        if h.rsv & !allowed != 0 {
            return Err(Violation::Protocol(
                "RSV bit without a negotiated extension",
            ));
        }
        if kind.is_control() {
            if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(Violation::Protocol("control frame over 125 bytes"));
            }
            if !h.fin {
                return Err(Violation::Protocol("fragmented control frame"));
            }
            return Ok(kind);
        }
        let (so_far, frames) = match (kind, self.in_message) {
            (Kind::Continuation, false) => {
                return Err(Violation::Protocol("continuation outside a message"));
            }
            (Kind::Start, true) => {
                return Err(Violation::Protocol("new message inside a fragmented one"));
            }
            (Kind::Start, false) => (0, 1),
            _ => (self.message_len, self.frames.saturating_add(1)),
        };
        // Judged per frame, from the header: a message of many tiny frames is refused at
        // the first frame over the bound, before any of it is forwarded.
        if frames > rules.max_fragments {
            return Err(Violation::TooManyFragments);
        }
        if h.payload_len > rules.max_frame_size {
            return Err(Violation::TooBig);
        }
        let message_len = so_far.saturating_add(h.payload_len);
        if message_len > rules.max_message_size {
            return Err(Violation::TooBig);
        }
        self.message_len = message_len;
        self.frames = frames;
        self.in_message = !h.fin;
        Ok(kind)
    }

    /// True while a fragmented message is open (a frame boundary is not a message boundary).
    pub fn in_message(&self) -> bool {
        self.in_message
    }
}

/// Incremental UTF-8 check of a text message arriving in pieces (a sequence may be split
/// across reads and frames). Client text is checked because a proxy that forwarded invalid
/// text would leave the upstream to drop the connection, which the client would only see
/// as the upstream vanishing; checking here gives the client its 1007.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Check {
    carry: [u8; 4],
    /// At most 4 (a byte, so the check is 6 bytes in each pump).
    carry_len: u8,
    bad: bool,
}

impl Utf8Check {
    /// Feeds the next (unmasked) bytes of the message.
    pub fn feed(&mut self, mut data: &[u8]) {
        while self.carry_len > 0 && !data.is_empty() && !self.bad {
            self.carry[usize::from(self.carry_len)] = data[0];
            self.carry_len += 1;
            data = &data[1..];
            match std::str::from_utf8(&self.carry[..usize::from(self.carry_len)]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() && self.carry_len < 4 => {}
                Err(_) => self.bad = true,
            }
        }
        if self.bad || data.is_empty() {
            return;
        }
        if let Err(e) = std::str::from_utf8(data) {
            match e.error_len() {
                Some(_) => self.bad = true,
                None => {
                    let tail = &data[e.valid_up_to()..];
                    self.carry[..tail.len()].copy_from_slice(tail);
                    // An incomplete sequence: at most 3 bytes.
                    self.carry_len = tail.len() as u8;
                }
            }
        }
    }

    /// True once an invalid sequence has been seen.
    pub fn is_bad(&self) -> bool {
        self.bad
    }

    /// Ends the message: valid only if nothing was bad and no sequence is left open.
    pub fn finish(&mut self) -> bool {
        let ok = !self.bad && self.carry_len == 0;
        *self = Utf8Check::default();
        ok
    }
}

/// Checks a close frame's (unmasked) payload and returns its code and reason.
pub fn parse_close(payload: &[u8]) -> Result<(u16, &str), Violation> {
    match payload {
        [] => Ok((code::NO_STATUS, "")),
        [_] => Err(Violation::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(Violation::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason)
                .map(|r| (code, r))
                .map_err(|_| Violation::InvalidUtf8)
        }
    }
}

/// Codes a peer may put on the wire: tungstenite's rule, plus 1014 (IANA "bad gateway"),
/// which a proxy in front of another wsgate must accept since we send it ourselves.
fn close_code_allowed(code: u16) -> bool {
    code == 1014 || CloseCode::from(code).is_allowed()
}

/// XORs `data` with the mask, continuing at byte `offset` of the masked payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

/// A whole control frame held on the stack: one the proxy sends itself, or a peer's close
/// frame kept back until its payload has been checked.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    bytes: [u8; MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD],
    len: usize,
}

impl Default for ControlFrame {
    fn default() -> Self {
        ControlFrame {
            bytes: [0; MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD],
            len: 0,
        }
    }
}

impl ControlFrame {
    /// A close frame with `code` and `reason` (truncated to fit 125 bytes on a char
    /// boundary), masked with `mask` when it goes to the upstream.
    pub fn close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> ControlFrame {
        let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason.as_bytes()[..cut];
        let mut f = ControlFrame::default();
        let payload_len = 2 + reason.len();
        f.bytes[0] = 0x88;
        // payload_len <= 125, so it fits the 7-bit length.
        f.bytes[1] = payload_len as u8 | if mask.is_some() { 0x80 } else { 0 };
        let mut at = 2;
        if let Some(m) = mask {
            f.bytes[2..6].copy_from_slice(&m);
            at = 6;
        }
        f.bytes[at..at + 2].copy_from_slice(&code.to_be_bytes());
        f.bytes[at + 2..at + payload_len].copy_from_slice(reason);
        if let Some(m) = mask {
            apply_mask(&mut f.bytes[at..at + payload_len], m, 0);
        }
        f.len = at + payload_len;
        f
    }

    /// A ping with `payload` (≤ 125 bytes), masked when it goes to the upstream.
    pub fn ping(payload: &[u8], mask: Option<[u8; 4]>) -> ControlFrame {
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        let mut f = ControlFrame::default();
        f.bytes[0] = 0x89;
        // payload.len() <= 125, so it fits the 7-bit length.
        f.bytes[1] = payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 };
        let mut at = 2;
        if let Some(m) = mask {
            f.bytes[2..6].copy_from_slice(&m);
            at = 6;
        }
        f.bytes[at..at + payload.len()].copy_from_slice(payload);
        if let Some(m) = mask {
            apply_mask(&mut f.bytes[at..at + payload.len()], m, 0);
        }
        f.len = at + payload.len();
        f
    }

    /// The unmasked payload of a collected frame, when it is exactly `N` bytes long.
    pub fn payload_unmasked<const N: usize>(
        &self,
        header_len: usize,
        mask: Option<[u8; 4]>,
    ) -> Option<[u8; N]> {
        let payload = self.bytes.get(header_len..self.len)?;
        let mut out: [u8; N] = payload.try_into().ok()?;
        if let Some(m) = mask {
            apply_mask(&mut out, m, 0);
        }
        Some(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends bytes of a frame being collected; the caller bounds the total by the
    /// header (≤ 14) plus a control payload (≤ 125), which always fits.
    pub fn extend(&mut self, data: &[u8]) {
        let end = (self.len + data.len()).min(self.bytes.len());
        let n = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&data[..n]);
        self.len = end;
    }

    /// The checked code and reason of a collected close frame whose header is
    /// `header_len` bytes long. Runs once per connection, so the reason is owned.
    pub fn close_info(
        &self,
        header_len: usize,
        mask: Option<[u8; 4]>,
    ) -> Result<(u16, String), Violation> {
        let payload = self.bytes.get(header_len..self.len).unwrap_or_default();
        let mut plain = [0u8; MAX_CONTROL_PAYLOAD];
        let plain = &mut plain[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        plain.copy_from_slice(&payload[..plain.len()]);
        if let Some(m) = mask {
            apply_mask(plain, m, 0);
        }
        parse_close(plain).map(|(code, reason)| (code, reason.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C2U: Rules = Rules {
        dir: Dir::ClientToUpstream,
        max_frame_size: 1 << 20,
        max_message_size: 4 << 20,
        max_fragments: u32::MAX,
        rsv_first: 0,
        rsv_other: 0,
    };
    const U2C: Rules = Rules {
        dir: Dir::UpstreamToClient,
        ..C2U
    };

    fn masked(first: u8, len: u8) -> Vec<u8> {
        vec![first, 0x80 | len, 1, 2, 3, 4]
    }

    fn parse(rules: &Rules, v: &mut Validator, bytes: &[u8]) -> Parse {
        v.parse_header(rules, bytes)
    }

    #[test]
    fn masked_text_frame_from_client_parses() {
        let mut v = Validator::default();
        let p = parse(&C2U, &mut v, &masked(0x81, 5));
        assert_eq!(
            p,
            Parse::Header(Header {
                kind: Kind::Start,
                fin: true,
                len: 6,
                payload_len: 5,
                mask: Some([1, 2, 3, 4])
            })
        );
    }

    #[test]
    fn partial_header_is_incomplete() {
        let mut v = Validator::default();
        assert_eq!(parse(&C2U, &mut v, &[0x81]), Parse::Incomplete);
        assert_eq!(parse(&C2U, &mut v, &[0x81, 0xFE, 0x01]), Parse::Incomplete);
        assert_eq!(parse(&C2U, &mut v, &[0x81, 0x85, 1, 2]), Parse::Incomplete);
    }

    #[test]
    fn masking_rules_depend_on_direction() {
        let mut v = Validator::default();
        assert!(matches!(
            parse(&C2U, &mut v, &[0x81, 0x00]),
            Parse::Invalid(Violation::Protocol(_))
        ));
        assert!(matches!(
            parse(&U2C, &mut v, &masked(0x81, 0)),
            Parse::Invalid(Violation::Protocol(_))
        ));
        assert!(matches!(
            parse(&U2C, &mut v, &[0x81, 0x00]),
            Parse::Header(_)
        ));
    }

    #[test]
    fn reserved_opcodes_and_rsv_bits_are_refused() {
        let mut v = Validator::default();
        for first in [0x83u8, 0x8B, 0xC1, 0xA1, 0x91] {
            assert!(
                matches!(parse(&C2U, &mut v, &masked(first, 0)), Parse::Invalid(_)),
                "{first:#x}"
            );
        }
    }

    #[test]
    fn deflate_allows_rsv1_on_first_frame_only() {
        let rules = Rules::new(
            Dir::ClientToUpstream,
            1 << 20,
            4 << 20,
            "permessage-deflate; client_max_window_bits",
        );
        let mut v = Validator::default();
        assert!(matches!(
            parse(&rules, &mut v, &masked(0x41, 1)),
            Parse::Header(_)
        ));
        assert!(matches!(
            parse(&rules, &mut v, &masked(0x40, 1)),
            Parse::Invalid(_)
        ));
    }

    #[test]
    fn control_frames_must_be_small_and_final() {
        let mut v = Validator::default();
        let big_ping = [0x89, 0xFE, 0x00, 0x7E, 1, 2, 3, 4];
        assert!(matches!(parse(&C2U, &mut v, &big_ping), Parse::Invalid(_)));
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x09, 1)),
            Parse::Invalid(_)
        ));
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x89, 125)),
            Parse::Header(_)
        ));
    }

    #[test]
    fn fragmentation_rules_are_enforced() {
        let mut v = Validator::default();
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x80, 1)),
            Parse::Invalid(_)
        ));
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x01, 1)),
            Parse::Header(_)
        ));
        assert!(v.in_message());
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x89, 0)),
            Parse::Header(_)
        ));
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x81, 1)),
            Parse::Invalid(_)
        ));
        let mut v = Validator::default();
        parse(&C2U, &mut v, &masked(0x01, 1));
        assert!(matches!(
            parse(&C2U, &mut v, &masked(0x80, 1)),
            Parse::Header(_)
        ));
        assert!(!v.in_message());
    }

    #[test]
    fn sizes_are_judged_from_the_header() {
        let rules = Rules {
            max_frame_size: 1000,
            max_message_size: 1500,
            ..C2U
        };
        let mut v = Validator::default();
        let big = [0x82, 0xFE, 0x03, 0xE9, 1, 2, 3, 4]; // 1001 bytes
        assert_eq!(
            parse(&rules, &mut v, &big),
            Parse::Invalid(Violation::TooBig)
        );
        let mut v = Validator::default();
        let f1 = [0x02, 0xFE, 0x03, 0xE8, 1, 2, 3, 4];
        let f2 = [0x80, 0xFE, 0x03, 0xE8, 1, 2, 3, 4];
        assert!(matches!(parse(&rules, &mut v, &f1), Parse::Header(_)));
        assert_eq!(
            parse(&rules, &mut v, &f2),
            Parse::Invalid(Violation::TooBig)
        );
    }

    #[test]
    fn a_message_of_more_frames_than_the_bound_is_refused_at_the_first_extra_frame() {
        let rules = C2U.with_max_fragments(3);
        let mut v = Validator::default();
        assert!(matches!(
            parse(&rules, &mut v, &masked(0x01, 1)),
            Parse::Header(_)
        ));
        // Control frames between fragments are not fragments.
        assert!(matches!(
            parse(&rules, &mut v, &masked(0x89, 0)),
            Parse::Header(_)
        ));
        for _ in 0..2 {
            assert!(matches!(
                parse(&rules, &mut v, &masked(0x00, 1)),
                Parse::Header(_)
            ));
        }
        assert_eq!(
            parse(&rules, &mut v, &masked(0x80, 1)),
            Parse::Invalid(Violation::TooManyFragments)
        );
        // Exactly the bound passes, and the count starts again with each message.
        let mut v = Validator::default();
        for _ in 0..2 {
            parse(&rules, &mut v, &masked(0x01, 1));
            parse(&rules, &mut v, &masked(0x00, 1));
            assert!(matches!(
                parse(&rules, &mut v, &masked(0x80, 1)),
                Parse::Header(_)
            ));
            assert!(!v.in_message());
        }
        assert_eq!(
            Violation::TooManyFragments.ending(Side::Client),
            Ending::TooManyFragments
        );
    }

    #[test]
    fn top_bit_of_64_bit_length_is_a_protocol_error() {
        let mut v = Validator::default();
        let mut h = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        h.extend_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(
            parse(&C2U, &mut v, &h),
            Parse::Invalid(Violation::Protocol(_))
        ));
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(parse_close(&[]), Ok((1005, "")));
        assert!(parse_close(&[3]).is_err());
        assert_eq!(parse_close(&[0x03, 0xE8, b'o', b'k']), Ok((1000, "ok")));
        assert!(matches!(
            parse_close(&[0x03, 0xED]),
            Err(Violation::Protocol(_))
        )); // 1005
        assert!(matches!(parse_close(&[0x03, 0xF6]), Ok((1014, "")))); // 1014
        assert_eq!(
            parse_close(&[0x03, 0xE8, 0xFF]),
            Err(Violation::InvalidUtf8)
        );
    }

    #[test]
    fn utf8_check_handles_sequences_split_anywhere() {
        let text = "aé€😀z".as_bytes();
        for split in 0..=text.len() {
            let mut c = Utf8Check::default();
            c.feed(&text[..split]);
            c.feed(&text[split..]);
            assert!(c.finish(), "split at {split}");
        }
        let mut c = Utf8Check::default();
        c.feed(&[0xF0, 0x9F]);
        assert!(!c.is_bad());
        assert!(!c.finish(), "an open sequence at the end is invalid");
        let mut c = Utf8Check::default();
        c.feed(&[0xCE, 0xBA, 0xED, 0xA0, 0x80]); // a surrogate
        assert!(c.is_bad());
        let mut c = Utf8Check::default();
        c.feed(&[0xF4]);
        c.feed(&[0x90, 0x80, 0x80]); // > U+10FFFF
        assert!(c.is_bad());
    }

    #[test]
    fn own_close_frames_round_trip() {
        let f = ControlFrame::close(1001, "going away", Some([9, 8, 7, 6]));
        let bytes = f.as_bytes();
        let mut v = Validator::default();
        let Parse::Header(h) = v.parse_header(&C2U, bytes) else {
            panic!("not a header")
        };
        assert_eq!(h.kind, Kind::Close);
        let mut payload = bytes[h.len..].to_vec();
        apply_mask(&mut payload, [9, 8, 7, 6], 0);
        assert_eq!(parse_close(&payload), Ok((1001, "going away")));
        let long = "é".repeat(100);
        let f = ControlFrame::close(1000, &long, None);
        assert_eq!(f.as_bytes().len(), 2 + 2 + 122);
    }
}
