#!/usr/bin/env bash
# User-space instructions a relay spends per echoed message or per handshake, counted by
# valgrind's callgrind (repeatable, unlike CPU time on a shared machine). The process under
# test runs under callgrind on core 0 (so wsgate picks its one-CPU runtime); the echo
# backend and the generator run on core 1. Counters are zeroed after a warm-up, then read
# after a 1 s and after a 3 s run: the difference divided by the difference in work leaves
# out start-up and the per-run connection set-up.
#
#   bench/instructions.sh echo|echo16k|handshake|handshake-tls|h2echo PORT -- COMMAND...
#
# echo16k: the echo loop with 16 KiB messages (8 connections, 500 msg/s) instead of 64 B;
# handshake-tls: full TLS handshakes (no resumption) against a TLS listener's PORT;
# h2echo: the 64 B closed loop of `wsgate-bench h2-echo` on PORT (a TLS listener offering
# ALPN h2) over H2_CONNS connections × H2_STREAMS streams (default 32 × 1, HTTP/2's own
# cost per message with nothing multiplexed); per echoed message.
#
#   bench/instructions.sh echo 19101 -- target/release/wsgate --config /tmp/wsgate-bench.yaml
#   bench/instructions.sh h2echo 19102 -- target/release/wsgate --config /tmp/wsgate-h2.yaml
#   bench/instructions.sh echo 19401 -- bench/target/release/wsgate-bench tunnel \
#       --bind 127.0.0.1:19401 --upstream 127.0.0.1:19001 --engine epoll
#
# The backend is expected on 127.0.0.1:19001, or $BACKEND_PORT (started here when nothing
# listens there: `compare.sh --port-offset N` configs use 19001 + N);
# `compare.sh` writes a suitable wsgate config (`wsgate-bench.yaml` in its output dir).
set -euo pipefail

MODE=${1:?echo, echo16k, handshake, handshake-tls or h2echo}; PORT=${2:?port}; shift 2
[[ ${1:-} == -- ]] && shift
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GEN="$ROOT/bench/target/release/wsgate-bench"
OUT=$(mktemp -d /tmp/wsgate-instr.XXXXXX)

BACKEND_PORT=${BACKEND_PORT:-19001}
BACKEND=""; VG=""
# A failed run (set -e) must not leave the process under test or the backend behind.
trap 'for p in $VG $BACKEND; do kill "$p" 2>/dev/null || true; done' EXIT
if ! (exec 3<>"/dev/tcp/127.0.0.1/$BACKEND_PORT") 2>/dev/null; then
    taskset -c 1 "$GEN" backend --bind "127.0.0.1:$BACKEND_PORT" >/dev/null 2>&1 &
    BACKEND=$!
    sleep 0.5
fi

taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "$@" 2>"$OUT/valgrind.log" &
VG=$!
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done

# run SECONDS: prints the work done (echoes or handshakes).
run() {
    case "$MODE" in
        echo) taskset -c 1 "$GEN" echo --target "127.0.0.1:$PORT" --conns 50 --size 64 \
                  --rate 2000 --warmup 0 --duration "$1" |
              python3 -c 'import json,sys; print(json.load(sys.stdin)["received"])' ;;
        echo16k) taskset -c 1 "$GEN" echo --target "127.0.0.1:$PORT" --conns 8 --size 16384 \
                  --rate 500 --warmup 0 --duration "$1" |
              python3 -c 'import json,sys; print(json.load(sys.stdin)["received"])' ;;
        handshake) taskset -c 1 "$GEN" handshake --target "127.0.0.1:$PORT" --concurrency 4 \
                  --warmup 0 --duration "$1" |
              python3 -c 'import json,sys; print(json.load(sys.stdin)["handshakes"])' ;;
        handshake-tls) taskset -c 1 "$GEN" handshake --target "127.0.0.1:$PORT" --tls \
                  --concurrency 4 --warmup 0 --duration "$1" |
              python3 -c 'import json,sys; print(json.load(sys.stdin)["handshakes"])' ;;
        h2echo) taskset -c 1 "$GEN" h2-echo --target "127.0.0.1:$PORT" \
                  --connections "${H2_CONNS:-32}" --streams-per-conn "${H2_STREAMS:-1}" \
                  --size 64 --warmup 0 --duration "$1" |
              python3 -c 'import json,sys; print(json.load(sys.stdin)["msgs"])' ;;
        *) echo "mode: echo, echo16k, handshake, handshake-tls or h2echo" >&2; exit 2 ;;
    esac
}
total() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

# SHORT/LONG: the two runs' seconds (h2echo's TLS set-up under valgrind takes most of a
# 1 s run: longer runs leave more messages in the difference).
SHORT=${SHORT:-1}; LONG=${LONG:-3}
run 1 >/dev/null
callgrind_control -z "$VG" >/dev/null 2>&1
short=$(run "$SHORT")
callgrind_control -d "$VG" >/dev/null 2>&1
callgrind_control -z "$VG" >/dev/null 2>&1
long=$(run "$LONG")
callgrind_control -d "$VG" >/dev/null 2>&1
sleep 0.5
kill "$VG" 2>/dev/null || true
wait "$VG" 2>/dev/null || true
a=$(total "$OUT/cg.out.1"); b=$(total "$OUT/cg.out.2")
echo "$MODE: $short then $long done; $a then $b instructions; $(( (b - a) / (long - short) )) per $MODE (profiles in $OUT)"
