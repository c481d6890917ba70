#!/usr/bin/env bash
# Side-by-side benchmark of wsgate, nginx and HAProxy relaying the same echo backend on
# this machine (SPEC §9), with two references: "direct" (the backend alone) and "tunnel"
# (the cheapest possible byte relay, the floor for any proxy). See bench/README.md.
#
#   bench/compare.sh               # full run (3 repeats, ~10 min), table on stdout
#   bench/compare.sh --quick       # one short repeat (< 2 min), for development
#   bench/compare.sh --scenarios flood [--quick]   # issue 17's flood (not in the default set)
#   bench/compare.sh --scenarios h2 --targets "wsgate haproxy" [--quick]   # WebSocket over HTTP/2
#   bench/compare.sh --scenarios storm [--quick]   # issue 19's reconnect storm (not in the default set)
#   bench/compare.sh --scenarios cores [--quick]   # issue 21: wsgate on 1 core vs 2 worker threads
#   bench/contract.sh [--quick]                    # every SPEC §9 row with a verdict (runs this script)
#
# Options: --repeats N, --targets "direct tunnel wsgate nginx haproxy",
#          --scenarios "echo latency handshake idle abuse flood h2 storm cores", --out DIR, --idle-max N,
#          --key rsa|ecdsa (certificate key type, default rsa = RSA 2048),
#          --wsgate-bin PATH (run this wsgate binary instead of building this tree's),
#          --bench-bin PATH (run this wsgate-bench instead of building bench/),
#          --flood-attack S, --flood-tls-attack S (attack seconds; the TLS run is shorter),
#          --flood-rate N (cap the flood's attempts per second; default 0 = as fast as they go),
#          --wait-idle PCT (before each flood run, wait up to 5 min until both cores are
#          below PCT % busy over 2 s: for a machine shared with other work),
#          --storm-clients N (default 4,000; quick 1,000), --storm-variants "plain queue rate hc"
#          (proxy configs: plain; wsgate max_pending 32; nginx/HAProxy global rate just
#          under R; wsgate 500 ms health check), --storm-modes "naive jitter",
#          --port-offset N (add N to every port: another run of this script on the machine).
#
# The proxy under test runs on core 0 (taskset -c 0), the load generator and the backend
# on core 1. Nothing is installed: missing tools are reported with the command to get them.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR="$ROOT/bench"
REPEATS=3
QUICK=0
TARGETS="direct tunnel wsgate nginx haproxy"
SCENARIOS="echo latency handshake idle abuse"
OUT=""
IDLE_MAX=""
KEY=rsa
WSGATE_BIN=""
FLOOD_ATTACK=""
FLOOD_TLS_ATTACK=""
WAIT_IDLE=""
STORM_CLIENTS=""
STORM_VARIANTS="plain queue rate"
STORM_MODES="naive jitter"
PORT_OFFSET=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; REPEATS=1 ;;
        --repeats) REPEATS=$2; shift ;;
        --targets) TARGETS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --idle-max) IDLE_MAX=$2; shift ;;
        --key) KEY=$2; shift ;;
        --wsgate-bin) WSGATE_BIN=$2; shift ;;
        --bench-bin) BENCH_BIN=$2; shift ;;
        --flood-attack) FLOOD_ATTACK=$2; shift ;;
        --flood-tls-attack) FLOOD_TLS_ATTACK=$2; shift ;;
        --flood-rate) FLOOD_RATE=$2; shift ;;
        --wait-idle) WAIT_IDLE=$2; shift ;;
        --storm-clients) STORM_CLIENTS=$2; shift ;;
        --storm-variants) STORM_VARIANTS=$2; shift ;;
        --storm-modes) STORM_MODES=$2; shift ;;
        --port-offset) PORT_OFFSET=$2; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Durations (seconds) of each run; --quick shortens them all.
