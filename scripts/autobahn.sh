#!/usr/bin/env bash
# Autobahn testsuite (fuzzingclient) against the loadgen echo-server, once directly and
# once through wsguard; compression cases 12.* and 13.* are excluded unless COMPRESSION=1.
# Fails (exit 1) if any case gets a worse verdict through wsguard than direct.
#
# Usage: scripts/autobahn.sh
#        COMPRESSION=1 scripts/autobahn.sh     # permessage-deflate cases 12.* and 13.* only
#
# Environment knobs (defaults in brackets):
#   SKIP_BUILD [0]      1 = do not run cargo build (use existing binaries)
#   DIRECT_ONLY [0]     1 = only the direct agent (no wsguard, no comparison)
#   CASES ['["*"]']     JSON list of case patterns, e.g. '["1.*","9.1.*"]'
#                       (with COMPRESSION=1 the default is '["12.*","13.*"]')
#   COMPRESSION [0]     1 = run the permessage-deflate cases (12.*, 13.*): they are no longer
#                       excluded, CASES defaults to them, wsguard's policy spells out
#                       `compression: {mode: on, context_takeover: false, max_window_bits: 15}`
#                       (the defaults), and the echo-server runs with --deflate (ECHO_DEFLATE=1):
#                       its own permessage-deflate server on wsguard's frame decoder and codec,
#                       answering offers like wsguard does (no context takeover, window 15).
#                       So direct implements 12.*/13.* and the normal comparison applies to
#                       them; in addition every 12.*/13.* case through wsguard must be OK,
#                       NON-STRICT or INFORMATIONAL with behaviorClose OK. Through wsguard both
#                       hops are compressed (the backend accepts wsguard's offer), so messages
#                       pass through compressed unless a guard needs them inflated.
#   ECHO_DEFLATE [=COMPRESSION]  1 = start the echo-server with --deflate (also usable without
#                       COMPRESSION=1, to check the deflate echo-server on cases 1.*-11.*); 0 =
#                       tungstenite's echo-server (then direct is UNIMPLEMENTED on 12.*/13.* and
#                       only the absolute criterion judges them)
#   CHAIN [0]           1 (with COMPRESSION=1) = also a third agent, wsguard-chain: the client
#                       talks to a first wsguard whose upstream is a second wsguard in front of
#                       the echo-server, so the hop between the two is compressed and the first
#                       one's deflater (and the second one's inflater) carries every client
#                       message. Judged by the same absolute criterion on 12.*/13.*.
#   WSTEST_TIMEOUT [1800]  seconds before the wstest run is aborted
#   LOADGEN, WSGUARD    binary paths (default: $CARGO_TARGET_DIR/release/... or target/release/...)
#   PYTHON2             python 2.7 interpreter (default: $(pyenv root)/versions/2.7.18/bin/python)
#   AUTOBAHN_VENV       virtualenv location [~/.cache/wsguard/autobahn-venv], created on demand
#   KEEP_TMP [0]        1 = keep the temp dir (reports, logs) on success
#   LIMITS [16MiB]      16MiB = wsguard with max_message_size and max_frame_size 16MiB (the
#                       echo-server takes 64 MiB messages, for 9.*); default = wsguard with the
#                       default size limits (1 MiB message, frame = message), and the echo-server
#                       capped at ECHO_MAX_MESSAGE_SIZE [1048576] too, so both agents enforce the
#                       same limit. Either way per_ip, per_connection are null and keepalive is off
#                       (the default per-IP handshake rate would refuse the suite's connections).
#
# Every process this script starts is tracked by PID and stopped by PID on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

SKIP_BUILD="${SKIP_BUILD:-0}"
DIRECT_ONLY="${DIRECT_ONLY:-0}"
COMPRESSION="${COMPRESSION:-0}"
CHAIN="${CHAIN:-0}"
ECHO_DEFLATE="${ECHO_DEFLATE:-$COMPRESSION}"
case "$COMPRESSION" in
0)
    CASES="${CASES:-[\"*\"]}"
    EXCLUDE_CASES='["12.*", "13.*"]'
    [[ "$CHAIN" == 0 ]] || {
        echo "CHAIN=1 needs COMPRESSION=1" >&2
        exit 2
    }
    ;;
