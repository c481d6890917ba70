#!/usr/bin/env bash
# SPEC §9 in one command (issue 21): runs every scenario behind a §9 row, against nginx,
# HAProxy and the floor (`tunnel`, compare.sh's cheapest relay on kernel sockets), and
# prints one table: row, wsgate, nginx, HAProxy, floor, target, verdict (met / missed
# with the ratio). See bench/README.md, "SPEC §9 in one command".
#
#   bench/contract.sh            # full run (~30 min on the 2-core VM)
#   bench/contract.sh --quick    # smoke check (~4 min): one short repeat, peers left out
#                                # of flood and storm, latency over 3 repeats (indicative)
#
# Options: --out DIR (default a new /tmp/wsgate-contract.XXXXXX), --wait-idle PCT and
# --port-offset N (passed to compare.sh), --groups "main latency flood storm fleet" (run
# only these; the others' rows say n/a), --wsgate-bin PATH (passed to compare.sh).
#
# Groups of runs, each in OUT/NAME (runs.jsonl, configs, logs):
#   main     compare.sh --scenarios "echo handshake idle h2 cores" (memory, CPU per
#            message and per handshake, HTTP/2, the fd-limit sweep, 2 threads vs 1)
#   latency  compare.sh --scenarios latency, 7 repeats (quick 3)
#   flood    compare.sh --scenarios flood
#   storm    compare.sh --scenarios storm --storm-variants "queue rate"
#   fleet    bench/fleet.sh without its two-instance part (PAIRS=0)
# A group that fails leaves its rows saying error and the next group runs; the exit
# status is then 1. A peer that is not installed makes its cells n/a.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
OUT=""
GROUPS_RUN="main latency flood storm fleet"
PASS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --out) OUT=$2; shift ;;
        --groups) GROUPS_RUN=$2; shift ;;
        --wait-idle|--port-offset|--wsgate-bin) PASS+=("$1" "$2"); shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        *) echo "contract.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$(mktemp -d /tmp/wsgate-contract.XXXXXX)}
mkdir -p "$OUT"
STATUS="$OUT/status.tsv"
: >"$STATUS"
ulimit -Hn >"$OUT/fd_limit"   # compare.sh raises its open-files limit to this
echo "contract.sh: results in $OUT" >&2

PEERS=""
MISSING=""
for p in nginx haproxy; do
    if command -v "$p" >/dev/null 2>&1; then PEERS+=" $p"; else MISSING+="$p not installed; "; fi
done
Q=()
[[ $QUICK == 1 ]] && Q=(--quick)

# group NAME TARGETS DETAIL -- COMMAND...: runs one group, records how it went.
group() {
    local name=$1 targets=$2 detail=$3; shift 4
    if [[ " $GROUPS_RUN " != *" $name "* ]]; then
        printf '%s\tskipped\t%s\t0\t%s\n' "$name" "$targets" "not in --groups" >>"$STATUS"
        return
    fi
    echo "== $name: $*" >&2
    local t0 rc
    t0=$(date +%s)
    "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    rc=$?
    local secs=$(( $(date +%s) - t0 ))
    if [[ $rc == 0 ]]; then
        printf '%s\tok\t%s\t%s\t%s\n' "$name" "$targets" "$secs" "$detail" >>"$STATUS"
    else
        echo "   $name exited $rc after $secs s (see $OUT/$name.err)" >&2
        tail -3 "$OUT/$name.err" | sed 's/^/   /' >&2
        printf '%s\tfailed\t%s\t%s\t%s\n' "$name" "$targets" "$secs" \
            "${detail:+$detail; }exit $rc, see $name.err" >>"$STATUS"
    fi
}

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)
[[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] && commit+=" (with uncommitted changes)"
COMPARE="$ROOT/bench/compare.sh"

targets="tunnel wsgate$PEERS"
group main "$targets" "${MISSING%; }" -- "$COMPARE" "${Q[@]}" "${PASS[@]}" --out "$OUT/main" \
    --scenarios "echo handshake idle h2 cores" --targets "$targets"

targets="direct tunnel wsgate$PEERS"
group latency "$targets" "${MISSING%; }" -- "$COMPARE" "${Q[@]}" "${PASS[@]}" \
    --out "$OUT/latency" --scenarios latency --targets "$targets" \
    --repeats "$([[ $QUICK == 1 ]] && echo 3 || echo 7)"

# The peers' flood and storm runs only give context (the targets are wsgate's own):
# --quick leaves them out.
if [[ $QUICK == 1 ]]; then targets="wsgate"; why="--quick runs wsgate only"
else targets="wsgate$PEERS"; why="${MISSING%; }"; fi
group flood "$targets" "$why" -- "$COMPARE" "${Q[@]}" "${PASS[@]}" --out "$OUT/flood" \
    --scenarios flood --targets "$targets"
group storm "$targets" "$why" -- "$COMPARE" "${Q[@]}" "${PASS[@]}" --out "$OUT/storm" \
    --scenarios storm --targets "$targets" --storm-variants "queue rate"

if ! command -v redis-server >/dev/null 2>&1; then
    printf '%s\tskipped\t%s\t0\t%s\n' fleet "plain cluster" \
        "redis-server not installed (apt-get install -y redis-server)" >>"$STATUS"
elif [[ -n ${PASS[*]:-} && " ${PASS[*]} " == *" --wsgate-bin "* ]]; then
    printf '%s\tskipped\t%s\t0\t%s\n' fleet "plain cluster" \
        "fleet.sh runs this tree's target/release/wsgate only" >>"$STATUS"
else
    if [[ $QUICK == 1 ]]; then fr=1; fd=2; else fr=3; fd=5; fi
    group fleet "plain cluster" "" -- env REPEATS=$fr DURATION=$fd PAIRS=0 \
        "$ROOT/bench/fleet.sh" "$OUT/fleet"
fi

elapsed=$(( $(date +%s) - started ))
{
    echo "<!-- wsgate contract $(date -u +%Y-%m-%dT%H:%MZ), $([[ $QUICK == 1 ]] && echo quick || echo full) run, ${elapsed} s, $(nproc) cores, $(uname -r), commit ${commit}, load before ${load_before}, after $(cut -d' ' -f1-3 /proc/loadavg) -->"
    python3 "$ROOT/bench/contract.py" "$OUT"
} | tee "$OUT/contract.md"
rc=${PIPESTATUS[0]}
echo "table: $OUT/contract.md; runs: $OUT/*/runs.jsonl" >&2
exit "$rc"