if [[ $QUICK == 1 ]]; then
    WARM=0.5; ECHO_S=1.5; OPEN_S=2; HS_S=1.5; QUIET_S=3; ATTACK_S=4; SETTLE=1
    IDLE_MAX=${IDLE_MAX:-2000}
    # flood: the issue's client counts, shorter phases and fewer newcomers.
    FLOOD_QUIET=4; FLOOD_ATTACK=${FLOOD_ATTACK:-10}; FLOOD_TLS_ATTACK=${FLOOD_TLS_ATTACK:-5}
    FLOOD_NEWCOMERS=30
    STORM_CLIENTS=${STORM_CLIENTS:-1000}
else
    WARM=1; ECHO_S=2; OPEN_S=4; HS_S=2; QUIET_S=4; ATTACK_S=6; SETTLE=1.5
    IDLE_MAX=${IDLE_MAX:-9900}
    # flood: issue 17's figures (30 s attack, 100 newcomers); the TLS check needs less.
    FLOOD_QUIET=10; FLOOD_ATTACK=${FLOOD_ATTACK:-30}; FLOOD_TLS_ATTACK=${FLOOD_TLS_ATTACK:-10}
    FLOOD_NEWCOMERS=100
    STORM_CLIENTS=${STORM_CLIENTS:-4000}
fi
FLOOD_RATE=${FLOOD_RATE:-0}   # attacker attempts/s cap (0: as fast as they go)
OPEN_RATE=10000   # msg/s, SPEC §9's fixed rate
OPEN_CONNS=50
ECHO_CONNS=32

# --- tools -----------------------------------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 ($2)"); }
need taskset "apt-get install -y util-linux"
need openssl "apt-get install -y openssl"
need cargo "https://rustup.rs"
[[ " $TARGETS " == *" nginx "* ]] && need nginx "apt-get install -y nginx   # Debian bookworm: 1.22"
[[ " $TARGETS " == *" haproxy "* ]] && need haproxy "apt-get install -y haproxy   # Debian bookworm: 2.6"
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "compare.sh: missing tools (nothing is installed for you):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "or leave those targets out, e.g. --targets \"direct wsgate\"" >&2
    exit 1
fi
if [[ $(nproc) -lt 2 ]]; then
    echo "compare.sh: needs 2 cores (proxy on core 0, load on core 1)" >&2
    exit 1
fi

ulimit -n "$(ulimit -Hn)"
FD_LIMIT=$(ulimit -n)

# --- build -----------------------------------------------------------------------------
if [[ -n $WSGATE_BIN ]]; then
    WSGATE=$(realpath "$WSGATE_BIN")
    [[ -x $WSGATE ]] || { echo "compare.sh: --wsgate-bin $WSGATE_BIN is not an executable" >&2; exit 1; }
    echo "using wsgate $WSGATE (not built); building wsgate-bench (release)..." >&2
else
    WSGATE="$ROOT/target/release/wsgate"
    echo "building wsgate and wsgate-bench (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet)
fi
if [[ -n ${BENCH_BIN:-} ]]; then
    GEN=$(realpath "$BENCH_BIN")   # a saved wsgate-bench (e.g. before a change to it)
else
    (cd "$BENCH_DIR" && cargo build --release --quiet)
    GEN="$BENCH_DIR/target/release/wsgate-bench"
fi
# A fresh build leaves the kernel writing its output back for a while, which showed up as
# a 20 % slower first run: let it settle first.
sync
sleep 3

OUT=${OUT:-$(mktemp -d /tmp/wsgate-bench.XXXXXX)}
mkdir -p "$OUT"
RUNS="$OUT/runs.jsonl"
: >"$RUNS"
: >"$OUT/failed.txt"
echo "results in $OUT" >&2

# --- certificate -----------------------------------------------------------------------
case "$KEY" in
    rsa) KEYARGS=(-newkey rsa:2048) ;;
    ecdsa) KEYARGS=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    *) echo "compare.sh: --key rsa|ecdsa" >&2; exit 2 ;;
esac
openssl req -x509 "${KEYARGS[@]}" -nodes -days 30 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
cat "$OUT/cert.pem" "$OUT/key.pem" >"$OUT/haproxy.pem"

