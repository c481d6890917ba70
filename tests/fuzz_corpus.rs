//! Replays the fuzzers' committed inputs, seed corpora (`fuzz/corpus/<target>/`) and crash
//! reproducers (`fuzz/regressions/<target>/`), through the same `wsgate::fuzzing` entry
//! points the fuzz targets call, so a regression fails `cargo test` without the fuzzer.

use std::path::{Path, PathBuf};

/// Inputs above this are skipped: the fuzzers never produce them, and the entry points
/// cut inputs well below it anyway.
const MAX_INPUT: u64 = 1024 * 1024;

/// Every regular file under `fuzz/{corpus,regressions}/<target>/` (dot files excluded).
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            let small = entry
                .metadata()
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_INPUT);
            if !hidden && small {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs `run` on every input of `target`, naming the file of the first failure.
fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        !files.is_empty(),
        "no inputs for {target} in fuzz/corpus/{target}/"
    );
    for path in files {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("{target}: {} fails: {why}", path.display());
        }
    }
}

#[test]
fn frame_stream_inputs_replay_cleanly() {
    replay("frame_stream", wsgate::fuzzing::frame_stream);
}

#[test]
fn upgrade_request_inputs_replay_cleanly() {
    replay("upgrade_request", wsgate::fuzzing::upgrade_request);
}

#[test]
fn config_yaml_inputs_replay_cleanly() {
    replay("config_yaml", wsgate::fuzzing::config_yaml);
}

#[test]
fn upstream_answer_inputs_replay_cleanly() {
    replay("upstream_answer", wsgate::fuzzing::upstream_answer);
}
