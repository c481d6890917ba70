//! `deflate: inspect`: a client's compressed (RSV1) messages are inflated as they stream by,
//! so `max_message_size` and UTF-8 are judged on what the upstream will read (RFC 7692).
//! The inflated bytes go through a fixed scratch buffer and are dropped once judged; the
//! frames themselves are forwarded as the client sent them (nothing is recompressed).
//!
//! The inflater (`flate2` on miniz_oxide: its state holds the 32 KiB window) exists only
//! once a compressed message arrived, and outlives a message only under context takeover.

use flate2::{Decompress, FlushDecompress, Status};

use super::frame::{Utf8Check, Violation, apply_mask};

/// Appended to each message's payload before inflating (RFC 7692 §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Inflated bytes are judged in pieces of this size.
const SCRATCH: usize = 4096;

/// Whether permessage-deflate is among the negotiated `extensions`, and if so whether
/// `client_no_context_takeover` was agreed (`Some(true)`: a fresh inflater per message).
pub fn negotiated(extensions: &str) -> Option<bool> {
    extensions.split(',').find_map(|ext| {
        let mut params = ext.split(';').map(str::trim);
        let name = params.next()?;
        name.eq_ignore_ascii_case("permessage-deflate").then(|| {
            params.any(|p| {
                p.split('=')
                    .next()
                    .is_some_and(|k| k.trim().eq_ignore_ascii_case("client_no_context_takeover"))
            })
        })
    })
}

/// One direction's inflation state.
pub struct Inflate {
    /// `client_no_context_takeover` was negotiated: a fresh inflater per message.
    reset_per_message: bool,
    max_message_size: u64,
    decomp: Option<Box<Decompress>>,
    /// Inflated bytes of the open message.
    message_len: u64,
    /// The sender ended its DEFLATE stream (a BFINAL block) inside this message: what
    /// follows is not inflated, and the next message starts a fresh inflater.
    ended: bool,
}

impl Inflate {
    pub fn new(reset_per_message: bool, max_message_size: u64) -> Inflate {
        Inflate {
            reset_per_message,
            max_message_size,
            decomp: None,
            message_len: 0,
            ended: false,
        }
    }

    /// An inflater (its window) is held: between messages only under context takeover.
    pub fn holds_inflater(&self) -> bool {
        self.decomp.is_some()
    }

    /// A compressed message starts.
    pub fn start_message(&mut self) {
        self.message_len = 0;
        self.ended = false;
        if self.decomp.is_none() {
            self.decomp = Some(Box::new(Decompress::new(false)));
        }
    }

    /// Inflates a run of (masked when `mask` is set) payload bytes, the first of which is at
    /// offset `at` (mod 4) in its frame's mask; returns the next mask offset.
    pub fn feed(
        &mut self,
        data: &[u8],
        mask: Option<[u8; 4]>,
        at: u8,
        text: Option<&mut Utf8Check>,
    ) -> Result<u8, Violation> {
        let mut text = text;
        let mut at = usize::from(at & 3);
        let mut plain = [0u8; 512];
        for piece in data.chunks(plain.len()) {
            let chunk = &mut plain[..piece.len()];
            chunk.copy_from_slice(piece);
            if let Some(mask) = mask {
                apply_mask(chunk, mask, at);
                at = (at + piece.len()) & 3;
            }
            self.inflate(chunk, FlushDecompress::None, text.as_deref_mut())?;
        }
        // Below 4, so it fits.
        Ok(at as u8)
    }

    /// The message's last frame ended: inflate the RFC 7692 tail, judge the text, and drop
    /// the inflater unless its window carries over to the next message.
    pub fn end_message(&mut self, text: Option<&mut Utf8Check>) -> Result<(), Violation> {
        let mut text = text;
        let result = self.inflate(&TAIL, FlushDecompress::Sync, text.as_deref_mut());
        if result.is_err() || self.reset_per_message || self.ended {
            self.decomp = None;
        }
        result?;
        match text.map(Utf8Check::finish) {
            Some(false) => Err(Violation::InvalidUtf8),
            _ => Ok(()),
        }
    }

