#!/usr/bin/env python3
"""Records real Serf agent RPC bytes as benchmark fixtures for serf-client.

Usage:
    # 1) record from a running agent (RPC address as host:port):
    scripts/record-fixtures.py record 127.0.0.1:7373 [--events 200] [--out-dir DIR]
    # 2) build a 500-member `members` reply from the recorded one:
    scripts/record-fixtures.py --synthesize-members 500 [--from FILE] [--out FILE]

Needs Python 3.8+ and `msgpack` from PyPI (`pip install msgpack`). Starts no agent:
point it at one that is already running, ideally in a cluster of three so that the
recorded `members` reply has three members.

`record` writes, into DIR (default: serf-client/benches/data next to this script's
repository root):
  user-events.bin  the raw bytes the agent sent on a `stream` connection (filter
                   "user") after the stream's ack: one response header + one event
                   record per user event, exactly as received. The events are fired
                   from a second connection, with Coalesce false, varied names and
                   payloads (empty, text, JSON, non-UTF-8 bytes, near the 512-byte
                   limit).
  members-3.bin    the raw reply to `members` on a fresh connection: the response
                   header followed by the body.

`--synthesize-members N` reads members-3.bin, keeps its header bytes verbatim and
builds a body with N members (node-000, node-001, ...) by copying the recorded
member maps, so key order and encodings (alphabetical keys, Addr as 4-byte bin,
smallest int encodings) are the agent's. Ports and addresses vary; a few members
are `failed` or `left`. It first checks that re-encoding the recorded body gives
back the recorded bytes exactly, so the synthetic body is encoded the same way.
"""

import argparse
import os
import socket
import sys
import time

import msgpack

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "serf-client", "benches", "data")


class RawConn:
    """One RPC connection that keeps every byte it receives."""

    def __init__(self, addr, timeout=10.0):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = bytearray()  # every byte received so far
        self.unpacker = msgpack.Unpacker(raw=False)
        self.seq = 0

    def send(self, command, body=None):
        seq = self.seq
        self.seq += 1
        out = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            out += msgpack.packb(body, use_bin_type=True)
        self.sock.sendall(out)
        return seq

    def next_value(self):
        """Returns (value, start offset, end offset) of the next msgpack value."""
        while True:
            start = self.unpacker.tell()
            try:
                value = next(self.unpacker)
                return value, start, self.unpacker.tell()
            except StopIteration:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the agent closed the connection")
                self.raw += chunk
                self.unpacker.feed(chunk)

    def expect_ok(self, seq, what):
        header, _, _ = self.next_value()
        if header.get("Seq") != seq or header.get("Error"):
            raise RuntimeError(f"{what}: unexpected reply header {header!r}")

    def handshake(self):
        seq = self.send("handshake", {"Version": 1})
        self.expect_ok(seq, "handshake")

    def close(self):
        self.sock.close()


def user_events(n):
    """N varied (name, payload) pairs; name + payload stay under the 512-byte limit."""
    names = ["deploy", "restart", "config-reload", "cache-flush", "scale", "déploiement", "rotate-certs"]
    events = []
    for i in range(n):
        name = names[i % len(names)]
        kind = i % 6
        if kind == 0:
            payload = b""
        elif kind == 1:
            payload = f"v1.{i}.0".encode()
        elif kind == 2:
            payload = (
                '{"service":"web","version":"1.%d.0","replicas":%d,"canary":false}' % (i, i % 9)
            ).encode()
        elif kind == 3:
            # not UTF-8: high bytes, an invalid continuation, NUL
            payload = bytes([0xFF, 0xFE, 0x00, 0xC3, 0x28, 0x80, i & 0xFF]) + bytes(range(0x80, 0xA0))
        elif kind == 4:
            payload = ("x" * 400 + f"-{i}").encode()
        else:
            payload = f"node-{i:03}\tready\n".encode()
        events.append((name, payload))
    return events