# --- ports -----------------------------------------------------------------------------
P=$PORT_OFFSET
BACKEND_PORT=$((19001 + P))
STORM_PORT=$((19011 + P))   # the storm's capacity-limited backend (inside the generator)
declare -A PLAIN_PORT=([direct]=$((19001 + P)) [tunnel]=$((19401 + P)) [wsgate]=$((19101 + P)) [nginx]=$((19201 + P)) [haproxy]=$((19301 + P)))
declare -A TLS_PORT=([wsgate]=$((19102 + P)) [nginx]=$((19202 + P)) [haproxy]=$((19302 + P)))

# --- configs ---------------------------------------------------------------------------
# Two of each: "bench" (no per-address limits: every scenario but abuse and flood comes
# from the generator's many addresses at rates no per-address limit should see) and "abuse"
# (per-address limits: 64 connections, 10 handshakes/s with a burst of 20, 10 s for a
# request head; wsgate also limits messages, which the tunnels cannot). The flood runs use
# the abuse configs.
write_configs() {
    local mode
    for mode in bench abuse; do
        local limits
        if [[ $mode == bench ]]; then
            limits='limits:
  max_connections: 1000000
  max_connections_per_ip: 1000000
  handshakes_per_ip: { rate: 1000000, per: 1s, burst: 1000000 }
  messages: { rate: 100000, per: 1s, burst: 100000 }'
        else
            limits='limits:
  max_connections_per_ip: 64
  handshakes_per_ip: { rate: 10, per: 1s, burst: 20 }
  handshake_timeout: 10s
  messages: { rate: 100, per: 1s, burst: 200, on_exceed: close }
  fragment_timeout: 10s'
        fi
        cat >"$OUT/wsgate-$mode.yaml" <<EOF
listeners:
  - { name: plain, bind: "127.0.0.1:${PLAIN_PORT[wsgate]}" }
  - name: tls
    bind: "127.0.0.1:${TLS_PORT[wsgate]}"
    tls: { certificates: [{ cert: "$OUT/cert.pem", key: "$OUT/key.pem" }] }
log: { access: "$OUT/wsgate-access.log" }
$limits
upstreams:
  echo: { backends: [{ addr: "127.0.0.1:$BACKEND_PORT" }] }
routes:
  - { name: bench, match: { path_prefix: / }, upstream: echo }
EOF

        local nginx_http="" nginx_server=""
        if [[ $mode == abuse ]]; then
            nginx_http='limit_conn_zone $binary_remote_addr zone=perip:10m;
    limit_req_zone $binary_remote_addr zone=handshakes:10m rate=10r/s;'
            nginx_server='limit_conn perip 64;
        limit_req zone=handshakes burst=20 nodelay;
        limit_conn_status 429;
        limit_req_status 429;
        client_header_timeout 10s;'
        fi
        mkdir -p "$OUT/nginx-tmp"
        cat >"$OUT/nginx-$mode.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $FD_LIMIT;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections $((2 * FD_LIMIT)); }   # the fd limit, not this, is what binds
http {
    access_log $OUT/nginx-access.log;
    client_body_temp_path $OUT/nginx-tmp/body;
    proxy_temp_path $OUT/nginx-tmp/proxy;
    fastcgi_temp_path $OUT/nginx-tmp/fastcgi;
    uwsgi_temp_path $OUT/nginx-tmp/uwsgi;
    scgi_temp_path $OUT/nginx-tmp/scgi;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream echo { server 127.0.0.1:$BACKEND_PORT; }
    $nginx_http
    server {
        listen 127.0.0.1:${PLAIN_PORT[nginx]} backlog=4096;
        listen 127.0.0.1:${TLS_PORT[nginx]} ssl backlog=4096;
        ssl_certificate $OUT/cert.pem;
        ssl_certificate_key $OUT/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        $nginx_server
        location / {
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
EOF

        local hap_front=""
        if [[ $mode == abuse ]]; then
            hap_front='stick-table type ip size 100k expire 30s store conn_cur,http_req_rate(1s)
    tcp-request connection track-sc0 src
    tcp-request connection reject if { sc_conn_cur(0) gt 64 }
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 20 }'
        fi
        cat >"$OUT/haproxy-$mode.cfg" <<EOF
global
    nbthread 1
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
    timeout http-request 10s
frontend ws
    bind 127.0.0.1:${PLAIN_PORT[haproxy]} backlog 4096
    bind 127.0.0.1:${TLS_PORT[haproxy]} ssl crt $OUT/haproxy.pem backlog 4096
    $hap_front
    default_backend echo
backend echo
    server b1 127.0.0.1:$BACKEND_PORT
EOF
    done
}
write_configs

# --- HTTP/2 (scenario h2) ----------------------------------------------------------------
# WebSockets over HTTP/2 (RFC 8441) on the TLS listeners: wsgate offers ALPN h2 there by
# default (said explicitly here); HAProxy needs "alpn h2,http/1.1" on its bind line and
# then accepts extended CONNECT on its own (it advertises SETTINGS_ENABLE_CONNECT_PROTOCOL
# unless "option h2-workaround-bogus-websocket-clients" is set). Backends stay HTTP/1.1.
# nginx has no RFC 8441 (its HTTP/2 refuses CONNECT): it is left out of this scenario.
write_h2_configs() {
    sed 's|^    tls: {|    http2: true\n    tls: {|' "$OUT/wsgate-bench.yaml" >"$OUT/wsgate-h2.yaml"
    sed "s|ssl crt $OUT/haproxy.pem backlog|ssl crt $OUT/haproxy.pem alpn h2,http/1.1 backlog|" \
        "$OUT/haproxy-bench.cfg" >"$OUT/haproxy-h2.cfg"
}
write_h2_configs
# The storm's configs (issue 19): the bench limits (no per-address limit: 4,000 clients on
# 400 addresses), the storm backend as the only upstream. Variants: plain (each proxy as
# it comes), queue (wsgate: max_pending = the backend's 32 slots), rate (nginx limit_req
# without nodelay / HAProxy rate-limit sessions, both at 1,500/s, just under R = 1,600/s:
# the operator must know R), hc (wsgate with a 500 ms health check).
write_storm_configs() {
    local v extra
    for v in plain queue queue40 hc ej100; do
        case $v in
            plain) extra="" ;;
            queue) extra=", max_pending: 32" ;;
            queue40) extra=", max_pending: 40" ;;
            hc) extra=", health_check: { interval: 500ms, timeout: 250ms }" ;;
            ej100) extra=", max_ejected: 100%" ;;
        esac
        cat >"$OUT/wsgate-storm-$v.yaml" <<EOF
