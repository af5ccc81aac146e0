#!/usr/bin/env bash
# wsguard benchmark, in one run:
#   * closed-loop echo throughput: direct vs wsguard vs nginx, per-message rate limit
#     overhead, HMAC (wsg1) signing overhead; optionally several interleaved rounds;
#   * idle sessions: RSS per proxied session, and wsguard's CPU while holding them
#     with keepalive off, 1s/1s and 1s/0s (client/upstream ping interval).
# The report (Markdown) goes to stdout, progress to stderr.
#
# Usage: scripts/bench.sh
#
# Environment knobs (defaults in brackets):
#   CONNS [100] SIZE [64] DURATION [10] WARMUP [2]   echo throughput test
#   ROUNDS [1]          rounds over all throughput scenarios (interleaved); medians are reported
#   TP_SCENARIOS        throughput scenarios ("" = none), any of (default: all, in this order):
#                         direct wsguard nginx wsguard-msglimit direct-signed wsguard-hmac-off wsguard-hmac
#                       (not in the default list: nginx-signed wsguard-guards, and the
#                       permessage-deflate ones: direct-deflate nginx-deflate wsguard-deflate
#                       wsguard-deflate-guards direct-plain-json wsguard-plain-json)
#   PAYLOAD [binary]    binary = a fixed byte pattern in binary messages; json = JSON-like,
#                       compressible text messages of SIZE bytes varied per message (loadgen
#                       --payload json). The *-plain-json scenarios always use json.
#   IDLE_CONNS [5000] IDLE_RATE [2000]                idle tests (need ~2*IDLE_CONNS fds in wsguard)
#   IDLE_SETTLE [3]     seconds between READY and the RSS sample / the start of the CPU window
#   IDLE_BURST_SIZE [0] > 0: every IDLE_BURST_EVERY'th idle session [1] first echoes one binary
#                       message of this many bytes (READY waits for all of them), so the RSS
#                       sample shows whether the proxy's buffers went back; wsguard's
#                       max_message_size is then 2 * IDLE_BURST_SIZE
#   KA_WINDOW [30]      seconds over which CPU time is measured while the sessions are idle
#   IDLE_SCENARIOS      idle scenarios ("" = none), any of (default: all, in this order):
#                         wsguard-idle wsguard-ka-1s-1s wsguard-ka-1s-0s direct-idle
#                       (not in the default list: wsguard-deflate-idle direct-deflate-idle)
#   SKIP_BUILD [0]      1 = do not run cargo build (use existing binaries)
#   DIRECT_ONLY [0]     1 = only the scenarios that need no wsguard
#   NO_NGINX [0]        1 = skip the nginx comparison even if nginx is installed
#   LOADGEN, WSGUARD, NGINX_BIN   binary paths (default: $CARGO_TARGET_DIR/release/... or
#                       target/release/...; `nginx` in PATH)
#   LOADGEN_THREADS     worker threads for the load-generating client (default: all CPUs)
#   PIN [0]             1 = give the proxy a core of its own: loadgen and echo-server run on
#                       CPU 0 only, wsguard / nginx (1 worker) on CPU 1 only. "direct" then
#                       runs its two processes on one core, and a proxy scenario measures how
#                       much one proxy core can relay (as a sidecar with a 1-CPU limit would)
#   KEEP_TMP [0]        1 = keep the temp dir (configs, logs, JSON results) on success
#   NOISE_MAX [0.15]    throughput runs during which the rest of the machine used more than this
#                       many cores are marked "*" and left out of the median (unless all are)
#   QUIET_BELOW [0]     > 0: before each measurement wait (up to QUIET_MAX [900] s) until the
#                       machine used less than this many cores over 3 s (e.g. 0.3 on a shared box)
#
# Scenarios (all wsguard configs: per_ip null, max_connections 100000, log level warn):
#   direct            loadgen -> echo-server
#   wsguard           loadgen -> wsguard (per_connection null, keepalive 0s/0s) -> echo-server
#   nginx             loadgen -> nginx (proxy_pass, Upgrade) -> echo-server
#   wsguard-msglimit  as wsguard, per_connection: { messages: { rate: 1000000/s, burst: 1000000 } }
#   direct-signed     loadgen --sign-key-file (c1) -> echo-server --sign-key-file (p1)
#   wsguard-hmac-off  signing loadgen -> wsguard (hmac off: envelopes pass through) -> signing echo-server
#   wsguard-hmac      signing loadgen -> wsguard (hmac enforce: verify c1, re-sign p1; verify p1,
#                     re-sign c1) -> signing echo-server
#   nginx-signed      signing loadgen -> nginx -> signing echo-server (the reference for wsguard-guards)
#   wsguard-guards    all guards on: signing loadgen (Origin header, HS256 JWT in Authorization)
#                     -> wsguard (origin enforce, jwt enforce HS256, hmac enforce both ways,
#                     per_ip + per_connection message and byte limits that never trigger,
#                     keepalive 1s/1s) -> signing echo-server
#   wsguard-idle      IDLE_CONNS idle sessions through wsguard, keepalive 0s/0s
#   wsguard-ka-1s-1s  same, keepalive { interval: 1s, upstream_interval: 1s }
#   wsguard-ka-1s-0s  same, keepalive { interval: 1s, upstream_interval: 0s }
#   wsguard-ka-I-U    any other pair, e.g. wsguard-ka-25s-25s (the defaults), wsguard-ka-500ms-0s
#   direct-idle       IDLE_CONNS idle sessions straight to an echo-server
#
# permessage-deflate (loadgen echo/idle --deflate and echo-server --deflate, both offering /
# answering no context takeover, window 15; wsguard with `compression: {mode: on}`, i.e.
# context_takeover false, max_window_bits 15):
#   direct-deflate    deflate loadgen -> deflate echo-server
#   nginx-deflate     deflate loadgen -> nginx (passes Sec-WebSocket-Extensions through)
#                     -> deflate echo-server
#   wsguard-deflate   deflate loadgen -> wsguard (as wsguard, compression on: both hops
#                     compressed) -> deflate echo-server
#   wsguard-deflate-guards  as wsguard-guards with compression on, deflate loadgen and
#                     signing deflate echo-server: HMAC makes wsguard inflate, verify, re-sign
#                     and re-deflate every message on both hops
#   direct-plain-json / wsguard-plain-json  as direct / wsguard with --payload json (no
#                     compression): the uncompressed reference for the wire bytes and CPU
#   wsguard-deflate-idle  IDLE_CONNS idle sessions through wsguard (keepalive 0s/0s,
#                     compression on) with compression negotiated on both hops
#   direct-deflate-idle   IDLE_CONNS idle deflate sessions straight to a deflate echo-server
# The throughput table's "wire B per echo" is the loadgen's socket bytes (both directions:
# frame headers and payloads as sent, compressed or not) per echo during the echo loop;
# "payload B per echo" the message bytes (both directions) per echo.
#
# CPU figures come from /proc/PID/stat (utime+stime) and /proc/stat, sampled by this
# script; "other" is whole-machine busy CPU minus the processes of the scenario, i.e.
# noise from anything else running on the machine (and unattributed kernel work).
#
# Every process this script starts is tracked by PID and stopped by PID on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CONNS="${CONNS:-100}"
SIZE="${SIZE:-64}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
PAYLOAD="${PAYLOAD:-binary}"
case "$PAYLOAD" in binary | json) ;; *)
    echo "PAYLOAD must be binary or json" >&2
    exit 2
    ;;
