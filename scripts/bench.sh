#!/usr/bin/env bash
# wsguard benchmark: closed-loop echo throughput (direct vs wsguard [vs nginx]) and
# idle memory per session, in one run.
#
# Usage: scripts/bench.sh
#
# Environment knobs (defaults in brackets):
#   CONNS [100] SIZE [64] DURATION [10] WARMUP [2]        echo throughput test
#   IDLE_CONNS [5000] IDLE_HOLD [15] IDLE_RATE [2000]     idle memory test
#   IDLE_SETTLE [2]     seconds between READY and the RSS sample
#   SKIP_BUILD [0]      1 = do not run cargo build (use existing binaries)
#   DIRECT_ONLY [0]     1 = only the parts that need no proxy (echo-server + loadgen)
#   NO_NGINX [0]        1 = skip the nginx comparison even if nginx is installed
#   LOADGEN, WSGUARD, NGINX_BIN   binary paths (default: target/release/..., `nginx` in PATH)
#   LOADGEN_THREADS     worker threads for the load-generating client (default: all CPUs)
#   KEEP_TMP [0]        1 = keep the temp dir (configs, logs, JSON results) on success
#
# Every process this script starts is tracked by PID and stopped by PID on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CONNS="${CONNS:-100}"
SIZE="${SIZE:-64}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
IDLE_CONNS="${IDLE_CONNS:-5000}"
IDLE_HOLD="${IDLE_HOLD:-15}"
IDLE_RATE="${IDLE_RATE:-2000}"
IDLE_SETTLE="${IDLE_SETTLE:-2}"
SKIP_BUILD="${SKIP_BUILD:-0}"
DIRECT_ONLY="${DIRECT_ONLY:-0}"
NO_NGINX="${NO_NGINX:-0}"
KEEP_TMP="${KEEP_TMP:-0}"
LOADGEN="${LOADGEN:-$ROOT/target/release/examples/loadgen}"
WSGUARD="${WSGUARD:-$ROOT/target/release/wsguard}"
NGINX_BIN="${NGINX_BIN:-$(command -v nginx 2>/dev/null || true)}"
LOADGEN_THREADS="${LOADGEN_THREADS:-}"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for tool in python3 curl timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# --- file descriptors -------------------------------------------------------
# 5000 idle sessions need ~10k fds in the proxy (client + upstream side).
if ! ulimit -n 65536 2>/dev/null; then
    hard="$(ulimit -Hn)"
    ulimit -n "$hard" 2>/dev/null || true
    log "could not raise fd limit to 65536 (hard limit $hard); using $(ulimit -n)"
fi
need_fds=$((IDLE_CONNS * 2 + 1024))
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt "$need_fds" ]]; then
    die "fd limit $(ulimit -n) too low for IDLE_CONNS=$IDLE_CONNS (need ~$need_fds)"
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
    local keep=() p
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
        [[ "$p" == "$pid" ]] || keep+=("$p")
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

