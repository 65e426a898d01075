"""What the balancer answers itself: 400, 403, 408, 431, 503, each logged with its status."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    SpliceLB,
    backend,
    config,
    free_port,
    listener,
)


def start(
    start_lb: Callable[..., SpliceLB],
    servers: list[tuple[str, str]],
    listener_extra: str = "",
    backend_extra: str = "",
    mode: str = "http",
) -> tuple[SpliceLB, int]:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", mode=mode, extra=listener_extra),
            backend("app", servers, extra=backend_extra),
            workers=1,
        ),
        workers=1,
    )
    return lb, port


def assert_logged(lb: SpliceLB, status: int, reason_part: str) -> None:
    [line] = lb.wait_conns(1)
    assert line["status"] == status
    assert reason_part in line["reason"]
    assert line["server"] is None


def test_slow_head_gets_408_after_head_timeout(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = start(start_lb, [("echo1", echo_pair[0].address)], "head_timeout = 1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: slow.example\r\n")  # and never the blank line
        began = time.monotonic()
        reply = clients.read_all(sock)
    assert clients.status_of(reply) == 408
    assert b"Connection: close" in reply
    assert 0.9 < clients.elapsed(began) < 4
    assert_logged(lb, 408, "not complete within 1 s")


def test_oversized_head_gets_431(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = start(start_lb, [("echo1", echo_pair[0].address)])
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert clients.status_of(clients.exchange(port, head)) == 431
    assert_logged(lb, 431, "")


def test_garbage_gets_400(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = start(start_lb, [("echo1", echo_pair[0].address)])
    tls_hello = bytes.fromhex("160301020001000200") + b"\x00" * 40  # a TLS client on an http port
    reply = clients.exchange(port, tls_hello)
    assert clients.status_of(reply) == 400
    assert reply.rstrip().endswith(b"\n") or reply.count(b"\n") >= 5
    assert_logged(lb, 400, "")


def test_forbidden_origin_gets_403_and_never_reaches_a_backend(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = start(
        start_lb,
        [("echo1", echo_pair[0].address)],
        'allowed_origins = ["https://good.example"]',
    )
    evil = clients.upgrade_request(extra="Origin: https://evil.example\r\n")
    reply = clients.exchange(port, evil)
    assert clients.status_of(reply) == 403
    assert b"origin not allowed" in reply
    assert_logged(lb, 403, "origin")
    good = clients.upgrade_request(extra="Origin: https://GOOD.example/\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(good)
        assert sock.recv(100).startswith(b"HTTP/1.1 101")


def test_no_server_reachable_gets_503(start_lb: Callable[..., SpliceLB]) -> None:
    dead = [("dead1", f"127.0.0.1:{free_port()}"), ("dead2", f"127.0.0.1:{free_port()}")]
    lb, port = start(start_lb, dead)
    reply = clients.exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert clients.status_of(reply) == 503
    assert_logged(lb, 503, "no server available")
    failed = lb.events("connect_failed")
    assert {line["server"] for line in failed} == {"dead1", "dead2"}
    assert all("refused" in line["reason"] for line in failed)


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_refused_server_is_retried_on_another(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], mode: str
) -> None:
    servers = [("dead", f"127.0.0.1:{free_port()}"), ("echo1", echo_pair[0].address)]
    lb, port = start(start_lb, servers, backend_extra="retries = 1", mode=mode)
    for _ in range(6):
        request = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        reply = clients.exchange(port, request)
        assert reply.startswith(b"HTTP/1.1 200")
        assert reply.endswith(b"echo1")
    lines = lb.wait_conns(6)
    assert {line["server"] for line in lines} == {"echo1"}


def test_server_maxconn_moves_to_another_server_then_503(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = echo_pair
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            f'[[backends]]\nname = "app"\n'
            f'[[backends.servers]]\nname = "echo1"\naddress = "{a.address}"\nmaxconn = 1\n'
            f'[[backends.servers]]\nname = "echo2"\naddress = "{b.address}"\nmaxconn = 1\n',
            workers=1,
        ),
        workers=1,
    )
    tunnels = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(clients.upgrade_request())
        assert sock.recv(200).startswith(b"HTTP/1.1 101")
        tunnels.append(sock)
    reply = clients.exchange(port, clients.upgrade_request())
    assert clients.status_of(reply) == 503
    for sock in tunnels:
        sock.close()
    lines = lb.wait_conns(3)
    assert [line["status"] for line in lines].count(503) == 1
    assert {line["server"] for line in lines if line["status"] is None} == {"echo1", "echo2"}


def test_server_maxconn_holds_across_workers_at_once(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """A server's cap counts every worker's tunnels as they open and close, not as the
    counters are published (10 ms later): a connection right after a tunnel opened gets
    503 from whichever worker accepts it, and the next tunnel is let in once it closed."""
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            f'[[backends]]\nname = "app"\n'
            f'[[backends.servers]]\nname = "echo1"\naddress = "{echo_pair[0].address}"\n'
            "maxconn = 1\n",
            workers=2,
        ),
        workers=2,
    )
    rounds = 12  # each round's two connections reach different workers half the time
    for done in range(rounds):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as tunnel:
            tunnel.sendall(clients.upgrade_request())
            assert tunnel.recv(200).startswith(b"HTTP/1.1 101"), done
            reply = clients.exchange(port, clients.upgrade_request())
            assert clients.status_of(reply) == 503, done
        lb.wait_conns(2 * (done + 1))  # the tunnel's end is counted before the next round
    lines = lb.conns()
    tunnels = [line for line in lines if line["status"] is None]
    refused = [line for line in lines if line["status"] == 503]
    assert len(tunnels) == len(refused) == rounds
    # Each list is in round order: each round's two lines are in before the next.
    crossed = sum(a["pid"] != b["pid"] for a, b in zip(refused, tunnels, strict=True))
    assert crossed > 0, "every 503 came from the tunnel's own worker: not tested across"


def test_instance_maxconn_holds_new_connections_in_the_backlog(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [("echo1", echo_pair[0].address)]),
            workers=1,
            extra_global="maxconn = 1",
        ),
        workers=1,
    )
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    first.sendall(clients.upgrade_request())
    assert first.recv(200).startswith(b"HTTP/1.1 101")
    second = socket.create_connection(("127.0.0.1", port), timeout=10)  # queued by the kernel
    second.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    second.settimeout(1.0)
    try:
        early = second.recv(100)
    except TimeoutError:
        early = b""
    assert early == b""  # not served while the cap is reached
    first.close()
    second.settimeout(10)
    reply = clients.read_all(second)
    second.close()
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"echo1")
    assert len(lb.wait_conns(2)) == 2
