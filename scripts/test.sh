#!/usr/bin/env bash
# The whole wsguard test suite, on a fresh machine with only Rust installed.
# It first installs anything the tests need that the machine lacks (today:
# nothing beyond Rust and the crates; tests start their own backends on
# 127.0.0.1), then runs unit, integration, process and corpus-replay tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --no-fail-fast "$@"