def record(addr, n_events, out_dir):
    os.makedirs(out_dir, exist_ok=True)

    stream = RawConn(addr)
    stream.handshake()
    stream_seq = stream.send("stream", {"Type": "user"})
    stream.expect_ok(stream_seq, "stream")
    first = stream.unpacker.tell()  # the first byte after the ack

    sender = RawConn(addr)
    sender.handshake()
    sent = user_events(n_events)
    for name, payload in sent:
        seq = sender.send("event", {"Name": name, "Payload": payload, "Coalesce": False})
        sender.expect_ok(seq, "event")

    received = []
    end = first
    deadline = time.monotonic() + 30
    stream.sock.settimeout(30)
    while len(received) < n_events:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(received)} of {n_events} events arrived")
        header, _, _ = stream.next_value()
        if header.get("Seq") != stream_seq or header.get("Error"):
            raise RuntimeError(f"unexpected stream header {header!r}")
        body, _, end = stream.next_value()
        received.append(body)

    got = [(b["Name"], b.get("Payload") or b"") for b in received]
    if sorted(got) != sorted(sent):
        raise RuntimeError("the recorded events are not the ones that were sent")
    data = bytes(stream.raw[first:end])
    # Stop the stream before closing, after every event has been delivered (closing a
    # stream during event dispatch can crash a 0.9.x agent).
    stream.send("stop", {"Stop": stream_seq})
    sender.close()
    with open(os.path.join(out_dir, "user-events.bin"), "wb") as f:
        f.write(data)
    print(f"user-events.bin: {len(received)} events, {len(data)} bytes")

    members = RawConn(addr)
    members.handshake()
    start = members.unpacker.tell()
    seq = members.send("members")
    header, _, _ = members.next_value()
    if header.get("Seq") != seq or header.get("Error"):
        raise RuntimeError(f"members: unexpected reply header {header!r}")
    body, _, end = members.next_value()
    data = bytes(members.raw[start:end])
    members.close()
    stream.close()
    with open(os.path.join(out_dir, "members-3.bin"), "wb") as f:
        f.write(data)
    print(f"members-3.bin: {len(body['Members'])} members, {len(data)} bytes")


def synthesize_members(count, src, out):
    with open(src, "rb") as f:
        data = f.read()
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    header = next(unpacker)
    body_start = unpacker.tell()
    body = next(unpacker)
    if unpacker.tell() != len(data) or header.get("Error"):
        raise RuntimeError(f"{src} is not one members reply (header + body)")
    header_bytes, body_bytes = data[:body_start], data[body_start:]
    if msgpack.packb(body, use_bin_type=True) != body_bytes:
        raise RuntimeError("re-encoding the recorded body does not give the agent's bytes")

    templates = body["Members"]
    members = []
    for i in range(count):
        m = dict(templates[i % len(templates)])  # keeps the agent's key order
        m["Name"] = f"node-{i:03}"
        m["Addr"] = bytes([10, 0, (i >> 8) & 0xFF, i & 0xFF])
        m["Port"] = 7946 + (i * 7) % 4000
        m["Tags"] = dict(m["Tags"])
        if i % 97 == 13:
            m["Status"] = "failed"
        elif i % 89 == 42:
            m["Status"] = "left"
        members.append(m)
    out_bytes = header_bytes + msgpack.packb({"Members": members}, use_bin_type=True)
    with open(out, "wb") as f:
        f.write(out_bytes)
    print(f"{os.path.basename(out)}: {count} members, {len(out_bytes)} bytes")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["record"], help="record from a live agent")
    p.add_argument("addr", nargs="?", help="agent RPC address, host:port")
    p.add_argument("--events", type=int, default=200, help="user events to record (default 200)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--synthesize-members", type=int, metavar="N",
                   help="build an N-member reply from the recorded members-3.bin")
    p.add_argument("--from", dest="src", help="recorded reply (default OUT_DIR/members-3.bin)")
    p.add_argument("--out", help="output (default OUT_DIR/members-N.bin)")
    args = p.parse_args()

    if args.synthesize_members is not None:
        n = args.synthesize_members
        src = args.src or os.path.join(args.out_dir, "members-3.bin")
        out = args.out or os.path.join(args.out_dir, f"members-{n}.bin")
        synthesize_members(n, src, out)
    elif args.mode == "record" and args.addr:
        record(args.addr, args.events, args.out_dir)
    else:
        p.error("give `record HOST:PORT` or `--synthesize-members N`")


if __name__ == "__main__":
    sys.exit(main())