1)
    CASES="${CASES:-[\"12.*\", \"13.*\"]}"
    EXCLUDE_CASES='[]'
    ;;
*)
    echo "COMPRESSION must be 0 or 1" >&2
    exit 2
    ;;
esac
WSTEST_TIMEOUT="${WSTEST_TIMEOUT:-1800}"
KEEP_TMP="${KEEP_TMP:-0}"
LIMITS="${LIMITS:-16MiB}"
case "$LIMITS" in
16MiB)
    ECHO_MAX_MESSAGE_SIZE="${ECHO_MAX_MESSAGE_SIZE:-$((64 << 20))}"
    SIZE_LIMITS=$'  max_message_size: 16MiB\n  max_frame_size: 16MiB\n'
    ;;
default)
    ECHO_MAX_MESSAGE_SIZE="${ECHO_MAX_MESSAGE_SIZE:-$((1 << 20))}"
    SIZE_LIMITS=""
    ;;
*)
    echo "LIMITS must be 16MiB or default" >&2
    exit 2
    ;;
esac
# cargo resolves a relative CARGO_TARGET_DIR against the directory it runs in ($ROOT here).
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
LOADGEN="${LOADGEN:-$TARGET_DIR/release/examples/loadgen}"
WSGUARD="${WSGUARD:-$TARGET_DIR/release/wsguard}"
AUTOBAHN_VENV="${AUTOBAHN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/wsguard/autobahn-venv}"

