//! Defends the upgrade checks (SPEC §3) against arbitrary request heads: routing, the
//! `Connection`/`Upgrade`/version/key checks, the subprotocol allowlist, the path rewrite
//! and the hop-by-hop filter must never panic, and nothing admitted may be impossible to
//! forward upstream. Input layout: `wsgate::fuzzing::upgrade_request`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate::fuzzing::upgrade_request(data);
});