start_bg() { # start_bg LOGFILE CMD...: start in background, stdout+stderr to LOGFILE
    local logf="$1"
    shift
    "$@" >"$logf" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

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
with open(path) as f:
    for line in f:
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
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
    log "building (cargo build --release --examples --bins) in $ROOT"
    (cd "$ROOT" && cargo build --release --examples --bins)
fi
[[ -x "$LOADGEN" ]] || die "loadgen binary not found: $LOADGEN"
if [[ "$DIRECT_ONLY" != 1 ]]; then
    [[ -x "$WSGUARD" ]] || die "wsguard binary not found: $WSGUARD"
fi

log "temp dir: $TMP; fd limit $(ulimit -n); $(nproc) CPUs"

# --- backends ---------------------------------------------------------------
start_echo_server() { # start_echo_server NAME -> sets ECHO_PID / ECHO_PORT
    local name="$1" line
    start_bg_split "$TMP/$name.out" "$TMP/$name.err" "$LOADGEN" echo-server --listen 127.0.0.1:0
    ECHO_PID="$LAST_PID"
    line="$(wait_for_line "$TMP/$name.out" '^LISTENING ' 10 "$ECHO_PID")" || die "$name did not start"
    ECHO_PORT="${line##*:}"
    log "$name listening on 127.0.0.1:$ECHO_PORT (pid $ECHO_PID)"
}

start_echo_server echo-backend
BACKEND_PID="$ECHO_PID"
BACKEND_PORT="$ECHO_PORT"

read -r PROXY_PORT ADMIN_PORT NGINX_PORT <<<"$(free_ports 3)"

WSGUARD_PID=""
if [[ "$DIRECT_ONLY" != 1 ]]; then
    cat >"$TMP/wsguard.yaml" <<EOF
listen: "127.0.0.1:$PROXY_PORT"
admin:
  listen: "127.0.0.1:$ADMIN_PORT"
log:
  level: warn
upstream:
  url: "ws://127.0.0.1:$BACKEND_PORT"
limits:
  per_ip: null
  per_connection: null
  max_connections: 100000
keepalive:
  interval: 0s
  upstream_interval: 0s
EOF
    start_bg "$TMP/wsguard.log" "$WSGUARD" run -c "$TMP/wsguard.yaml"
    WSGUARD_PID="$LAST_PID"
    ready=0
    for ((i = 0; i < 150; i++)); do
        if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$ADMIN_PORT/readyz" 2>/dev/null; then
            ready=1
            break
        fi
        if ! kill -0 "$WSGUARD_PID" 2>/dev/null; then
            tail -n 30 "$TMP/wsguard.log" >&2 || true
            die "wsguard exited during startup"
        fi
        sleep 0.1
    done
    if [[ $ready != 1 ]]; then
        tail -n 30 "$TMP/wsguard.log" >&2 || true
        die "wsguard /readyz did not return 200 within 15 s"
    fi
    log "wsguard ready on 127.0.0.1:$PROXY_PORT (admin $ADMIN_PORT, pid $WSGUARD_PID)"
fi

# --- idle memory --------------------------------------------------------------
# run_idle NAME URL PID_TO_MEASURE [EXTRA_PID_TO_MEASURE]
# Sets IDLE_N (open at READY), IDLE_OK (open at end), IDLE_FAILED, IDLE_DROPPED and
# RSS_<name> arrays via global assoc arrays below.
declare -A RSS_BEFORE RSS_AFTER RSS_SESSIONS
run_idle() {
    local name="$1" url="$2" m1="$3" m2="${4:-}" line pid rc=0 n
    local b1 b2
    b1="$(rss_kib "$m1")"
    [[ -n "$m2" ]] && b2="$(rss_kib "$m2")"
    log "idle[$name]: $IDLE_CONNS conns at $IDLE_RATE/s to $url, hold ${IDLE_HOLD}s"
    start_bg_split "$TMP/idle-$name.out" "$TMP/idle-$name.err" \
        timeout $((IDLE_CONNS / IDLE_RATE + IDLE_HOLD + 90)) \
        "$LOADGEN" ${LG_THREADS[@]+"${LG_THREADS[@]}"} idle --url "$url" --conns "$IDLE_CONNS" \
        --hold "$IDLE_HOLD" --rate "$IDLE_RATE" --label "$name"
    pid="$LAST_PID"
    if ! line="$(wait_for_line "$TMP/idle-$name.out" '^READY ' $((IDLE_CONNS / IDLE_RATE + 60)) "$pid")"; then
        stop_pid "$pid"
        cat "$TMP/idle-$name.err" >&2 || true
        return 1
    fi
    n="${line#READY }"
    sleep "$IDLE_SETTLE"
    RSS_BEFORE[$name:$m1]="$b1"
    RSS_AFTER[$name:$m1]="$(rss_kib "$m1")"
    RSS_SESSIONS[$name:$m1]="$n"
    if [[ -n "$m2" ]]; then
        RSS_BEFORE[$name:$m2]="$b2"
        RSS_AFTER[$name:$m2]="$(rss_kib "$m2")"
        RSS_SESSIONS[$name:$m2]="$n"
    fi
    RSS_BEFORE[$name:client]=0
    RSS_AFTER[$name:client]="$(rss_kib "$(pgrep -P "$pid" -x loadgen | head -n1 || true)" 2>/dev/null || echo 0)"
    RSS_SESSIONS[$name:client]="$n"
    log "idle[$name]: READY $n; sampled RSS; waiting for the hold to end"
    wait "$pid" || rc=$?
    PIDS=($(for p in ${PIDS[@]+"${PIDS[@]}"}; do [[ "$p" == "$pid" ]] || echo "$p"; done))
    cat "$TMP/idle-$name.err" | grep -v '^idle: attempted=' >&2 || true
    read -r IDLE_OK IDLE_FAILED IDLE_DROPPED <<<"$(json_field "$TMP/idle-$name.out" open_at_end failed dropped)"
    IDLE_N="$n"
    [[ $rc -eq 0 ]] || log "idle[$name]: loadgen exited with status $rc"
    return 0
}

IDLE_ROWS=()
idle_row() { # idle_row SCENARIO PROCESS KEY
    local scen="$1" proc="$2" key="$3" before after n per
    before="${RSS_BEFORE[$key]:-0}"
    after="${RSS_AFTER[$key]:-0}"
    n="${RSS_SESSIONS[$key]:-0}"
    if [[ "$n" -gt 0 ]]; then
        per="$(calc "round(($after - $before) / $n, 1)")"
    else
        per="-"
    fi
    IDLE_ROWS+=("| $scen | $proc | $n | $before | $after | $per |")
}

if [[ "$DIRECT_ONLY" != 1 ]]; then
    sleep 1
    if run_idle wsguard "ws://127.0.0.1:$PROXY_PORT/" "$WSGUARD_PID" "$BACKEND_PID"; then
        idle_row "via wsguard (open at end $IDLE_OK, failed $IDLE_FAILED, dropped $IDLE_DROPPED)" wsguard "wsguard:$WSGUARD_PID"
        idle_row "via wsguard" "echo backend (info)" "wsguard:$BACKEND_PID"
        idle_row "via wsguard" "loadgen client (info)" "wsguard:client"
    else
        IDLE_ROWS+=("| via wsguard | wsguard | FAILED (see $TMP/idle-wsguard.err) | | | |")
    fi
    kill -0 "$WSGUARD_PID" 2>/dev/null || die "wsguard died during the idle test (see $TMP/wsguard.log)"
fi

# Direct idle against a fresh echo-server, so its baseline is not inflated by earlier runs.
start_echo_server echo-idle
IDLE_ECHO_PID="$ECHO_PID"
if run_idle direct "ws://127.0.0.1:$ECHO_PORT/" "$IDLE_ECHO_PID"; then
    idle_row "direct (open at end $IDLE_OK, failed $IDLE_FAILED, dropped $IDLE_DROPPED)" "echo backend (info)" "direct:$IDLE_ECHO_PID"
    idle_row "direct" "loadgen client (info)" "direct:client"
else
    IDLE_ROWS+=("| direct | echo backend | FAILED (see $TMP/idle-direct.err) | | | |")
fi
stop_pid "$IDLE_ECHO_PID"

# --- throughput -----------------------------------------------------------------
declare -A TP_RATE TP_P50 TP_P99 TP_ERR
TP_ORDER=()
run_echo() { # run_echo NAME URL
    local name="$1" url="$2" rc=0
    log "echo[$name]: $CONNS conns x $SIZE B, ${WARMUP}s warmup + ${DURATION}s via $url"
    timeout $((DURATION + WARMUP + 120)) "$LOADGEN" ${LG_THREADS[@]+"${LG_THREADS[@]}"} echo --url "$url" \
        --conns "$CONNS" --size "$SIZE" --duration "$DURATION" --warmup "$WARMUP" --label "$name" \
        >"$TMP/echo-$name.json" 2>"$TMP/echo-$name.err" || rc=$?
    cat "$TMP/echo-$name.err" >&2 || true
    [[ $rc -eq 0 ]] || log "echo[$name]: loadgen exited with status $rc"
    TP_ORDER+=("$name")
    read -r TP_RATE[$name] TP_P50[$name] TP_P99[$name] TP_ERR[$name] \
        <<<"$(json_field "$TMP/echo-$name.json" msgs_per_sec p50_us p99_us errors)"
    sleep 1
    return 0
}

run_echo direct "ws://127.0.0.1:$BACKEND_PORT/"
[[ "${TP_RATE[direct]}" != "-" ]] || die "direct echo run failed; see $TMP/echo-direct.err"

if [[ "$DIRECT_ONLY" != 1 ]]; then
    run_echo wsguard "ws://127.0.0.1:$PROXY_PORT/"
    kill -0 "$WSGUARD_PID" 2>/dev/null || die "wsguard died during the throughput test (see $TMP/wsguard.log)"
fi

# nginx only needs the echo backend, so it also runs with DIRECT_ONLY=1.
if [[ "$NO_NGINX" != 1 && -n "$NGINX_BIN" && -x "$NGINX_BIN" ]]; then
    NGX="$TMP/nginx"
    mkdir -p "$NGX/logs"
    cat >"$NGX/nginx.conf" <<EOF
worker_processes auto;
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
            proxy_pass http://127.0.0.1:$BACKEND_PORT;
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
    if "$NGINX_BIN" -t -q -c "$NGX/nginx.conf" -p "$NGX/" ${NGX_E[@]+"${NGX_E[@]}"} >"$NGX/logs/start.log" 2>&1 &&
        "$NGINX_BIN" -c "$NGX/nginx.conf" -p "$NGX/" ${NGX_E[@]+"${NGX_E[@]}"} >>"$NGX/logs/start.log" 2>&1; then
        NGINX_PID=""
        for ((i = 0; i < 50; i++)); do
            if [[ -s "$NGX/nginx.pid" ]]; then
                NGINX_PID="$(tr -d '[:space:]' <"$NGX/nginx.pid")"
                break
            fi
            sleep 0.1
        done
        if [[ -n "$NGINX_PID" ]]; then
            PIDS+=("$NGINX_PID")
            log "nginx master pid $NGINX_PID on 127.0.0.1:$NGINX_PORT"
            run_echo nginx "ws://127.0.0.1:$NGINX_PORT/"
            stop_pid "$NGINX_PID"
        else
            log "nginx did not write its pid file; skipping (see $NGX/logs)"
        fi
    else
        log "nginx failed to start; skipping:"
        cat "$NGX/logs/start.log" >&2 || true
    fi
else
    log "nginx not installed (or NO_NGINX=1): skipping nginx comparison"
fi

# --- report -------------------------------------------------------------------
echo
echo "## wsguard benchmark ($(nproc) CPUs, $CONNS conns, $SIZE B messages, ${DURATION}s + ${WARMUP}s warmup)"
echo
echo "| scenario | msgs/s | p50 us | p99 us | ratio vs direct | errors |"
echo "|---|---:|---:|---:|---:|---:|"
for name in "${TP_ORDER[@]}"; do
    ratio="-"
    if [[ "${TP_RATE[$name]}" != "-" && "${TP_RATE[direct]}" != "-" && "${TP_RATE[direct]}" != 0 ]]; then
        ratio="$(calc "'%.2f' % (${TP_RATE[$name]} / ${TP_RATE[direct]})")"
    fi
    echo "| $name | ${TP_RATE[$name]} | ${TP_P50[$name]} | ${TP_P99[$name]} | $ratio | ${TP_ERR[$name]} |"
done
echo
echo "### Idle memory ($IDLE_CONNS connections requested; RSS from /proc/PID/status VmRSS, KiB)"
echo
echo "| scenario | process | sessions open at READY | RSS before | RSS after | KiB per session |"
echo "|---|---|---:|---:|---:|---:|"
for row in ${IDLE_ROWS[@]+"${IDLE_ROWS[@]}"}; do
    echo "$row"
done
echo