log() { printf '[autobahn %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for tool in python3 curl timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# --- process bookkeeping ----------------------------------------------------
TMP="$(mktemp -d /tmp/wsguard-autobahn.XXXXXX)"
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
        log "reports, logs and configs kept in $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_bg() { # start_bg OUTFILE ERRFILE CMD...
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
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
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

# --- Autobahn virtualenv (python 2.7) -------------------------------------------
# autobahntestsuite 0.8.2 is python-2 only. This is the set pip resolved on
# python 2.7.18 that runs `wstest -m fuzzingclient`; pinned so later releases cannot
# break the resolution. wsaccel, zope.interface, autobahn, txaio and PyHamcrest are
# built from sdists (needs a C compiler and the python 2.7 headers).
PINS='autobahntestsuite==0.8.2
autobahn==0.10.9
txaio==2.1.0
Twisted==20.3.0
zope.interface==5.5.2
Automat==22.10.0
attrs==21.4.0
constantly==15.1.0
hyperlink==21.0.0
idna==2.10
incremental==22.10.0
PyHamcrest==1.10.1
six==1.17.0
typing==3.10.0.0
enum34==1.1.10
ipaddress==1.0.23
klein==20.6.0
Tubes==0.2.1
Werkzeug==1.0.1
Jinja2==2.11.3
MarkupSafe==1.1.1
pyOpenSSL==21.0.0
cryptography==3.3.2
cffi==1.15.1
pycparser==2.21
service-identity==21.1.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
wsaccel==0.6.6
ujson==2.0.3
unittest2==1.1.0
traceback2==1.4.0
linecache2==1.0.0
argparse==1.4.0'

find_python2() {
    if [[ -n "${PYTHON2:-}" ]]; then
        echo "$PYTHON2"
        return
    fi
    local cand
    if command -v pyenv >/dev/null 2>&1; then
        cand="$(pyenv root)/versions/2.7.18/bin/python"
        [[ -x "$cand" ]] && {
            echo "$cand"
            return
        }
    fi
    for cand in python2.7 python2; do
        command -v "$cand" >/dev/null 2>&1 && {
            command -v "$cand"
            return
        }
    done
    return 1
}

ensure_venv() {
    local marker="$AUTOBAHN_VENV/.wsguard-pins"
    if [[ -x "$AUTOBAHN_VENV/bin/wstest" && -f "$marker" ]] && [[ "$(cat "$marker")" == "$PINS" ]] &&
        "$AUTOBAHN_VENV/bin/python" -c 'import autobahntestsuite, autobahn, twisted' 2>/dev/null; then
        log "using existing venv $AUTOBAHN_VENV"
        return 0
    fi
    local py2 tool="$AUTOBAHN_VENV.tool"
    py2="$(find_python2)" || die "python 2.7 not found (set PYTHON2=/path/to/python2.7)"
    "$py2" -c 'import sys; assert sys.version_info[:2] == (2, 7)' || die "$py2 is not python 2.7"
    log "creating venv $AUTOBAHN_VENV with $py2"
    rm -rf "$AUTOBAHN_VENV" "$tool"
    mkdir -p "$(dirname "$AUTOBAHN_VENV")"
    # virtualenv goes into a private --target dir so the interpreter's site-packages stay untouched.
    "$py2" -m pip install -q --disable-pip-version-check --target "$tool" 'virtualenv<20.22' ||
        die "pip install virtualenv<20.22 failed"
    PYTHONPATH="$tool" "$py2" -m virtualenv -q "$AUTOBAHN_VENV" || die "virtualenv creation failed"
    printf '%s\n' "$PINS" >"$TMP/autobahn-requirements.txt"
    "$AUTOBAHN_VENV/bin/pip" install -q --disable-pip-version-check -r "$TMP/autobahn-requirements.txt" ||
        die "pip install of the pinned autobahntestsuite set failed"
    "$AUTOBAHN_VENV/bin/python" -c 'import autobahntestsuite, autobahn, twisted' || die "venv import check failed"
    printf '%s' "$PINS" >"$marker"
    rm -rf "$tool"
}

# --- build ------------------------------------------------------------------
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building (cargo build --release --examples --bins) in $ROOT, target dir $TARGET_DIR"
    (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --examples --bins)
fi
[[ -x "$LOADGEN" ]] || die "loadgen binary not found: $LOADGEN"
if [[ "$DIRECT_ONLY" != 1 ]]; then
    [[ -x "$WSGUARD" ]] || die "wsguard binary not found: $WSGUARD"
fi
# Run private copies: a build by someone else in a shared target dir must not swap the
# binaries under a run that takes minutes.
mkdir -p "$TMP/bin"
cp "$LOADGEN" "$TMP/bin/loadgen" && LOADGEN="$TMP/bin/loadgen"
if [[ "$DIRECT_ONLY" != 1 ]]; then
    cp "$WSGUARD" "$TMP/bin/wsguard" && WSGUARD="$TMP/bin/wsguard"
fi

ensure_venv

# --- echo backend (LIMITS=16MiB: 64 MiB messages for 9.*; frame limit stays at 16 MiB, or
# equals the message limit with --deflate) --
ECHO_ARGS=()
[[ "$ECHO_DEFLATE" == 1 ]] && ECHO_ARGS=(--deflate)
start_bg "$TMP/echo.out" "$TMP/echo.err" "$LOADGEN" echo-server --listen 127.0.0.1:0 --max-message-size "$ECHO_MAX_MESSAGE_SIZE" ${ECHO_ARGS[@]+"${ECHO_ARGS[@]}"}
ECHO_PID="$LAST_PID"
line="$(wait_for_line "$TMP/echo.out" '^LISTENING ' 10 "$ECHO_PID")" || die "echo-server did not start ($(cat "$TMP/echo.err"))"
ECHO_PORT="${line##*:}"
log "echo-server on 127.0.0.1:$ECHO_PORT (pid $ECHO_PID$([[ "$ECHO_DEFLATE" == 1 ]] && echo ', permessage-deflate'))"

# --- wsguard ------------------------------------------------------------------
COMPRESSION_POLICY=""
if [[ "$COMPRESSION" == 1 ]]; then
    COMPRESSION_POLICY=$'compression:\n  mode: on\n  context_takeover: false\n  max_window_bits: 15'
fi

start_wsguard() { # start_wsguard NAME LISTEN_PORT ADMIN_PORT UPSTREAM_PORT; sets WSGUARD_PID
    local name="$1" port="$2" admin="$3" up="$4" i ready=0
    cat >"$TMP/$name.yaml" <<EOF
listen: "127.0.0.1:$port"
admin:
  listen: "127.0.0.1:$admin"
log:
  level: warn
upstream:
  url: "ws://127.0.0.1:$up"
limits:
${SIZE_LIMITS}  per_ip: null
  per_connection: null
keepalive:
  interval: 0s
  upstream_interval: 0s
${COMPRESSION_POLICY}
EOF
    start_bg "$TMP/$name.out" "$TMP/$name.log" "$WSGUARD" run -c "$TMP/$name.yaml"
    WSGUARD_PID="$LAST_PID"
    WSGUARD_ADMINS+=("$name=$admin")
    for ((i = 0; i < 150; i++)); do
        if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$admin/readyz" 2>/dev/null; then
            ready=1
            break
        fi
        if ! kill -0 "$WSGUARD_PID" 2>/dev/null; then
            tail -n 30 "$TMP/$name.out" "$TMP/$name.log" >&2 || true
            die "$name exited during startup"
        fi
        sleep 0.1
    done
    if [[ $ready != 1 ]]; then
        tail -n 30 "$TMP/$name.out" "$TMP/$name.log" >&2 || true
        die "$name /readyz did not return 200 within 15 s"
    fi
    log "$name on 127.0.0.1:$port -> 127.0.0.1:$up (admin $admin, pid $WSGUARD_PID)"
}

WSGUARD_ADMINS=()
read -r PROXY_PORT ADMIN_PORT CHAIN_PORT CHAIN_ADMIN_PORT INNER_PORT INNER_ADMIN_PORT <<<"$(free_ports 6)"
if [[ "$DIRECT_ONLY" != 1 ]]; then
    start_wsguard wsguard "$PROXY_PORT" "$ADMIN_PORT" "$ECHO_PORT"
    WSGUARD_PIDS=("$WSGUARD_PID")
    if [[ "$CHAIN" == 1 ]]; then
        start_wsguard wsguard-inner "$INNER_PORT" "$INNER_ADMIN_PORT" "$ECHO_PORT"
        WSGUARD_PIDS+=("$WSGUARD_PID")
        start_wsguard wsguard-chain "$CHAIN_PORT" "$CHAIN_ADMIN_PORT" "$INNER_PORT"
        WSGUARD_PIDS+=("$WSGUARD_PID")
    fi
fi

# --- fuzzingclient spec + run -------------------------------------------------------
mkdir -p "$TMP/reports"
SERVERS="{\"agent\": \"direct\", \"url\": \"ws://127.0.0.1:$ECHO_PORT\"}"
if [[ "$DIRECT_ONLY" != 1 ]]; then
    SERVERS="$SERVERS, {\"agent\": \"wsguard\", \"url\": \"ws://127.0.0.1:$PROXY_PORT\"}"
    if [[ "$CHAIN" == 1 ]]; then
        SERVERS="$SERVERS, {\"agent\": \"wsguard-chain\", \"url\": \"ws://127.0.0.1:$CHAIN_PORT\"}"
    fi
fi
cat >"$TMP/fuzzingclient.json" <<EOF
{
  "outdir": "$TMP/reports",
  "servers": [$SERVERS],
  "cases": $CASES,
  "exclude-cases": $EXCLUDE_CASES,
  "exclude-agent-cases": {}
}
EOF
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$TMP/fuzzingclient.json" || die "bad spec (check CASES)"

log "limits: $LIMITS (echo-server max message $ECHO_MAX_MESSAGE_SIZE B), compression cases: $([[ "$COMPRESSION" == 1 ]] && echo included || echo excluded), cases: $CASES"
log "running wstest -m fuzzingclient (log: $TMP/wstest.log)"
start_bg "$TMP/wstest.log" "$TMP/wstest.err" \
    timeout "$WSTEST_TIMEOUT" "$AUTOBAHN_VENV/bin/wstest" -m fuzzingclient -s "$TMP/fuzzingclient.json"
WSTEST_PID="$LAST_PID"
rc=0
wait "$WSTEST_PID" || rc=$?
PIDS=($(for p in ${PIDS[@]+"${PIDS[@]}"}; do [[ "$p" == "$WSTEST_PID" ]] || echo "$p"; done))
if [[ $rc -ne 0 ]]; then
    tail -n 20 "$TMP/wstest.log" "$TMP/wstest.err" >&2 || true
    die "wstest exited with status $rc (124 = timeout after ${WSTEST_TIMEOUT}s)"
fi
[[ -s "$TMP/reports/index.json" ]] || die "wstest produced no index.json"
if [[ "$DIRECT_ONLY" != 1 ]]; then
    for p in "${WSGUARD_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || log "WARNING: wsguard pid $p is no longer running after the test run (see $TMP/wsguard*.log)"
    done
    # Payload vs wire bytes per hop and direction: shows which hops were compressed.
    for na in "${WSGUARD_ADMINS[@]}"; do
        curl -fsS --max-time 5 "http://127.0.0.1:${na#*=}/metrics" >"$TMP/${na%%=*}.metrics" 2>/dev/null || true
        log "${na%%=*}: $(grep -E '^wsguard_(wire_)?bytes_total' "$TMP/${na%%=*}.metrics" 2>/dev/null | tr '\n' ' ')"
    done
fi

# --- summary --------------------------------------------------------------------
python3 - "$TMP/reports/index.json" "$DIRECT_ONLY" "$COMPRESSION" <<'PY'
import json
import sys

index = json.load(open(sys.argv[1]))
direct_only = sys.argv[2] == "1"
compression = sys.argv[3] == "1"
ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
RANK = {b: i for i, b in enumerate(ORDER)}
# Verdicts that pass the absolute criterion for the compression cases.
GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}
PROXIES = [a for a in ("wsguard", "wsguard-chain") if a in index]