esac
ROUNDS="${ROUNDS:-1}"
TP_SCENARIOS="${TP_SCENARIOS-direct wsguard nginx wsguard-msglimit direct-signed wsguard-hmac-off wsguard-hmac}"
IDLE_CONNS="${IDLE_CONNS:-5000}"
IDLE_RATE="${IDLE_RATE:-2000}"
IDLE_SETTLE="${IDLE_SETTLE:-3}"
IDLE_BURST_SIZE="${IDLE_BURST_SIZE:-0}"
IDLE_BURST_EVERY="${IDLE_BURST_EVERY:-1}"
KA_WINDOW="${KA_WINDOW:-30}"
IDLE_SCENARIOS="${IDLE_SCENARIOS-wsguard-idle wsguard-ka-1s-1s wsguard-ka-1s-0s direct-idle}"
SKIP_BUILD="${SKIP_BUILD:-0}"
DIRECT_ONLY="${DIRECT_ONLY:-0}"
NO_NGINX="${NO_NGINX:-0}"
KEEP_TMP="${KEEP_TMP:-0}"
QUIET_BELOW="${QUIET_BELOW:-0}"
NOISE_MAX="${NOISE_MAX:-0.15}"
QUIET_MAX="${QUIET_MAX:-900}"
# cargo resolves a relative CARGO_TARGET_DIR against the directory it runs in ($ROOT here).
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
LOADGEN="${LOADGEN:-$TARGET_DIR/release/examples/loadgen}"
WSGUARD="${WSGUARD:-$TARGET_DIR/release/wsguard}"
NGINX_BIN="${NGINX_BIN:-$(command -v nginx 2>/dev/null || true)}"
LOADGEN_THREADS="${LOADGEN_THREADS:-}"
PIN="${PIN:-0}"
PIN_ENDS=()
PIN_PROXY=()
if [[ "$PIN" == 1 ]]; then
    command -v taskset >/dev/null || { echo "PIN=1 needs taskset" >&2; exit 1; }
    PIN_ENDS=(taskset -c 0)
    PIN_PROXY=(taskset -c 1)
fi

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for tool in python3 curl timeout getconf pgrep; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
CLK_TCK="$(getconf CLK_TCK)"

if [[ "$DIRECT_ONLY" == 1 ]]; then
    TP_SCENARIOS="$(for s in $TP_SCENARIOS; do [[ $s == wsguard* ]] || echo "$s"; done | xargs)"
    IDLE_SCENARIOS="$(for s in $IDLE_SCENARIOS; do [[ $s == wsguard* ]] || echo "$s"; done | xargs)"
fi
if [[ "$NO_NGINX" == 1 || -z "$NGINX_BIN" || ! -x "$NGINX_BIN" ]]; then
    [[ " $TP_SCENARIOS " == *" nginx"* ]] && log "nginx not installed (or NO_NGINX=1): skipping nginx"
    TP_SCENARIOS="$(for s in $TP_SCENARIOS; do [[ $s == nginx* ]] || echo "$s"; done | xargs)"
fi

# --- file descriptors -------------------------------------------------------
# Every idle session through wsguard costs it two fds (client + upstream side).
if ! ulimit -n 65536 2>/dev/null; then
    hard="$(ulimit -Hn)"
    ulimit -n "$hard" 2>/dev/null || true
    log "could not raise fd limit to 65536 (hard limit $hard); using $(ulimit -n)"