listeners:
  - { name: plain, bind: "127.0.0.1:${PLAIN_PORT[wsgate]}" }
log: { access: "$OUT/wsgate-access.log" }
limits:
  max_connections: 1000000
  max_connections_per_ip: 1000000
  handshakes_per_ip: { rate: 1000000, per: 1s, burst: 1000000 }
  messages: { rate: 100000, per: 1s, burst: 100000 }
upstreams:
  storm: { backends: [{ addr: "127.0.0.1:$STORM_PORT" }]$extra }
routes:
  - { name: bench, match: { path_prefix: / }, upstream: storm }
EOF
    done
    for v in plain rate; do
        local zone="" limit=""
        if [[ $v == rate ]]; then
            zone='map $host $storm_all { default all; }
    limit_req_zone $storm_all zone=storm:1m rate=1500r/s;'
            limit='limit_req zone=storm burst=20000;'
        fi
        cat >"$OUT/nginx-storm-$v.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $FD_LIMIT;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections $((2 * FD_LIMIT)); }
http {
    access_log $OUT/nginx-access.log;
    client_body_temp_path $OUT/nginx-tmp/body;
    proxy_temp_path $OUT/nginx-tmp/proxy;
    fastcgi_temp_path $OUT/nginx-tmp/fastcgi;
    uwsgi_temp_path $OUT/nginx-tmp/uwsgi;
    scgi_temp_path $OUT/nginx-tmp/scgi;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream storm { server 127.0.0.1:$STORM_PORT; }
    $zone
    server {
        listen 127.0.0.1:${PLAIN_PORT[nginx]} backlog=4096;
        $limit
        location / {
            proxy_pass http://storm;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
EOF
        local rate=""
        [[ $v == rate ]] && rate="rate-limit sessions 1500"
        cat >"$OUT/haproxy-storm-$v.cfg" <<EOF
global
    nbthread 1
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
    timeout http-request 10s
frontend ws
    bind 127.0.0.1:${PLAIN_PORT[haproxy]} backlog 4096
    $rate
    default_backend storm
backend storm
    server b1 127.0.0.1:$STORM_PORT
EOF
    done
}
write_storm_configs

# --- processes -------------------------------------------------------------------------
BACKEND_PID=""
PROXY_PID=""
PIDS=""
# Where the proxy and the generator run (scenario cores changes them for its runs), the
# environment wsgate gets, and the label its runs are recorded under (default: the target).
PROXY_CPUS=0
GEN_CPUS=1
WSGATE_ENV=()
LABEL=""

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "compare.sh: nothing listens on port $port" >&2
    return 1
}

start_proxy() { # NAME MODE
    local name=$1 mode=$2
    PROXY_PID=""; PIDS=""
    case "$name" in
        direct) return 0 ;;
        tunnel)
            taskset -c 0 "$GEN" tunnel --bind "127.0.0.1:${PLAIN_PORT[tunnel]}" \
                --upstream "127.0.0.1:$BACKEND_PORT" 2>>"$OUT/tunnel-stderr.log" &
            PROXY_PID=$!; PIDS=$PROXY_PID ;;
        wsgate)
            taskset -c "$PROXY_CPUS" env "${WSGATE_ENV[@]}" "$WSGATE" --config "$OUT/wsgate-$mode.yaml" \
                2>>"$OUT/wsgate-stderr.log" &
            PROXY_PID=$!; PIDS=$PROXY_PID ;;
        nginx)
            taskset -c 0 nginx -p "$OUT" -c "$OUT/nginx-$mode.conf" 2>>"$OUT/nginx-stderr.log" &
            PROXY_PID=$! ;;
        haproxy)
            taskset -c 0 haproxy -db -f "$OUT/haproxy-$mode.cfg" >>"$OUT/haproxy-access.log" 2>&1 &
            PROXY_PID=$!; PIDS=$PROXY_PID ;;
    esac
    wait_port "${PLAIN_PORT[$name]}"
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
        echo "compare.sh: $name exited at start (see its log in $OUT)" >&2
        exit 1
    fi
    if [[ $name == nginx ]]; then
        # Master and worker: the worker does the work; the master's share is constant.
        PIDS="$PROXY_PID $(pgrep -P "$PROXY_PID" | tr '\n' ' ')"
    fi
    sleep 0.2
}

