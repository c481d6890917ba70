//! What `deflate: inspect` costs per connection: the heap an inflater keeps between
//! messages (under context takeover) and after one (without), measured with a global
//! allocator that tracks live bytes. One test in this binary, so nothing else allocates
//! while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

use flate2::{Compress, Compression, FlushCompress};
use wsgate::relay::frame::Utf8Check;
use wsgate::relay::inflate::Inflate;

struct Tracking;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarding the caller's layout to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with the same layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// One text message, compressed as a permessage-deflate sender does (tail removed).
fn compressed(text: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(text.len() + 1024);
    c.compress_vec(text, &mut out, FlushCompress::Sync)
        .unwrap_or_else(|e| panic!("{e}"));
    out.truncate(out.len() - 4);
    out
}

fn one_message(inflate: &mut Inflate, payload: &[u8]) {
    let mut text = Utf8Check::default();
    inflate.start_message();
    inflate
        .feed(payload, None, 0, Some(&mut text))
        .unwrap_or_else(|v| panic!("{v:?}"));
    inflate
        .end_message(Some(&mut text))
        .unwrap_or_else(|v| panic!("{v:?}"));
}

#[test]
fn an_inspecting_connection_keeps_one_inflater_only_under_context_takeover() {
    let payload = compressed(&b"hello, inflated world. ".repeat(4000));
    let inflate_box = std::mem::size_of::<Inflate>() as i64;

    let before = live();
    let mut takeover = Inflate::new(false, 1 << 20);
    assert_eq!(
        live() - before,
        0,
        "nothing allocated before a compressed message"
    );
    one_message(&mut takeover, &payload);
    let kept = live() - before;
    one_message(&mut takeover, &payload);
    assert_eq!(
        live() - before,
        kept,
        "a second message allocates nothing more"
    );
    drop(takeover);
    assert_eq!(live(), before);

    let mut fresh = Inflate::new(true, 1 << 20);
    one_message(&mut fresh, &payload);
    assert_eq!(
        live() - before,
        0,
        "client_no_context_takeover keeps no inflater"
    );
    drop(fresh);
    assert!(kept > 0 && kept <= 64 << 10, "inflater kept {kept} bytes");
    // Printed last: the test harness's output capture allocates.
    println!(
        "per inspecting connection: {inflate_box} B (the pump's boxed Inflate) + {kept} B inflater kept under context takeover"
    );
}
