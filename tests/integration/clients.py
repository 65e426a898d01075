"""Clients for integration tests (raw sockets and the websockets library), and a server
that answers and closes."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from websockets.asyncio.client import connect


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send ``data``, optionally shut down writing, read until the balancer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


TCPI_SEGS_IN = 140  # offset of tcpi_segs_in in struct tcp_info (linux/tcp.h)


def answer_and_close(server: socket.socket, answer: bytes, count: int) -> None:
    """Answer ``count`` connections, the answer's last bytes and the FIN in one segment."""
    for _ in range(count):
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.send(answer, socket.MSG_MORE)  # held until the FIN joins it
            conn.shutdown(socket.SHUT_WR)
            read_all(conn)


def segments_received(port: int, request: bytes) -> tuple[bytes, int]:
    """What a client reads to the end of file, and how many segments carried it to it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = read_all(sock)
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_SEGS_IN + 4)
        return reply, int.from_bytes(info[TCPI_SEGS_IN:], "little")


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply[9:12])


def upgrade_request(path: str = "/ws", host: str = "example.test", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


def ws_tunnel(port: int) -> socket.socket:
    """A raw WebSocket tunnel through the balancer (101 read, frames not needed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(upgrade_request())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def ws_ping(sock: socket.socket, payload: bytes = b"hi") -> bool:
    """Send one masked text frame and read its echo: is the tunnel alive?"""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    try:
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        reply = sock.recv(100)
    except OSError:
        return False
    return reply == bytes([0x81, len(payload)]) + payload


async def ws_echo(url: str, messages: list[bytes | str], **kwargs: object) -> list[bytes | str]:
    """Send each message and collect its echo, in order."""
    replies: list[bytes | str] = []
    async with connect(url, max_size=None, open_timeout=10, **kwargs) as ws:  # type: ignore[arg-type]
        for message in messages:
            await ws.send(message)
            replies.append(await ws.recv())
    return replies


def run(coro: object, timeout: float = 60) -> object:
    async def bounded() -> object:
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]

    return asyncio.run(bounded())


def elapsed(start: float) -> float:
    return time.monotonic() - start