fi
need_fds=$((IDLE_CONNS * 2 + 64))
if [[ -n "$IDLE_SCENARIOS" && "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt "$need_fds" ]]; then
    die "fd limit $(ulimit -n) too low for IDLE_CONNS=$IDLE_CONNS (wsguard needs ~$need_fds)"
fi

# --- process bookkeeping ----------------------------------------------------
TMP="$(mktemp -d /tmp/wsguard-bench.XXXXXX)"
PIDS=()
LAST_PID=""

stop_pid() { # stop_pid PID: TERM, wait up to 5 s, then KILL; forget the PID
    local pid="$1" i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

forget_pid() {
    local keep=() p
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
        [[ "$p" == "$1" ]] || keep+=("$p")
    done
    PIDS=(${keep[@]+"${keep[@]}"})
}

cleanup() {
    local rc=$? p
    trap - EXIT
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
        stop_pid "$p"
    done
    if [[ $rc -ne 0 || "$KEEP_TMP" == 1 ]]; then
        log "logs and configs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_bg_split() { # start_bg_split OUTFILE ERRFILE CMD...
    local outf="$1" errf="$2"
    shift 2
    "$@" >"$outf" 2>"$errf" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_for_line() { # wait_for_line FILE ERE TIMEOUT_S PID -> prints the first matching line
    local file="$1" re="$2" tmo="$3" pid="$4" i line
    for ((i = 0; i < tmo * 10; i++)); do
        line="$(grep -E -m1 "$re" "$file" 2>/dev/null || true)"
        if [[ -n "$line" ]]; then
            printf '%s\n' "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || {
            log "process $pid exited while waiting for /$re/ in $file:"
            tail -n 20 "$file" >&2 || true
            return 1
        }
        sleep 0.1
    done
    log "timeout (${tmo}s) waiting for /$re/ in $file"
    tail -n 20 "$file" >&2 || true
    return 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# cpu_snapshot PID...: "<epoch s> <busy ticks, all CPUs> <ticks of PID1> <ticks of PID2> ..."
# (ticks = utime+stime from /proc/PID/stat; -1 for a PID that is gone). Pure bash, so
# it is quick and its timing does not depend on how loaded the machine is.
cpu_snapshot() {
    local t="$EPOCHREALTIME" f g s pid out
    read -r -a f </proc/stat # cpu user nice system idle iowait irq softirq steal
    out="$t $((f[1] + f[2] + f[3] + f[6] + f[7] + f[8]))"
    for pid in "$@"; do
        if [[ "$pid" =~ ^[0-9]+$ && "$pid" != 0 ]] && s="$(<"/proc/$pid/stat")" 2>/dev/null; then
            read -r -a g <<<"${s##*) }"
            out+=" $((g[11] + g[12]))"
        else
            out+=" -1"
        fi
    done
    echo "$out"
}

# ctx_switches PID: context switches (voluntary + involuntary) of all its threads so far
ctx_switches() {
    local c=0 k v f
    for f in /proc/"$1"/task/*/status; do
        while read -r k v; do
            case "$k" in
            voluntary_ctxt_switches: | nonvoluntary_ctxt_switches:) c=$((c + v)) ;;
            esac
        done <"$f" 2>/dev/null || true
    done
    echo "$c"
}

# wait_quiet: with QUIET_BELOW > 0, wait until the whole machine used fewer than
# QUIET_BELOW cores over 3 s (other people's builds), at most QUIET_MAX s.
wait_quiet() {
    [[ "$QUIET_BELOW" != 0 ]] || return 0
    local a b busy start=$SECONDS said=0
    while :; do
        read -r -a a </proc/stat
        sleep 3
        read -r -a b </proc/stat
        busy="$(awk -v x=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8]))) \
            -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", x / hz / 3 }')"
        awk -v x="$busy" -v q="$QUIET_BELOW" 'BEGIN { exit !(x < q) }' && return 0
        if ((SECONDS - start >= QUIET_MAX)); then
            log "machine still busy ($busy cores) after ${QUIET_MAX}s; measuring anyway"
            return 0
        fi
        if [[ $said == 0 ]]; then
            log "waiting for the machine to go quiet (busy $busy cores >= $QUIET_BELOW)"
            said=1
        fi
    done
}

# sleep_until EPOCH_S: sleep until that wall-clock time (no-op if it has passed)
sleep_until() {
    local d
    d="$(awk -v t="$1" -v n="$EPOCHREALTIME" 'BEGIN { d = t - n; printf "%.3f", (d > 0 ? d : 0) }')"
    sleep "$d"
}

# cpu_delta HZ SNAP_A SNAP_B SCALE: per-field usage between two snapshots, as
# (ticks/HZ/seconds)*SCALE, "-" where a PID was missing; first field is the interval
cpu_delta() {
    python3 - "$@" <<'PY'
import sys
hz = float(sys.argv[1]); scale = float(sys.argv[4])
a = [float(x) for x in sys.argv[2].split()]
b = [float(x) for x in sys.argv[3].split()]
dt = b[0] - a[0]
out = ["%.2f" % dt]
for x, y in zip(a[1:], b[1:]):
    out.append("-" if x < 0 or y < 0 else "%.2f" % ((y - x) / hz / dt * scale))
print(" ".join(out))
PY
}

free_ports() { # free_ports N: N distinct currently-free loopback ports
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

json_field() { # json_field FILE KEY...: prints the fields (space separated) of the last JSON line
    python3 - "$@" <<'PY'
import json, sys
path, keys = sys.argv[1], sys.argv[2:]
obj = None
try:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    pass
except OSError:
    pass
if obj is None:
    print(" ".join("-" for _ in keys))
else:
    out = []
    for k in keys:
        v = obj.get(k)
        if v is None:
            out.append("-")
        elif isinstance(v, float):
            out.append("%.0f" % v)
        elif isinstance(v, (dict, list)):
            out.append(json.dumps(v, separators=(",", ":")))
        else:
            out.append(str(v))
    print(" ".join(out))
PY
}

calc() { python3 -c "import sys; print(eval(sys.argv[1]))" "$1"; }

LG_THREADS=()
[[ -n "$LOADGEN_THREADS" ]] && LG_THREADS=(--threads "$LOADGEN_THREADS")

# --- build ------------------------------------------------------------------
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building (cargo build --release --examples --bins) in $ROOT, target dir $TARGET_DIR"
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --examples --bins)
fi
[[ -x "$LOADGEN" ]] || die "loadgen binary not found: $LOADGEN"
if [[ "$TP_SCENARIOS $IDLE_SCENARIOS" == *wsguard* ]]; then
    [[ -x "$WSGUARD" ]] || die "wsguard binary not found: $WSGUARD"
fi

log "temp dir: $TMP; fd limit $(ulimit -n); $(nproc) CPUs; loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
log "throughput: [$TP_SCENARIOS] x $ROUNDS round(s); idle: [$IDLE_SCENARIOS]"

# --- HMAC keys (base64 of 32 random bytes) -------------------------------------
python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >"$TMP/client.key"
python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())' >"$TMP/upstream.key"
chmod 600 "$TMP/client.key" "$TMP/upstream.key"

# --- JWT (HS256) for wsguard-guards: a secret file and one token valid for a day ---------
python3 -c 'import os; print(os.urandom(32).hex())' >"$TMP/jwt.secret"
chmod 600 "$TMP/jwt.secret"
JWT_TOKEN="$(python3 - "$TMP/jwt.secret" <<'PY'
import base64, hashlib, hmac, json, sys, time
secret = open(sys.argv[1]).read().strip().encode()
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400}).encode())
sig = b64(hmac.new(secret, (head + "." + body).encode(), hashlib.sha256).digest())
print(head + "." + body + "." + sig)
PY
)"
GUARD_ORIGIN="https://app.bench.example"

# --- backends -------------------------------------------------------------------
start_echo_server() { # start_echo_server NAME [EXTRA ARGS...] -> sets ECHO_PID / ECHO_PORT
    local name="$1" line
    shift
    start_bg_split "$TMP/$name.out" "$TMP/$name.err" ${PIN_ENDS[@]+"${PIN_ENDS[@]}"} "$LOADGEN" echo-server --listen 127.0.0.1:0 "$@"
    ECHO_PID="$LAST_PID"
    line="$(wait_for_line "$TMP/$name.out" '^LISTENING ' 10 "$ECHO_PID")" || die "$name did not start"
    ECHO_PORT="${line##*:}"
    log "$name listening on 127.0.0.1:$ECHO_PORT (pid $ECHO_PID)"
}

# --- wsguard ----------------------------------------------------------------------
# start_wsguard NAME BACKEND_PORT PER_CONNECTION KA_INTERVAL KA_UPSTREAM HMAC_MODE(none|off|enforce)
# -> sets WSG_PID / WSG_PORT / WSG_ADMIN
start_wsguard() {
    local name="$1" bport="$2" perconn="$3" ki="$4" ku="$5" hmode="$6" cfg i ready=0
    cfg="$TMP/wsguard-$name.yaml"
    read -r WSG_PORT WSG_ADMIN <<<"$(free_ports 2)"
    cat >"$cfg" <<EOF
listen: "127.0.0.1:$WSG_PORT"
admin:
  listen: "127.0.0.1:$WSG_ADMIN"
log:
  level: warn
upstream:
  url: "ws://127.0.0.1:$bport"
limits:
  per_ip: null
  per_connection: $perconn
  max_connections: 100000${WSG_EXTRA_LIMITS:-}
keepalive:
  interval: $ki
  upstream_interval: $ku
EOF
    if [[ "${GUARDS:-0}" == 1 ]]; then
        # all guards on: replace the limits and keepalive written above
        sed -i '/^limits:$/,$d' "$cfg"
        cat >>"$cfg" <<EOF
limits:
  per_ip: { handshakes: { rate: 10000/s, burst: 10000 }, connections: 100000, pending_handshakes: 1000 }
  per_subject: { connections: 100000, messages: { rate: 1000000/s, burst: 1000000 } }
  per_connection:
    messages: { rate: 1000000/s, burst: 1000000 }
    bytes: { rate: 1GiB/s, burst: 1GiB }
  max_connections: 100000
keepalive:
  interval: 1s
  upstream_interval: 1s
origin:
  mode: enforce
  allow: ["$GUARD_ORIGIN"]
jwt:
  mode: enforce
  algorithms: [HS256]
  keys: [{ secret_file: "$TMP/jwt.secret" }]
EOF
    fi
    if [[ "$hmode" != none ]]; then
        cat >>"$cfg" <<EOF
hmac:
  mode: $hmode
  client_keys: [{ id: c1, secret_file: "$TMP/client.key" }]
  upstream_key: { id: p1, secret_file: "$TMP/upstream.key" }
EOF
    fi
    if [[ "${WSG_COMPRESSION:-0}" == 1 ]]; then
        printf 'compression:\n  mode: on\n' >>"$cfg"
    fi
    start_bg_split "$TMP/wsguard-$name.out" "$TMP/wsguard-$name.log" ${PIN_PROXY[@]+"${PIN_PROXY[@]}"} "$WSGUARD" run -c "$cfg"
    WSG_PID="$LAST_PID"
    for ((i = 0; i < 150; i++)); do
        if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$WSG_ADMIN/readyz" 2>/dev/null; then
            ready=1
            break
        fi
        if ! kill -0 "$WSG_PID" 2>/dev/null; then
            tail -n 30 "$TMP/wsguard-$name.out" "$TMP/wsguard-$name.log" >&2 || true
            die "wsguard ($name) exited during startup"
        fi
        sleep 0.1
    done
    if [[ $ready != 1 ]]; then
        tail -n 30 "$TMP/wsguard-$name.log" >&2 || true
        die "wsguard ($name) /readyz did not return 200 within 15 s"
    fi
    log "wsguard[$name] ready on 127.0.0.1:$WSG_PORT (admin $WSG_ADMIN, pid $WSG_PID)"
}

# --- nginx ------------------------------------------------------------------------
# start_nginx BACKEND_PORT -> sets NGINX_PID (master) / NGINX_PORT; returns 1 if it cannot start
start_nginx() {
    local bport="$1" i
    NGX="$TMP/nginx"
    NGINX_PORT="$(free_ports 1)"
    rm -rf "$NGX"
    mkdir -p "$NGX/logs"
    local user_line=""
    # Run as root, nginx would switch its workers to its compiled-in user; stay root instead.
    [[ "$(id -u)" == 0 ]] && user_line="user root;"
    cat >"$NGX/nginx.conf" <<EOF
$user_line
$([[ "$PIN" == 1 ]] && printf 'worker_processes 1;\nworker_cpu_affinity 10;' || echo 'worker_processes auto;')
daemon on;
pid $NGX/nginx.pid;
error_log $NGX/logs/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $NGX/client_body;
    proxy_temp_path $NGX/proxy;
    fastcgi_temp_path $NGX/fastcgi;
    uwsgi_temp_path $NGX/uwsgi;
    scgi_temp_path $NGX/scgi;
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      close;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://127.0.0.1:$bport;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            tcp_nodelay on;
        }
    }
}
EOF
    NGX_E=()
    # -e (startup error log) exists since nginx 1.19.5; avoids touching the compiled-in log path.
    "$NGINX_BIN" -h 2>&1 | grep -q -- '-e filename' && NGX_E=(-e "$NGX/logs/error.log")
    if ! "$NGINX_BIN" -t -q -c "$NGX/nginx.conf" -p "$NGX/" ${NGX_E[@]+"${NGX_E[@]}"} >"$NGX/logs/start.log" 2>&1 ||
        ! "$NGINX_BIN" -c "$NGX/nginx.conf" -p "$NGX/" ${NGX_E[@]+"${NGX_E[@]}"} >>"$NGX/logs/start.log" 2>&1; then
        log "nginx failed to start; skipping:"
        cat "$NGX/logs/start.log" >&2 || true
        return 1
    fi
    NGINX_PID=""
    for ((i = 0; i < 50; i++)); do
        if [[ -s "$NGX/nginx.pid" ]]; then
            NGINX_PID="$(tr -d '[:space:]' <"$NGX/nginx.pid")"
            break
        fi
        sleep 0.1
    done
    if [[ -z "$NGINX_PID" ]]; then
        log "nginx did not write its pid file; skipping (see $NGX/logs)"
        return 1
    fi
    PIDS+=("$NGINX_PID")
    sleep 0.3
    log "nginx master pid $NGINX_PID (workers: $(pgrep -P "$NGINX_PID" | xargs)) on 127.0.0.1:$NGINX_PORT"
}

# ================================================================================
# throughput
# ================================================================================
declare -A TP_RATE TP_P50 TP_P99 TP_ERR TP_LG TP_PROXY TP_BACK TP_OTHER TP_WIRE TP_PAYB TP_DEFL
declare -A BASE=(
    [direct]=""
    [wsguard]=direct
    [nginx]=direct
    [wsguard-msglimit]=wsguard
    [direct-signed]=direct
    [wsguard-hmac-off]=direct-signed
    [wsguard-hmac]=wsguard-hmac-off
    [nginx-signed]=direct-signed
    [wsguard-guards]=nginx-signed
    [direct-plain-json]=""
    [wsguard-plain-json]=direct-plain-json
    [direct-deflate]=direct-plain-json
    [nginx-deflate]=direct-deflate
    [wsguard-deflate]=direct-deflate
    [wsguard-deflate-guards]=wsguard-deflate
)
# Extra loadgen echo arguments of the next run_echo (--deflate), and its payload if not $PAYLOAD.
LG_EXTRA=()
LG_PAYLOAD=

# run_echo KEY URL SIGN(0|1) PROXY_PIDS BACKEND_PID
run_echo() {
    local key="$1" url="$2" sign="$3" proxy_pids="$4" bpid="$5" rc=0 lpid lg a b
    local sign_args=()
    [[ "$sign" == 1 ]] && sign_args=(--sign-key-file "$TMP/client.key" --kid c1)
    [[ "${GUARDS:-0}" == 1 ]] && sign_args+=(--header "Origin: $GUARD_ORIGIN" --header "Authorization: Bearer $JWT_TOKEN")
    wait_quiet
    log "echo[$key]: $CONNS conns x $SIZE B, ${WARMUP}s warmup + ${DURATION}s via $url$([[ $sign == 1 ]] && echo ' (signed)') (payload ${LG_PAYLOAD:-$PAYLOAD}${LG_EXTRA[*]+ ${LG_EXTRA[*]}})"
    timeout $((DURATION + WARMUP + 120)) ${PIN_ENDS[@]+"${PIN_ENDS[@]}"} "$LOADGEN" ${LG_THREADS[@]+"${LG_THREADS[@]}"} echo --url "$url" \
        --conns "$CONNS" --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --label "$key" \
        --payload "${LG_PAYLOAD:-$PAYLOAD}" ${sign_args[@]+"${sign_args[@]}"} ${LG_EXTRA[@]+"${LG_EXTRA[@]}"} \
        >"$TMP/echo-$key.json" 2>"$TMP/echo-$key.err" &
    lpid=$!
    PIDS+=("$lpid")
    # CPU window: from 1 s after the warmup (connecting takes well under a second) to
    # 0.5 s before the measurement would end if connecting took no time at all.
    t0="$EPOCHREALTIME"
    sleep_until "$(awk -v t="$t0" -v w="$WARMUP" 'BEGIN { printf "%.3f", t + w + 1 }')"
    lg="$(pgrep -P "$lpid" -x loadgen | head -n1 || true)"
    # shellcheck disable=SC2086
    a="$(cpu_snapshot "${lg:-0}" "$bpid" $proxy_pids)"
    sleep_until "$(awk -v t="$t0" -v w="$WARMUP" -v d="$DURATION" 'BEGIN { printf "%.3f", t + w + d - 0.5 }')"
    # shellcheck disable=SC2086
    b="$(cpu_snapshot "${lg:-0}" "$bpid" $proxy_pids)"
    wait "$lpid" || rc=$?
    forget_pid "$lpid"
    cat "$TMP/echo-$key.err" >&2 || true
    [[ $rc -eq 0 ]] || log "echo[$key]: loadgen exited with status $rc"
    read -r TP_RATE[$key] TP_P50[$key] TP_P99[$key] TP_ERR[$key] TP_WIRE[$key] TP_PAYB[$key] TP_DEFL[$key] \
        <<<"$(json_field "$TMP/echo-$key.json" msgs_per_sec p50_us p99_us errors wire_bytes_per_msg payload_bytes_per_msg deflate_conns)"
    # cores used over the window: loadgen, proxy (sum of its processes), backend, everything else
    read -r TP_LG[$key] TP_BACK[$key] TP_PROXY[$key] TP_OTHER[$key] <<<"$(python3 - "$(cpu_delta "$CLK_TCK" "$a" "$b" 1)" <<'PY'
import sys
v = sys.argv[1].split()[1:]  # busy, loadgen, backend, proxy processes...
if "-" in v:
    print("- - - -")
else:
    busy, lg, back = float(v[0]), float(v[1]), float(v[2])
    proxy = sum(float(x) for x in v[3:])
    print("%.2f %.2f %.2f %.2f" % (lg, back, proxy, max(busy - lg - back - proxy, 0.0)))
PY
)"
    log "echo[$key]: cores used: loadgen ${TP_LG[$key]}, proxy ${TP_PROXY[$key]}, backend ${TP_BACK[$key]}, other ${TP_OTHER[$key]}"
    sleep 1
}

TP_ROUNDS_DONE=0
if [[ -n "$TP_SCENARIOS" ]]; then
    start_echo_server echo-plain
    PLAIN_PID="$ECHO_PID"
    PLAIN_PORT="$ECHO_PORT"
    start_echo_server echo-signed --sign-key-file "$TMP/upstream.key" --kid p1
    SIGNED_PID="$ECHO_PID"
    SIGNED_PORT="$ECHO_PORT"
    DEFL_PID="" DEFL_PORT="" DEFL_SIGNED_PID="" DEFL_SIGNED_PORT=""
    if [[ " $TP_SCENARIOS " =~ \ (direct|nginx|wsguard)-deflate\  ]]; then
        start_echo_server echo-deflate --deflate
        DEFL_PID="$ECHO_PID"
        DEFL_PORT="$ECHO_PORT"
    fi
    if [[ " $TP_SCENARIOS " == *" wsguard-deflate-guards "* ]]; then
        start_echo_server echo-deflate-signed --deflate --sign-key-file "$TMP/upstream.key" --kid p1
        DEFL_SIGNED_PID="$ECHO_PID"
        DEFL_SIGNED_PORT="$ECHO_PORT"
    fi
    sleep 1
    for ((round = 1; round <= ROUNDS; round++)); do
        log "=== throughput round $round/$ROUNDS"
        for s in $TP_SCENARIOS; do
            k="$s:$round"
            LG_EXTRA=() LG_PAYLOAD=""
            case "$s" in
            direct) run_echo "$k" "ws://127.0.0.1:$PLAIN_PORT/" 0 "" "$PLAIN_PID" ;;
            direct-plain-json)
                LG_PAYLOAD=json
                run_echo "$k" "ws://127.0.0.1:$PLAIN_PORT/" 0 "" "$PLAIN_PID"
                ;;
            direct-deflate)
                LG_EXTRA=(--deflate)
                run_echo "$k" "ws://127.0.0.1:$DEFL_PORT/" 0 "" "$DEFL_PID"
                ;;
            nginx-deflate)
                LG_EXTRA=(--deflate)
                if start_nginx "$DEFL_PORT"; then
                    run_echo "$k" "ws://127.0.0.1:$NGINX_PORT/" 0 "$NGINX_PID $(pgrep -P "$NGINX_PID" | xargs)" "$DEFL_PID"
                    stop_pid "$NGINX_PID"
                fi
                ;;
            wsguard-deflate | wsguard-deflate-guards | wsguard-plain-json)
                bport="$DEFL_PORT" bpid="$DEFL_PID" sign=0 hmode=none WSG_COMPRESSION=1 LG_EXTRA=(--deflate)
                case "$s" in
                wsguard-deflate-guards) bport="$DEFL_SIGNED_PORT" bpid="$DEFL_SIGNED_PID" sign=1 hmode=enforce GUARDS=1 ;;
                wsguard-plain-json) bport="$PLAIN_PORT" bpid="$PLAIN_PID" WSG_COMPRESSION=0 LG_EXTRA=() LG_PAYLOAD=json ;;
                esac
                start_wsguard "$s-$round" "$bport" null 0s 0s "$hmode"
                run_echo "$k" "ws://127.0.0.1:$WSG_PORT/" "$sign" "$WSG_PID" "$bpid"
                kill -0 "$WSG_PID" 2>/dev/null || die "wsguard died during $k (see $TMP/wsguard-$s-$round.log)"
                curl -fsS "http://127.0.0.1:$WSG_ADMIN/metrics" 2>/dev/null |
                    grep -E '^wsguard_(signature_failures|messages|bytes|wire_bytes|compress)' >"$TMP/metrics-$s-$round.txt" || true
                stop_pid "$WSG_PID"
                GUARDS=0 WSG_COMPRESSION=0
                ;;
            direct-signed) run_echo "$k" "ws://127.0.0.1:$SIGNED_PORT/" 1 "" "$SIGNED_PID" ;;
            wsguard | wsguard-msglimit | wsguard-hmac-off | wsguard-hmac | wsguard-guards)
                bport="$PLAIN_PORT" bpid="$PLAIN_PID" sign=0 perconn=null hmode=none
                case "$s" in
                wsguard-guards) bport="$SIGNED_PORT" bpid="$SIGNED_PID" sign=1 hmode=enforce GUARDS=1 ;;
                wsguard-msglimit) perconn="{ messages: { rate: 1000000/s, burst: 1000000 } }" ;;
                wsguard-hmac-off) bport="$SIGNED_PORT" bpid="$SIGNED_PID" sign=1 ;;
                wsguard-hmac) bport="$SIGNED_PORT" bpid="$SIGNED_PID" sign=1 hmode=enforce ;;
                esac
                start_wsguard "$s-$round" "$bport" "$perconn" 0s 0s "$hmode"
                run_echo "$k" "ws://127.0.0.1:$WSG_PORT/" "$sign" "$WSG_PID" "$bpid"
                kill -0 "$WSG_PID" 2>/dev/null || die "wsguard died during $k (see $TMP/wsguard-$s-$round.log)"
                if [[ "$hmode" == enforce ]]; then
                    curl -fsS "http://127.0.0.1:$WSG_ADMIN/metrics" 2>/dev/null |
                        grep -E '^wsguard_(signature_failures|messages)' >"$TMP/metrics-$s-$round.txt" || true
                fi
                stop_pid "$WSG_PID"
                GUARDS=0
                ;;
            nginx-signed)
                if start_nginx "$SIGNED_PORT"; then
                    run_echo "$k" "ws://127.0.0.1:$NGINX_PORT/" 1 "$NGINX_PID $(pgrep -P "$NGINX_PID" | xargs)" "$SIGNED_PID"
                    stop_pid "$NGINX_PID"
                fi
                ;;
            nginx)
                if start_nginx "$PLAIN_PORT"; then
                    run_echo "$k" "ws://127.0.0.1:$NGINX_PORT/" 0 "$NGINX_PID $(pgrep -P "$NGINX_PID" | xargs)" "$PLAIN_PID"
                    stop_pid "$NGINX_PID"
                fi
                ;;
            *) die "unknown throughput scenario $s" ;;
            esac
        done
        TP_ROUNDS_DONE=$round
    done
    stop_pid "$SIGNED_PID"
    stop_pid "$PLAIN_PID"
    [[ -z "$DEFL_PID" ]] || stop_pid "$DEFL_PID"
    [[ -z "$DEFL_SIGNED_PID" ]] || stop_pid "$DEFL_SIGNED_PID"
    LG_EXTRA=() LG_PAYLOAD=""
fi

# ================================================================================
# idle sessions: memory and keepalive CPU
# ================================================================================
declare -A ID_BURSTS ID_CSW ID_OPEN ID_END ID_FAIL ID_DROP ID_PINGS ID_RSS0 ID_RSS1 ID_BRSS0 ID_BRSS1 ID_CLRSS ID_CPU ID_BCPU ID_LCPU ID_OTHER ID_WIN ID_RTT

# run_idle NAME URL MEASURED_PID(proxy or backend) BACKEND_PID
run_idle() {
    local name="$1" url="$2" mpid="$3" bpid="$4" line pid lg rc=0 a b hold
    hold="$(calc "$IDLE_SETTLE + $KA_WINDOW + 2")"
    wait_quiet
    ID_RSS0[$name]="$(rss_kib "$mpid")"
    ID_BRSS0[$name]="$(rss_kib "$bpid")"
    log "idle[$name]: $IDLE_CONNS conns at $IDLE_RATE/s to $url, then ${IDLE_SETTLE}s settle + ${KA_WINDOW}s CPU window"
    start_bg_split "$TMP/idle-$name.out" "$TMP/idle-$name.err" \
        timeout "$(calc "int($IDLE_CONNS / $IDLE_RATE + $hold + 90)")" \
        "$LOADGEN" ${LG_THREADS[@]+"${LG_THREADS[@]}"} idle --url "$url" --conns "$IDLE_CONNS" \
        --hold "$hold" --rate "$IDLE_RATE" --label "$name" \
        --burst-size "$IDLE_BURST_SIZE" --burst-every "$IDLE_BURST_EVERY" ${IDLE_EXTRA[@]+"${IDLE_EXTRA[@]}"}
    pid="$LAST_PID"
    if ! line="$(wait_for_line "$TMP/idle-$name.out" '^READY ' $((IDLE_CONNS / IDLE_RATE + 60)) "$pid")"; then
        stop_pid "$pid"
        cat "$TMP/idle-$name.err" >&2 || true
        return 1
    fi
    ID_OPEN[$name]="${line#READY }"
    sleep "$IDLE_SETTLE"
    lg="$(pgrep -P "$pid" -x loadgen | head -n1 || true)"
    ID_RSS1[$name]="$(rss_kib "$mpid")"
    ID_BRSS1[$name]="$(rss_kib "$bpid")"
    ID_CLRSS[$name]="$(rss_kib "${lg:-0}")"
    log "idle[$name]: READY ${ID_OPEN[$name]}; RSS ${ID_RSS0[$name]} -> ${ID_RSS1[$name]} KiB; CPU window ${KA_WINDOW}s"
    local c0 c1
    c0="$(ctx_switches "$mpid")"
    a="$(cpu_snapshot "$mpid" "$bpid" "${lg:-0}")"
    sleep "$KA_WINDOW"
    b="$(cpu_snapshot "$mpid" "$bpid" "${lg:-0}")"
    c1="$(ctx_switches "$mpid")"
    ID_CSW[$name]="$(awk -v a="$c0" -v b="$c1" -v t="$KA_WINDOW" 'BEGIN { printf "%.0f", (b - a) / t }')"
    log "idle[$name]: cpu snapshots (t busy measured backend loadgen): [$a] [$b]"
    read -r ID_WIN[$name] ID_CPU[$name] ID_BCPU[$name] ID_LCPU[$name] ID_OTHER[$name] <<<"$(python3 - "$(cpu_delta "$CLK_TCK" "$a" "$b" 100)" "$mpid" "$bpid" <<'PY'
import sys
v = sys.argv[1].split()  # interval, busy, measured, backend, loadgen (% of one core)
same = sys.argv[2] == sys.argv[3]
if "-" in v:
    print(v[0], " ".join(v[2:5]), "-")
else:
    dt, busy, m, back, lg = (float(x) for x in v)
    ours = m + lg + (0 if same else back)
    print("%.2f %.2f %.2f %.2f %.2f" % (dt, m, back, lg, max(busy - ours, 0.0)))
PY
)"
    ID_RTT[$name]="-"
    if [[ "$mpid" != "$bpid" ]]; then
        ID_RTT[$name]="$(curl -fsS "http://127.0.0.1:$WSG_ADMIN/metrics" 2>/dev/null |
            awk '/^wsguard_ping_rtt_seconds_count/ {s += $NF} END {print s + 0}')"
    fi
    log "idle[$name]: %CPU over ${ID_WIN[$name]}s: measured ${ID_CPU[$name]}, backend ${ID_BCPU[$name]}, loadgen ${ID_LCPU[$name]}, other ${ID_OTHER[$name]}; measured process: ${ID_CSW[$name]} context switches/s"
    wait "$pid" || rc=$?
    forget_pid "$pid"
    grep -v '^idle: attempted=' "$TMP/idle-$name.err" >&2 || true
    read -r ID_END[$name] ID_FAIL[$name] ID_DROP[$name] ID_PINGS[$name] ID_BURSTS[$name] \
        <<<"$(json_field "$TMP/idle-$name.out" open_at_end failed dropped pings_received bursts)"
    [[ $rc -eq 0 ]] || log "idle[$name]: loadgen exited with status $rc"
    return 0
}

IDLE_DONE=()
IDLE_EXTRA=()
for s in $IDLE_SCENARIOS; do
    IDLE_EXTRA=()
    if [[ "$s" == *-deflate-idle ]]; then
        # permessage-deflate negotiated on every hop (client, and wsguard's backend hop)
        start_echo_server "echo-$s" --deflate
        IDLE_EXTRA=(--deflate)
    else
        start_echo_server "echo-$s"
    fi
    bpid="$ECHO_PID" bport="$ECHO_PORT"
    case "$s" in
    direct-idle | direct-deflate-idle)
        sleep 1
        run_idle "$s" "ws://127.0.0.1:$bport/" "$bpid" "$bpid" && IDLE_DONE+=("$s")
        ;;
    wsguard-deflate-idle)
        WSG_COMPRESSION=1
        start_wsguard "$s" "$bport" null 0s 0s none
        WSG_COMPRESSION=0
        sleep 1
        run_idle "$s" "ws://127.0.0.1:$WSG_PORT/" "$WSG_PID" "$bpid" && IDLE_DONE+=("$s")
        kill -0 "$WSG_PID" 2>/dev/null || die "wsguard died during idle test $s (see $TMP/wsguard-$s.log)"
        curl -fsS "http://127.0.0.1:$WSG_ADMIN/metrics" 2>/dev/null | grep -E '^wsguard_compress' >"$TMP/metrics-$s.txt" || true
        stop_pid "$WSG_PID"
        ;;
    wsguard-idle | wsguard-ka-*-*)
        ki=0s ku=0s
        if [[ "$s" =~ ^wsguard-ka-([0-9]+m?s)-([0-9]+m?s)$ ]]; then
            ki="${BASH_REMATCH[1]}" ku="${BASH_REMATCH[2]}"
        elif [[ "$s" != wsguard-idle ]]; then
            die "bad idle scenario $s (expected wsguard-ka-<interval>-<upstream_interval>, e.g. wsguard-ka-25s-0s)"
        fi
        WSG_EXTRA_LIMITS=""
        [[ "$IDLE_BURST_SIZE" != 0 ]] && WSG_EXTRA_LIMITS=$'\n'"  max_message_size: $((IDLE_BURST_SIZE * 2))"
        start_wsguard "$s" "$bport" null "$ki" "$ku" none
        WSG_EXTRA_LIMITS=""
        sleep 1
        run_idle "$s" "ws://127.0.0.1:$WSG_PORT/" "$WSG_PID" "$bpid" && IDLE_DONE+=("$s")
        kill -0 "$WSG_PID" 2>/dev/null || die "wsguard died during idle test $s (see $TMP/wsguard-$s.log)"
        stop_pid "$WSG_PID"
        ;;
    *) die "unknown idle scenario $s" ;;
    esac
    stop_pid "$bpid"
done

# ================================================================================
# report
# ================================================================================
median() { python3 -c 'import statistics, sys; v = [float(x) for x in sys.argv[1:] if x != "-"]; print("%.0f" % statistics.median(v) if v else "-")' "$@"; }

echo
echo "## wsguard benchmark"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)); Linux $(uname -r); fd limit $(ulimit -n)"
echo
if [[ $TP_ROUNDS_DONE -gt 0 ]]; then
    echo "### Echo throughput ($CONNS conns, $SIZE B payload ($PAYLOAD), ${WARMUP}s warmup + ${DURATION}s, $TP_ROUNDS_DONE round(s), median)"
    echo
    [[ "$PIN" == 1 ]] && echo "PIN=1: loadgen and echo-server on CPU 0, the proxy (wsguard; nginx with 1 worker) on CPU 1." && echo
    echo "| scenario | msgs/s | MB/s (payload, one way) | runs used | per round | p50 us | p99 us | ratio vs direct | baseline | ratio vs baseline | proxy CPU us per echo (median) | wire B per echo (client) | payload B per echo | deflate conns | errors | cores: loadgen / proxy / backend / other |"
    echo "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
    # A run is "clean" when the rest of the machine stayed below NOISE_MAX cores.
    clean() { [[ "${TP_OTHER[$1]:--}" != - ]] && awk -v x="${TP_OTHER[$1]}" -v m="$NOISE_MAX" 'BEGIN { exit !(x <= m) }'; }
    declare -A MED USED
    for s in $TP_SCENARIOS; do
        rates=() all=()
        for ((r = 1; r <= TP_ROUNDS_DONE; r++)); do
            [[ -n "${TP_RATE[$s:$r]:-}" ]] || continue
            all+=("${TP_RATE[$s:$r]}")
            if clean "$s:$r"; then rates+=("${TP_RATE[$s:$r]}"); fi
        done
        [[ ${#all[@]} -gt 0 ]] || continue
        [[ ${#rates[@]} -gt 0 ]] || rates=("${all[@]}")
        MED[$s]="$(median "${rates[@]}")"
        USED[$s]="${#rates[@]}/${#all[@]}"
    done
    for s in $TP_SCENARIOS; do
        [[ -n "${MED[$s]:-}" ]] || continue
        rates=() p50s=() p99s=() errs=0 cpu=() any_clean=0 uspe=() wires=() paybs=() defl="-"
        for ((r = 1; r <= TP_ROUNDS_DONE; r++)); do
            if [[ -n "${TP_RATE[$s:$r]:-}" ]] && clean "$s:$r"; then any_clean=1; fi
        done
        for ((r = 1; r <= TP_ROUNDS_DONE; r++)); do
            k="$s:$r"
            [[ -n "${TP_RATE[$k]:-}" ]] || continue
            [[ "${TP_ERR[$k]}" =~ ^[0-9]+$ ]] && errs=$((errs + TP_ERR[$k]))
            wires+=("${TP_WIRE[$k]:--}")
            paybs+=("${TP_PAYB[$k]:--}")
            defl="${TP_DEFL[$k]:--}"
            cpu+=("${TP_LG[$k]}/${TP_PROXY[$k]}/${TP_BACK[$k]}/${TP_OTHER[$k]}")
            if [[ $any_clean == 1 ]] && ! clean "$k"; then
                rates+=("${TP_RATE[$k]}*")
                continue
            fi
            rates+=("${TP_RATE[$k]}")
            [[ "${TP_PROXY[$k]}" != - && "${TP_RATE[$k]}" != - && "${TP_PROXY[$k]}" != 0.00 ]] &&
                uspe+=("$(calc "'%.2f' % (${TP_PROXY[$k]} * 1e6 / ${TP_RATE[$k]})")")
            p50s+=("${TP_P50[$k]}")
            p99s+=("${TP_P99[$k]}")
        done
        rd="-" rb="-" base="${BASE[$s]:-}"
        [[ -n "${MED[direct]:-}" && "${MED[direct]}" != "-" && "${MED[$s]}" != "-" ]] &&
            rd="$(calc "'%.2f' % (${MED[$s]} / ${MED[direct]})")"
        [[ -n "$base" && -n "${MED[$base]:-}" && "${MED[$base]}" != "-" && "${MED[$s]}" != "-" ]] &&
            rb="$(calc "'%.2f' % (${MED[$s]} / ${MED[$base]})")"
        mbs="-"
        [[ "${MED[$s]}" != - ]] && mbs="$(calc "'%.1f' % (${MED[$s]} * $SIZE / 1e6)")"
        us="-"
        [[ ${#uspe[@]} -gt 0 ]] && us="$(python3 -c 'import statistics, sys; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "${uspe[@]}") (${uspe[*]})"
        echo "| $s | ${MED[$s]} | $mbs | ${USED[$s]} | ${rates[*]} | $(median "${p50s[@]}") | $(median "${p99s[@]}") | $rd | ${base:--} | $rb | $us | $(median "${wires[@]}") | $(median "${paybs[@]}") | $defl | $errs | ${cpu[*]} |"
    done
    echo
    echo "cores: CPU cores used over the measurement window, per round (loadgen / proxy / echo backend / rest of the machine)."
    echo "Runs marked * had the rest of the machine above $NOISE_MAX cores and are left out of the medians (msgs/s, p50, p99)."
    echo
fi

if [[ ${#IDLE_DONE[@]} -gt 0 ]]; then
    echo "### Idle sessions ($IDLE_CONNS requested at $IDLE_RATE/s; RSS = VmRSS KiB sampled ${IDLE_SETTLE}s after READY; CPU over ${KA_WINDOW}s after that)"
    echo
    echo "burst: $([[ "$IDLE_BURST_SIZE" != 0 ]] && echo "every ${IDLE_BURST_EVERY}th session echoed one ${IDLE_BURST_SIZE} B message before READY" || echo none)"
    echo
    echo "| scenario | open at READY / at end | failed / dropped | bursts echoed | measured process | RSS before | RSS after | KiB per session | %CPU (one core) | backend RSS delta / session | backend %CPU | loadgen %CPU | other %CPU | pings answered (loadgen) | ping RTTs (wsguard) |"
    echo "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for s in "${IDLE_DONE[@]}"; do
        n="${ID_OPEN[$s]}"
        per="-" bper="-"
        if [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]]; then
            per="$(calc "round((${ID_RSS1[$s]} - ${ID_RSS0[$s]}) / $n, 2)")"
            bper="$(calc "round((${ID_BRSS1[$s]} - ${ID_BRSS0[$s]}) / $n, 2)")"
        fi
        proc=wsguard
        [[ "$s" == direct-* ]] && proc="echo backend" bper="(same)"
        echo "| $s | $n / ${ID_END[$s]} | ${ID_FAIL[$s]} / ${ID_DROP[$s]} | ${ID_BURSTS[$s]} | $proc | ${ID_RSS0[$s]} | ${ID_RSS1[$s]} | $per | ${ID_CPU[$s]} | $bper | ${ID_BCPU[$s]} | ${ID_LCPU[$s]} | ${ID_OTHER[$s]} | ${ID_PINGS[$s]} | ${ID_RTT[$s]} |"
    done
    echo
    echo "loadgen client RSS at the sample (KiB, info): $(for s in "${IDLE_DONE[@]}"; do printf '%s=%s ' "$s" "${ID_CLRSS[$s]}"; done)"
    echo
    echo "context switches per second of the measured process during the CPU window (all threads): $(for s in "${IDLE_DONE[@]}"; do printf '%s=%s ' "$s" "${ID_CSW[$s]}"; done)"
    echo
fi