def rank(v):
    # Anything unknown (e.g. WRONG CODE in behaviorClose) ranks as FAILED.
    return RANK.get(v, RANK["FAILED"])


def case_key(c):
    return tuple(int(x) if x.isdigit() else x for x in c.split("."))


def is_compression_case(c):
    return c.split(".")[0] in ("12", "13")


def counts_row(label, cases):
    counts = {b: 0 for b in ORDER}
    other = 0
    for c in cases:
        if c["behavior"] in counts:
            counts[c["behavior"]] += 1
        else:
            other += 1
    close_bad = sum(1 for c in cases if c.get("behaviorClose") != "OK")
    extra = " (+%d other)" % other if other else ""
    return "| %s | %d%s | %s | %d |" % (label, len(cases), extra, " | ".join(str(counts[b]) for b in ORDER), close_bad)


agents = [a for a in ("direct", "wsguard", "wsguard-chain") if a in index] + sorted(
    a for a in index if a not in ("direct", "wsguard", "wsguard-chain"))
print()
print("| agent | cases | " + " | ".join(ORDER) + " | behaviorClose not OK |")
print("|---|---:|" + "---:|" * len(ORDER) + "---:|")
for a in agents:
    print(counts_row(a, list(index[a].values())))

# Per-section summary of the compression cases (12.1 ... 13.7, and 12, 13 as a whole).
if any(is_compression_case(c) for a in agents for c in index[a]):
    print()
    print("| agent | section | cases | " + " | ".join(ORDER) + " | behaviorClose not OK |")
    print("|---|---|---:|" + "---:|" * len(ORDER) + "---:|")
    for a in agents:
        groups = {}
        for c, v in index[a].items():
            if is_compression_case(c):
                parts = c.split(".")
                groups.setdefault(parts[0], []).append(v)
                groups.setdefault(parts[0] + "." + parts[1], []).append(v)
        for g in sorted(groups, key=case_key):
            print(counts_row("%s | %s%s" % (a, g, "" if "." in g else " (all)"), groups[g]))

