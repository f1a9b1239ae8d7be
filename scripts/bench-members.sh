#!/usr/bin/env bash
# Times Serf `members` calls against one live agent with three clients and prints a table:
#   - serf-client (this workspace): in-process per-call latency on one connection, N
#     sequential calls then N calls with 16 in flight (examples/members_latency.rs);
#   - the Go CLI, `serf members -rpc-addr=...` (one process per call);
#   - the Python `serfclient` package from PyPI: in-process, N sequential calls;
# and, for all three, whole-process cold time (spawn -> exit), median over RUNS runs:
#   target/release/examples/members, `serf members`, `python -c` with serfclient.
#
# Usage: scripts/bench-members.sh            # starts a 3-agent cluster on free loopback ports
#        SERF_RPC_ADDR=127.0.0.1:7373 scripts/bench-members.sh   # uses a running agent
# Environment: N (in-process calls per client and round, default 2000), ROUNDS (alternating
#              in-process rounds, default 3; the table shows the median round), RUNS (cold
#              runs per client, default 30, interleaved), SERF_RPC_AUTH (passed to every
#              client when the agent needs it).
# Needs: cargo, python3 (with venv), and `serf` (installed with apt-get when missing).
# serfclient and msgpack are installed into target/bench-venv. The agents it starts are
# stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-2000}
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-30}
VENV="$ROOT/target/bench-venv"
HELPER="$ROOT/scripts/bench_members.py"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-members.XXXXXX")
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "==> $*" >&2; }

if ! command -v serf >/dev/null 2>&1; then
    log "installing serf with apt-get"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -q && apt-get install -y -q serf
    else
        sudo apt-get update -q && sudo apt-get install -y -q serf
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
log "installing serfclient and msgpack into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check serfclient msgpack
PY="$VENV/bin/python"
# serfclient imports pkg_resources: Python 3.12+ venvs come without setuptools, and
# setuptools 82 removed pkg_resources (recent ones warn on import), so pin below 81.
if ! "$PY" -c "import pkg_resources" >/dev/null 2>&1; then
    log "installing setuptools<81 for serfclient's pkg_resources import"
    "$VENV/bin/pip" install -q --disable-pip-version-check "setuptools<81"
fi

log "building serf-client examples (release)"
(cd "$ROOT" && cargo build -q --release -p serf-client --examples)
EXAMPLES="$ROOT/target/release/examples"

if [ -z "${SERF_RPC_ADDR:-}" ]; then
    read -r B1 B2 B3 R1 R2 R3 < <("$PY" "$HELPER" free-ports 6)
    log "starting 3 agents (rpc 127.0.0.1:$R1, :$R2, :$R3)"
    start_agent() { # name bind rpc [extra args...]
        local name=$1 bind=$2 rpc=$3
        shift 3
        serf agent -node="$name" -bind="127.0.0.1:$bind" -advertise="127.0.0.1:$bind" \
            -rpc-addr="127.0.0.1:$rpc" "$@" >"$WORK/$name.log" 2>&1 &
        PIDS+=("$!")
    }
    start_agent bench-1 "$B1" "$R1" -tag role=web -tag dc=east
    for _ in $(seq 100); do
        serf members -rpc-addr="127.0.0.1:$R1" >/dev/null 2>&1 && break
        sleep 0.1
    done
    start_agent bench-2 "$B2" "$R2" -tag role=db -join="127.0.0.1:$B1"
    start_agent bench-3 "$B3" "$R3" -tag role=cache -tag dc=west -join="127.0.0.1:$B1"
    export SERF_RPC_ADDR="127.0.0.1:$R1"
    alive=0
    for _ in $(seq 200); do
        alive=$(serf members -rpc-addr="$SERF_RPC_ADDR" -status=alive 2>/dev/null | wc -l) || alive=0
        [ "$alive" -ge 3 ] && break
        sleep 0.1
    done
    if [ "$alive" -lt 3 ]; then
        log "the cluster did not converge; agent logs:"
        tail -n 20 "$WORK"/*.log >&2
        exit 1
    fi
fi
ADDR=$SERF_RPC_ADDR
HOST=${ADDR%:*}
PORT=${ADDR##*:}
log "agent: $ADDR ($(serf members -rpc-addr="$ADDR" | wc -l) members)"

RESULTS="$WORK/results.jsonl"
for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS: serf-client, $N sequential calls then $N with 16 in flight"
    "$EXAMPLES/members_latency" "$N" | tee -a "$RESULTS" >&2
    log "round $round/$ROUNDS: serfclient, $N sequential calls"
    "$PY" "$HELPER" serfclient-latency "$ADDR" "$N" | tee -a "$RESULTS" >&2
done

log "cold runs (spawn -> exit), $RUNS interleaved runs each"
"$PY" "$HELPER" cold "$RUNS" \
    serf-client "$EXAMPLES/members" ::: \
    serf-cli serf members -rpc-addr="$ADDR" ::: \
    serfclient "$PY" -c "
import os, sys
from serfclient import SerfClient
r = SerfClient('$HOST', $PORT, rpc_auth=os.environ.get('SERF_RPC_AUTH')).members()
sys.exit(1 if r.head.get('Error') else 0)" ::: \
    serfclient-import "$PY" -c "import serfclient" | tee -a "$RESULTS" >&2

echo
"$PY" "$HELPER" table "$RESULTS"
