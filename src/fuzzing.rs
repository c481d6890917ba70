//! Entry points shared by the `fuzz/` targets and the corpus-replay test, so that every
//! input the fuzzers keep is also run by `cargo test`.
