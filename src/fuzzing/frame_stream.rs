//! The `frame_stream` target: the relay (SPEC §4/§5) over in-memory pipes, fed two wire
//! streams in a chunking the input chooses, with the oracles that it ends and relays
//! verbatim, adding at most one close frame of its own.

use std::future::{Future, poll_fn};
use std::num::NonZeroU32;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::RUNTIME;
use crate::config::{MessageRate, OnExceed};
use crate::relay::{Settings, relay};

/// Larger inputs are cut here: 64 KiB frame and message limits are exceeded well before.
pub const FRAME_STREAM_MAX_INPUT: usize = 128 * 1024;

/// Bytes before the two wire streams: flags, the client stream's length (u16 LE), the
/// chunk schedule and the options.
pub const FRAME_STREAM_HEADER: usize = 8;

/// From the moment the relay starts, it must be over within this, although it waits up to
/// 5 s for close handshakes: both test ends hang up (EOF) at once, which ends every wait.
const RELAY_DEADLINE: Duration = Duration::from_secs(2);

/// `Sec-WebSocket-Extensions` values the upstream may have accepted (flags bits 0–1).
const EXTENSIONS: [&str; 4] = [
    "",
    "permessage-deflate",
    "x-opaque-extension",
    "permessage-deflate; client_max_window_bits=10, x-opaque-extension",
];

/// Chunks per input before the rest of each stream goes in one write: one relay pass per
/// chunk costs ~15 µs under the sanitizers, so this caps an input at a few ms.
pub const MAX_CHUNKS: usize = 256;

/// Capacity of each in-memory pipe (flags bits 2–3): small ones force partial writes.
const PIPE_CAPACITY: [usize; 4] = [64_000, 4096, 700, 61];

/// (max_frame_size, max_message_size) choices (options bits 2–3). A frame over the limit is
/// caught from its header alone, but a message over it only after its earlier frames'
/// payloads, so small limits let small inputs reach the message check. 125 is the
/// smallest `max_frame_size` the config accepts.
const SIZE_LIMITS: [(u64, u64); 4] = [
    (64 * 1024, 64 * 1024),
    (125, 125),
    (1024, 4096),
    (200, 64 * 1024),
];

/// Largest close frame the proxy may write itself: header (2 + 4 mask bytes) + 125.
const MAX_CLOSE_FRAME: usize = 2 + 4 + 125;

/// Runs the relay over in-memory pipes with two wire streams taken from `data`.
///
/// Layout of `data` (missing header bytes read as 0):
/// - byte 0, flags: bits 0–1 pick the negotiated extensions, bits 2–3 the pipe capacity;
///   bit 4 (bit 5) hands the first `schedule[0] * 9` (`schedule[1] * 9`) bytes of the
///   client (upstream) stream to the relay as early bytes, as if read with the handshake;
///   bit 6 (bit 7) makes the client (upstream) hang up abruptly at its end of stream
///   instead of half-closing and reading until the relay closes.
/// - bytes 1–2: length of the client → upstream stream (u16 LE, clamped); the rest of the
///   data after the header is the upstream → client stream.
/// - bytes 3–6: the schedule, used cyclically: bit 7 picks the direction of the next chunk
///   (0 client, 1 upstream; the other one once a stream is used up), bits 0–6 its size,
///   0 meaning "the rest of that stream" (so an all-zero header writes each stream at
///   once). After [`MAX_CHUNKS`] chunks, each stream's rest goes in one write. The relay
///   runs between chunks.
/// - byte 7, options: bits 0–1 set the client's message budget (`limits.messages`): 1 is
///   `on_exceed: close` with no refill and a burst of 1 + bits 4–7, 2 is `on_exceed:
///   throttle` at 64 000/s with a burst of 16 × (1 + bits 4–7), 0 and 3 unlimited;
///   bits 2–3 pick the frame and message size limits from [`SIZE_LIMITS`].
///
/// Oracles: the relay ends within [`RELAY_DEADLINE`], and what reaches each peer is a
/// prefix of what the other sent, then, at a frame boundary, at most one close frame of
/// the proxy's own (possibly cut short when that peer is given up on).
pub fn frame_stream(data: &[u8]) {
    let data = data.get(..FRAME_STREAM_MAX_INPUT).unwrap_or(data);
    let plan = Plan::new(data);
    RUNTIME.with(|runtime| {
        // Without a runtime (out of file descriptors or similar) there is nothing to test.
        if let Some(runtime) = runtime {
            runtime.block_on(run_relay(&plan));
        }
    });
}

