//! One direction of a relayed connection: read bytes, walk the frame headers, forward the
//! bytes verbatim, and never read more than has been written (end-to-end backpressure).
//!
//! A pump never holds a whole frame or message: payload bytes go out as they arrive, in
//! runs of at most one buffer. It also owns what the proxy itself says to its destination
//! (a close frame), which it slips in only at a frame boundary. Decisions about *when* to
//! close belong to the session; the pump reports what it saw as an [`Event`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::frame::{
    ControlFrame, Dir, Kind, MAX_HEADER_LEN, RawHeader, Rules, Utf8Check, Validator, Violation,
    apply_mask, parse_raw,
};
use super::inflate::Inflate;
use super::limits::{MessageGate, Verdict};
use super::pool;
use crate::observe::report::Stats;
use crate::outcome::code;

/// Payload length of the proxy's own pings; pongs of this length are checked against it.
pub const PING_LEN: usize = 8;

/// Reads per poll before yielding, so one busy connection cannot starve its worker
/// thread. 32 reads of 16 KiB is 512 KiB per turn: large enough to amortise the wake-up.
const READS_PER_POLL: usize = 32;

/// What a pump saw that the session must act on.
#[derive(Debug)]
pub enum Event {
    /// A close frame arrived from the source (forwarded if the pump was still
    /// forwarding); see [`Pump::src_close`].
    CloseReceived,
    /// The source broke a rule; nothing more from it is forwarded.
    Violation(Violation),
    /// The source reached EOF or failed to read.
    SrcEnded(Option<io::Error>),
    /// Writing to the destination failed.
    DstFailed(io::Error),
    /// The source answered the proxy's ping (the pong was consumed).
    PongReceived,
    /// The source exceeded its message budget with `on_exceed: close`.
    RateLimited,
    /// The pump found its own state inconsistent (a bug): the session ends with 1011.
    Broken(&'static str),
}

/// The source's message budget, and what it said about the header at `pos`.
struct Gate {
    budget: MessageGate,
    mark: GateMark,
}

/// A header may be parsed again (throttled, or waiting for earlier bytes to be written):
/// it is charged and counted only once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateMark {
    Unasked,
    Passed,
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Expecting a frame header at `pos`.
    Header,
    /// Forwarding this many more payload bytes.
    Forward(u64),
    /// Dropping this many more payload bytes.
    Discard(u64),
    /// Collecting a close frame's payload, or a pong's that may answer our ping (this many
    /// bytes still to come).
    Control {
        remaining: u64,
        /// At most [`MAX_HEADER_LEN`]: a byte keeps the phase at 16 bytes.
        header_len: u8,
        mask: Option<[u8; 4]>,
        pong: bool,
    },
}

/// What `out` holds, which decides what writing it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutKind {
    Close,
    OwnPing,
    /// A peer's pong that turned out not to answer our ping.
    Relayed,
}

/// One direction's relay state. Bytes `[sent, pos)` of `buf` are parsed and due to be
/// written; `[pos, end)` are read but not parsed (at most a partial header).
pub struct Pump {
    rules: Rules,
    validator: Validator,
    buf_size: usize,
    buf: Option<Box<[u8]>>,
    sent: usize,
    pos: usize,
    end: usize,
    /// A partial header kept while the buffer is back in the pool (a byte's worth of
    /// length: with `mask_at`, this keeps `early` from growing an idle pump).
    stash: [u8; MAX_HEADER_LEN],
    stash_len: u8,
    /// Handshake bytes that did not fit the buffer; gone once read.
    early: Option<Box<Early>>,
    phase: Phase,
    // Close frames happen about once per connection, so they live on the heap only while
    // needed: an idle pump is a few dozen bytes plus its counters.
    /// A close frame being collected, then written out once checked.
    ctl: Option<Box<ControlFrame>>,
    /// A control frame being written; `out_sent` bytes of it are out.
    out: Option<Box<ControlFrame>>,
    out_kind: OutKind,
    out_sent: usize,
    /// The proxy's own ping, waiting for a frame boundary.
    ping: Option<Box<ControlFrame>>,
    /// Pongs carrying this payload answer the proxy's ping: consumed, never forwarded.
    pub expect_pong: Option<[u8; PING_LEN]>,
    /// When the proxy's last ping was written.
    pub ping_sent_at: Option<Instant>,
    /// When bytes last went to the destination; kept only when pings are on (`Some`).
    pub last_write: Option<Instant>,
    /// A data frame passed since the session last looked (idle timeout).
    pub saw_data: bool,
    /// When the open fragmented message began (fragment timeout), if tracked.
    pub fragment_since: Option<Instant>,
    track_fragments: bool,
    /// The source's message budget (client side only).
    gate: Option<Box<Gate>>,
    /// `on_exceed: throttle`: nothing more is read from the source before then (the held
    /// header is re-checked on wake-ups, but charged and counted once).
    pub throttled_until: Option<Instant>,
    /// The proxy's own close frame, waiting for a frame boundary.
    inject: Option<Box<ControlFrame>>,
    /// Sent to the destination in place of the source's close when that arrives (the
    /// proxy answers a peer for the other one, after everything the source sent before).
    pub close_reply: Option<Box<ControlFrame>>,
    needs_flush: bool,
    /// Frames from the source still go to the destination.
    forward: bool,
    /// The destination is gone or was abandoned: nothing is written to it again.
    dst_dead: bool,
    pub src_eof: bool,
    /// Code and reason of the close frame the source sent, once it arrived.
    /// (Boxed: it arrives once per connection, and an idle pump should not carry it.)
    pub src_close: Option<Box<(u16, String)>>,
    /// A close frame (relayed or the proxy's own) has been fully written to the destination.
    pub dst_close_sent: bool,
    /// Client text is checked for UTF-8 (unless an extension such as deflate transforms
    /// payloads); these track the frame being checked.
    check_text: bool,
    text: Utf8Check,
    in_text: bool,
    frame_mask: Option<[u8; 4]>,
    /// Where the frame's next payload byte falls in its mask (its offset mod 4).
    mask_at: u8,
    frame_fin: bool,
    /// The frame being forwarded is part of a checked text message (not a control frame).
    frame_is_text: bool,
    /// `deflate: inspect` with permessage-deflate negotiated (client side only).
    inflate: Option<Box<Inflate>>,
    /// The open message is compressed (RSV1) and being inflated.
    in_deflate: bool,
    /// The frame being forwarded is part of a message being inflated.
    frame_inflate: bool,
    /// A violation cut the frame being forwarded: the destination got part of it.
    pub cut_mid_frame: bool,
    /// When the destination stopped accepting writes (for `send_timeout` and the
    /// `stalls` counts); set and cleared only by `stall` and `end_stall`.
    pub stalled_since: Option<Instant>,
    pub stats: Stats,
}

