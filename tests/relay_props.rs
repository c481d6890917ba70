//! Property tests of the relay over in-memory streams: any sequence of valid frames, cut
//! into any chunks, comes out byte-identical on the other side; and a sequence ending in
//! an invalid frame is relayed up to that frame, then closed with the SPEC §5 codes.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::{client_frame, close_payload, frame, read_close_code, server_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use wsgate::relay::{Settings, relay};

fn settings() -> Settings {
    Settings::without_timers(1024, Duration::from_secs(5), 1 << 20, 1 << 20)
}

/// One message: its fragments (payloads) and control frames to slip between them.
#[derive(Clone, Debug)]
struct Msg {
    text: bool,
    fragments: Vec<Vec<u8>>,
    pings: Vec<Vec<u8>>,
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..130),
        1 => proptest::collection::vec(any::<u8>(), 60_000..70_000),
    ]
}

fn text_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-zé€😀 ]{0,60}".prop_map(String::into_bytes),
        1 => "[a-z]{3000,3100}".prop_map(String::into_bytes),
    ]
}

fn message() -> impl Strategy<Value = Msg> {
    (
        any::<bool>(),
        1usize..4,
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..125), 0..3),
    )
        .prop_flat_map(|(text, n, pings)| {
            let frag = if text {
                text_payload().boxed()
            } else {
                payload().boxed()
            };
            (Just(text), proptest::collection::vec(frag, n), Just(pings))
        })
        .prop_map(|(text, fragments, pings)| Msg {
            text,
            fragments,
            pings,
        })
}

/// Wire bytes of messages; `to_upstream` picks client framing (masked) or server framing.
fn encode(msgs: &[Msg], masked: bool) -> Vec<u8> {
    let f = |b0: u8, p: &[u8]| {
        if masked {
            client_frame(b0, p)
        } else {
            server_frame(b0, p)
        }
    };
    let mut out = Vec::new();
    for m in msgs {
        let last = m.fragments.len() - 1;
        for (i, frag) in m.fragments.iter().enumerate() {
            let opcode = if i == 0 {
                if m.text { 1 } else { 2 }
            } else {
                0
            };
            let fin = if i == last { 0x80 } else { 0 };
            out.extend(f(fin | opcode, frag));
            if let Some(p) = m.pings.get(i) {
                out.extend(f(0x89, p));
            }
        }
    }
    out
}

