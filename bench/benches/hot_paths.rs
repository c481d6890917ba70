//! Criterion micro-benchmarks of wsgate's hot paths:
//! - `frame_header`: parse and validate one client frame header (`relay::frame`), for a
//!   64 B frame (7-bit length) and a 16 KiB frame (16-bit extended length);
//! - `relay`: client→upstream frames of 64 B and 16 KiB through `relay::relay` over
//!   in-memory duplex pipes on a current-thread runtime (no timers, no message budget),
//!   64 frames per iteration, measured from the first write to the last byte read at the
//!   upstream end.
//!
//! - `rendezvous`: ranking 100 weighted backends for one sticky key
//!   (`upstream::hash::rank`, what each handshake does before it connects).

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use wsgate::relay::frame::{Dir, Parse, Rules, Validator};
use wsgate::relay::{Settings, relay};

/// A masked binary client frame with `n` payload bytes.
fn client_frame(n: usize) -> Vec<u8> {
    let mut out = vec![0x82];
    if n < 126 {
        out.push(0x80 | n as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    let mask = [0x11, 0x22, 0x33, 0x44];
    out.extend_from_slice(&mask);
    out.extend((0..n).map(|i| (i as u8) ^ mask[i % 4]));
    out
}

fn frame_header(c: &mut Criterion) {
    let rules = Rules::new(Dir::ClientToUpstream, 1 << 20, 4 << 20, "");
    let mut g = c.benchmark_group("frame_header");
    g.throughput(Throughput::Elements(1));
    for (name, n) in [("64B", 64usize), ("16KiB", 16 * 1024)] {
        let frame = client_frame(n);
        g.bench_function(name, |b| {
            let mut v = Validator::default();
            b.iter(|| match v.parse_header(&rules, black_box(&frame)) {
                Parse::Header(h) => black_box(h.payload_len),
                other => panic!("benchmark frame rejected: {other:?}"),
            });
        });
    }
    g.finish();
}

/// The relay between two in-memory pipes; returns the client's and the upstream's ends.
fn spawn_relay(rt: &tokio::runtime::Runtime) -> (DuplexStream, DuplexStream) {
    let (client, client_relay) = tokio::io::duplex(256 * 1024);
    let (upstream_relay, upstream) = tokio::io::duplex(256 * 1024);
    let settings = Settings::without_timers(16 * 1024, Duration::from_secs(30), 1 << 20, 4 << 20);
    rt.spawn(async move {
        relay(
            client_relay,
            Bytes::new(),
            upstream_relay,
            Bytes::new(),
            &settings,
        )
        .await
    });
    (client, upstream)
}

fn relay_frames(c: &mut Criterion) {
    const FRAMES: usize = 64;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let mut g = c.benchmark_group("relay");
    for (name, n) in [("64B", 64usize), ("16KiB", 16 * 1024)] {
        let batch: Vec<u8> = (0..FRAMES).flat_map(|_| client_frame(n)).collect();
        let (mut client, mut upstream) = spawn_relay(&rt);
        let mut sink = vec![0u8; batch.len()];
        g.throughput(Throughput::Bytes(batch.len() as u64));
        g.bench_function(format!("{name}_x{FRAMES}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let (w, r) =
                            tokio::join!(client.write_all(&batch), upstream.read_exact(&mut sink));
                        if let Err(e) = w.and(r.map(|_| ())) {
                            panic!("relay pipe: {e}");
                        }
                    }
                    start.elapsed()
                })
            });
        });
    }
    g.finish();
}

/// Ranks 100 backends of mixed weights for a different key each iteration.
fn rendezvous(c: &mut Criterion) {
    use wsgate::upstream::hash::{backend_seed, rank};
    let members: Vec<(u64, u32)> = (0..100u32)
        .map(|i| {
            (
                backend_seed(&format!("10.0.{}.{}:9001", i / 250, i % 250)),
                1 + i % 3,
            )
        })
        .collect();
    let mut n = 0u64;
    c.bench_function("rendezvous/rank_100_backends", |b| {
        b.iter(|| {
            n += 1;
            let key = n.to_le_bytes();
            black_box(rank(black_box(&key), &members))
        })
    });
}

criterion_group!(benches, frame_header, relay_frames, rendezvous);
criterion_main!(benches);
