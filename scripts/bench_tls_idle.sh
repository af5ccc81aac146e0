#!/usr/bin/env bash
# What an idle TLS session costs wsguard (issue 12, "TLS hops"): RSS per idle
# session with the client hop on TLS (rustls) against the same sessions in
# plaintext, through the same client, in one run.
#
# The client is the Python asyncio one below (loadgen speaks plain ws:// only):
# it opens CONNS sessions, sends the upgrade request, reads the 101 and then keeps
# reading (and discards) whatever comes, so the sessions stay idle and open.
# The backend hop is plaintext in both cases (loadgen echo-server).
#
# Usage: scripts/bench_tls_idle.sh   (SKIP_BUILD=1 to reuse release binaries)
# Knobs: CONNS [2000] RATE [500/s] SETTLE [3 s] KEEPALIVE [25s] (both hops)
# Prints one Markdown table row per mode on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-2000}
RATE=${RATE:-500}
SETTLE=${SETTLE:-3}
KEEPALIVE=${KEEPALIVE:-25s}
TARGET=${CARGO_TARGET_DIR:-target}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bin wsguard --example loadgen
WSGUARD=$TARGET/release/wsguard
LOADGEN=$TARGET/release/examples/loadgen
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
start_echo_backend

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 \
  -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null

cat > "$tmp/client.py" <<'PY'
import asyncio, base64, os, ssl, sys, time
host, port, n, rate, use_tls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "tls"
ctx = None
if use_tls:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
ok = fail = 0
writers = []
async def one():
    global ok, fail
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 20)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(("GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host, port, key)).encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head[:40])
        ok += 1
        writers.append(w)
        while await r.read(4096):
            pass
    except Exception:
        fail += 1
async def main():
    t0 = time.monotonic()
    tasks = []
    for i in range(n):
        d = t0 + i / rate - time.monotonic()
        if d > 0:
            await asyncio.sleep(d)
        tasks.append(asyncio.ensure_future(one()))
    while ok + fail < n:
        await asyncio.sleep(0.1)
    print("READY %d %d" % (ok, fail), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
PY

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

measure() { # mode (plain|tls)
  local mode=$1 port admin w c i line before after
  port=$(free_port); admin=$(free_port)
  cat > "$tmp/p.yaml" <<YAML
listen: "127.0.0.1:$port"
admin: { listen: "127.0.0.1:$admin" }
upstream: { url: "ws://$backend" }
log: { level: warn }
keepalive: { interval: $KEEPALIVE, upstream_interval: $KEEPALIVE }
limits: { per_ip: null, per_connection: null, per_subject: null, max_connections: 100000 }
YAML
  [ "$mode" = tls ] && printf 'tls: { cert_file: "%s", key_file: "%s" }\n' "$tmp/tls.crt" "$tmp/tls.key" >> "$tmp/p.yaml"
  "$WSGUARD" run -c "$tmp/p.yaml" 2>>"$tmp/wsguard.log" & w=$!; pids+=("$w")
  for _ in $(seq 150); do curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  sleep 1
  before=$(rss "$w")
  python3 "$tmp/client.py" 127.0.0.1 "$port" "$CONNS" "$RATE" "$mode" > "$tmp/client-$mode.out" & c=$!; pids+=("$c")
  line=""
  for ((i = 0; i < CONNS / RATE * 10 + 600; i++)); do
    line=$(grep -m1 '^READY' "$tmp/client-$mode.out" || true)
    [ -n "$line" ] && break
    sleep 0.1
  done
  [ -n "$line" ] || { echo "client ($mode) never got READY" >&2; exit 1; }
  sleep "$SETTLE"
  after=$(rss "$w")
  read -r _ ok failed <<<"$line"
  printf '| %s | %s / %s | %s -> %s KiB | %s |\n' "$mode" "$ok" "$failed" "$before" "$after" \
    "$(python3 -c "print(round(($after - $before) / max($ok, 1), 2))")"
  kill "$c"; wait "$c" 2>/dev/null || true
  kill "$w"; wait "$w" 2>/dev/null || true
}

echo "| client hop | sessions open / failed | wsguard RSS before -> after | KiB per session (both hops) |"
echo "|---|---|---|---:|"
measure plain
measure tls
