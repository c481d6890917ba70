//! Defends the relay (SPEC §4/§5) against hostile or broken peers on either side: any
//! bytes, in any chunking, in both directions at once, with early bytes and abrupt hang-ups,
//! must neither panic nor hang the relay, and every byte it writes must be one the other
//! peer sent, verbatim, plus at most one close frame of its own. Input layout:
//! `wsgate::fuzzing::frame_stream`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate::fuzzing::frame_stream(data);
});
