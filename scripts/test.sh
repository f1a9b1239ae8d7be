#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test, the ones against real
# Serf agents included (they start `serf agent` processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "==> serf: $(command -v serf)"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