impl Pump {
    /// `buf_size` is the payload room (`limits.buffer_size`); the buffer gets one frame
    /// header more, so a frame of exactly `buffer_size` moves in one read and one write.
    pub fn new(rules: Rules, buf_size: usize) -> Pump {
        Pump {
            rules,
            validator: Validator::default(),
            buf_size: buf_size + MAX_HEADER_LEN,
            buf: None,
            sent: 0,
            pos: 0,
            end: 0,
            stash: [0; MAX_HEADER_LEN],
            stash_len: 0,
            early: None,
            phase: Phase::Header,
            ctl: None,
            out: None,
            out_kind: OutKind::Close,
            out_sent: 0,
            ping: None,
            expect_pong: None,
            ping_sent_at: None,
            last_write: None,
            saw_data: false,
            fragment_since: None,
            track_fragments: false,
            gate: None,
            throttled_until: None,
            inject: None,
            close_reply: None,
            needs_flush: false,
            forward: true,
            dst_dead: false,
            src_eof: false,
            src_close: None,
            dst_close_sent: false,
            stalled_since: None,
            check_text: rules.dir == Dir::ClientToUpstream && rules.rsv_first == 0,
            text: Utf8Check::default(),
            in_text: false,
            frame_mask: None,
            mask_at: 0,
            frame_fin: false,
            frame_is_text: false,
            inflate: None,
            in_deflate: false,
            frame_inflate: false,
            cut_mid_frame: false,
            stats: Stats::default(),
        }
    }

    /// `deflate: inspect` on a connection that negotiated permessage-deflate: compressed
    /// client messages are inflated as they pass, their inflated size held to
    /// `max_message_size` and text to UTF-8; uncompressed text is checked as sent.
    pub fn inspect_deflate(&mut self, reset_per_message: bool) {
        self.inflate = Some(Box::new(Inflate::new(
            reset_per_message,
            self.rules.max_message_size,
        )));
        self.check_text = self.rules.dir == Dir::ClientToUpstream;
    }

    /// Applies the source's message budget (client side).
    pub fn set_gate(&mut self, gate: MessageGate) {
        self.gate = Some(Box::new(Gate {
            budget: gate,
            mark: GateMark::Unasked,
        }));
    }

    /// Records when fragmented messages start, for `fragment_timeout`.
    pub fn track_fragments(&mut self) {
        self.track_fragments = true;
    }

    /// Keeps `last_write` up to date, for ping scheduling.
    pub fn track_writes(&mut self) {
        self.last_write = Some(Instant::now());
    }

    /// Queues the proxy's ping for the next frame boundary (the session tells the other
    /// pump which pong to consume). Returns false when the destination is closing.
    pub fn send_ping(&mut self, payload: [u8; PING_LEN], mask: Option<[u8; 4]>) -> bool {
        if self.dst_dead || self.dst_close_sent || self.inject.is_some() {
            return false;
        }
        self.ping = Some(Box::new(ControlFrame::ping(&payload, mask)));
        self.ping_sent_at = None;
        true
    }

