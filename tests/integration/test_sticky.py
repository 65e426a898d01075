"""Sticky sessions and slow start through a running balancer, with real backends.

``balance = "hash"`` on a cookie: a session's requests (and its WebSocket
upgrade) all reach one server, sessions spread, and a request without the
cookie is hashed by its source address.  ``slowstart``: a server back in
rotation (ready after maint, up after down) gets well under its share of new
connections in its first seconds and all of it once the ramp is over.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    FlakyBackend,
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

SLOWSTART = 10.0
SESSIONS = [f"session-{i}" for i in range(30)]


def whoami(port: int, *headers: str, source: str = "127.0.0.1") -> str:
    """The server that answers one request on a new connection (from ``source``)."""
    head = "\r\n".join(["GET /whoami HTTP/1.1", "Host: x", "Connection: close", *headers])
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(f"{head}\r\n\r\n".encode())
        reply = clients.read_all(s)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    return reply.rsplit(b"\n", 1)[-1].decode()


def upgraded_by(port: int, cookie: str) -> str:
    """The server that answers a WebSocket upgrade carrying ``cookie``."""
    head = (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Cookie: {cookie}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode())
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 101"), reply[:200]
    fields = dict(
        line.split(": ", 1) for line in reply.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
    )
    return fields["X-Backend"]


@pytest.fixture
def three(procs: list[Proc]) -> list[EchoBackend]:
    servers = [EchoBackend(f"echo{i}") for i in range(1, 4)]
    procs.extend(servers)
    return servers


def test_a_cookie_keeps_its_session_on_one_server(
    three: list[EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend(
                "app",
                [(s.name, s.address) for s in three],
                extra='balance = "hash"\nhash_key = "cookie:sid"',
            ),
        ),
        workers=2,
    )
    server_of = {}
    for sid in SESSIONS:  # each request a new connection, to either worker
        seen = {whoami(port, f"Cookie: theme=dark; sid={sid}") for _ in range(4)}
        assert len(seen) == 1, (sid, seen)
        server_of[sid] = seen.pop()
    assert set(server_of.values()) == {"echo1", "echo2", "echo3"}  # sessions spread
    for sid in SESSIONS[:5]:  # its WebSocket goes where its polling requests went
        assert upgraded_by(port, f"sid={sid}") == server_of[sid]

    # No session cookie (a client before it logs in): its source address is hashed instead.
    by_source = {}
    for i in range(1, 13):
        source = f"127.0.0.{i}"
        seen = {whoami(port, "Cookie: theme=dark", source=source) for _ in range(3)}
        assert len(seen) == 1, (source, seen)
        by_source[source] = seen.pop()
    assert len(set(by_source.values())) > 1, by_source  # hashed, not one fixed server
    workers = {line["pid"] for line in lb.conns()}
    assert len(workers) == 2  # both workers served, and agreed


def test_a_later_request_with_another_key_is_not_forwarded_on_the_connection(
    three: list[EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """A kept-alive connection is on its first request's server: a later request with
    another session is not forwarded there (its retry, on a new connection, goes where its
    key does); the same session goes on."""
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend(
                "app",
                [(s.name, s.address) for s in three],
                extra='balance = "hash"\nhash_key = "cookie:sid"',
            ),
        ),
        workers=1,
    )
    request = "GET /whoami HTTP/1.1\r\nHost: x\r\nCookie: sid={}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for sid in ("a", "a"):
            s.sendall(request.format(sid).encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(request.format("b").encode())
        assert clients.read_all(s) == b""  # closed, nothing of it forwarded
    [line] = wait_until(lb.conns, 10, "the conn line")
    assert line["reason"] == "request 3 not forwarded: its hash key is not the connection's"


# --- slow start -----------------------------------------------------------------------


def shares(answers: list[tuple[float, str]], start: float, end: float) -> tuple[float, int]:
    """B's share (percent) of the answers in the window [start, end), and their count."""
    window = [server for at, server in answers if start <= at < end]
    return 100 * Counter(window)["B"] / max(1, len(window)), len(window)


def test_a_server_ready_after_maint_ramps_up_to_its_share(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = FlakyBackend("A"), FlakyBackend("B")
    procs.extend([a, b])
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [("A", a.address), ("B", b.address)], extra=f"slowstart = {SLOWSTART}"),
        ),
        workers=2,
    )
    cfg = str(lb.config_path)
    assert cli("maint", "-c", cfg, "app/B").returncode == 0
    assert {whoami(port) for _ in range(6)} == {"A"}
    assert cli("ready", "-c", cfg, "app/B").returncode == 0
    back = time.monotonic()  # the supervisor set it before the command returned
    answers = []
    while (at := time.monotonic() - back) < SLOWSTART + 2.5:  # the ramp, and 2.5 s after
        answers.append((at, whoami(port)))
    early, n_early = shares(answers, 0, 2)
    late, n_late = shares(answers, SLOWSTART + 0.5, SLOWSTART + 2.5)
    assert n_early > 20 and n_late > 20, (n_early, n_late)
    # Its full share is 50%; over its first 2 s it has 5% to 24% of its weight.
    assert 0 < early < 25, early
    assert 40 < late < 60, late


class Tunnels:
    """Connections kept open (kept-alive HTTP, a tunnel each), by the server behind them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []

    def open(self, count: int) -> Counter[str]:
        servers: Counter[str] = Counter()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.socks.append(sock)
            sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            servers[sock.recv(4096).rsplit(b"\n", 1)[-1].decode()] += 1
        return servers

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.fixture
def tunnels() -> Iterator[Callable[[int], Tunnels]]:
    made: list[Tunnels] = []

    def make(port: int) -> Tunnels:
        made.append(Tunnels(port))
        return made[-1]

    yield make
    for t in made:
        t.close()


def test_leastconn_does_not_send_every_reconnecting_client_to_a_recovered_server(
    procs: list[Proc], start_lb: Callable[..., SpliceLB], tunnels: Callable[[int], Tunnels]
) -> None:
    a, b = FlakyBackend("A"), FlakyBackend("B")
    procs.extend([a, b])
    port = free_port()
    health = '[backends.health]\ntype = "http"\ninterval = 0.3\ntimeout = 0.3\nrise = 2\nfall = 2'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend(
                "app",
                [("A", a.address), ("B", b.address)],
                extra=f'balance = "leastconn"\nslowstart = {SLOWSTART}\n{health}',
            ),
        ),
        workers=2,
    )

    def came(to: str, after: int = 0) -> bool:
        return any(e["server"] == "B" and e["to"] == to for e in lb.events("server_state")[after:])

    wait_until(lambda: came("up"), 10, "B up")
    b.set_mode("500")
    wait_until(lambda: came("down"), 10, "B down")
    clients_ = tunnels(port)
    assert clients_.open(20) == {"A": 20}  # B's clients reconnected to A
    mark = len(lb.events("server_state"))
    b.set_mode("ok")
    wait_until(lambda: came("up", mark), 10, "B up again")
    back = time.monotonic()
    first = clients_.open(20)  # within its first second or so
    assert time.monotonic() - back < SLOWSTART / 4
    # Without slow start all 20 would go to B (0 open against 20); with it, B counts with
    # 5% to 30% of its weight: fewer than a third of A's.
    assert first["B"] < 8, first
    while time.monotonic() < back + SLOWSTART + 0.5:  # the ramp, served (short requests)
        whoami(port)
    later = clients_.open(20)
    assert later["B"] >= 18, later  # its full weight: it catches up with A (about 37 to 3)
