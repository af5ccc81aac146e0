#!/usr/bin/env bash
# Handshakes/s through wsguard (issues 3 and 6), one run each, same machine:
#   guards off | JWT HS256 | JWT RS256 | per-IP limit local | per-IP limit shared on Redis
# Usage: scripts/bench_handshakes.sh   (SKIP_BUILD=1 to reuse release binaries; SECS, CONNS)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-10}; CONNS=${CONNS:-32}
TARGET=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin wsguard --example loadgen --example handshakes
WSGUARD=$TARGET/release/wsguard; LOADGEN=$TARGET/release/examples/loadgen; HS=$TARGET/release/examples/handshakes
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
start_echo_backend
secret="a-benchmark-hs256-secret-of-at-least-32-bytes"
printf '%s' "$secret" > "$tmp/hs.secret"
redis_port=$(free_port)
if command -v redis-server >/dev/null; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & pids+=($!)
  sleep 0.3
fi

run() { # label, extra policy, client args...
  local label=$1 extra=$2; shift 2
  local port admin; port=$(free_port); admin=$(free_port)
  cat > "$tmp/p.yaml" <<YAML
listen: "127.0.0.1:$port"
admin: { listen: "127.0.0.1:$admin" }
upstream: { url: "ws://$backend" }
log: { level: warn }
keepalive: { interval: 0s, upstream_interval: 0s }
$extra
YAML
  "$WSGUARD" run -c "$tmp/p.yaml" 2>>"$tmp/wsguard.log" & local w=$!
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
  "$HS" --url "ws://127.0.0.1:$port/" --conns "$CONNS" --secs "$SECS" --label "$label" "$@"
  kill "$w"; wait "$w" 2>/dev/null || true
}
nolimits="limits: { per_ip: null, per_connection: null, per_subject: null }"
run "guards off" "$nolimits"
run "jwt HS256" "$nolimits
jwt: { mode: enforce, algorithms: [HS256], keys: [{ secret_file: \"$tmp/hs.secret\" }] }" --hs-secret "$secret"
run "jwt RS256" "$nolimits
jwt: { mode: enforce, algorithms: [RS256], keys: [{ file: \"$PWD/tests/fixtures/jwt/rsa_public.pem\" }] }" --rs-key tests/fixtures/jwt/rsa_private.pem
hi="limits: { per_connection: null, per_subject: null, per_ip: { handshakes: { rate: 1000000/s, burst: 1000000 }, connections: null, pending_handshakes: null } }"
run "per-ip limit, local" "$hi"
if command -v redis-server >/dev/null; then
  run "per-ip limit, shared (Redis)" "limits:
  per_connection: null
  per_subject: null
  per_ip: { handshakes: { rate: 1000000/s, burst: 1000000 }, connections: null, pending_handshakes: null }
  shared: { redis_url: \"redis://127.0.0.1:$redis_port\", timeout: 50ms }"
fi
