#!/usr/bin/env bash
# The whole wsguard test suite, on a fresh machine with only Rust installed.
# It first installs what the tests need that the machine lacks (redis-server
# for the shared-limit tests, which start their own on a free port), then
# runs unit, integration, process and corpus-replay tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# redis-server also runs the Sentinel (`--sentinel`); redis-cli (redis-tools)
# builds the test Cluster.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "== installing redis-server and redis-cli (needed by the shared-limit, Sentinel and Cluster tests)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
# The browser tests (the demo page in headless Chromium) need Debian's
# chromium: about 80 MB and 130 packages, installed here like redis-server.
# WSGUARD_BROWSER_TESTS=0 skips the install; those tests then pass as skipped
# and say so on stderr.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "${WSGUARD_BROWSER_TESTS:-1}" = 1 ]; then
    echo "== installing chromium (needed by the browser tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "== chromium not installed (WSGUARD_BROWSER_TESTS=0): the browser tests will be skipped"
  fi
fi
# `fuzzing` builds the fuzz entry points the corpus replay test needs.
cargo test --locked --no-fail-fast --features fuzzing "$@"