/// The client's message budget chosen by the options byte of [`frame_stream`].
fn message_budget(options: u8) -> Option<MessageRate> {
    let n = u32::from(options >> 4) + 1;
    let (rate, per, burst, on_exceed) = match options & 0b11 {
        // Once the burst (1..=16) is spent, the next message closes the connection.
        1 => (1, Duration::from_secs(3600), n, OnExceed::Close),
        // Throttled waits last ≥ 1 ms (tokio's timer tick) and refill at most a burst, so
        // bursts of 16..=256 keep even 700 tiny frames far below the deadline.
        2 => (64_000, Duration::from_secs(1), 16 * n, OnExceed::Throttle),
        _ => return None,
    };
    Some(MessageRate {
        rate: NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
        per,
        burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        on_exceed,
    })
}

/// Which side of the relay a chunk is written by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// The decoded input of [`frame_stream`].
struct Plan<'a> {
    settings: Settings,
    capacity: usize,
    /// Client → upstream wire bytes (early bytes included, at the start).
    client: &'a [u8],
    /// Upstream → client wire bytes (early bytes included, at the start).
    upstream: &'a [u8],
    client_early: usize,
    upstream_early: usize,
    client_hangs_up: bool,
    upstream_hangs_up: bool,
    /// (side, start, end) ranges of that side's stream, in the order they are written.
    chunks: Vec<(Side, usize, usize)>,
}

impl<'a> Plan<'a> {
    fn new(data: &'a [u8]) -> Plan<'a> {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let flags = byte(0);
        let split = usize::from(u16::from_le_bytes([byte(1), byte(2)]));
        let schedule = [byte(3), byte(4), byte(5), byte(6)];
        let options = byte(7);
        let streams = data.get(FRAME_STREAM_HEADER..).unwrap_or(&[]);
        let (client, upstream) = streams.split_at(split.min(streams.len()));
        let early = |bit: u8, size: u8, stream: &[u8]| {
            if flags & bit != 0 {
                (usize::from(size) * 9).min(stream.len())
            } else {
                0
            }
        };
        let client_early = early(0x10, schedule[0], client);
        let upstream_early = early(0x20, schedule[1], upstream);

        let mut chunks = Vec::new();
        let (mut c, mut u) = (client_early, upstream_early);
        let mut turn = 0usize;
        // Every chunk is at least one byte, so this ends after at most `streams.len()` turns.
        while c < client.len() || u < upstream.len() {
            let s = schedule[turn % schedule.len()];
            turn += 1;
            let wants_upstream = s & 0x80 != 0;
            let side = match (wants_upstream, c < client.len(), u < upstream.len()) {
                (false, true, _) | (true, true, false) => Side::Client,
                _ => Side::Upstream,
            };
            let (pos, len) = match side {
                Side::Client => (&mut c, client.len()),
                Side::Upstream => (&mut u, upstream.len()),
            };
            let size = match s & 0x7f {
                _ if chunks.len() >= MAX_CHUNKS => len - *pos,
                0 => len - *pos,
                n => usize::from(n),
            };
            let end = (*pos + size).min(len);
            chunks.push((side, *pos, end));
            *pos = end;
        }

        let sizes = usize::from((options >> 2) & 0b11);
        Plan {
            settings: Settings {
                extensions: EXTENSIONS[usize::from(flags & 0b11)].to_owned(),
                messages: message_budget(options),
                // With the smallest size limits, a small fragment bound too, so that short
                // inputs reach it.
                max_fragments: if sizes == 1 { 4 } else { u32::MAX },
                // Far beyond the deadline: the test ends always read, so nothing may stall.
                ..Settings::without_timers(
                    1024,
                    Duration::from_secs(30),
                    SIZE_LIMITS[sizes].0,
                    SIZE_LIMITS[sizes].1,
                )
            },
            capacity: PIPE_CAPACITY[usize::from((flags >> 2) & 0b11)],
            client,
            upstream,
            client_early,
            upstream_early,
            client_hangs_up: flags & 0x40 != 0,
            upstream_hangs_up: flags & 0x80 != 0,
            chunks,
        }
    }

    fn stream(&self, side: Side) -> &'a [u8] {
        match side {
            Side::Client => self.client,
            Side::Upstream => self.upstream,
        }
    }
}