    fn inflate(
        &mut self,
        mut input: &[u8],
        flush: FlushDecompress,
        mut text: Option<&mut Utf8Check>,
    ) -> Result<(), Violation> {
        let Some(decomp) = self.decomp.as_deref_mut() else {
            return Err(Violation::Protocol("compressed bytes outside a message"));
        };
        let mut out = [0u8; SCRATCH];
        loop {
            if self.ended {
                return Ok(());
            }
            let (in_before, out_before) = (decomp.total_in(), decomp.total_out());
            let status = decomp
                .decompress(input, &mut out, flush)
                .map_err(|_| Violation::Protocol("corrupt permessage-deflate data"))?;
            let used = usize::try_from(decomp.total_in() - in_before).unwrap_or(input.len());
            let made = usize::try_from(decomp.total_out() - out_before).unwrap_or(0);
            input = input.get(used..).unwrap_or_default();
            self.message_len = self.message_len.saturating_add(made as u64);
            if self.message_len > self.max_message_size {
                return Err(Violation::TooBig);
            }
            if let Some(check) = text.as_deref_mut() {
                check.feed(&out[..made]);
                if check.is_bad() {
                    return Err(Violation::InvalidUtf8);
                }
            }
            match status {
                Status::StreamEnd => self.ended = true,
                // A full scratch buffer may hold more output back; an empty input with
                // room to spare means everything so far came out.
                Status::Ok | Status::BufError if made == out.len() => {}
                Status::Ok | Status::BufError if input.is_empty() => return Ok(()),
                Status::Ok | Status::BufError if used == 0 && made == 0 => {
                    return Err(Violation::Protocol("corrupt permessage-deflate data"));
                }
                Status::Ok | Status::BufError => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// Raw DEFLATE of `msgs` as one permessage-deflate sender would write them (context
    /// takeover, each message sync-flushed and its tail removed).
    fn compress_all(msgs: &[&[u8]], takeover: bool) -> Vec<Vec<u8>> {
        let mut c = Compress::new(Compression::default(), false);
        msgs.iter()
            .map(|m| {
                if !takeover {
                    c = Compress::new(Compression::default(), false);
                }
                let mut out = Vec::with_capacity(m.len() + 64);
                let before = c.total_in();
                while (c.total_in() - before) < m.len() as u64 || out.is_empty() {
                    let from = (c.total_in() - before) as usize;
                    out.reserve(1024);
                    c.compress_vec(&m[from..], &mut out, FlushCompress::Sync)
                        .unwrap();
                }
                assert!(out.ends_with(&TAIL));
                out.truncate(out.len() - 4);
                out
            })
            .collect()
    }

    fn run(inf: &mut Inflate, payload: &[u8], text: bool) -> Result<(), Violation> {
        let mut check = Utf8Check::default();
        inf.start_message();
        let mask = [1, 2, 3, 4];
        let mut masked = payload.to_vec();
        apply_mask(&mut masked, mask, 0);
        let mut at = 0;
        for piece in masked.chunks(7) {
            at = inf.feed(piece, Some(mask), at, text.then_some(&mut check))?;
        }
        inf.end_message(text.then_some(&mut check))
    }

    #[test]
    fn negotiated_reads_the_accepted_offer() {
        assert_eq!(negotiated(""), None);
        assert_eq!(negotiated("x-foo"), None);
        assert_eq!(negotiated("permessage-deflate"), Some(false));
        assert_eq!(
            negotiated(
                "x-foo, permessage-deflate; server_max_window_bits=12; client_no_context_takeover"
            ),
            Some(true)
        );
    }

    #[test]
    fn a_conversation_with_context_takeover_inflates() {
        let same: &[u8] = b"a sentence long enough to be sent again as one back-reference";
        let msgs: [&[u8]; 3] = [same, same, b"\xce\xbb ok"];
        let frames = compress_all(&msgs, true);
        // The second message is a back-reference into the first one's window.
        assert!(frames[1].len() < same.len() / 2, "{:?}", frames[1]);
        let mut inf = Inflate::new(false, 1 << 20);
        for (f, m) in frames.iter().zip(msgs) {
            run(&mut inf, f, true).unwrap();
            assert!(inf.holds_inflater());
            assert_eq!(inf.message_len, m.len() as u64);
        }
    }

    #[test]
    fn no_context_takeover_resets_per_message() {
        let msgs: [&[u8]; 2] = [b"abcabcabcabc", b"abcabcabcabc"];
        let frames = compress_all(&msgs, false);
        let mut inf = Inflate::new(true, 1 << 20);
        for f in &frames {
            run(&mut inf, f, true).unwrap();
            assert!(!inf.holds_inflater());
        }
    }

    #[test]
    fn limits_count_inflated_bytes() {
        let zeros = vec![0u8; 4 << 20];
        let frames = compress_all(&[&zeros], true);
        assert!(frames[0].len() < 16 << 10, "{}", frames[0].len());
        let mut inf = Inflate::new(false, 1 << 20);
        assert_eq!(run(&mut inf, &frames[0], false), Err(Violation::TooBig));
        let mut inf = Inflate::new(false, 4 << 20);
        assert_eq!(run(&mut inf, &frames[0], false), Ok(()));
    }

    #[test]
    fn bad_text_and_corrupt_data_are_refused() {
        let frames = compress_all(&[b"ok \xff\xfe no"], true);
        let mut inf = Inflate::new(false, 1 << 20);
        assert_eq!(run(&mut inf, &frames[0], true), Err(Violation::InvalidUtf8));
        let mut inf = Inflate::new(false, 1 << 20);
        assert!(matches!(
            run(&mut inf, &[0xff, 0xff, 0xff, 0xff, 0xff], false),
            Err(Violation::Protocol(_))
        ));
    }
}
