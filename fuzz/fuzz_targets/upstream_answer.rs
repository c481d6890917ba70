//! Defends the upstream handshake's answer parsing (`upstream::http1`) against arbitrary
//! backends: the head parser and a refusal body's decoder (Content-Length, chunked, up to
//! the close) must never panic, over-read the head bound or invent body bytes. Input
//! layout: `wsgate::fuzzing::upstream_answer`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate::fuzzing::upstream_answer(data);
});
