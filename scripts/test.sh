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
echo "==> Helm chart: render, lint and check with the real Helm engine (helm-python-sdk)"
venv=target/test-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# checkov: the security scanner run on the rendered chart (about 10 s of tests; the install
# about 1 min on a fresh venv).
"$venv/bin/pip" install -q --disable-pip-version-check helm-python-sdk pytest pyyaml checkov==3.3.30
"$venv/bin/python" -m pytest -q -rs charts/tests
if [ -z "${KUBECONFIG:-}" ]; then
  echo "==> NOTE: the cluster suites (tests/: cluster, ha, lifecycle, node, outage, validation, examples, watch, chart, discovery) were SKIPPED: set KUBECONFIG to a real cluster to run them"
fi
