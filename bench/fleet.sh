#!/usr/bin/env bash
# The fleet (SPEC §9 "with `cluster`", §10; docs/fleet.md), on one machine:
#   1. proxy CPU per plain handshake, one wsgate pinned to core 0, without and with
#      `cluster` (a local redis-server, fleet per-IP cap and handshake rate on, never
#      refusing), REPEATS alternating runs each; the generator, backend and Redis on core 1;
#   2. Redis commands per handshake (INFO commandstats around the `cluster` runs);
#   3. handshakes/s of two instances sharing that Redis (one generator each, all unpinned:
#      a 2-core machine), beside one instance without `cluster` driven the same way.
#
#   bench/fleet.sh [OUTDIR]         # REPEATS=3 DURATION=5 by default
#   PAIRS=0 bench/fleet.sh [OUTDIR] # part 1 and 2 only (what SPEC §9 judges; bench/contract.sh)
#
# Needs: cargo build --release (wsgate) and (cd bench && cargo build --release), and
# redis-server/redis-cli (apt-get install -y redis-server). Prints one JSON line per run
# into OUTDIR/runs.jsonl and a summary at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GEN="$ROOT/bench/target/release/wsgate-bench"
WSGATE="$ROOT/target/release/wsgate"
OUT=${1:-$(mktemp -d /tmp/wsgate-fleet.XXXXXX)}
REPEATS=${REPEATS:-3}
DURATION=${DURATION:-5}
PAIRS=${PAIRS:-1}
# Ports of their own (other benchmarks use 19xxx).
REDIS_PORT=29379
BACKEND_PORT=29001
mkdir -p "$OUT"
for bin in "$GEN" "$WSGATE"; do [[ -x $bin ]] || { echo "build $bin first" >&2; exit 1; }; done
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install -y redis-server)" >&2; exit 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

taskset -c 1 "$GEN" backend --bind "127.0.0.1:$BACKEND_PORT" >"$OUT/backend.log" 2>&1 & PIDS+=($!)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no >"$OUT/redis.log" 2>&1 & PIDS+=($!)
wait_port "$BACKEND_PORT"; wait_port "$REDIS_PORT"

# config NAME PORT ADMIN_PORT CLUSTER(0|1) INSTANCE
config() {
    local f="$OUT/$1.yaml"
    cat >"$f" <<EOF
listeners: [{ name: plain, bind: "127.0.0.1:$2" }]
admin: { bind: "127.0.0.1:$3" }
log: { access: "$OUT/$1-access.log" }
limits:
  max_connections: 1000000
  max_connections_per_ip: 1000000
  handshakes_per_ip: { rate: 1000000, per: 1s, burst: 1000000 }
upstreams:
  echo: { backends: [{ addr: "127.0.0.1:$BACKEND_PORT" }] }
routes:
  - { name: bench, match: { path_prefix: / }, upstream: echo }
EOF
    if [[ $4 == 1 ]]; then
        cat >>"$f" <<EOF
cluster:
  redis: "redis://127.0.0.1:$REDIS_PORT/0"
  instance: "$5"
  prefix: "bench:"
  lease: 15s
  limits:
    max_connections_per_ip: 1000000
    handshakes_per_ip: { rate: 1000000, per: 1s, burst: 1000000 }
EOF
    fi
    echo "$f"
}

# "ROUND_TRIPS SERVER_COMMANDS": commands clients sent (scripts count once) and every
# command the server ran (those inside scripts too), from INFO commandstats.
calls() { redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' |
    awk -F'[:,=]' '/^cmdstat_/ { all += $3
        if ($1 ~ /^cmdstat_(evalsha|eval|publish|subscribe|info|hello|ping|client.*|script.*)$/) sent += $3 }
        END { print sent + 0, all + 0 }'; }
fallbacks() { curl -s "127.0.0.1:$1/metrics" | awk '/^wsgate_cluster_fallbacks_total/ {print $2}'; }