/// A relay between two in-memory pipes: (client end, upstream end, the relay's task).
fn spawn_relay() -> (
    DuplexStream,
    DuplexStream,
    tokio::task::JoinHandle<wsgate::relay::Report>,
) {
    let (client, client_relay) = tokio::io::duplex(8192);
    let (upstream_relay, upstream) = tokio::io::duplex(8192);
    let s = settings();
    let task = tokio::spawn(async move {
        relay(
            client_relay,
            bytes::Bytes::new(),
            upstream_relay,
            bytes::Bytes::new(),
            &s,
        )
        .await
    });
    (client, upstream, task)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn valid_frames_in_any_chunking_arrive_byte_identical(
        c2u in proptest::collection::vec(message(), 1..5),
        u2c in proptest::collection::vec(message(), 1..5),
        chunks in proptest::collection::vec(1usize..3000, 1..8),
    ) {
        runtime().block_on(async {
            let (client, upstream, relay_task) = spawn_relay();
            let up_bytes = encode(&c2u, true);
            let down_bytes = encode(&u2c, false);
            let (up_len, down_len) = (up_bytes.len(), down_bytes.len());
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut ur, mut uw) = tokio::io::split(upstream);
            let chunks2 = chunks.clone();
            let w1 = tokio::spawn(async move {
                write_chunked(&mut cw, &up_bytes, &chunks2).await;
                cw
            });
            let w2 = tokio::spawn(async move {
                write_chunked(&mut uw, &down_bytes, &chunks).await;
                uw
            });
            let got_up = read_split_exactly(&mut ur, up_len).await;
            let got_down = read_split_exactly(&mut cr, down_len).await;
            prop_assert_eq!(got_up, encode(&c2u, true));
            prop_assert_eq!(got_down, encode(&u2c, false));
            let mut cw = w1.await.unwrap_or_else(|e| panic!("{e}"));
            let mut uw = w2.await.unwrap_or_else(|e| panic!("{e}"));
            // A clean close handshake, client first.
            cw.write_all(&client_frame(0x88, &close_payload(1000, "done"))).await.unwrap_or_else(|e| panic!("{e}"));
            uw.write_all(&server_frame(0x88, &close_payload(1000, "done"))).await.unwrap_or_else(|e| panic!("{e}"));
            drop((cw, uw, cr, ur));
            let report = tokio::time::timeout(Duration::from_secs(10), relay_task).await;
            let report = report.unwrap_or_else(|_| panic!("relay did not finish")).unwrap_or_else(|e| panic!("{e}"));
            let close = report.close.unwrap_or_else(|| panic!("no close recorded"));
            prop_assert_eq!(close.code, 1000);
            let frames: usize = c2u.iter().map(|m| m.fragments.len() + m.pings.len().min(m.fragments.len())).sum();
            prop_assert_eq!(report.c2u.frames as usize, frames + 1);
            prop_assert_eq!(report.c2u.messages as usize, c2u.len());
            Ok(())
        })?;
    }

    #[test]
    fn an_invalid_frame_after_valid_ones_gets_the_section5_codes(
        prefix in proptest::collection::vec(message(), 0..3),
        bad in prop_oneof![
            Just((frame(0x81, b"unmasked", None), 1002u16)),
            Just((client_frame(0x83, b"reserved"), 1002)),
            Just((client_frame(0xC2, b"rsv"), 1002)),
            Just((client_frame(0x89, &[0u8; 126]), 1002)),
            Just((client_frame(0x0A, b"frag pong"), 1002)),
            Just((client_frame(0x80, b"orphan"), 1002)),
            Just((client_frame(0x88, &[0x03, 0xE8, 0xC3, 0x28]), 1007)),
            Just((client_frame(0x81, &[0xC3, 0x28]), 1007)),
            // Judged from the header alone: the payload never needs to arrive.
            Just((vec![0x82, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 1, 9, 9, 9, 9], 1009)),
        ],
        chunks in proptest::collection::vec(1usize..3000, 1..8),
    ) {
        runtime().block_on(async {
            let (client, upstream, relay_task) = spawn_relay();
            let good = encode(&prefix, true);
            let mut wire = good.clone();
            wire.extend_from_slice(&bad.0);
            let (mut cr, mut cw) = tokio::io::split(client);
            let (mut ur, mut uw) = tokio::io::split(upstream);
            let writer = tokio::spawn(async move {
                write_chunked(&mut cw, &wire, &chunks).await;
                cw
            });
            // The valid prefix arrives intact (plus, for an invalid text frame, the frame
            // itself: text is judged when its frame ends), then the proxy's 1001.
            let got = read_split_exactly(&mut ur, good.len()).await;
            prop_assert_eq!(&got, &good);
            let code = read_close_code(&mut ur).await;
            prop_assert_eq!(code, Some(1001));
            uw.write_all(&server_frame(0x88, &close_payload(1001, ""))).await.unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(read_close_code(&mut cr).await, Some(bad.1));
            let mut cw = writer.await.unwrap_or_else(|e| panic!("{e}"));
            cw.write_all(&client_frame(0x88, &close_payload(bad.1, ""))).await.unwrap_or_else(|e| panic!("{e}"));
            drop((cw, uw, cr, ur));
            let report = tokio::time::timeout(Duration::from_secs(10), relay_task).await;
            let report = report.unwrap_or_else(|_| panic!("relay did not finish")).unwrap_or_else(|e| panic!("{e}"));
            let close = report.close.unwrap_or_else(|| panic!("no close recorded"));
            prop_assert_eq!(close.code, bad.1);
            Ok(())
        })?;
    }
}

/// Writes `bytes` in the given chunk sizes (cycled), yielding between chunks; stops
/// quietly if the relay closed its side.
async fn write_chunked<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8], chunks: &[usize]) {
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = chunks[i % chunks.len()].min(bytes.len() - at);
        if w.write_all(&bytes[at..at + n]).await.is_err() {
            break;
        }
        at += n;
        i += 1;
        tokio::task::yield_now().await;
    }
}

async fn read_split_exactly<R: AsyncReadExt + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let read = tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(_))), "wanted {n} bytes: {read:?}");
    buf
}
