#!/usr/bin/env bash
# Reload storm soak (issue 7): 500 sessions stream sequence-numbered echo
# messages through wsguard while it receives 100 SIGHUPs alternating valid
# and invalid policy files. Passes when every session stayed open, no echo
# was lost or out of order (the load generator checks each message's
# sequence number), and the reload counters are 50 ok / 50 error.
#
#   scripts/reload_storm.sh            # builds release binaries first
#   SKIP_BUILD=1 SESSIONS=500 RELOADS=100 scripts/reload_storm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${SESSIONS:-500}
RELOADS=${RELOADS:-100}
TARGET=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin wsguard --example loadgen
WSGUARD=${WSGUARD:-$TARGET/release/wsguard}
LOADGEN=${LOADGEN:-$TARGET/release/examples/loadgen}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
start_echo_backend
port=$(free_port); admin=$(free_port)
valid() {
  cat <<YAML
listen: "127.0.0.1:$port"
admin: { listen: "127.0.0.1:$admin" }
upstream: { url: "ws://$backend" }
log: { level: info }
keepalive: { interval: ${1}s }
limits:
  per_ip: null
  per_connection: null
  max_connections: 20000
YAML
}
valid 25 > "$tmp/policy.yaml"
"$WSGUARD" run -c "$tmp/policy.yaml" 2> "$tmp/wsguard.log" & wsg=$!; pids+=($wsg)
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break; sleep 0.05; done

# Long enough to cover the whole storm; closed-loop echo, checked per message.
"$LOADGEN" echo --url "ws://127.0.0.1:$port/" --conns "$SESSIONS" --size 64 --duration 40 \
  --max-inflight 64 --op-timeout 10 > "$tmp/load.json" 2> "$tmp/load.txt" & load=$!; pids+=($load)
sleep 5   # all sessions open and streaming
start=$(date +%s.%N)
for i in $(seq "$RELOADS"); do
  if (( i % 2 )); then valid $((20 + i % 10)) > "$tmp/policy.yaml"; else printf 'limits:\n  max_conections: 1\n' >> "$tmp/policy.yaml"; fi
  kill -HUP "$wsg"
  sleep 0.2
done
storm=$(python3 -c "import time;print(round(time.time()-$start,1))")
wait "$load" || true
metrics=$(curl -fsS "http://127.0.0.1:$admin/metrics")
ok=$(awk '/^wsguard_reloads_total\{result="ok"\}/ {print $2}' <<<"$metrics")
err=$(awk '/^wsguard_reloads_total\{result="error"\}/ {print $2}' <<<"$metrics")
cat "$tmp/load.txt"
python3 - "$tmp/load.json" "$SESSIONS" "$RELOADS" "${ok:-0}" "${err:-0}" "$storm" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
sessions, reloads, ok, err, storm = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
print(f"reload storm: {r['connected']}/{sessions} sessions, {reloads} SIGHUPs in {storm}s "
      f"(ok {ok:.0f}, error {err:.0f}), {r['messages']} echoes checked in order, errors {r['errors']}, "
      f"p99 {r['p99_us']} us, max {r['max_us']} us")
bad = r['connected'] != sessions or r['errors'] != 0 or ok != reloads / 2 or err != reloads / 2
sys.exit(1 if bad else 0)
PY
