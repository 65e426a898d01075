"""Faults inside a worker: descriptors run out, a callback raises, a peer resets while
the other side stalls.  Each test ends with the instance serving (tests/faults/checks.py)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.checks import REQUEST, fault_config, get, still_serves
from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    FlakyBackend,
    Proc,
    SpliceLB,
    ToolServer,
    backend,
    cli,
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
    # Slow heads until every worker has met its fault (the first expiry in each worker
    # raises; the kernel may send a whole round to one worker).
    statuses: list[int] = []
    replies: list[bytes] = []
    for _ in range(10):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
        replies += [clients.read_all(sock) for sock in socks]
        for sock in socks:
            sock.close()
        statuses = [clients.status_of(reply) for reply in replies]
        if statuses.count(500) == len(lb.worker_pids()):
            break
    # the connection whose expiry failed is answered too: the balancer's own error
    assert statuses.count(500) == len(lb.worker_pids()), statuses
    assert set(statuses) <= {408, 500}, statuses
    assert not any(b"injected" in reply for reply in replies)  # the details are the log's
    workers = len(lb.worker_pids())
    errors = wait_until(
        lambda: len(lb.events("worker_error")) >= workers and lb.events("worker_error"), 5, "errors"
    )
    assert all("injected fault" in e["error"] for e in errors)
    assert {e["pid"] for e in errors} == set(lb.worker_pids())
    status = json.loads(cli("status", "--json", "-c", str(lb.config_path)).stdout)
    assert status["answers"]["500"] == statuses.count(500)
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
    busy = clients.ws_tunnel(port)
    assert clients.ws_ping(
        busy
    )  # bytes moved: the sweep flushes this tunnel first, and that raises
    wait_until(lambda: lb.events("worker_error"), 5, "worker_error")
    idle = clients.ws_tunnel(port)
    began = time.monotonic()
    idle.settimeout(10)
    assert idle.recv(100) == b""  # the balancer closes the idle tunnel
    assert time.monotonic() - began < 5
    wait_until(
        lambda: any(c["reason"] == "tunnel idle timeout" for c in lb.conns()), 5, "the idle close"
    )
    still_serves(lb, port)


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


def test_the_open_file_limit_is_raised_and_maxconn_planned_within_it(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """Started with the soft limit many shells give (1024) and a maxconn that needs more
    descriptors than even the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    port = free_port()
    text = fault_config(port, servers(echo_pair), extra="maxconn = 100000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        lb = start_lb(text)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for pid in lb.worker_pids():
        assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (hard, hard)
    [warning] = lb.events("fd_limit")
    assert "global.maxconn = 100000" in warning["reason"] and str(hard) in warning["reason"]
    caps = {r["maxconn"] for r in lb.events("worker_start")}
    assert caps and all(2 * cap < hard for cap in caps)  # each worker holds what it can
    still_serves(lb, port)


def test_accept_paused_is_logged_once_per_episode(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    squeeze: Callable[[int, int], None],
) -> None:
    port = free_port()
    lb = start_lb(fault_config(port, servers(echo_pair), workers=1), workers=1)
    [victim] = lb.worker_pids()
    squeeze(victim, 0)  # not even the client's socket: accept fails
    with ThreadPoolExecutor(10) as pool:
        replies = [pool.submit(clients.exchange, port, REQUEST, timeout=15) for _ in range(10)]
        wait_until(lambda: lb.events("accept_paused"), 10, "accept_paused")
        time.sleep(1.5)  # the fault lasts: the worker tries again every 0.1 s
        resource.prlimit(victim, resource.RLIMIT_NOFILE, (20000, 20000))
        statuses = [clients.status_of(reply.result()) for reply in replies]
    assert statuses == [200] * 10  # the backlog held them all
    assert len(lb.events("accept_paused")) == 1  # one line when it began ...
    [resumed] = wait_until(lambda: lb.events("accept_resumed"), 10, "accept_resumed")
    assert resumed["count"] >= 10  # ... and one when it ended, counting every try
    still_serves(lb, port)


def four_local_ports(
    namespace: tuple[str, str, str], procs: list[Proc], tmp_path: Path, backend_extra: str = ""
) -> tuple[SpliceLB, Callable[[int], tuple[list[int], list[socket.socket]]]]:
    """splicelb and one server in a namespace of its own with four local ports, and what
    opens ``n`` tunnels through it, each held by a kept-alive request: their statuses and
    sockets."""
    name, _here, there = namespace
    inside = ("ip", "netns", "exec", name)
    subprocess.run(
        [*inside, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40003"], check=True
    )
    server = FlakyBackend("a", prefix=inside)
    procs.append(server)
    port = free_port()
    text = config(
        listener(f"{there}:{port}", "app"),
        backend("app", [("a", server.address)], backend_extra),
        workers=1,
    )
    lb = SpliceLB(tmp_path, text, workers=1, prefix=inside)
    procs.append(lb)

    def tunnels(n: int) -> tuple[list[int], list[socket.socket]]:
        held, statuses = [], []
        for _ in range(n):  # each kept-alive request holds its tunnel, and a local port
            sock = socket.create_connection((there, port), timeout=5)
            sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            statuses.append(clients.status_of(sock.recv(1000)))
            held.append(sock)
        return statuses, held

    return lb, tunnels


def test_a_used_up_local_port_range_is_the_balancers_limit_not_the_servers(
    namespace: tuple[str, str, str], procs: list[Proc], tmp_path: Path
) -> None:
    """In a namespace of its own, with four local ports: a fifth tunnel to the server
    has no port to connect from."""
    lb, tunnels = four_local_ports(namespace, procs, tmp_path)
    statuses, held = tunnels(8)
    assert statuses.count(200) >= 2 and statuses[-1] == 503, statuses
    refused = [c for c in lb.conns() if c["status"] == 503]
    assert all(
        c["reason"] == "local limit: Cannot assign requested address (connect)" for c in refused
    )
    assert not lb.events("connect_failed")  # the server is not blamed ...
    [warning] = lb.events("local_limit")  # ... and the operator is told once
    assert "net.ipv4.ip_local_port_range" in warning["raise_with"]
    status = json.loads(cli("status", "--json", "-c", str(lb.config_path)).stdout)
    [counted] = [s for b in status["backends"] for s in b["servers"]]
    assert counted["failed_connects"] == 0
    for sock in held:
        sock.close()


def test_source_addresses_each_hold_a_port_range_of_tunnels_to_a_server(
    namespace: tuple[str, str, str], procs: list[Proc], tmp_path: Path
) -> None:
    """The same four local ports, and `source` = two addresses: eight tunnels to the one
    server, each source address connecting from its own four ports; the ninth has none."""
    lb, tunnels = four_local_ports(
        namespace, procs, tmp_path, 'source = ["127.0.0.1", "127.0.0.2"]'
    )
    statuses, held = tunnels(9)
    assert statuses == [200] * 8 + [503], statuses
    assert not lb.events("connect_failed")
    for sock in held:
        sock.close()
