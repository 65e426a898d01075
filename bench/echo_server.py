"""WebSocket echo backend for the benchmark: a correct 101, then every byte echoed back.

It answers the HTTP/1.1 upgrade (``Sec-WebSocket-Accept`` computed from the
client's key) and from then on writes back exactly the bytes it receives, frame
headers included, so a client reads back as many bytes as it sent. A plain
request without a key gets ``400``. One uvloop ``Protocol`` per connection, no
frame parsing: the backend must not be what is measured.

``SIGUSR1`` makes it close every upgraded connection at once (to the parent: it
passes the signal to each process): the reconnect storm of ``bench/wsload.py``.

``--procs N`` forks N processes, each accepting on its own ``SO_REUSEPORT``
socket bound to the same port, so many idle tunnels spread over several
processes (none near the per-process descriptor limit).

Run: ``python bench/echo_server.py --port 0 --procs 2`` prints ``listening PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import hashlib
import os
import signal
import socket
import sys
from typing import cast

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16384
PR_SET_PDEATHSIG = 1


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def find_key(head: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip()
    return None


UPGRADED: set[Echo] = set()  # this process's upgraded connections, for SIGUSR1


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.upgraded:
            transport.write(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                transport.close()
            return
        head, rest = self.head[:end], self.head[end + 4 :]
        self.head = b""
        key = find_key(head)
        if key is None:
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        self.upgraded = True
        UPGRADED.add(self)
        if rest:
            transport.write(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        UPGRADED.discard(self)

    def pause_writing(self) -> None:  # the client reads slower than it sends
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


def close_upgraded() -> None:
    """Close every upgraded connection of this process (its end of file to the client)."""
    for echo in list(UPGRADED):
        if echo.transport is not None:
            echo.transport.close()
    UPGRADED.clear()


def serve(sock: socket.socket) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, sock=sock, backlog=4096)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, close_upgraded)
        async with server:
            await stop.wait()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    socks = []
    port = args.port
    for _ in range(args.procs):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((args.host, port))
        sock.listen(4096)
        port = sock.getsockname()[1]
        socks.append(sock)
    children: list[int] = []

    def pass_on(signum: int, _frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGUSR1, pass_on)
    for index, sock in enumerate(socks):
        pid = os.fork()
        if pid == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the parent
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until serve() handles it
            for other in socks[:index] + socks[index + 1 :]:
                other.close()
            serve(sock)
            os._exit(0)
        children.append(pid)
    for sock in socks:
        sock.close()
    print(f"listening {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for pid in children:
            os.waitpid(pid, 0)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
