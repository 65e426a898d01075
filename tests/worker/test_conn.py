"""A connection in a worker's loop, on real sockets, with the worker's side faked."""

from __future__ import annotations

import _socket
import errno
import select
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from lb.config import parse_config
from lb.route import Router
from lb.worker import conn as conn_module
from lb.worker.conn import Connection, Context
from lb.worker.deadlines import Deadlines
from lb.worker.loop import Loop
from lb.worker.pipes import PipePool
from lb.worker.runtime import BackendRuntime, ListenerRuntime
from lb.worker.splice import Pump


class InOrder:
    """A picker that offers the servers in order, skipping those tried."""

    def __init__(self, servers: Sequence[int]) -> None:
        self.servers = servers

    def pick(self, _host: str, tried: Sequence[int] = ()) -> int | None:
        return next((s for s in self.servers if s not in tried), None)


@dataclass
class Worker:
    """What the connection reports back."""

    failed: list[int] = field(default_factory=list)
    finished: list[tuple[int | None, str]] = field(default_factory=list)

    def connect_failed(self, conn: Connection, _why: str) -> None:
        self.failed.append(conn.server)

    def finish(self, _conn: Connection, status: int | None, reason: str, _out: int) -> None:
        self.finished.append((status, reason))


def unanswered_server() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full: a connect to it stays in progress."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname())
    return server, filler


class ScriptedEpoll:
    """The loop's epoll set, but its next wait returns the events given (once)."""

    def __init__(self, real: Any, loop: Loop) -> None:
        self.real = real
        self.loop = loop
        self.script: list[tuple[int, int]] = []

    def poll(self, _timeout: float = -1, _max: int = -1) -> list[tuple[int, int]]:
        if self.script:
            events, self.script = self.script, []
            return events
        self.loop.stop()
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def test_a_stale_event_for_a_closed_server_socket_never_reaches_the_next_one(
    sockets: list[socket.socket],
) -> None:
    """A connect times out and the next server is tried in the same batch of events; an
    error event for the first socket, later in that batch, must not be taken for the
    second socket's (which would mark a good server suspect)."""
    servers = [unanswered_server() for _ in range(2)]
    sockets += [s for pair in servers for s in pair]
    worker = Worker()
    loop = Loop(on_error=lambda exc: pytest.fail(repr(exc)))
    deadlines = Deadlines(loop, 0.01, lambda exc: pytest.fail(repr(exc)))
    backend = BackendRuntime(
        name="app",
        picker=InOrder([0, 1]),  # type: ignore[arg-type]
        connect_timeout=0.01,
        retries=1,
        addresses={i: (socket.AF_INET, pair[0].getsockname()) for i, pair in enumerate(servers)},
        names={0: "a", 1: "b"},
        live=frozenset(),
        handover=True,
    )
    ctx = Context(
        loop=loop,
        pump=Pump(loop, PipePool(), deadlines),
        deadlines=deadlines,
        backends={"app": backend},
        finish=worker.finish,
        tunnel_opened=lambda server, at, head: None,
        count_bytes=lambda server, at, up, down: None,
        connect_failed=worker.connect_failed,
        local_limit=lambda err, where: None,
    )
    listener = ListenerRuntime(0, "t", "tcp", None, "app", 5.0, 60.0, [], 0)  # type: ignore[arg-type]
    client, ours = socket.socketpair()
    sockets.append(client)
    conn = Connection(ctx, listener, ours.detach(), ("127.0.0.1", 1))
    conn.start()
    assert conn.sock is not None
    first = conn.sock.fileno()  # connecting to server 0, which never answers
    time.sleep(0.05)  # its connect deadline is past
    epoll = ScriptedEpoll(loop.epoll, loop)
    loop.epoll = epoll  # type: ignore[assignment]
    # One batch: the deadline tick (the timerfd), then an error event for the first socket.
    epoll.script = [(timerfd(loop), select.EPOLLIN), (first, select.EPOLLERR | select.EPOLLHUP)]
    loop.run()
    assert worker.failed == [0]  # server 1 is connecting still, and not blamed
    assert conn.sock is not None and conn.server == 1
    conn.abort("test over")
    loop.shutdown()


def timerfd(loop: Loop) -> int:
    return loop._timerfd.fd  # type: ignore[attr-defined]


class ResetOnSend(_socket.socket):
    """A server socket whose first send fails as if the server had reset at once."""

    def send(self, data: Any, flags: int = 0) -> int:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


def test_a_head_no_server_took_goes_to_the_next_server_as_routed(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first server resets before taking a byte: the next one gets the whole head, in
    the form it was routed in (the path in normal form)."""
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    sockets += servers
    made: list[_socket.socket] = []

    def make_socket(family: int, kind: int) -> _socket.socket:
        made.append((ResetOnSend if not made else _socket.socket)(family, kind))
        return made[-1]

    monkeypatch.setattr(conn_module, "_socket", SimpleNamespace(**vars(_socket)))
    monkeypatch.setattr(conn_module._socket, "socket", make_socket)
    worker = Worker()
    loop = Loop(on_error=lambda exc: pytest.fail(repr(exc)))
    deadlines = Deadlines(loop, 0.01, lambda exc: pytest.fail(repr(exc)))
    backend = BackendRuntime(
        name="app",
        picker=InOrder([0, 1]),  # type: ignore[arg-type]
        connect_timeout=5.0,
        retries=1,
        addresses={i: (socket.AF_INET, s.getsockname()) for i, s in enumerate(servers)},
        names={0: "a", 1: "b"},
        live=frozenset(),
        handover=True,
    )
    ctx = Context(
        loop=loop,
        pump=Pump(loop, PipePool(), deadlines),
        deadlines=deadlines,
        backends={"app": backend},
        finish=worker.finish,
        tunnel_opened=lambda server, at, head: None,
        count_bytes=lambda server, at, up, down: None,
        connect_failed=worker.connect_failed,
        local_limit=lambda err, where: None,
    )
    config = parse_config(
        {
            "listeners": [{"name": "t", "bind": "127.0.0.1:1", "default_backend": "app"}],
            "backends": [{"name": "app", "servers": [{"name": "a", "address": "127.0.0.1:2"}]}],
        }
    )
    router = Router(config.listeners[0])
    listener = ListenerRuntime(0, "t", "http", router, "app", 5.0, 60.0, [], 0)
    client, ours = socket.socketpair()
    sockets.append(client)
    head = b"POST /%61/./b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n"
    client.sendall(head + b"body")
    conn = Connection(ctx, listener, ours.detach(), ("127.0.0.1", 1))
    conn.start()
    assert worker.failed == [0]
    assert conn.tunnel is not None and conn.server == 1
    accepted, _ = servers[1].accept()
    sockets.append(accepted)
    accepted.settimeout(5)
    got = b""
    while not got.endswith(b"body"):
        got += accepted.recv(65536)
    assert got == b"POST /a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
    assert conn.bytes_in == len(head + b"body")
    conn.abort("test over")
    loop.shutdown()
