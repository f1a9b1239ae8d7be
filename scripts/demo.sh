#!/usr/bin/env bash
# Demo: starts a local three-agent Serf cluster (roles web, db, db) on free loopback ports,
# runs serf-operator in local mode on examples/ next to the web node, fires a user event, a
# query and a node failure, and shows the Jobs that would be created and the query's answers
# (from the operator's `where` route and the db nodes' handler scripts). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# Two builds: a target-selection flag such as --examples restricts every selected package,
# so one command with both would never build the serf-operator binary.
cargo build --quiet -p serf-client --examples
cargo build --quiet -p serf-operator --bin serf-operator

operator=target/debug/serf-operator
[ -x "$operator" ] || { echo "the build did not produce $operator" >&2; exit 1; }

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

echo "==> serf-operator local mode on examples/, following demo-web (role=web)"
POD_NAMESPACE=serf-system "$operator" local --handlers examples >"$work/operator.yaml" 2>"$work/operator.err" &
pids+=($!)
for _ in $(seq 1 50); do grep -q "following the Serf agent" "$work/operator.err" && break; sleep 0.2; done

echo "==> firing user event deploy=v1.2.3"
cargo run --quiet -p serf-client --example event -- deploy v1.2.3 --no-coalesce
sleep 1
echo "==> running query where (answered by the operator) and load (by the db nodes' scripts)"
cargo run --quiet -p serf-client --example query -- where --timeout 2
cargo run --quiet -p serf-client --example query -- load 5m --timeout 2
echo "==> kill -9 demo-db2 (member-failed after Serf's failure detection, a few seconds;"
echo "    the remediation route gathers failures for 10 s before its Job)"
{ kill -9 "$demo_db2_pid" && wait "$demo_db2_pid"; } 2>/dev/null || true
for _ in $(seq 1 150); do
  grep -q "job: db-remediation-db-failed" "$work/operator.yaml" && break
  sleep 0.2
done

echo "==> what the operator decided (YAML: a summary per event, then each Job and its stdin Secret):"
cat "$work/operator.yaml"
grep -q "job: web-deploy-" "$work/operator.yaml" && grep -q "job: db-remediation-db-failed" "$work/operator.yaml" \
  && grep -q "answer: demo-web in serf-system" "$work/operator.yaml" \
  || { echo "expected results missing" >&2; cat "$work/operator.err" >&2; exit 1; }
echo "==> done; stopping the agents and the operator"