stop_proxy() {
    if [[ -n $PROXY_PID ]]; then
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
        if [[ -n $PIDS ]]; then
            local p
            for p in $PIDS; do
                while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
            done
        fi
    fi
    PROXY_PID=""; PIDS=""
}

cleanup() {
    stop_proxy
    if [[ -n $BACKEND_PID ]]; then kill "$BACKEND_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# A leftover listener on one of our ports would silently stand in for the process under
# test (unpinned): refuse to start instead.
for port in "$BACKEND_PORT" "$STORM_PORT" "${PLAIN_PORT[@]}" "${TLS_PORT[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "compare.sh: port $port is already in use; stop whatever listens there" >&2
        exit 1
    fi
done

taskset -c 1 "$GEN" backend --bind "127.0.0.1:$BACKEND_PORT" >"$OUT/backend.out" 2>&1 &
BACKEND_PID=$!
wait_port "$BACKEND_PORT"
kill -0 "$BACKEND_PID" 2>/dev/null || { echo "compare.sh: the backend exited (see $OUT/backend.out)" >&2; exit 1; }

# gen SCENARIO NAME TLS ARGS...: runs the generator on core 1 against NAME's port.
gen() {
    local scenario=$1 name=$2 tls=$3; shift 3
    local port=${PLAIN_PORT[$name]} tlsarg=()
    [[ $scenario == storm && $name == direct ]] && port=$STORM_PORT
    if [[ $tls == tls ]]; then port=${TLS_PORT[$name]}; tlsarg=(--tls); fi
    local pidargs=() p
    for p in $PIDS; do pidargs+=(--pid "$p"); done
    local line
    if line=$(taskset -c "$GEN_CPUS" "$GEN" "$scenario" --target "127.0.0.1:$port" \
        --label "${LABEL:-$name}" "${tlsarg[@]}" "${pidargs[@]}" "$@" 2>>"$OUT/generator-stderr.log"); then
        echo "$line" >>"$RUNS"
        echo "  ${LABEL:-$name} $scenario $tls $*: ok" >&2
    else
        failed "${LABEL:-$name} $scenario $tls $*"
    fi
}

# failed WHAT: a run that gave no result, said on stderr and kept in failed.txt (which
# bench/contract.sh reads: the rows of that run say "error", not "n/a").
failed() {
    echo "  $1: FAILED (see $OUT/generator-stderr.log)" >&2
    printf '%s\n' "$1" >>"$OUT/failed.txt"
}

has() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# gen_h2 SCENARIO NAME ARGS...: an HTTP/2 scenario (h2-echo, h2-idle) on core 1 against
# NAME's TLS listener.
gen_h2() {
    local scenario=$1 name=$2; shift 2
    local pidargs=() p line
    for p in $PIDS; do pidargs+=(--pid "$p"); done
    if line=$(taskset -c 1 "$GEN" "$scenario" --target "127.0.0.1:${TLS_PORT[$name]}" \
        --label "$name" "${pidargs[@]}" "$@" 2>>"$OUT/generator-stderr.log"); then
        echo "$line" >>"$RUNS"
        echo "  $name $scenario $*: ok" >&2
    else
        failed "$name $scenario $*"
    fi
}

# run_h2: one repeat of the h2 scenario for every target that speaks RFC 8441. Echo: the
# HTTP/1.1 TLS closed loop (32 connections, as the echo scenario), then the same 32
# WebSockets as streams of one HTTP/2 connection (a browser's one connection per origin),
# over 4 connections × 8 streams, and over 32 connections × 1 stream (no multiplexing:
# HTTP/2's own cost per message, nothing shared), all in one proxy process. Idle: per TLS
# connection (plain too, for reference) and per stream with 100 streams on each
# connection, each run in a fresh proxy.
run_h2() {
    local name n
    for name in $TARGETS; do
        case $name in direct|tunnel|nginx) continue ;; esac
        wait_idle
        start_proxy "$name" h2
        gen echo "$name" tls --conns $ECHO_CONNS --size 64 --warmup $WARM --duration $ECHO_S
        gen_h2 h2-echo "$name" --connections 1 --streams-per-conn $ECHO_CONNS --size 64 \
            --warmup $WARM --duration $ECHO_S
        gen_h2 h2-echo "$name" --connections 4 --streams-per-conn $((ECHO_CONNS / 4)) \
            --size 64 --warmup $WARM --duration $ECHO_S
        gen_h2 h2-echo "$name" --connections $ECHO_CONNS --streams-per-conn 1 --size 64 \
            --warmup $WARM --duration $ECHO_S
        stop_proxy
    done
    for n in 1000 "$IDLE_MAX"; do
        for name in $TARGETS; do
            case $name in direct|tunnel|nginx) continue ;; esac
            # The idle scenario, when run too, measures these already (bench config).
            if ! has idle; then
                start_proxy "$name" h2
                gen idle "$name" plain --connections "$n" --settle $SETTLE
                stop_proxy
                start_proxy "$name" h2
                gen idle "$name" tls --connections "$n" --settle $SETTLE
                stop_proxy
            fi
            start_proxy "$name" h2
            gen_h2 h2-idle "$name" --connections $(( (n + 99) / 100 )) --streams "$n" \
                --settle $SETTLE
            stop_proxy
        done
    done
}

