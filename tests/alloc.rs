//! The relay's steady state allocates nothing per frame (SPEC §4): thousands of frames
//! relayed each way through a real gateway, with a counting global allocator watching
//! the whole process. Peers use raw sockets and pre-built frames so that they allocate
//! nothing themselves.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarding the caller's layout to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with the same layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BATCH: usize = 500;

/// Sends `batch` (BATCH frames) one way and reads exactly its length on the other side.
async fn pass(from: &mut TcpStream, to: &mut TcpStream, batch: &[u8], scratch: &mut [u8]) {
    let (w, r) = tokio::join!(from.write_all(batch), async {
        let mut left = batch.len();
        let cap = scratch.len();
        while left > 0 {
            let n = to.read(&mut scratch[..left.min(cap)]).await.unwrap_or(0);
            assert!(n > 0, "stream ended");
            left -= n;
        }
    });
    w.unwrap_or_else(|e| panic!("{e}"));
    r
}

#[tokio::test(flavor = "current_thread")]
async fn steady_state_relay_allocates_nothing_per_frame() {
    let (backend, mut accepted) = raw_backend().await;
    // A budget far above the test's pace: the limiter runs on every message, never refuses.
    let gw = spawn_gateway(&config_for(backend, "messages: { rate: 1000000, per: 1s }")).await;
    let (mut client, head) = raw_upgrade(gw.addr(), "/", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut up, _) = accepted
        .recv()
        .await
        .unwrap_or_else(|| panic!("no backend"));
    // Client messages of four frames each: fragments are counted per frame
    // (`max_fragments`) without allocating either.
    let first_byte = |i: usize| [0x02, 0x00, 0x00, 0x80][i % 4];
    let c2u: Vec<u8> = (0..BATCH)
        .flat_map(|i| client_frame(first_byte(i), &vec![i as u8; 64 + i % 200]))
        .collect();
    let u2c: Vec<u8> = (0..BATCH)
        .flat_map(|i| server_frame(0x81, &vec![b'a'; 64 + i % 300]))
        .collect();
    let mut scratch = vec![0u8; 64 * 1024];
    // Warm up: buffers enter the pool, lazily-initialised runtime state settles.
    for _ in 0..5 {
        pass(&mut client, &mut up, &c2u, &mut scratch).await;
        pass(&mut up, &mut client, &u2c, &mut scratch).await;
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let rounds = 20;
    for _ in 0..rounds {
        pass(&mut client, &mut up, &c2u, &mut scratch).await;
        pass(&mut up, &mut client, &u2c, &mut scratch).await;
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let frames = rounds * BATCH * 2;
    // Zero is the design; a handful allows for runtime housekeeping unrelated to frames.
    assert!(
        allocations < 20,
        "{allocations} allocations while relaying {frames} frames"
    );
    drop(gw);
}
