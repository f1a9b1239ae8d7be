#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine: the Serf agent
# (Debian's `serf` package). Idempotent; does nothing when `serf` is already on PATH.
set -euo pipefail
if ! command -v serf >/dev/null 2>&1; then
  echo "==> installing the serf agent (Debian package serf)"
  sudo_cmd=""
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 update
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 install -y serf
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
