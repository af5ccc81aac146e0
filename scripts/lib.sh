# Sourced by scripts/bench_handshakes.sh and scripts/reload_storm.sh (after
# they set $LOADGEN): a temp dir, background processes tracked by PID and
# stopped on exit, free loopback ports, and the loadgen echo backend.

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# Starts `loadgen echo-server` on a free port; sets $backend to its host:port.
start_echo_backend() {
  "$LOADGEN" echo-server --listen 127.0.0.1:0 > "$tmp/backend.out" 2>&1 & pids+=($!)
  for _ in $(seq 100); do grep -q LISTENING "$tmp/backend.out" && break; sleep 0.05; done
  backend=$(awk '/LISTENING/ {print $2}' "$tmp/backend.out")
}
