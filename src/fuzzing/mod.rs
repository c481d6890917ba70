//! Entry points shared by the `fuzz/` targets and the corpus-replay test, so that every
//! input the fuzzers keep is also run by `cargo test`.
//!
//! Each function turns arbitrary bytes into a call of the real code, bounds its own work
//! (input size, chunk count, wall-clock time) and never fails on its own account: no
//! `unwrap`, no indexing that can go out of range. The panics that remain are the
//! oracles, each naming the broken property: the relay must finish soon after both peers
//! hang up and pass bytes on verbatim, adding at most one close frame of its own at a
//! frame boundary; `admit` must not admit what the upstream request cannot carry; config
//! errors must not echo `${NAME}` values. Such a panic is a finding in wsgate, not here.
//!
//! Compiled only with the `fuzzing` cargo feature (the fuzz crate and the corpus-replay
//! test enable it), so none of it is in a release build. One file per target.

mod config_yaml;
mod frame_stream;
mod upgrade_request;
mod upstream_answer;

pub use config_yaml::{CONFIG_YAML_MAX_INPUT, config_yaml};
pub use frame_stream::{FRAME_STREAM_HEADER, FRAME_STREAM_MAX_INPUT, MAX_CHUNKS, frame_stream};
pub use upgrade_request::{
    UPGRADE_REQUEST_MAX_INPUT, UPGRADE_ROUTES_YAML, upgrade_request, upgrade_routes,
};
pub use upstream_answer::{UPSTREAM_ANSWER_MAX_INPUT, upstream_answer};

thread_local! {
    /// One current-thread runtime per thread, reused across inputs: building one costs as
    /// much as relaying a small input. Every input's futures finish (or are dropped)
    /// inside its `block_on`, so nothing carries over but the runtime's own state.
    static RUNTIME: Option<tokio::runtime::Runtime> =
        tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_empty_inputs_run() {
        for data in [
            &b""[..],
            b"\xff",
            b"GET / HTTP/1.1\nHost: x\n",
            b"listeners: [",
        ] {
            frame_stream(data);
            upgrade_request(data);
            config_yaml(data);
            upstream_answer(data);
        }
    }
}