async fn run_relay(plan: &Plan<'_>) {
    let (client_end, client_relay) = tokio::io::duplex(plan.capacity);
    let (upstream_relay, upstream_end) = tokio::io::duplex(plan.capacity);
    let client_early = Bytes::copy_from_slice(plan.client.get(..plan.client_early).unwrap_or(&[]));
    let upstream_early =
        Bytes::copy_from_slice(plan.upstream.get(..plan.upstream_early).unwrap_or(&[]));
    let mut relay = pin!(relay(
        client_relay,
        client_early,
        upstream_relay,
        upstream_early,
        &plan.settings,
    ));
    let mut driver = Driver {
        plan,
        client: TestEnd::new(client_end, plan.client_hangs_up),
        upstream: TestEnd::new(upstream_end, plan.upstream_hangs_up),
        next: 0,
        offset: 0,
    };
    let mut report = None;
    let mut driven = false;
    let both = poll_fn(|cx| {
        loop {
            if report.is_none()
                && let Poll::Ready(r) = relay.as_mut().poll(cx)
            {
                report = Some(r);
            }
            if !driven {
                match driver.poll(cx) {
                    // Straight back to the relay, so the chunk is read on its own.
                    Step::Wrote => continue,
                    Step::Done => driven = true,
                    Step::Pending => {}
                }
            }
            return if report.is_some() && driven {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
    });
    if tokio::time::timeout(RELAY_DEADLINE, both).await.is_err() {
        panic!(
            "relay still running {RELAY_DEADLINE:?} after start (relay finished: {}, \
             chunks written: {}/{}, client end: {}, upstream end: {}; settings: {:?})",
            report.is_some(),
            driver.next,
            plan.chunks.len(),
            driver.client.state(),
            driver.upstream.state(),
            plan.settings,
        );
    }
    check_verbatim(
        "client → upstream",
        plan.client,
        &driver.upstream.received,
        true,
    );
    check_verbatim(
        "upstream → client",
        plan.upstream,
        &driver.client.received,
        false,
    );
}

/// Writes the planned chunks and reads everything the relay writes, on both test ends.
struct Driver<'p, 'a> {
    plan: &'p Plan<'a>,
    client: TestEnd,
    upstream: TestEnd,
    /// Index of the chunk being written, and how much of it is out.
    next: usize,
    offset: usize,
}

impl Driver<'_, '_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Step {
        loop {
            self.client.poll_read_all(cx);
            self.upstream.poll_read_all(cx);
            let Some(&(side, start, end)) = self.plan.chunks.get(self.next) else {
                break;
            };
            let bytes = self
                .plan
                .stream(side)
                .get(start + self.offset..end)
                .unwrap_or(&[]);
            let te = match side {
                Side::Client => &mut self.client,
                Side::Upstream => &mut self.upstream,
            };
            let done = match te.stream.as_mut() {
                Some(s) if !te.write_failed && !bytes.is_empty() => {
                    match Pin::new(s).poll_write(cx, bytes) {
                        Poll::Pending => return Step::Pending,
                        Poll::Ready(Ok(n)) if n > 0 => {
                            self.offset += n;
                            start + self.offset >= end
                        }
                        // The relay hung up: the rest of this side's chunks are skipped.
                        Poll::Ready(_) => {
                            te.write_failed = true;
                            true
                        }
                    }
                }
                _ => true,
            };
            if done {
                self.next += 1;
                self.offset = 0;
                return Step::Wrote;
            }
        }
        // Everything written: hang up both ends.
        let client = self.client.poll_finish(cx);
        let upstream = self.upstream.poll_finish(cx);
        if client.is_ready() && upstream.is_ready() {
            Step::Done
        } else {
            Step::Pending
        }
    }
}

/// What one poll of the [`Driver`] achieved.
enum Step {
    /// A chunk is written (or skipped): the relay should run before the next one.
    Wrote,
    /// Everything is written, and both test ends have hung up.
    Done,
    /// Waiting for the relay (wakers registered).
    Pending,
}

/// The far end of one of the relay's sockets, as the peer (client or upstream) holds it.
struct TestEnd {
    stream: Option<DuplexStream>,
    hangs_up: bool,
    write_failed: bool,
    shut: bool,
    read_eof: bool,
    /// What the relay wrote to this peer (bounded by `MAX_RECEIVED`).
    received: Vec<u8>,
    scratch: Box<[u8]>,
}

/// More than the relay could legitimately write from a bounded input: stop keeping it.
const MAX_RECEIVED: usize = FRAME_STREAM_MAX_INPUT + 4 * MAX_CLOSE_FRAME;

impl TestEnd {
    fn new(stream: DuplexStream, hangs_up: bool) -> TestEnd {
        TestEnd {
            stream: Some(stream),
            hangs_up,
            write_failed: false,
            shut: false,
            read_eof: false,
            received: Vec::new(),
            scratch: vec![0; 4096].into_boxed_slice(),
        }
    }

    /// Reads whatever is available, so the relay's writes never wait on us.
    fn poll_read_all(&mut self, cx: &mut Context<'_>) {
        while !self.read_eof {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            let mut buf = ReadBuf::new(&mut self.scratch);
            match Pin::new(s).poll_read(cx, &mut buf) {
                Poll::Pending => return,
                Poll::Ready(Ok(())) if buf.filled().is_empty() => self.read_eof = true,
                Poll::Ready(Ok(())) => {
                    let room = MAX_RECEIVED.saturating_sub(self.received.len());
                    let filled = buf.filled();
                    self.received
                        .extend_from_slice(filled.get(..room).unwrap_or(filled));
                }
                Poll::Ready(Err(_)) => self.read_eof = true,
            }
        }
    }

    /// Hangs up: abruptly (dropping the socket), or by half-closing and reading until the
    /// relay closes its side.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(s) = self.stream.as_mut() else {
            return Poll::Ready(());
        };
        if self.hangs_up {
            self.stream = None;
            return Poll::Ready(());
        }
        if !self.shut {
            if Pin::new(s).poll_shutdown(cx).is_pending() {
                return Poll::Pending;
            }
            self.shut = true;
            self.poll_read_all(cx);
        }
        if self.read_eof {
            self.stream = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn state(&self) -> String {
        format!(
            "{{open: {}, shut: {}, write_failed: {}, read_eof: {}, received: {} B}}",
            self.stream.is_some(),
            self.shut,
            self.write_failed,
            self.read_eof,
            self.received.len()
        )
    }
}

/// The relay's contract (README "The relay"): bytes go on verbatim, and the proxy's own
/// close frame (or the reply it holds for a peer) goes in only at a frame boundary, after
/// which nothing more is forwarded. So `received` must be a prefix of `sent`, then, at a
/// frame boundary of `sent`, at most one close frame (masked toward the upstream). That
/// frame may be cut short: a destination the relay gives up on (the peer hung up, or
/// reached EOF without a close) is dropped even mid-write.
fn check_verbatim(direction: &str, sent: &[u8], received: &[u8], masked: bool) {
    let common = sent
        .iter()
        .zip(received)
        .take_while(|(a, b)| a == b)
        .count();
    if common == received.len() {
        return;
    }
    // The close frame may start with bytes that happen to equal the next ones sent, so
    // every boundary up to `common` is a candidate.
    let ok = frame_boundaries(sent, common)
        .into_iter()
        .rev()
        .take_while(|&b| b + MAX_CLOSE_FRAME >= common)
        .any(|split| is_close_frame_prefix(received.get(split..).unwrap_or(&[]), masked));
    if !ok {
        let tail = received.get(common..).unwrap_or(&[]);
        panic!(
            "{direction}: the relay wrote bytes that are neither relayed verbatim nor one \
             close frame of its own at a frame boundary: {} bytes match what was sent, then \
             {:02x?}",
            common,
            tail.get(..64).unwrap_or(tail),
        );
    }
}

/// Offsets in `wire` where frames start (0 included), up to `limit`, by walking the
/// headers' lengths as the relay does.
fn frame_boundaries(wire: &[u8], limit: usize) -> Vec<usize> {
    let mut out = vec![0];
    let mut pos = 0usize;
    loop {
        let Some(&[_, b1]) = wire.get(pos..pos + 2) else {
            return out;
        };
        let (ext, short) = match b1 & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let Some(len_bytes) = wire.get(pos + 2..pos + 2 + ext) else {
            return out;
        };
        let payload = short.unwrap_or_else(|| {
            len_bytes
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        });
        let header = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
        let next = usize::try_from(payload)
            .ok()
            .and_then(|p| (pos + header).checked_add(p));
        match next {
            Some(next) if next <= limit => {
                out.push(next);
                pos = next;
            }
            _ => return out,
        }
    }
}

/// A close frame, or the start of one (FIN, opcode 8, payload ≤ 125 bytes and not 1,
/// mask bit as given), and nothing after it.
fn is_close_frame_prefix(bytes: &[u8], masked: bool) -> bool {
    match bytes {
        [] => true,
        [b0] => *b0 == 0x88,
        [b0, b1, rest @ ..] => {
            let len = usize::from(b1 & 0x7f);
            let has_mask = b1 & 0x80 != 0;
            *b0 == 0x88
                && has_mask == masked
                && len <= 125
                && len != 1
                && rest.len() <= len + 4 * usize::from(masked)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_writes_each_stream_once_in_order_after_its_early_bytes() {
        let mut data = vec![0x10, 3, 0, 1, 0x82, 0x00, 0x01, 0x00];
        data.extend_from_slice(b"abcdefgh");
        let plan = Plan::new(&data);
        assert_eq!(plan.client, b"abc");
        assert_eq!(plan.upstream, b"defgh");
        assert_eq!(plan.client_early, 3);
        let written = |side| {
            let mut out = Vec::new();
            for &(s, start, end) in &plan.chunks {
                if s == side {
                    out.extend_from_slice(&plan.stream(s)[start..end]);
                }
            }
            out
        };
        assert_eq!(written(Side::Client), b"");
        assert_eq!(written(Side::Upstream), b"defgh");
        // The client's stream is all early bytes, so every chunk goes upstream: 0x01 one
        // byte, 0x82 two, 0x00 the rest.
        assert_eq!(
            plan.chunks,
            [
                (Side::Upstream, 0, 1),
                (Side::Upstream, 1, 3),
                (Side::Upstream, 3, 5)
            ]
        );
    }

    #[test]
    fn one_byte_chunks_stop_at_max_chunks_and_the_rest_goes_at_once() {
        let mut data = vec![0, 0xff, 0xff, 1, 1, 1, 1, 0];
        data.extend(std::iter::repeat_n(b'x', 1000));
        let plan = Plan::new(&data);
        assert_eq!(plan.chunks.len(), MAX_CHUNKS + 1);
        assert_eq!(plan.chunks.last(), Some(&(Side::Client, MAX_CHUNKS, 1000)));
    }

    #[test]
    fn close_frames_and_their_starts_are_recognised_with_their_masking() {
        assert!(is_close_frame_prefix(&[0x88, 0x02, 0x03, 0xe8], false));
        assert!(is_close_frame_prefix(&[0x88, 0x80, 1, 2, 3, 4], true));
        assert!(is_close_frame_prefix(&[0x88, 0x82, 1, 2], true));
        assert!(!is_close_frame_prefix(&[0x88, 0x82, 1, 2], false));
        assert!(!is_close_frame_prefix(&[0x88, 0x02, 0x03, 0xe8, 0], false));
        assert!(!is_close_frame_prefix(&[0x88, 0x01, 0x03], false));
        assert!(!is_close_frame_prefix(&[0x81, 0x00], false));
    }

    #[test]
    fn frame_boundaries_follow_every_length_form() {
        let mut wire = vec![0x81, 0x02, b'h', b'i'];
        wire.extend([0x82, 0x80 | 126, 0, 3, 1, 2, 3, 4, 9, 9, 9]);
        wire.extend([0x82, 127, 0, 0, 0, 0, 0, 0, 0, 1, 7]);
        wire.extend([0x88, 0x02]);
        assert_eq!(frame_boundaries(&wire, wire.len()), [0, 4, 15, 26]);
        assert_eq!(frame_boundaries(&wire, 14), [0, 4]);
        // A length beyond any input ends the walk.
        assert_eq!(
            frame_boundaries(&[0x82, 127, 0xff, 0, 0, 0, 0, 0, 0, 0], 99),
            [0]
        );
    }
}
