"""The splice pump on real TCP sockets: bytes arrive whole, and end of file follows them."""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from lb.worker.deadlines import Deadlines
from lb.worker.loop import IN, Loop
from lb.worker.pipes import PipePool
from lb.worker.splice import Pump, Tunnel

IDLE = 3600.0


@dataclass
class FakeConnection:
    """The tunnel's owner (a connection, in a worker)."""

    bytes_in: int = 0
    bytes_out: int = 0
    closed: list[str] = field(default_factory=list)
    counted: list[tuple[int, int]] = field(default_factory=list)

    def tunnel_moved(self, up: int, down: int) -> None:
        self.bytes_in += up
        self.bytes_out += down
        self.counted.append((up, down))

    def tunnel_closed(self, reason: str, up: int, down: int) -> None:
        self.closed.append(reason)
        if up or down:
            self.tunnel_moved(up, down)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


Setup = tuple[Tunnel, socket.socket, socket.socket, FakeConnection]


@pytest.fixture
def make_tunnel() -> Iterator[Callable[[PipePool], Setup]]:
    """client <-> [balancer's client socket | tunnel | balancer's server socket] <-> server."""
    made: list[Setup] = []

    def make(pipes: PipePool) -> Setup:
        client, lb_client = tcp_pair()
        lb_server, server = tcp_pair()
        lb_client.setblocking(False)
        lb_server.setblocking(False)
        loop = Loop(on_error=lambda exc: pytest.fail(repr(exc)))
        pump = Pump(loop, pipes, Deadlines(loop, 0.05, lambda exc: pytest.fail(repr(exc))))
        conn = FakeConnection()
        tunnel = Tunnel(pump, conn, lb_client.detach(), lb_server.detach(), IDLE)
        made.append((tunnel, client, server, conn))
        return made[-1]

    yield make
    for tunnel, client, server, _conn in made:
        client.close()
        server.close()
        loop, pipes = tunnel.loop, tunnel.pump.pipes
        tunnel.close("test over")
        loop.shutdown()
        pipes.close()


@pytest.fixture
def tunnel(make_tunnel: Callable[[PipePool], Setup]) -> Setup:
    return make_tunnel(PipePool())


def arrived(sock: socket.socket) -> None:
    """Wait until the balancer's socket has what ``sock``'s peer sent (loopback: at once)."""
    time.sleep(0.05)
    select.select([], [], [], 0)


def read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_bytes_and_end_of_file_in_one_event_end_the_flow_in_one_read(tunnel: Setup) -> None:
    t, client, server, _conn = tunnel
    server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    server.shutdown(socket.SHUT_WR)
    arrived(server)
    t.loop.events = IN  # woken with the FIN already in: EPOLLIN | EPOLLRDHUP
    t.down.on_readable()
    assert t.down.ended  # passed on without a second read
    assert read_to_eof(client) == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


def test_a_read_that_filled_the_pipe_is_not_taken_for_the_end(
    make_tunnel: Callable[[PipePool], Setup],
) -> None:
    """With the FIN already in, a read that may have stopped because the pipe ran
    out of slots is followed by another: every byte arrives before the end of file."""
    t, client, server, _conn = make_tunnel(PipePool(size=8192))  # two slots
    chunks = [bytes([65 + i % 26]) * 1000 for i in range(20)]
    for chunk in chunks:
        server.send(chunk)
    server.shutdown(socket.SHUT_WR)
    arrived(server)
    reads = 0
    while not t.down.ended and reads < 100:
        t.loop.events = IN
        t.down.on_readable()
        reads += 1
    assert reads > 1
    assert read_to_eof(client) == b"".join(chunks)


def test_closed_tunnel_counts_its_bytes_once(tunnel: Setup) -> None:
    t, client, server, conn = tunnel
    client.sendall(b"x" * 1000)
    server.sendall(b"y" * 300)
    arrived(server)
    t.loop.events = 0
    t.up.on_readable()
    t.down.on_readable()
    t.close("both done")
    assert conn.closed == ["both done"]
    assert (conn.bytes_in, conn.bytes_out) == (1000, 300)
    assert conn.counted == [(1000, 300)]


class NoPipes(PipePool):
    """A pool that can make no pipe until told it can (the worker is out of descriptors)."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = False
        self.refused = 0

    def new(self) -> tuple[int, int, int]:
        if not self.allowed:
            self.refused += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().new()


def test_no_pipe_holds_the_bytes_until_one_can_be_made(
    make_tunnel: Callable[[PipePool], Setup],
) -> None:
    """Out of descriptors for a pipe: the flow stops reading, tries again, and loses nothing."""
    pipes = NoPipes()
    t, client, server, conn = make_tunnel(pipes)
    client.sendall(b"hold me")
    arrived(client)
    t.loop.events = IN
    t.up.on_readable()
    assert pipes.refused == 1 and t.pump.starved == [t.up] and not conn.closed
    pipes.allowed = True
    t.loop.call_later(0.5, t.loop.stop)
    t.loop.run()  # the retry reads the client again, now with a pipe
    server.settimeout(2)
    assert server.recv(100) == b"hold me"
    assert not conn.closed


def test_an_idle_tunnel_closes_after_its_timeout_and_an_active_one_stays(
    make_tunnel: Callable[[PipePool], Setup],
) -> None:
    t, client, server, conn = make_tunnel(PipePool())
    t.idle_timeout = 0.3
    t.start(speculate=False)
    client.sendall(b"x")
    t.loop.call_later(0.2, lambda: client.sendall(b"y"))  # active: the deadline moves on
    t.loop.call_later(0.5, lambda: seen.append(list(conn.closed)))
    t.loop.call_later(1.8, t.loop.stop)
    seen: list[list[str]] = []
    t.loop.run()
    assert seen == [[]]  # still open 0.5 s in: it moved a byte at 0.2 s
    assert conn.closed == ["tunnel idle timeout"]
    assert (conn.bytes_in, conn.bytes_out) == (2, 0)
    assert server.recv(10) == b"xy"
