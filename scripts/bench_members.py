#!/usr/bin/env python3
"""Helper of scripts/bench-members.sh: free ports, timings and the results table.

Modes (the timing modes print JSON lines):
    bench_members.py free-ports N
    bench_members.py serfclient-latency HOST:PORT N    # needs `serfclient` + `msgpack`
    bench_members.py cold RUNS NAME CMD [ARG...] [::: NAME CMD [ARG...]]...
    bench_members.py table RESULTS.jsonl

`serfclient-latency` times N sequential `members()` calls of the PyPI `serfclient`
package on one connection (it is synchronous: one call in flight at a time), and the
process CPU time they took.
`cold` times whole processes, spawn to exit, stdout to /dev/null: RUNS rounds (after
one unmeasured round), each running every command once in turn, so that a change in
machine load hits all of them alike; one JSON line per command with the median. It
fails when any run exits non-zero.
`table` prints the side-by-side table; when a client has several in-process records
(rounds), each figure is the median over the rounds.
"""

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def summary(latencies, wall, cpu, in_flight, members):
    latencies = sorted(latencies)
    n = len(latencies)

    def pct(p):
        return round(latencies[max(1, math.ceil(p * n)) - 1] * 1e6, 1)

    return {
        "calls": n,
        "in_flight": in_flight,
        "members": members,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "mean_us": round(statistics.fmean(latencies) * 1e6, 1),
        "calls_per_s": round(n / wall),
        "cpu_us_per_call": round(cpu / n * 1e6, 1),
    }


def serfclient_latency(addr, n):
    import serfclient  # noqa: F401  (fail early with a clear ImportError)
    from serfclient import SerfClient

    host, port = addr.rsplit(":", 1)
    client = SerfClient(host, int(port), rpc_auth=os.environ.get("SERF_RPC_AUTH"))
    reply = client.members()
    if reply.head.get("Error"):
        raise RuntimeError(f"members failed: {reply.head}")
    members = len(reply.body["Members"])
    for _ in range(min(n, 100)):  # warm-up
        client.members()
    latencies = []
    cpu = time.process_time()
    started = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        client.members()
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    client.close()
    print(json.dumps({"client": "serfclient", "sequential": summary(latencies, wall, cpu, 1, members)}))


def cold(runs, specs):
    def once(cmd):
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd!r} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return elapsed

    for _, cmd in specs:
        once(cmd)  # page cache, first-run effects
    times = {name: [] for name, _ in specs}
    for _ in range(runs):
        for name, cmd in specs:
            times[name].append(once(cmd))
    for name, _ in specs:
        ts = sorted(times[name])
        print(json.dumps({
            "client": name,
            "cold": {
                "runs": runs,
                "median_ms": round(statistics.median(ts) * 1e3, 2),
                "min_ms": round(ts[0] * 1e3, 2),
                "max_ms": round(ts[-1] * 1e3, 2),
            },
        }))


def parse_cold_specs(args):
    specs, cur = [], []
    for a in args + [":::"]:
        if a == ":::":
            if len(cur) < 2:
                raise SystemExit("cold: each command needs a NAME and a CMD")
            specs.append((cur[0], cur[1:]))
            cur = []
        else:
            cur.append(a)
    return specs


def table(path):
    records = {}
    extra = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            per_client = records.setdefault(rec["client"], {})
            for key in ("sequential", "concurrent", "cold"):
                if key in rec:
                    per_client.setdefault(key, []).append(rec[key])
            if "runtime" in rec:
                extra.setdefault(rec["client"], {})["runtime"] = rec["runtime"]

    def median_of(recs):
        merged = {}
        for k in recs[0]:
            vals = [r[k] for r in recs if isinstance(r.get(k), (int, float))]
            if len(vals) == len(recs):
                m = statistics.median(vals)
                merged[k] = round(m, 2) if isinstance(m, float) else m
            else:
                merged[k] = recs[0][k]
        return merged

    rows = {c: {k: median_of(v) for k, v in secs.items()} for c, secs in records.items()}
    rounds = len(records.get("serf-client", {}).get("sequential", []))

    order = [
        ("serf-client", "serf-client (Rust)"),
        ("serf-cli", "serf members (Go CLI)"),
        ("serfclient", "serfclient (Python)"),
        ("serfclient-import", "  python -c 'import serfclient' only"),
    ]

    def get(row, section, key, unit=""):
        v = row.get(section, {}).get(key)
        if v is None:
            return "n/a"
        if isinstance(v, float) and key.endswith("_us"):
            return f"{v:.1f}{unit}"
        return f"{v}{unit}"

    header = [
        "client",
        "seq p50 µs", "seq p99 µs", "seq mean µs", "seq calls/s", "seq CPU µs/call",
        "16-in-flight p50 µs", "p99 µs", "calls/s", "CPU µs/call",
        "cold median ms", "cold min–max ms",
    ]
    lines = []
    for key, label in order:
        row = rows.get(key, {})
        c = row.get("cold")
        lines.append([
            label,
            get(row, "sequential", "p50_us"), get(row, "sequential", "p99_us"),
            get(row, "sequential", "mean_us"), get(row, "sequential", "calls_per_s"),
            get(row, "sequential", "cpu_us_per_call"),
            get(row, "concurrent", "p50_us"), get(row, "concurrent", "p99_us"),
            get(row, "concurrent", "calls_per_s"), get(row, "concurrent", "cpu_us_per_call"),
            f"{c['median_ms']:.2f}" if c else "n/a",
            f"{c['min_ms']:.2f}–{c['max_ms']:.2f}" if c else "n/a",
        ])
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]

    def fmt(r):
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in lines:
        print(fmt(r))
    seq = rows.get("serf-client", {}).get("sequential", {})
    runs = rows.get("serf-client", {}).get("cold", {}).get("runs", "?")
    print()
    print(f"members per reply: {seq.get('members', '?')}; in-process: {seq.get('calls', '?')} calls "
          f"per client per round, median over {rounds} alternating round(s); "
          f"cold: {runs} interleaved runs each (median, spawn to exit).")
    rt = extra.get("serf-client", {}).get("runtime")
    if rt:
        print(f"serf-client: one connection, tokio {rt} runtime, 16 tasks sharing it for the in-flight run.")
    print("serf members: one process and one connection per call, so only cold time applies.")
    print("serfclient: synchronous, one call in flight per connection, so no in-flight run;")
    print("  its cold time includes its own import (the row below it: the import alone).")
    print("CPU µs/call: the client process's own CPU time per call; latencies also include the")
    print("  agent's work and the kernel's wake-ups, which vary a lot with machine load.")


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    mode, args = argv[1], argv[2:]
    if mode == "free-ports" and len(args) == 1:
        free_ports(int(args[0]))
    elif mode == "serfclient-latency" and len(args) == 2:
        serfclient_latency(args[0], int(args[1]))
    elif mode == "cold" and len(args) >= 3:
        cold(int(args[0]), parse_cold_specs(args[1:]))
    elif mode == "table" and len(args) == 1:
        table(args[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
