"""Faults inside a worker: descriptors run out, a callback raises, a peer resets while
the other side stalls.  Each test ends with the instance serving (tests/faults/checks.py)."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.checks import REQUEST, fault_config, get, still_serves
from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    ToolServer,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)

INJECT = ("-m", "tests.faults.inject")


def servers(pair: tuple[EchoBackend, EchoBackend]) -> list[tuple[str, str]]:
    return [(b.name, b.address) for b in pair]


def open_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def allow_only(pid: int, spare: int) -> tuple[int, int]:
    """Lower ``pid``'s open-file limit so that it can open ``spare`` more descriptors
    (the kernel hands out the lowest free number and refuses numbers at or above the
    soft limit); returns the limits to restore."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used, limit, free = open_fds(pid), 0, 0
    while free < spare or limit in used:
        free += limit not in used
        limit += 1
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, old[1]))
    return old


@pytest.fixture
def squeeze() -> Iterator[Callable[[int, int], None]]:
    """``squeeze(pid, spare)``; every squeezed limit is restored at the end."""
    restore: list[tuple[int, tuple[int, int]]] = []

    def apply(pid: int, spare: int) -> None:
        restore.append((pid, allow_only(pid, spare)))

    yield apply
    for pid, limits in reversed(restore):
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)


def test_no_descriptor_for_the_server_socket_gets_503_and_the_worker_accepts_again(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    squeeze: Callable[[int, int], None],
) -> None:
    port = free_port()
    lb = start_lb(fault_config(port, servers(echo_pair)))
    victim = lb.worker_pids()[0]
    before = open_fds(victim)
    squeeze(victim, 1)  # room for the client's socket, none for the server's
    statuses = [clients.status_of(clients.exchange(port, REQUEST, timeout=5)) for _ in range(24)]
    resource.prlimit(victim, resource.RLIMIT_NOFILE, (20000, 20000))
    assert set(statuses) <= {200, 503}, statuses
    refused = [c for c in lb.conns() if c["status"] == 503]
    assert refused and {c["pid"] for c in refused} == {victim}, statuses
    assert all("Too many open files" in c["reason"] for c in refused), refused
    assert not lb.events("connect_failed")  # the balancer's own limit is not the server's fault
    still_serves(lb, port)
    # every descriptor the squeezed worker took for those clients is closed again
    wait_until(lambda: open_fds(victim) <= before | pipes_of(victim), 10, "no leaked socket")


def pipes_of(pid: int) -> set[int]:
    return {
        int(fd)
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    }


def test_no_descriptor_for_a_pipe_holds_the_bytes_until_descriptors_free(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    squeeze: Callable[[int, int], None],
) -> None:
    port = free_port()
    lb = start_lb(
        config(listener(f"127.0.0.1:{port}", "app", mode="tcp"), backend("app", servers(echo_pair)))
    )
    victim = lb.worker_pids()[0]
    before = len(open_fds(victim))
    squeeze(victim, 2)  # the client's socket and the server's, no pipe
    with ThreadPoolExecutor(12) as pool:
        replies = [pool.submit(clients.exchange, port, REQUEST, timeout=15) for _ in range(12)]
        # the squeezed worker holds a tunnel and has no descriptor left for its first pipe
        wait_until(lambda: len(open_fds(victim)) >= before + 2, 10, "a tunnel on the victim")
        time.sleep(0.5)  # the fault lasts a while
        resource.prlimit(victim, resource.RLIMIT_NOFILE, (20000, 20000))
        statuses = [clients.status_of(reply.result()) for reply in replies]
    assert statuses == [200] * 12
    still_serves_tcp(lb, port)


def still_serves_tcp(lb: SpliceLB, port: int) -> None:
    """tcp mode: a burst served by every worker (nothing to time out: no head)."""
    before = len(lb.conns())
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: get(port), range(200)))
    assert statuses == [200] * 200
    lines = wait_until(lambda: len(lb.conns()) >= before + 200 and lb.conns()[before:], 15, "conns")
    assert set(lb.worker_pids()) <= {line["pid"] for line in lines}


def test_a_raising_expire_leaves_the_deadlines_running(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        fault_config(port, servers(echo_pair)),
        launcher=(*INJECT, "--raise", "lb.worker.conn:Connection.expire", "--"),
    )
    # Slow heads on both workers: the first to expire in each worker raises.
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    for sock in socks:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
    replies = [clients.read_all(sock) for sock in socks]
    for sock in socks:
        sock.close()
    # the connection whose expiry failed is answered too: the balancer's own error
    assert {clients.status_of(reply) for reply in replies} <= {408, 500}, replies
    errors = wait_until(lambda: lb.events("worker_error"), 5, "worker_error")
    assert all("injected fault" in e["error"] for e in errors)
    still_serves(lb, port)


def test_a_raising_sweep_leaves_idle_tunnels_timing_out(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra="tunnel_timeout = 2\nhead_timeout = 1"),
            backend("app", servers(echo_pair)),
            workers=1,
        ),
        workers=1,
        launcher=(*INJECT, "--raise", "lb.worker.splice:Tunnel.flush", "--"),
    )
    busy = clients_tunnel(port)
    assert ws_ping(busy)  # bytes moved: the sweep flushes this tunnel first, and that raises
    wait_until(lambda: lb.events("worker_error"), 5, "worker_error")
    idle = clients_tunnel(port)
    began = time.monotonic()
    idle.settimeout(10)
    assert idle.recv(100) == b""  # the balancer closes the idle tunnel
    assert time.monotonic() - began < 5
    wait_until(
        lambda: any(c["reason"] == "tunnel idle timeout" for c in lb.conns()), 5, "the idle close"
    )
    still_serves(lb, port)


def clients_tunnel(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(clients.upgrade_request())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def ws_ping(sock: socket.socket, payload: bytes = b"hi") -> bool:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock.recv(100) == bytes([0x81, len(payload)]) + payload


def fill(sock: socket.socket) -> int:
    """Send until nothing more goes out for half a second: the far side stopped reading."""
    sock.setblocking(False)
    sent, chunk = 0, b"y" * 65536
    while select.select([], [sock], [], 0.5)[1]:
        with contextlib.suppress(BlockingIOError):
            sent += sock.send(chunk)
    return sent


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_reset_ends_the_tunnel_while_its_server_stalls(
    start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    stall = ToolServer("stall")
    procs.append(stall)
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", mode="tcp"), backend("app", [("s", stall.address)])
        )
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert fill(sock) > 0  # the server reads nothing: the balancer stops reading the client
    reset(sock)
    [line] = lb.wait_conns(1, timeout=3)
    assert line["reason"] == "client reset"
    [result] = wait_until(stall.results, 3, "the server's connection to end")
    assert result["ended"] == "reset"  # passed on: the server's buffers are freed at once


def test_a_server_reset_ends_the_tunnel_while_its_client_stalls(
    start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    flood = ToolServer("flood")
    procs.append(flood)
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", mode="tcp"), backend("app", [("f", flood.address)])
        )
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10):  # and never read
        wait_until(flood.results, 10, "the server to send until stalled, then reset")
        [line] = lb.wait_conns(1, timeout=3)
    assert line["reason"] == "server reset"
