#!/usr/bin/env bash
# Demo: starts a local three-agent Serf cluster (roles web, db, db) on free loopback ports,
# streams its events as JSON lines with the `stream` example, fires a user event, a query
# answered by the db nodes, a tag change and a node failure, then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --quiet -p serf-client --examples

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_agent() { # name role [join]
  local name=$1 role=$2 join=${3:-} bind rpc
  bind=$(free_port); rpc=$(free_port)
  local args=(agent -node="$name" -bind="127.0.0.1:$bind" -advertise="127.0.0.1:$bind"
    -rpc-addr="127.0.0.1:$rpc" -tag role="$role")
  if [ "$role" = db ]; then
    # a classic Serf handler script answers the `load` query
    args+=(-event-handler 'query:load=echo "load on $SERF_SELF_NAME: 0.42"')
  fi
  [ -n "$join" ] && args+=(-join="$join")
  serf "${args[@]}" >"$work/$name.log" 2>&1 &
  pids+=($!)
  eval "${name//-/_}_bind=127.0.0.1:$bind ${name//-/_}_rpc=127.0.0.1:$rpc ${name//-/_}_pid=$!"
  for _ in $(seq 1 100); do
    serf members -rpc-addr="127.0.0.1:$rpc" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "agent $name did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}

echo "==> starting agents: demo-web (role=web), demo-db1 and demo-db2 (role=db)"
start_agent demo-web web
start_agent demo-db1 db "$demo_web_bind"
start_agent demo-db2 db "$demo_web_bind"
export SERF_RPC_ADDR=$demo_web_rpc

echo "==> members, through the members example"
for _ in $(seq 1 50); do
  [ "$(cargo run --quiet -p serf-client --example members | grep -c alive)" -eq 3 ] && break
  sleep 0.2
done
cargo run --quiet -p serf-client --example members

echo "==> streaming every event of demo-web as JSON lines"
target/debug/examples/stream '*' >"$work/events.jsonl" 2>"$work/stream.err" &
pids+=($!)
sleep 1

echo "==> firing user event deploy=v1.2.3"
cargo run --quiet -p serf-client --example event -- deploy v1.2.3 --no-coalesce
echo "==> running query load (answered by the db nodes' handler scripts)"
cargo run --quiet -p serf-client --example query -- load 5m --timeout 2
echo "==> changing demo-db1's tags (member-update)"
serf tags -rpc-addr="$demo_db1_rpc" -set version=2
echo "==> kill -9 demo-db2 (member-failed after Serf's failure detection, a few seconds)"
{ kill -9 "$demo_db2_pid" && wait "$demo_db2_pid"; } 2>/dev/null || true
for _ in $(seq 1 150); do
  grep -q member-failed "$work/events.jsonl" && break
  sleep 0.2
done

echo "==> events seen by the stream:"
cat "$work/events.jsonl"
grep -q '"name":"deploy"' "$work/events.jsonl" && grep -q member-failed "$work/events.jsonl" \
  || { echo "expected events missing" >&2; cat "$work/stream.err" >&2; exit 1; }
echo "==> done; stopping the agents"