print()
for a in agents:
    notok = [(k, v) for k, v in sorted(index[a].items(), key=lambda kv: case_key(kv[0]))
             if v["behavior"] != "OK" or v.get("behaviorClose") != "OK"]
    if a == "direct" and compression:
        unimpl = set(k for k, v in notok if is_compression_case(k) and v["behavior"] == "UNIMPLEMENTED")
        notok = [(k, v) for k, v in notok if k not in unimpl]
        if unimpl:
            print("direct: %d compression case(s) UNIMPLEMENTED (echo-server without --deflate: ECHO_DEFLATE=0?)"
                  % len(unimpl))
    if notok:
        print("%s: not-OK cases: %s" % (a, ", ".join(
            "%s=%s/%s" % (k, v["behavior"], v.get("behaviorClose")) for k, v in notok)))

if direct_only:
    print("\n(direct only: no comparison)")
    sys.exit(0)

if "wsguard" not in index:
    print("\nFAIL: no results for agent wsguard")
    sys.exit(1)

failed = False
direct = index.get("direct", {})
for agent in PROXIES:
    proxy = index[agent]
    worse = []
    for case in sorted(direct, key=case_key):
        d = direct[case]
        p = proxy.get(case)
        if p is None:
            worse.append((case, d, None, "missing through %s" % agent))
            continue
        why = []
        if rank(p["behavior"]) > rank(d["behavior"]):
            why.append("behavior %s -> %s" % (d["behavior"], p["behavior"]))
        if rank(p.get("behaviorClose")) > rank(d.get("behaviorClose")):
            why.append("behaviorClose %s -> %s" % (d.get("behaviorClose"), p.get("behaviorClose")))
        if why:
            worse.append((case, d, p, "; ".join(why)))
    # The compression cases are also judged on their own: direct may have nothing to
    # compare with (UNIMPLEMENTED), and wsguard must get them right regardless.
    bad = sorted(((c, v) for c, v in proxy.items() if is_compression_case(c)
                  and (v["behavior"] not in GOOD or v.get("behaviorClose") != "OK")),
                 key=lambda kv: case_key(kv[0]))
    ncomp = sum(1 for c in proxy if is_compression_case(c))

    print()
    if worse:
        failed = True
        print("FAIL: %d case(s) worse through %s than direct:" % (len(worse), agent))
        print("| case | direct | %s | why | report |" % agent)
        print("|---|---|---|---|---|")
        for case, d, p, why in worse:
            print("| %s | %s/%s | %s | %s | %s |" % (
                case, d["behavior"], d.get("behaviorClose"),
                "%s/%s" % (p["behavior"], p.get("behaviorClose")) if p else "-",
                why, p.get("reportfile", "") if p else ""))
    else:
        print("PASS: no case is worse through %s than direct (%d cases compared)" % (agent, len(direct)))
    if ncomp:
        if bad:
            failed = True
            print("FAIL: %d of %d compression case(s) through %s not OK/NON-STRICT/INFORMATIONAL"
                  " with a clean close:" % (len(bad), ncomp, agent))
            for c, v in bad:
                print("  %s: %s/%s %s" % (c, v["behavior"], v.get("behaviorClose"), v.get("reportfile", "")))
        else:
            print("PASS: all %d compression case(s) through %s are OK/NON-STRICT/INFORMATIONAL"
                  " with a clean close" % (ncomp, agent))
sys.exit(1 if failed else 0)
PY