# run_cores: issue 21 "more than one core", wsgate only. Three ways, each in a fresh
# process: on core 0 alone (label wsgate-1t: the current-thread runtime wsgate picks on
# one CPU, as in every other run here), on cores 0 and 1 with two worker threads
# (wsgate-2t: tokio's multi-thread runtime), and on both cores held to one worker
# (wsgate-mt1: TOKIO_WORKER_THREADS, which tokio's builder reads itself; tells the
# runtime's flavour from the second worker). The generator runs on both cores in all
# three (it has to share them with the two workers); the backend stays on core 1.
run_cores() {
    local v
    for v in 1t mt1 2t; do
        case $v in
            1t) PROXY_CPUS=0; WSGATE_ENV=() ;;
            mt1) PROXY_CPUS=0,1; WSGATE_ENV=(TOKIO_WORKER_THREADS=1) ;;
            2t) PROXY_CPUS=0,1; WSGATE_ENV=(TOKIO_WORKER_THREADS=2) ;;
        esac
        GEN_CPUS=0,1; LABEL="wsgate-$v"
        start_proxy wsgate bench
        gen echo wsgate plain --conns $ECHO_CONNS --size 64 --warmup $WARM --duration $ECHO_S
        gen echo wsgate plain --conns 8 --size 16384 --warmup $WARM --duration $ECHO_S
        gen handshake wsgate plain --warmup $WARM --duration $HS_S
        stop_proxy
    done
    PROXY_CPUS=0; GEN_CPUS=1; WSGATE_ENV=(); LABEL=""
}

