#!/usr/bin/env bash
# Builds the container image from the Dockerfile with buildah and smoke-tests
# it with podman. Slow (about 13 minutes of compilation on 2 cores): not part
# of .ci/run.
#
#   scripts/image.sh            build + smoke test; prints size and build time
#
# Base images: the Dockerfile pins them by digest. When they cannot be pulled
# (a machine without registry access) and ../shared/tools/oci-standin-bases.sh
# exists, it builds local stand-ins under the same names (tag only) and the
# build uses those; a machine with a registry never needs it.
#
# The smoke test runs the image with the host network (bound to 127.0.0.1
# only) and checks: the process runs as a non-root uid; /healthz and /readyz
# answer 200; `wsguard check` passes on the image's own policy; a message
# echoes through the containerised proxy to a backend; SIGTERM makes it exit
# 0 within shutdown_grace.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
IMAGE=${IMAGE:-localhost/wsguard:dev}
: "${CARGO_TARGET_DIR:=$root/target}"
export CARGO_TARGET_DIR

RUST_PINNED=$(awk -F= '/^ARG RUST_IMAGE=/{print $2}' Dockerfile)
RUNTIME_PINNED=$(awk -F= '/^ARG RUNTIME_IMAGE=/{print $2}' Dockerfile)
RUST_TAG=${RUST_PINNED%@*}
RUNTIME_TAG=${RUNTIME_PINNED%@*}
STANDINS=$root/../shared/tools/oci-standin-bases.sh

step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cid=""
cleanup() {
  [ -n "$cid" ] && podman rm -f "$cid" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS CMD...: polls CMD every 0.1 s until it succeeds
  local until=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$until" ] && return 1
    sleep 0.1
  done
}

# ------------------------------------------------------------- base images
build_args=()
if command -v buildah >/dev/null 2>&1 && buildah pull --quiet "$RUST_PINNED" >/dev/null 2>&1 \
    && buildah pull --quiet "$RUNTIME_PINNED" >/dev/null 2>&1; then
  step "base images pulled: $RUST_PINNED, $RUNTIME_PINNED"
  pull=never
else
  [ -x "$STANDINS" ] || [ -f "$STANDINS" ] \
    || fail "cannot pull the base images and $STANDINS does not exist"
  step "base images cannot be pulled: building local stand-ins with $STANDINS"
  rust_version=${RUST_TAG#rust:}; rust_version=${rust_version%-bookworm}
  sh "$STANDINS" "$rust_version"
  build_args=(--build-arg "RUST_IMAGE=docker.io/library/$RUST_TAG" --build-arg "RUNTIME_IMAGE=$RUNTIME_TAG")
  pull=never
fi

# -------------------------------------------------------------------- build
# The build's `cargo build` fetches crates over HTTPS with the builder
# image's CA bundle. Behind a TLS-inspecting proxy (corporate egress) that
# fails; the host's bundle, which trusts that proxy, is mounted read-only over
# the builder's for the RUN steps only (a build-time volume is not part of any
# layer). HOST_CA_BUNDLE= (empty) turns this off.
HOST_CA_BUNDLE=${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
if [ -n "$HOST_CA_BUNDLE" ] && [ -f "$HOST_CA_BUNDLE" ]; then
  build_args+=(--volume "$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
step "building $IMAGE (buildah, --format docker)"
start=$(date +%s)
nice -n 19 buildah bud --quiet --format docker --layers --pull="$pull" \
  "${build_args[@]}" --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -t "$IMAGE" . > "$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; fail "build failed"; }
build_secs=$(( $(date +%s) - start ))
grep -i "warn" "$tmp/build.log" || true
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
size_mb=$(awk -v s="$size" 'BEGIN{printf "%.1f", s/1000000}')
step "built in ${build_secs}s; image size ${size_mb} MB ($size bytes)"
podman image inspect "$IMAGE" | grep -qi '"healthcheck"' \
  || fail "HEALTHCHECK was dropped (not --format docker?)"

# ---------------------------------------------------------------- smoke test
step "wsguard check on the image's policy"
podman run --rm --network none --entrypoint /usr/local/bin/wsguard "$IMAGE" \
  check -c /etc/wsguard/policy.yaml | tee "$tmp/check.out"
grep -q ': ok: ' "$tmp/check.out" || fail "check did not pass"

step "host-side echo backend and client"
cargo build -q --example loadgen --bin wsguard
LOADGEN=$CARGO_TARGET_DIR/debug/examples/loadgen
WSGUARD=$CARGO_TARGET_DIR/debug/wsguard
"$LOADGEN" echo-server --listen 127.0.0.1:0 > "$tmp/backend.out" 2>&1 & pids+=($!)
wait_for 10 grep -q LISTENING "$tmp/backend.out" || fail "echo backend did not start"
backend=$(awk '/LISTENING/ {print $2}' "$tmp/backend.out")

port=$(free_port); admin=$(free_port)
cat > "$tmp/policy.yaml" <<EOF
listen: "127.0.0.1:$port"
admin: { listen: "127.0.0.1:$admin" }
shutdown_grace: 5s
log: { format: json, level: info }
upstream: { url: "ws://$backend" }
EOF
chmod 0644 "$tmp/policy.yaml"; chmod 0755 "$tmp"

step "running the image (host network, 127.0.0.1 only)"
cid=$(podman run -d --network host --read-only --cap-drop ALL \
  -v "$tmp/policy.yaml:/etc/wsguard/policy.yaml:ro,Z" "$IMAGE")
wait_for 20 curl -sf "http://127.0.0.1:$admin/readyz" || { podman logs "$cid" | tail; fail "/readyz never answered"; }
for p in healthz readyz; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/$p")
  echo "/$p: $code"; [ "$code" = 200 ] || fail "/$p answered $code"
done

pid=$(podman inspect "$cid" --format '{{.State.Pid}}')
uid=$(awk '/^Uid:/{print $2}' "/proc/$pid/status")
echo "container process uid: $uid (image USER $(podman image inspect "$IMAGE" --format '{{.Config.User}}'))"
[ "$uid" != 0 ] || fail "runs as root"

step "a message through the containerised proxy"
reply=$(printf 'hello through the image\n' | timeout 20 "$WSGUARD" connect "ws://127.0.0.1:$port/")
echo "$reply"
grep -q '< hello through the image' <<<"$reply" || fail "no echo"

step "SIGTERM: exit 0 within shutdown_grace (5s)"
t0=$(date +%s%N)
podman kill --signal TERM "$cid" >/dev/null
code=$(timeout 15 podman wait "$cid")
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "exit code $code after ${ms} ms"
[ "$code" = 0 ] || { podman logs "$cid" | tail; fail "exit code $code"; }
[ "$ms" -le 5000 ] || fail "took ${ms} ms"
podman rm "$cid" >/dev/null; cid=""

step "PASS: $IMAGE, ${size_mb} MB, built in ${build_secs}s"
