"""Per-client limits: client_maxconn and client_rate, one count across every worker.

Clients come from 127.0.0.1 and, as another client, from 127.0.0.2 (a loopback
address too on Linux: the whole of 127.0.0.0/8 is).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

OTHER_CLIENT = "127.0.0.2"


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def upgrade(sock: socket.socket) -> bytes:
    """Ask the echo backend for a WebSocket, through either mode of listener: its head
    (101), or what came instead, to the end (the balancer's answer, or nothing)."""
    sock.sendall(clients.upgrade_request())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        try:
            chunk = sock.recv(1)
        except ConnectionResetError:
            break
        if not chunk:
            break
        head += chunk
    if head.startswith(b"HTTP/1.1 101"):
        return head
    return head + clients.read_all(sock)


def tunnel(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = connect(port, source)
    head = upgrade(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def status(lb: SpliceLB) -> dict[str, Any]:
    done = cli("status", "--json", "-c", str(lb.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout))


def held_by_worker(lb: SpliceLB) -> list[int]:
    """Connections each running worker holds (the status's counts, 10 ms late at most)."""
    return [w["connections"] for w in status(lb)["workers"]]


def open_on_both_workers(lb: SpliceLB, port: int, count: int, held: list[socket.socket]) -> None:
    """``count`` tunnels from 127.0.0.1, held by both workers (the kernel spreads them by
    the client's port: one that got them all has its last one replaced, bounded)."""

    def spread() -> list[int] | None:
        counts = held_by_worker(lb)
        return counts if sum(counts) == count else None

    for _ in range(count):
        held.append(tunnel(port))
    for _ in range(50):
        counts = wait_until(spread, 10, f"the workers to hold {count} connections")
        if len(counts) == 2 and min(counts) > 0:
            return
        held.pop().close()
        wait_until(lambda: sum(held_by_worker(lb)) == count - 1, 10, "the close")
        held.append(tunnel(port))
    raise AssertionError(f"every tunnel went to one worker: {counts}")


def start(
    start_lb: Callable[..., SpliceLB],
    echo: EchoBackend,
    limits: str,
    mode: str = "http",
    workers: int = 2,
) -> tuple[SpliceLB, int]:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", mode=mode, extra=limits),
            backend("app", [("echo1", echo.address)]),
            workers=workers,
        ),
        workers=workers,
    )
    return lb, port


def refusals(lb: SpliceLB) -> list[dict[str, Any]]:
    return [c for c in lb.conns() if c["status"] == 429]


def test_the_eleventh_connection_of_a_client_gets_429_whichever_worker_holds_the_ten(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    held: list[socket.socket],
) -> None:
    lb, port = start(start_lb, echo_pair[0], "client_maxconn = 10")
    open_on_both_workers(lb, port, 10, held)  # neither worker holds 10 of its own

    for _ in range(4):  # whichever worker takes it
        with connect(port) as sock:
            reply = upgrade(sock)
        assert clients.status_of(reply) == 429, reply
        assert b"\r\nRetry-After: 1\r\n" in reply
        assert b"Connection: close" in reply
        assert b"client limit: 10 open connections" in reply
    wait_until(lambda: len(refusals(lb)) == 4, 10, "4 conn lines of 429")
    line = refusals(lb)[0]
    assert (line["client"].split(":")[0], line["reason"]) == (
        "127.0.0.1",
        "client limit: 10 open connections",
    )
    assert line["server"] is None

    held.append(tunnel(port, OTHER_CLIENT))  # another client is served
    assert clients.ws_ping(held[-1])

    held.pop(0).close()  # one of the ten ends: the client may open one more
    wait_until(lambda: len(lb.conns()) == 5, 10, "the tunnel's conn line")
    held.append(tunnel(port))
    assert clients.ws_ping(held[-1])
    with connect(port) as sock:
        assert clients.status_of(upgrade(sock)) == 429
    wait_until(lambda: status(lb)["answers"]["429"] == 5, 10, "5 answers of 429 in the status")


def test_a_tcp_client_over_client_maxconn_is_closed(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    held: list[socket.socket],
) -> None:
    lb, port = start(start_lb, echo_pair[0], "client_maxconn = 2", mode="tcp", workers=1)
    held += [tunnel(port), tunnel(port)]
    with connect(port) as sock:
        assert upgrade(sock) == b""  # closed, nothing said
    [line] = wait_until(lambda: refusals(lb), 10, "a conn line of 429")
    assert line["reason"] == "client limit: 2 open connections"
    assert line["bytes_out"] == 0
    held.append(tunnel(port, OTHER_CLIENT))
    assert clients.ws_ping(held[-1])


def test_a_burst_over_client_burst_gets_429_with_retry_after_then_is_served(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    # A token every 2 s: the burst's requests are made well within the first one.
    lb, port = start(start_lb, echo_pair[0], "client_rate = 0.5\nclient_burst = 3", workers=2)
    request = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for _ in range(3):
        assert clients.status_of(clients.exchange(port, request)) == 200
    reply = clients.exchange(port, request)
    assert clients.status_of(reply) == 429, reply
    assert b"client rate: 0.5/s" in reply
    retry_after = int(reply.split(b"\r\nRetry-After: ")[1].split(b"\r\n")[0])
    assert 1 <= retry_after <= 2
    with connect(port, OTHER_CLIENT) as sock:  # another client has a bucket of its own
        sock.sendall(request)
        assert clients.status_of(clients.read_all(sock)) == 200
    [line] = wait_until(lambda: refusals(lb), 10, "a conn line of 429")
    assert line["reason"] == "client rate: 0.5/s"

    time.sleep(retry_after)  # what the client was told
    assert clients.status_of(clients.exchange(port, request)) == 200


def test_tunnels_handed_over_on_reload_still_count_against_their_client(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    held: list[socket.socket],
) -> None:
    lb, port = start(start_lb, echo_pair[0], "client_maxconn = 3")
    held += [tunnel(port) for _ in range(3)]
    done = cli("reload", "-c", str(lb.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(
        lambda: sum(h["tunnels"] for h in lb.events("handover")) == 3, 20, "3 tunnels handed over"
    )
    assert all(clients.ws_ping(sock) for sock in held)
    with connect(port) as sock:  # the new generation counts the three it adopted
        assert clients.status_of(upgrade(sock)) == 429
    held.pop().close()
    wait_until(lambda: any(c["status"] is None for c in lb.conns()), 10, "the tunnel's conn line")
    held.append(tunnel(port))