# busy_ticks CPU: busy and total clock ticks of one core so far (/proc/stat).
busy_ticks() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# wait_idle: with --wait-idle PCT, waits (at most 150 windows of 2 s) until both cores were
# below PCT % busy over one window. Our own backend idles meanwhile, so what is measured
# is someone else's work on a shared machine; the run goes ahead anyway after 5 minutes.
wait_idle() {
    [[ -z $WAIT_IDLE ]] && return 0
    local i b0 t0 b1 t1 c ok busy
    for i in $(seq 1 150); do
        read -r b0 t0 < <(busy_ticks 0); read -r b1 t1 < <(busy_ticks 1)
        sleep 2
        ok=1; busy=""
        for c in 0 1; do
            local bb tt ba ta
            read -r bb tt < <(busy_ticks $c)
            if [[ $c == 0 ]]; then ba=$b0; ta=$t0; else ba=$b1; ta=$t1; fi
            local pct=$(( (bb - ba) * 100 / ( (tt - ta) > 0 ? (tt - ta) : 1 ) ))
            busy+=" core$c=$pct%"
            (( pct < WAIT_IDLE )) || ok=0
        done
        if [[ $ok == 1 ]]; then
            [[ $i -gt 1 ]] && echo "  (waited $(( 2 * i )) s for idle cores:$busy)" >&2
            return 0
        fi
    done
    echo "  (cores still busy after 5 min:$busy; running anyway)" >&2
}