# pinned RUN_LABEL CLUSTER: one wsgate on core 0, the generator on core 1.
pinned() {
    local label=$1 cluster=$2 cfg pid before after
    cfg=$(config "$label" 29101 29191 "$cluster" bench-a)
    taskset -c 0 "$WSGATE" --config "$cfg" 2>"$OUT/$label.stderr" & pid=$!
    wait_port 29101
    sleep 0.5
    before=$(calls)
    # Warmed up by a run of its own, so that the Redis counts cover the measured run only.
    taskset -c 1 "$GEN" handshake --target 127.0.0.1:29101 --label warmup \
        --concurrency 16 --warmup 0 --duration 1 >/dev/null
    before=$(calls)
    taskset -c 1 "$GEN" handshake --target 127.0.0.1:29101 --pid "$pid" --label "$label" \
        --concurrency 16 --warmup 0 --duration "$DURATION" >"$OUT/run.json"
    after=$(calls)
    python3 - "$OUT/run.json" "$before" "$after" "$cluster" "$(fallbacks 29191)" <<'EOF' >>"$OUT/runs.jsonl"
import json, sys
r = json.load(open(sys.argv[1]))
b, a = sys.argv[2].split(), sys.argv[3].split()
r["redis_sent"] = int(a[0]) - int(b[0])
r["redis_server_commands"] = int(a[1]) - int(b[1])
r["cluster"] = sys.argv[4] == "1"
r["fallbacks"] = sys.argv[5] or None
print(json.dumps(r))
EOF
    tail -1 "$OUT/runs.jsonl"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

# pair LABEL CLUSTER: two instances (one without cluster: just one), unpinned.
pair() {
    local label=$1 cluster=$2 a b cfg_a cfg_b
    cfg_a=$(config "$label-a" 29201 29291 "$cluster" bench-a)
    "$WSGATE" --config "$cfg_a" 2>"$OUT/$label-a.stderr" & a=$!
    wait_port 29201
    if [[ $cluster == 1 ]]; then
        cfg_b=$(config "$label-b" 29202 29292 1 bench-b)
        "$WSGATE" --config "$cfg_b" 2>"$OUT/$label-b.stderr" & b=$!
        wait_port 29202
        sleep 0.5
        "$GEN" handshake --target 127.0.0.1:29201 --pid "$a" --label "$label-a" \
            --concurrency 16 --warmup 1 --duration "$DURATION" >"$OUT/pair-a.json" &
        local ga=$!
        "$GEN" handshake --target 127.0.0.1:29202 --pid "$b" --label "$label-b" \
            --concurrency 16 --warmup 1 --duration "$DURATION" >"$OUT/pair-b.json"
        wait "$ga"
        python3 -c 'import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:3]); print(json.dumps({"scenario":"pair","label":"two instances + redis","per_sec":a["per_sec"]+b["per_sec"],"each":[a["per_sec"],b["per_sec"]],"failed":a["failed"]+b["failed"]}))' \
            "$OUT/pair-a.json" "$OUT/pair-b.json" >>"$OUT/runs.jsonl"
        kill "$b"; wait "$b" 2>/dev/null || true
    else
        sleep 0.5
        "$GEN" handshake --target 127.0.0.1:29201 --pid "$a" --label "$label" \
            --concurrency 32 --warmup 1 --duration "$DURATION" | python3 -c 'import json,sys; r=json.load(sys.stdin); r["scenario"]="pair"; r["label"]="one instance, no cluster"; print(json.dumps(r))' >>"$OUT/runs.jsonl"
    fi
    tail -1 "$OUT/runs.jsonl"
    kill "$a"; wait "$a" 2>/dev/null || true
}

echo "load before: $(uptime)" | tee "$OUT/load.txt"
for _ in $(seq 1 "$REPEATS"); do
    pinned plain 0
    pinned cluster 1
done
if [[ $PAIRS == 1 ]]; then
    for _ in $(seq 1 "$REPEATS"); do
        pair single 0
        pair fleet 1
    done
fi
echo "load after: $(uptime)" | tee -a "$OUT/load.txt"

python3 - "$OUT/runs.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(xs): return statistics.median(xs) if xs else float("nan")
def span(xs): return f"{med(xs):.0f} ({min(xs):.0f}–{max(xs):.0f})" if xs else "–"
plain = [r for r in runs if r.get("scenario") == "handshake" and not r["cluster"]]
clus = [r for r in runs if r.get("scenario") == "handshake" and r["cluster"]]
single = [r for r in runs if r.get("scenario") == "pair" and r["label"].startswith("one")]
pairs = [r for r in runs if r.get("scenario") == "pair" and r["label"].startswith("two")]
cp = [r["cpu_us_per_handshake"] for r in plain]
cc = [r["cpu_us_per_handshake"] for r in clus]
print(f"proxy CPU µs per plain handshake, no cluster: {span(cp)}")
print(f"proxy CPU µs per plain handshake, cluster:    {span(cc)}  ratio {med(cc)/med(cp):.2f}")
print(f"handshakes/s pinned, no cluster: {span([r['per_sec'] for r in plain])}; cluster: {span([r['per_sec'] for r in clus])}")
sent = [r["redis_sent"] / r["handshakes"] for r in clus if r["handshakes"]]
inner = [r["redis_server_commands"] / r["handshakes"] for r in clus if r["handshakes"]]
print(f"Redis round trips per handshake (commands sent; a script counts once): {min(sent):.2f}–{max(sent):.2f}")
print(f"Redis commands executed per handshake (those inside scripts included): {min(inner):.2f}–{max(inner):.2f}")
print(f"fallbacks during cluster runs: {[r['fallbacks'] for r in clus]}; failed: {[r['failed'] for r in clus]}")
print(f"handshakes/s, one instance without cluster (unpinned): {span([r['per_sec'] for r in single])}")
print(f"handshakes/s, two instances sharing one Redis (unpinned): {span([r['per_sec'] for r in pairs])}")
EOF
echo "runs: $OUT/runs.jsonl"