    /// Bytes that arrived with the handshake (read by the HTTP layer past the head).
    pub fn seed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let buf = self.buf.get_or_insert_with(|| pool::take(self.buf_size));
        let n = (buf.len() - self.end).min(bytes.len());
        buf[self.end..self.end + n].copy_from_slice(&bytes[..n]);
        self.end += n;
        if n < bytes.len() {
            // More than a buffer came with the head (a small `buffer_size`, a large 101, a
            // client that did not wait): the rest is read before the socket, a buffer at a
            // time. Copied, so the HTTP layer's read buffer is not kept alive with it.
            self.early = Some(Box::new(Early {
                bytes: bytes[n..].into(),
                at: 0,
            }));
        }
    }

    /// Queues the proxy's own close frame for the destination; it goes out at the next
    /// frame boundary (after a ping or pong already being written), after which nothing
    /// more is forwarded.
    pub fn send_close(&mut self, frame: ControlFrame) {
        let close_in_flight = self.out.is_some() && self.out_kind == OutKind::Close;
        if !self.dst_dead && !self.dst_close_sent && !close_in_flight && self.inject.is_none() {
            self.inject = Some(Box::new(frame));
        }
        self.forward = false;
    }

    /// Stops all writes to the destination (it vanished, or is being cut off).
    pub fn abandon_dst(&mut self) {
        self.dst_dead = true;
        self.forward = false;
        self.inject = None;
        self.ping = None;
        self.out = None;
        self.out_sent = 0;
        self.end_stall();
    }

    pub fn dst_dead(&self) -> bool {
        self.dst_dead
    }

    /// True when the destination is between frames, so a frame of the proxy's own fits.
    pub fn at_boundary(&self) -> bool {
        !matches!(self.phase, Phase::Forward(_))
    }

    /// Nothing more will ever be written to the destination.
    pub fn dst_finished(&self) -> bool {
        self.dst_dead
            || self.dst_close_sent
            || (self.src_eof && !self.has_output() && self.inject.is_none())
    }

    fn has_output(&self) -> bool {
        self.out.is_some() || self.sent < self.pos
    }

    /// Drives the pump until it must wait for I/O (`Pending`, wakers registered) or has
    /// something to report.
    pub fn poll<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<Event>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut reads = 0;
        loop {
            if let Some(event) = self.parse_ahead() {
                return Poll::Ready(event);
            }
            if self.dst_dead {
                // Keep consuming the source so its close (or EOF) is seen.
                self.sent = self.pos;
            } else if self.out.is_some() {
                if let Err(e) = ready!(self.poll_write_out(cx, dst)) {
                    return Poll::Ready(Event::DstFailed(e));
                }
                continue;
            } else if self.sent < self.pos {
                if let Err(e) = ready!(self.poll_write_run(cx, dst)) {
                    return Poll::Ready(Event::DstFailed(e));
                }
                continue;
            } else if self.inject.is_some() && self.at_boundary() {
                self.ping = None;
                if let Some(frame) = self.inject.take().filter(|_| !self.dst_close_sent) {
                    self.start_out(frame, OutKind::Close);
                }
                continue;
            } else if self.ping.is_some() && self.at_boundary() {
                if let Some(frame) = self.ping.take().filter(|_| !self.dst_close_sent) {
                    self.start_out(frame, OutKind::OwnPing);
                }
                continue;
            }
            if self.needs_flush
                && !self.dst_dead
                && let Err(e) = ready!(self.poll_flush(cx, dst))
            {
                return Poll::Ready(Event::DstFailed(e));
            }
            if self.src_eof || self.throttled_until.is_some() {
                // Throttled: the session's timer lifts it; TCP backpressure slows the client.
                return Poll::Pending;
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            match ready!(self.poll_read(cx, src)) {
                Ok(0) => {
                    self.src_eof = true;
                    return Poll::Ready(Event::SrcEnded(None));
                }
                Ok(_) => {}
                Err(e) => {
                    self.src_eof = true;
                    return Poll::Ready(Event::SrcEnded(Some(e)));
                }
            }
        }
    }

    /// Reads and drops whatever the source still sends until EOF, so that closing the
    /// socket never discards unread data (which would turn the close into a reset).
    pub fn poll_drain<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
    ) -> Poll<()> {
        while !self.src_eof {
            self.sent = 0;
            self.pos = 0;
            self.end = 0;
            self.stash_len = 0;
            match ready!(self.poll_read(cx, src)) {
                Ok(0) | Err(_) => self.src_eof = true,
                Ok(_) => {}
            }
        }
        self.release();
        Poll::Ready(())
    }

    /// Returns the buffer to the pool; called when the session ends.
    pub fn release(&mut self) {
        self.early = None;
        if let Some(buf) = self.buf.take() {
            pool::give(buf);
        }
    }

    /// Walks `[pos, end)` as far as it can without writing. Stops at a partial header, at
    /// a frame that must not be forwarded while earlier bytes are unwritten, or at an event.
    fn parse_ahead(&mut self) -> Option<Event> {
        while self.pos < self.end {
            let Some(buf) = self.buf.as_deref() else {
                return Some(Event::Broken("bytes to parse but no buffer"));
            };
            let avail = &buf[self.pos..self.end];
            let step = match self.phase {
                Phase::Forward(rem) => {
                    let n = clamp(rem, avail.len());
                    if self.frame_inflate {
                        let fed = match self.inflate.as_deref_mut() {
                            Some(inflate) => inflate.feed(
                                &avail[..n],
                                self.frame_mask,
                                self.mask_at,
                                self.frame_is_text.then_some(&mut self.text),
                            ),
                            None => Err(Violation::Protocol("no inflater")),
                        };
                        match fed {
                            Ok(at) => self.mask_at = at,
                            Err(v) => {
                                // The rest of this frame must not reach the upstream
                                // (it would inflate the bomb itself): the frame is cut
                                // here, and no close frame can follow a cut frame.
                                self.in_deflate = false;
                                self.in_text = false;
                                self.frame_inflate = false;
                                self.text = Utf8Check::default();
                                self.cut_mid_frame = true;
                                self.abandon_dst();
                                return Some(Event::Violation(v));
                            }
                        }
                    } else if self.frame_is_text {
                        self.mask_at = feed_unmasked(
                            &mut self.text,
                            &avail[..n],
                            self.frame_mask,
                            self.mask_at,
                        );
                    }
                    self.pos += n;
                    self.stats.bytes += n as u64;
                    if rem == n as u64 {
                        self.phase = Phase::Header;
                        self.frame_done()
                    } else {
                        self.phase = Phase::Forward(rem - n as u64);
                        Step::Go
                    }
                }
                Phase::Discard(rem) => {
                    let n = clamp(rem, avail.len());
                    self.skip(n);
                    self.phase = if rem == n as u64 {
                        Phase::Header
                    } else {
                        Phase::Discard(rem - n as u64)
                    };
                    Step::Go
                }
                Phase::Control {
                    remaining,
                    header_len,
                    mask,
                    pong,
                } => {
                    let n = clamp(remaining, avail.len());
                    if let Some(ctl) = self.ctl.as_mut() {
                        ctl.extend(&avail[..n]);
                    }
                    self.skip(n);
                    if remaining == n as u64 {
                        self.phase = Phase::Header;
                        if pong {
                            self.pong_collected(usize::from(header_len), mask)
                        } else {
                            self.close_collected(usize::from(header_len), mask)
                        }
                    } else {
                        self.phase = Phase::Control {
                            remaining: remaining - n as u64,
                            header_len,
                            mask,
                            pong,
                        };
                        Step::Go
                    }
                }
                Phase::Header => match parse_raw(avail) {
                    None => Step::Stop,
                    Some(raw) => self.on_header(&raw),
                },
            };
            match step {
                Step::Go => {}
                Step::Stop => return None,
                Step::Report(event) => return Some(event),
            }
        }
        None
    }

    /// Handles one complete header at `pos`. Forwarded headers only advance `pos`; any
    /// other treatment needs everything before it written first (`sent == pos`).
    fn on_header(&mut self, raw: &RawHeader) -> Step {
        if !self.forward {
            return self.on_header_discarding(raw);
        }
        // The budget is asked before validation: a throttled header is parsed again later,
        // and validation advances the message state.
        if let Some(step) = self.gate_check(raw) {
            return step;
        }
        let step = self.on_admitted_header(raw);
        if let Some(gate) = self.gate.as_mut() {
            // Only a stop leaves this header to be parsed again, already charged.
            gate.mark = if matches!(step, Step::Stop) {
                GateMark::Passed
            } else {
                GateMark::Unasked
            };
        }
        step
    }

    /// A forwarded header the message budget let through.
    fn on_admitted_header(&mut self, raw: &RawHeader) -> Step {
        match self.validator.check(&self.rules, raw) {
            // Not consumed here: the next pass skips it as a discarded frame, once the bytes
            // before it are written.
            Err(v) => {
                self.forward = false;
                Step::Report(Event::Violation(v))
            }
            Ok(Kind::Close) if !self.ready_for_control() => Step::Stop,
            Ok(Kind::Close) => self.start_control(raw, false),
            Ok(Kind::Pong) if self.expect_pong.is_some() && raw.payload_len == PING_LEN as u64 => {
                if self.ready_for_control() {
                    self.start_control(raw, true)
                } else {
                    Step::Stop
                }
            }
            Ok(kind) => {
                self.pos += raw.len;
                self.stats.frames += 1;
                self.stats.bytes += raw.len as u64;
                if matches!(kind, Kind::Start | Kind::Continuation) {
                    self.saw_data = true;
                    if self.track_fragments {
                        self.note_fragment(kind, raw.fin);
                    }
                }
                if kind == Kind::Start {
                    self.stats.messages += 1;
                    self.in_text = self.check_text && raw.opcode == 0x1;
                    self.in_deflate = false;
                    if raw.rsv & 0x40 != 0
                        && let Some(inflate) = self.inflate.as_deref_mut()
                    {
                        inflate.start_message();
                        self.in_deflate = true;
                    }
                }
                // Control frames inside a text message are not part of its text.
                let data = matches!(kind, Kind::Start | Kind::Continuation);
                self.start_payload(raw, self.in_text && data, self.in_deflate && data)
            }
        }
    }

    /// Nothing is waiting to be written, so a control frame may be taken aside.
    fn ready_for_control(&self) -> bool {
        self.sent == self.pos && self.out.is_none()
    }

    /// Asks the source's message budget about this header; `None` lets it through.
    fn gate_check(&mut self, raw: &RawHeader) -> Option<Step> {
        let gate = self.gate.as_mut().filter(|g| g.mark != GateMark::Passed)?;
        let verdict = match raw.opcode {
            0x1 | 0x2 => gate.budget.message(),
            0x9 | 0xA => gate.budget.control(),
            _ => Verdict::Pass,
        };
        match verdict {
            Verdict::Pass => {
                self.throttled_until = None;
                None
            }
            Verdict::Close => {
                self.stats.rate_limited += 1;
                self.forward = false;
                Some(Step::Report(Event::RateLimited))
            }
            Verdict::WaitUntil(at) => {
                if gate.mark != GateMark::Refused {
                    self.stats.rate_limited += 1;
                    gate.mark = GateMark::Refused;
                }
                self.throttled_until = Some(at);
                Some(Step::Stop)
            }
        }
    }

    /// Tracks when an open fragmented message began.
    fn note_fragment(&mut self, kind: Kind, fin: bool) {
        match (kind, fin) {
            (Kind::Start, false) => self.fragment_since = Some(Instant::now()),
            (_, true) => self.fragment_since = None,
            _ => {}
        }
    }

    /// Starts forwarding a frame's payload; `text` frames are also UTF-8 checked, and
    /// `deflated` ones inflated (their text checked inflated).
    fn start_payload(&mut self, raw: &RawHeader, text: bool, deflated: bool) -> Step {
        self.frame_is_text = text;
        self.frame_inflate = deflated;
        if text || deflated {
            self.frame_mask = raw.mask;
            self.mask_at = 0;
            self.frame_fin = raw.fin;
        }
        if raw.payload_len > 0 {
            self.phase = Phase::Forward(raw.payload_len);
            return Step::Go;
        }
        if text || deflated {
            self.frame_done()
        } else {
            Step::Go
        }
    }

    /// End of a forwarded frame's payload: judge the text at frame granularity (as
    /// tungstenite does), so a bad sequence fails the connection when its frame ends.
    fn frame_done(&mut self) -> Step {
        if self.frame_inflate {
            return self.deflated_frame_done();
        }
        if !self.frame_is_text {
            return Step::Go;
        }
        self.frame_is_text = false;
        let ok = if self.frame_fin {
            self.in_text = false;
            self.text.finish()
        } else {
            !self.text.is_bad()
        };
        if ok {
            return Step::Go;
        }
        self.in_text = false;
        self.text = Utf8Check::default();
        self.forward = false;
        Step::Report(Event::Violation(Violation::InvalidUtf8))
    }

    /// End of a frame of a compressed message: report what inflating it broke, and at the
    /// message's end inflate the RFC 7692 tail and judge the whole text.
    fn deflated_frame_done(&mut self) -> Step {
        self.frame_inflate = false;
        let text = std::mem::take(&mut self.frame_is_text);
        let mut result = Ok(());
        if self.frame_fin {
            if result.is_ok() {
                result = match self.inflate.as_deref_mut() {
                    Some(inflate) => inflate.end_message(text.then_some(&mut self.text)),
                    None => Err(Violation::Protocol("no inflater")),
                };
            }
            self.in_deflate = false;
            self.in_text = false;
            self.text = Utf8Check::default();
        }
        match result {
            Ok(()) => Step::Go,
            Err(v) => {
                self.in_deflate = false;
                self.in_text = false;
                self.text = Utf8Check::default();
                self.forward = false;
                Step::Report(Event::Violation(v))
            }
        }
    }

    /// After a violation or a close, frames are only walked (to find the peer's close),
    /// never forwarded.
    fn on_header_discarding(&mut self, raw: &RawHeader) -> Step {
        if self.sent < self.pos && !self.dst_dead {
            return Step::Stop;
        }
        let is_close = raw.opcode == 0x8 && self.src_close.is_none();
        if is_close && raw.payload_len <= 125 {
            return self.start_control(raw, false);
        }
        self.skip(raw.len);
        if raw.payload_len > 0 {
            self.phase = Phase::Discard(raw.payload_len);
        }
        if is_close {
            // An oversized close is still the peer's close: it will send nothing more.
            self.src_close = Some(Box::new((code::NO_STATUS, String::new())));
            return Step::Report(Event::CloseReceived);
        }
        Step::Go
    }

    /// Starts collecting a close or pong frame (header now, payload as it arrives).
    fn start_control(&mut self, raw: &RawHeader, pong: bool) -> Step {
        let ctl = self.ctl.get_or_insert_with(Box::default);
        ctl.clear();
        if let Some(buf) = self.buf.as_deref() {
            ctl.extend(&buf[self.pos..self.pos + raw.len]);
        }
        self.skip(raw.len);
        if raw.payload_len == 0 && !pong {
            return self.close_collected(raw.len, raw.mask);
        }
        self.phase = Phase::Control {
            remaining: raw.payload_len,
            // A header is at most MAX_HEADER_LEN (14) bytes.
            header_len: raw.len as u8,
            mask: raw.mask,
            pong,
        };
        Step::Go
    }

    /// A whole pong is in `ctl`: consumed if it answers our ping, forwarded otherwise.
    fn pong_collected(&mut self, header_len: usize, mask: Option<[u8; 4]>) -> Step {
        let Some(ctl) = self.ctl.take() else {
            return Step::Report(Event::Broken("a pong collected without its frame"));
        };
        if self.expect_pong.is_some() && ctl.payload_unmasked(header_len, mask) == self.expect_pong
        {
            self.expect_pong = None;
            return Step::Report(Event::PongReceived);
        }
        // `forward` is off once a close to this destination is queued or relayed (or it is
        // gone), maybe while the pong was arriving: nothing may follow a close (SPEC §5).
        if self.forward {
            self.stats.frames += 1;
            self.stats.bytes += ctl.as_bytes().len() as u64;
            self.start_out(ctl, OutKind::Relayed);
        }
        Step::Go
    }

    fn start_out(&mut self, frame: Box<ControlFrame>, kind: OutKind) {
        self.out = Some(frame);
        self.out_kind = kind;
        self.out_sent = 0;
    }

    /// A whole close frame is in `ctl`: check it, then forward it unchanged.
    fn close_collected(&mut self, header_len: usize, mask: Option<[u8; 4]>) -> Step {
        let Some(ctl) = self.ctl.take() else {
            return Step::Report(Event::Broken("a close collected without its frame"));
        };
        let info = ctl.close_info(header_len, mask);
        let was_forwarding = self.forward;
        self.forward = false;
        match info {
            Ok(info) => {
                self.src_close = Some(Box::new(info));
                if was_forwarding && !self.dst_dead {
                    let out = self.close_reply.take().unwrap_or(ctl);
                    self.stats.frames += 1;
                    self.stats.bytes += out.as_bytes().len() as u64;
                    self.start_out(out, OutKind::Close);
                }
                Step::Report(Event::CloseReceived)
            }
            Err(v) if was_forwarding => {
                // Malformed, but still the peer's close: it will send nothing more.
                self.src_close = Some(Box::new((code::NO_STATUS, String::new())));
                Step::Report(Event::Violation(v))
            }
            Err(_) => {
                // A malformed close after we stopped forwarding still ends the peer's side
                // of the handshake.
                self.src_close = Some(Box::new((code::NO_STATUS, String::new())));
                Step::Report(Event::CloseReceived)
            }
        }
    }

    /// Consumes `n` bytes without forwarding them.
    fn skip(&mut self, n: usize) {
        self.pos += n;
        self.sent = self.pos;
    }

    fn poll_write_out<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<io::Result<()>> {
        while self
            .out
            .as_ref()
            .is_some_and(|o| self.out_sent < o.as_bytes().len())
        {
            let n = ready!(self.poll_write_some(cx, dst, WriteSrc::Out))?;
            self.out_sent += n;
        }
        self.out = None;
        self.out_sent = 0;
        match self.out_kind {
            OutKind::Close => self.dst_close_sent = true,
            OutKind::OwnPing => self.ping_sent_at = Some(Instant::now()),
            OutKind::Relayed => {}
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_run<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<io::Result<()>> {
        let n = ready!(self.poll_write_some(cx, dst, WriteSrc::Run))?;
        self.sent += n;
        Poll::Ready(Ok(()))
    }

    fn poll_write_some<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
        what: WriteSrc,
    ) -> Poll<io::Result<usize>> {
        let bytes = match what {
            WriteSrc::Out => match self.out.as_deref() {
                Some(out) => &out.as_bytes()[self.out_sent..],
                None => &[],
            },
            WriteSrc::Run => match self.buf.as_deref() {
                Some(buf) => &buf[self.sent..self.pos],
                None => &[],
            },
        };
        match Pin::new(dst).poll_write(cx, bytes) {
            Poll::Pending => {
                self.stall();
                Poll::Pending
            }
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.end_stall();
                self.needs_flush = true;
                if self.last_write.is_some() {
                    self.last_write = Some(Instant::now());
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// A flush can stall too (TLS takes writes into its own buffer, then waits for the
    /// peer in the flush), so it runs the `send_timeout` clock like a write.
    fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<io::Result<()>> {
        let Poll::Ready(done) = Pin::new(dst).poll_flush(cx) else {
            self.stall();
            return Poll::Pending;
        };
        self.end_stall();
        done?;
        self.needs_flush = false;
        Poll::Ready(Ok(()))
    }

    // === stalls (SPEC §6 `stalls`; the same clock runs `send_timeout`) ===

    /// The destination is full while bytes are due: a stall starts, unless one is open.
    /// The clock is read only here and in [`Pump::end_stall`]: a write that goes through
    /// costs one branch on `stalled_since`, nothing more.
    fn stall(&mut self) {
        if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
            self.stats.stalls.count += 1;
        }
    }

    /// Ends the open stall, if any, and counts its time: the destination took bytes again,
    /// was given up, or the connection is over.
    pub fn end_stall(&mut self) {
        if let Some(since) = self.stalled_since.take() {
            self.stats
                .stalls
                .add(Instant::now().saturating_duration_since(since));
        }
    }

    /// Reads into the buffer, borrowing one from the pool only for the read: if nothing
    /// arrives, the buffer goes back and any partial header waits in `stash`.
    fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
    ) -> Poll<io::Result<usize>> {
        self.compact();
        let buf = match self.buf.as_mut() {
            Some(buf) => buf,
            None => {
                let mut buf = pool::take(self.buf_size);
                let stashed = usize::from(self.stash_len);
                buf[..stashed].copy_from_slice(&self.stash[..stashed]);
                self.end = stashed;
                self.stash_len = 0;
                self.buf.insert(buf)
            }
        };
        if let Some(early) = self.early.as_mut() {
            let n = early.read_into(&mut buf[self.end..]);
            if early.at == early.bytes.len() {
                self.early = None;
            }
            self.end += n;
            return Poll::Ready(Ok(n));
        }
        let mut rb = ReadBuf::new(&mut buf[self.end..]);
        match Pin::new(src).poll_read(cx, &mut rb) {
            Poll::Pending => {
                self.park();
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// Moves the unparsed tail (a partial header) to the front once all before it is sent.
    fn compact(&mut self) {
        if self.sent != self.pos || self.pos == 0 {
            return;
        }
        if let Some(buf) = self.buf.as_mut() {
            buf.copy_within(self.pos..self.end, 0);
        }
        self.end -= self.pos;
        self.sent = 0;
        self.pos = 0;
    }

    /// Gives the buffer back while waiting for the source (SPEC §4: an idle connection
    /// holds no relay buffer).
    fn park(&mut self) {
        if self.sent != self.pos || self.end > MAX_HEADER_LEN {
            return;
        }
        if let Some(buf) = self.buf.take() {
            let tail = &buf[self.pos..self.end];
            self.stash[..tail.len()].copy_from_slice(tail);
            // At most a partial header (checked above), so it fits a byte.
            self.stash_len = tail.len() as u8;
            self.sent = 0;
            self.pos = 0;
            self.end = 0;
            pool::give(buf);
        }
    }
}

/// Handshake bytes beyond the first buffer, consumed from the front.
struct Early {
    bytes: Box<[u8]>,
    at: usize,
}

impl Early {
    /// Copies as much as fits into `out`; returns how much.
    fn read_into(&mut self, out: &mut [u8]) -> usize {
        let rest = &self.bytes[self.at..];
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        n
    }
}

/// What one parsing step asks of the pump loop.
enum Step {
    Go,
    /// Parsing must wait: for more bytes, or for `[sent, pos)` to be written.
    Stop,
    Report(Event),
}

#[derive(Clone, Copy)]
enum WriteSrc {
    Out,
    Run,
}

/// Feeds client bytes (masked on the wire) to the UTF-8 check, unmasking a copy in
/// stack-sized pieces; the forwarded bytes stay untouched. `at` is where `data` starts in
/// the mask; returns where the next bytes start.
fn feed_unmasked(check: &mut Utf8Check, data: &[u8], mask: Option<[u8; 4]>, at: u8) -> u8 {
    let Some(mask) = mask else {
        check.feed(data);
        return at;
    };
    let mut scratch = [0u8; 512];
    let mut at = usize::from(at & 3);
    for piece in data.chunks(scratch.len()) {
        let plain = &mut scratch[..piece.len()];
        plain.copy_from_slice(piece);
        apply_mask(plain, mask, at);
        at = (at + piece.len()) & 3;
        check.feed(plain);
    }
    // Below 4, so it fits.
    at as u8
}

/// `min(rem, avail)` as a usize.
fn clamp(rem: u64, avail: usize) -> usize {
    usize::try_from(rem).map_or(avail, |r| r.min(avail))
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
impl Pump {
    /// The state a panic between taking the buffer and resetting the offsets leaves: bytes
    /// said to be pending with no buffer to hold them.
    pub(super) fn lose_buffer_for_test(&mut self) {
        self.buf = None;
        self.pos = 0;
        self.end = 3;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::num::NonZeroU32;
    use std::task::Waker;
    use std::time::Duration;

    use super::*;
    use crate::config::{MessageRate, OnExceed};
    use crate::relay::tests::frame;

    /// Hands out queued chunks, then has nothing more for now (`Pending`).
    #[derive(Default)]
    struct Src(VecDeque<Vec<u8>>);

    impl AsyncRead for Src {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let Some(chunk) = self.0.front_mut() else {
                return Poll::Pending;
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.0.pop_front();
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Takes up to `room` bytes, then blocks; a flush blocks while `flush_stuck`.
    struct Dst {
        out: Vec<u8>,
        room: usize,
        flush_stuck: bool,
    }

    impl Dst {
        fn open() -> Dst {
            Dst {
                out: Vec::new(),
                room: usize::MAX,
                flush_stuck: false,
            }
        }
    }

    impl AsyncWrite for Dst {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.room);
            if n == 0 {
                return Poll::Pending;
            }
            self.room -= n;
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.flush_stuck {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    const KEY: Option<[u8; 4]> = Some([1, 2, 3, 4]);

    fn pump(dir: Dir) -> Pump {
        Pump::new(Rules::new(dir, 1 << 20, 1 << 20, ""), 1024)
    }

    fn src(chunks: &[&[u8]]) -> Src {
        Src(chunks.iter().map(|c| c.to_vec()).collect())
    }

    /// One poll; the waker is never used, the test drives every step.
    fn poll(p: &mut Pump, src: &mut Src, dst: &mut Dst) -> Poll<Event> {
        p.poll(&mut Context::from_waker(Waker::noop()), src, dst)
    }

    /// A budget of `burst` messages (and control frames) that refills once an hour.
    fn gate(burst: u32, on_exceed: OnExceed) -> MessageGate {
        MessageGate::new(&MessageRate {
            rate: NonZeroU32::MIN,
            per: Duration::from_secs(3600),
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            on_exceed,
        })
    }

    #[test]
    fn own_close_goes_out_after_a_part_written_ping() {
        let mut p = pump(Dir::UpstreamToClient);
        let (mut src, mut dst) = (
            Src::default(),
            Dst {
                room: 3,
                ..Dst::open()
            },
        );
        assert!(p.send_ping([7; PING_LEN], None));
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out.len(), 3, "the ping is part-written");
        // A drain (or idle, or expiry) close while the client reads slowly.
        let close = ControlFrame::close(1012, "service restart", None);
        p.send_close(close);
        dst.room = usize::MAX;
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        let ping = ControlFrame::ping(&[7; PING_LEN], None);
        assert_eq!(dst.out, [ping.as_bytes(), close.as_bytes()].concat());
        assert!(p.dst_close_sent);
    }

    #[test]
    fn own_close_goes_out_after_a_relayed_pong() {
        let mut p = pump(Dir::ClientToUpstream);
        p.expect_pong = Some([9; PING_LEN]);
        let pong = frame(0x8A, &[1; PING_LEN], KEY);
        let unmasked = frame(0x81, b"hi", None);
        let mut src = src(&[&[pong.as_slice(), &unmasked].concat()]);
        let mut dst = Dst::open();
        let event = poll(&mut p, &mut src, &mut dst);
        assert!(
            matches!(event, Poll::Ready(Event::Violation(_))),
            "{event:?}"
        );
        // The session's answer to a client violation: 1001 upstream.
        let close = ControlFrame::close(1001, "", Some([5, 6, 7, 8]));
        p.send_close(close);
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out, [pong.as_slice(), close.as_bytes()].concat());
        assert!(p.dst_close_sent);
    }

    #[test]
    fn a_pong_completed_after_our_close_is_not_forwarded() {
        let mut p = pump(Dir::ClientToUpstream);
        p.expect_pong = Some([9; PING_LEN]);
        let pong = frame(0x8A, &[1; PING_LEN], KEY);
        let (head, tail) = pong.split_at(8);
        let (mut src, mut dst) = (src(&[head]), Dst::open());
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        let close = ControlFrame::close(1000, "idle", Some([5, 6, 7, 8]));
        p.send_close(close);
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out, close.as_bytes());
        src.0.push_back(tail.to_vec());
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out, close.as_bytes(), "nothing after the close");
    }

    #[test]
    fn a_throttled_message_is_counted_once_however_often_the_pump_wakes() {
        let mut p = pump(Dir::ClientToUpstream);
        p.set_gate(gate(1, OnExceed::Throttle));
        let (one, two) = (frame(0x82, b"one", KEY), frame(0x82, b"two", KEY));
        let (mut src, mut dst) = (src(&[&[one.as_slice(), &two].concat()]), Dst::open());
        // Each poll stands for a wake-up, e.g. by upstream traffic.
        for _ in 0..50 {
            assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        }
        assert_eq!(dst.out, one);
        assert!(p.throttled_until.is_some());
        assert_eq!(p.stats.rate_limited, 1);
    }

    #[test]
    fn a_pong_waiting_for_earlier_bytes_is_charged_once() {
        let mut p = pump(Dir::ClientToUpstream);
        // Two control frames in the budget: charging the one pong thrice closes.
        p.set_gate(gate(2, OnExceed::Close));
        p.expect_pong = Some([9; PING_LEN]);
        let data = frame(0x82, &[0; 100], KEY);
        let pong = frame(0x8A, &[9; PING_LEN], KEY);
        let mut src = src(&[&[data.as_slice(), &pong].concat()]);
        let mut dst = Dst {
            room: 10,
            ..Dst::open()
        };
        for _ in 0..5 {
            let event = poll(&mut p, &mut src, &mut dst);
            assert!(event.is_pending(), "{event:?}");
        }
        dst.room = usize::MAX;
        let event = poll(&mut p, &mut src, &mut dst);
        assert!(
            matches!(event, Poll::Ready(Event::PongReceived)),
            "{event:?}"
        );
        assert_eq!(dst.out, data);
        assert_eq!(p.stats.rate_limited, 0);
    }

    #[test]
    fn a_flush_that_blocks_starts_the_stall_clock() {
        let mut p = pump(Dir::UpstreamToClient);
        let data = frame(0x82, b"hello", None);
        let (mut src, mut dst) = (src(&[&data]), Dst::open());
        dst.flush_stuck = true;
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out, data, "written, not flushed");
        assert!(p.stalled_since.is_some());
        dst.flush_stuck = false;
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert!(p.stalled_since.is_none());
        assert_eq!(p.stats.stalls.count, 1, "a stuck flush is a stall too");
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_is_one_stall_however_often_polled_and_ends_when_bytes_move() {
        let mut p = pump(Dir::UpstreamToClient);
        let data = frame(0x82, &[7; 100], None);
        let mut src = src(&[&data]);
        let mut dst = Dst {
            room: 10,
            ..Dst::open()
        };
        for _ in 0..5 {
            assert!(poll(&mut p, &mut src, &mut dst).is_pending());
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        assert_eq!(p.stats.stalls.count, 1);
        assert_eq!(
            p.stats.stalls.nanos, 0,
            "time is counted when the stall ends"
        );
        assert!(p.stalled_since.is_some());
        dst.room = usize::MAX;
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out, data);
        assert!(p.stalled_since.is_none());
        assert_eq!(p.stats.stalls.count, 1);
        assert_eq!(p.stats.stalls.time(), Duration::from_millis(250));

        // A second stall adds to both.
        src.0.push_back(data.clone());
        dst.room = 1;
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        tokio::time::advance(Duration::from_millis(40)).await;
        dst.room = usize::MAX;
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(p.stats.stalls.count, 2);
        assert_eq!(p.stats.stalls.time(), Duration::from_millis(290));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_never_block_record_no_stall() {
        let mut p = pump(Dir::UpstreamToClient);
        let (mut src, mut dst) = (Src::default(), Dst::open());
        for i in 0..100u8 {
            src.0.push_back(frame(0x82, &[i; 300], None));
            assert!(poll(&mut p, &mut src, &mut dst).is_pending());
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(p.stats.frames, 100);
        assert_eq!(p.stats.stalls, Default::default());
        assert!(p.stalled_since.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_given_up_while_stalled_ends_the_stall_with_its_time() {
        let mut p = pump(Dir::UpstreamToClient);
        let mut src = src(&[&frame(0x82, &[7; 100], None)]);
        let mut dst = Dst {
            room: 0,
            ..Dst::open()
        };
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        tokio::time::advance(Duration::from_millis(120)).await;
        // `send_timeout`, or the other side gone: the session cuts this destination off.
        p.abandon_dst();
        assert!(p.stalled_since.is_none());
        assert_eq!(p.stats.stalls.count, 1);
        assert_eq!(p.stats.stalls.time(), Duration::from_millis(120));
        p.end_stall();
        assert_eq!(
            p.stats.stalls.time(),
            Duration::from_millis(120),
            "ended once"
        );
    }

    #[test]
    fn early_bytes_beyond_one_buffer_are_relayed_in_order() {
        let mut p = pump(Dir::UpstreamToClient);
        let early: Vec<u8> = [
            frame(0x82, &[1; 3000], None),
            frame(0x81, b"welcome", None),
            frame(0x88, &1000u16.to_be_bytes(), None),
        ]
        .concat();
        p.seed(&early);
        let (mut src, mut dst) = (Src::default(), Dst::open());
        let mut closed = false;
        for _ in 0..10 {
            match poll(&mut p, &mut src, &mut dst) {
                Poll::Ready(Event::CloseReceived) => closed = true,
                Poll::Ready(event) => panic!("{event:?}"),
                Poll::Pending => break,
            }
        }
        assert!(closed, "the close in the early bytes was seen");
        assert!(poll(&mut p, &mut src, &mut dst).is_pending());
        assert_eq!(dst.out, early);
        assert!(p.buf.is_none(), "an idle pump holds no buffer");
    }
}