started=$(date +%s)
for rep in $(seq 1 "$REPEATS"); do
    echo "repeat $rep/$REPEATS" >&2
    for name in $TARGETS; do
        if has echo || has latency || has handshake; then
            start_proxy "$name" bench
            if has echo; then
                gen echo "$name" plain --conns $ECHO_CONNS --size 64 --warmup $WARM --duration $ECHO_S
                gen echo "$name" plain --conns 8 --size 16384 --warmup $WARM --duration $ECHO_S
            fi
            if has latency; then
                gen echo "$name" plain --conns $OPEN_CONNS --size 64 --rate $OPEN_RATE \
                    --warmup $WARM --duration $OPEN_S
            fi
            if has handshake; then
                gen handshake "$name" plain --warmup $WARM --duration $HS_S
                if [[ $name != direct && $name != tunnel ]]; then
                    gen handshake "$name" tls --warmup $WARM --duration $HS_S
                    # Resumed TLS 1.3 (issue 19): tickets kept by the generator; the
                    # warm-up's first handshake is the only full one.
                    gen handshake "$name" tls --resume --warmup $WARM --duration $HS_S
                fi
            fi
            stop_proxy
        fi
    done
    if has idle; then
        for tls in plain tls; do
            for n in 1000 "$IDLE_MAX"; do
                for name in $TARGETS; do
                    [[ $name == direct || $name == tunnel ]] && continue
                    start_proxy "$name" bench
                    gen idle "$name" "$tls" --connections "$n" --settle $SETTLE
                    stop_proxy
                done
            done
        done
    fi
    if has abuse; then
        for name in $TARGETS; do
            [[ $name == direct || $name == tunnel ]] && continue
            start_proxy "$name" abuse
            gen abuse "$name" plain --quiet $QUIET_S --attack $ATTACK_S
            stop_proxy
        done
    fi
    if has h2; then run_h2; fi
    if has cores && [[ " $TARGETS " == *" wsgate "* ]]; then run_cores; fi
    if has flood; then
        # A fresh proxy for each run, so RSS and CPU are the run's alone. The TLS run sends
        # the attacker to the TLS listener; the well-behaved clients stay plain.
        for name in $TARGETS; do
            [[ $name == direct || $name == tunnel ]] && continue
            wait_idle
            start_proxy "$name" abuse
            gen flood "$name" plain --quiet $FLOOD_QUIET --attack "$FLOOD_ATTACK" \
                --newcomers $FLOOD_NEWCOMERS --attack-rate "$FLOOD_RATE"
            stop_proxy
            wait_idle
            start_proxy "$name" abuse
            gen flood "$name" plain --attack-tls "127.0.0.1:${TLS_PORT[$name]}" \
                --quiet $FLOOD_QUIET --attack "$FLOOD_TLS_ATTACK" --newcomers $FLOOD_NEWCOMERS \
                --attack-rate "$FLOOD_RATE"
            stop_proxy
        done
    fi
    if has storm; then
        # A fresh proxy for each run. Variants: direct and every proxy plain; wsgate
        # queue and hc; nginx and HAProxy rate.
        for name in $TARGETS; do
            [[ $name == tunnel ]] && continue
            for v in $STORM_VARIANTS; do
                case "$name/$v" in
                    direct/plain|wsgate/plain|wsgate/queue|wsgate/queue40|wsgate/hc|wsgate/ej100|nginx/plain|nginx/rate|haproxy/plain|haproxy/rate) ;;
                    *) continue ;;
                esac
                for mode in $STORM_MODES; do
                    jitter=()
                    [[ $mode == jitter ]] && jitter=(--jitter)
                    wait_idle
                    start_proxy "$name" "storm-$v"
                    echo "  (load before the run: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
                    gen storm "$name" plain --clients "$STORM_CLIENTS" --variant "$v" \
                        --backend "127.0.0.1:$STORM_PORT" "${jitter[@]}"
                    stop_proxy
                done
            done
        done
    fi
done
elapsed=$(( $(date +%s) - started ))

{
    echo "<!-- wsgate-bench $(date -u +%Y-%m-%dT%H:%MZ), $REPEATS repeat(s), ${elapsed}s, $(nproc) cores, $(uname -r), cert $KEY, wsgate $WSGATE -->"
    "$GEN" report "$RUNS" --json "$OUT/summary.json"
} | tee "$OUT/table.md"
echo "raw runs: $RUNS; summary: $OUT/summary.json; table: $OUT/table.md" >&2
