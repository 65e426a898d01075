"""Benchmark clients with blocking sockets: WebSocket round trips and idle tunnels.

``python -m bench.clients rtt --port P --sizes 64:20000,16384:5000`` opens one
tunnel (an HTTP/1.1 upgrade, checked: ``101`` and the right
``Sec-WebSocket-Accept``), then per size sends one masked binary frame, waits
for the whole echo (the echo backend returns the same bytes), and times each
round trip with ``time.perf_counter_ns``; one message at a time. It prints one
JSON object: per size the p50, p99, mean and count in microseconds.

``python -m bench.clients idle --port P --count N [--source ADDR]`` opens N
tunnels (from ``ADDR``, a loopback address such as 127.0.0.2: one source
address has about 28,000 local ports), prints ``ready N`` and holds them,
idle, until its standard input closes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import socket
import struct
import sys
import time

HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TIMEOUT = 10.0
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h (socket.IP_BIND_ADDRESS_NO_PORT from Python 3.12)


class TunnelError(RuntimeError):
    pass


def open_tunnel(
    port: int, path: str = "/ws", timeout: float = TIMEOUT, source: str = ""
) -> socket.socket:
    """Connect (from ``source``, if given) and upgrade; the socket is blocking, with
    TCP_NODELAY, ready for frames."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source:
            # The port is chosen at connect, for this destination: a port bound without
            # it is taken from every connect() of the machine, the balancer's included.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.connect((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: 127.0.0.1:"
            + str(port).encode()
            + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
            + key
            + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise TunnelError(f"closed during the upgrade: {head!r}")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101 "):
            raise TunnelError(f"upgrade refused: {lines[0]!r}")
        want = base64.b64encode(hashlib.sha1(key + GUID).digest())
        accept = [
            v.strip()
            for n, _, v in (x.partition(b":") for x in lines[1:])
            if n.strip().lower() == b"sec-websocket-accept"
        ]
        if accept != [want] or rest:
            raise TunnelError(f"bad upgrade answer: {head!r} {rest!r}")
        return sock
    except BaseException:
        sock.close()
        raise


def binary_frame(size: int) -> bytes:
    """A masked, final binary frame with a ``size``-byte payload, as a client sends it."""
    if size <= 125:
        header = struct.pack("!BB", 0x82, 0x80 | size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x82, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, size)
    mask = os.urandom(4)
    payload = os.urandom(size)
    keystream = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(
        size, "big"
    )
    return header + mask + masked


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def round_trips(sock: socket.socket, size: int, count: int, warmup: int) -> dict[str, float]:
    """Send a frame and wait for its echo, ``count`` times (after ``warmup`` untimed ones)."""
    frame = binary_frame(size)
    n = len(frame)
    buf = bytearray(n)
    view = memoryview(buf)
    times: list[int] = []
    second_max: dict[int, int] = {}  # the longest round trip that ended in each second
    clock = time.perf_counter_ns
    first = clock()
    for i in range(warmup + count):
        start = clock()
        sock.sendall(frame)
        got = 0
        while got < n:
            r = sock.recv_into(view[got:], n - got)
            if r == 0:
                raise TunnelError("tunnel closed while waiting for an echo")
            got += r
        end = clock()
        if i >= warmup:
            times.append(end - start)
            second = (end - first) // 1_000_000_000
            second_max[second] = max(second_max.get(second, 0), end - start)
    if bytes(buf) != frame:
        raise TunnelError("the echo differs from what was sent")
    times.sort()
    # Work a process does once a second (a sweep of its connections) shows in every
    # second's longest round trip; a stall of the machine's (another process, the
    # hypervisor) in a few: the median over the seconds tells them apart.
    maxima = sorted(second_max.values())
    return {
        "count": count,
        "p50_us": percentile(times, 50) / 1000,
        "p99_us": percentile(times, 99) / 1000,
        "p999_us": percentile(times, 99.9) / 1000,
        "max_us": times[-1] / 1000,
        "mean_us": sum(times) / len(times) / 1000,
        "seconds": len(maxima),
        "second_max_p50_us": percentile(maxima, 50) / 1000,
    }


def rtt_main(port: int, sizes: list[tuple[int, int]], warmup: int) -> None:
    sock = open_tunnel(port)
    sock.settimeout(TIMEOUT)
    with sock:
        result = {str(size): round_trips(sock, size, count, warmup) for size, count in sizes}
    print(json.dumps(result), flush=True)


def idle_main(port: int, count: int, source: str = "") -> None:
    """Open ``count`` tunnels, say so, hold them until stdin closes."""
    socks = []
    for _ in range(count):
        for attempt in range(3):
            try:
                socks.append(open_tunnel(port, source=source))
                break
            except (OSError, TunnelError):
                if attempt == 2:
                    raise
                time.sleep(0.2)
    print(f"ready {len(socks)}", flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()


def parse_sizes(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        size, _, count = item.partition(":")
        pairs.append((int(size), int(count)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rtt = sub.add_parser("rtt", help="time message round trips over one tunnel")
    rtt.add_argument("--port", type=int, required=True)
    rtt.add_argument("--sizes", default="64:20000,16384:5000", help="SIZE:COUNT,...")
    rtt.add_argument("--warmup", type=int, default=200)
    idle = sub.add_parser("idle", help="open idle tunnels and hold them until stdin closes")
    idle.add_argument("--port", type=int, required=True)
    idle.add_argument("--count", type=int, required=True)
    idle.add_argument("--source", default="", help="a local address to connect from")
    args = parser.parse_args()
    if args.command == "rtt":
        rtt_main(args.port, parse_sizes(args.sizes), args.warmup)
    else:
        idle_main(args.port, args.count, args.source)


if __name__ == "__main__":
    main()
