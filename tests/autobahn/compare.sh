#!/usr/bin/env bash
# Autobahn|Testsuite through wsgate versus direct (../shared/autobahn). Not part of
# `cargo test` (it needs PyPI for the harness and ~2 minutes); run it when touching the relay.
#
#   tests/autobahn/compare.sh            # cases 1-10 (301), verdicts must be identical
#   CASES="5.*,7.*" tests/autobahn/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
AB=../shared/autobahn
WORK=${WORK:-/tmp/wsgate-autobahn}
mkdir -p "$WORK"
[ -x /tmp/autobahn-venv/bin/wstest ] || "$AB/setup.sh" /tmp/autobahn-venv
cargo build --release --manifest-path "$AB/echo-rs/Cargo.toml" --target-dir "$WORK/echo-rs-target" -q
cargo build --release -q
"$WORK/echo-rs-target/release/echo-rs" 127.0.0.1:9001 good 2>/dev/null & echo_pid=$!
target/release/wsgate --config tests/autobahn/wsgate.yaml 2>"$WORK/wsgate.log" & gw_pid=$!
trap 'kill $echo_pid $gw_pid 2>/dev/null || true' EXIT
sleep 1
"$AB/run.sh" ws://127.0.0.1:9001 "$WORK/direct" ${CASES:+"$CASES"} | tail -1
AGENT=wsgate "$AB/run.sh" ws://127.0.0.1:9080 "$WORK/wsgate" ${CASES:+"$CASES"} | tail -1
"$AB/compare.py" --verdicts "$WORK/direct" "$WORK/wsgate"
