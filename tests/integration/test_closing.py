"""Tunnels that must end end spread out: on stop, at their max age, when their server leaves.

Each test holds real WebSocket tunnels through a running splicelb and records,
on the client's side, when each one sees its end of file.
"""

from __future__ import annotations

import bisect
import re
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
)

LATE = 0.3  # what a close may lag behind its time: the closer's 50 ms grid, a busy loop


@dataclass
class Tunnel:
    sock: socket.socket
    server: str  # the echo backend's name, from its 101 answer
    began: float  # before the connect
    opened: float  # once the 101 was read


def open_tunnel(port: int) -> Tunnel:
    """A WebSocket tunnel through the balancer (the 101 read whole, frames not needed)."""
    began = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(clients.upgrade_request())
    head = b""
    while b"\r\n\r\n" not in head:  # the echo backend sends nothing after its 101 unasked
        chunk = sock.recv(4096)
        assert chunk, f"closed before the answer: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    found = re.search(rb"(?im)^x-backend: *(\S+)", head)
    assert found, head
    return Tunnel(sock, found[1].decode(), began, time.monotonic())


def open_tunnels(port: int, count: int) -> list[Tunnel]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: open_tunnel(port), range(count)))


def wait_closed(tunnels: Sequence[Tunnel], timeout: float) -> dict[int, float]:
    """When each tunnel (by index) saw its end of file, until all did or ``timeout``."""
    closed: dict[int, float] = {}
    with selectors.DefaultSelector() as selector:
        for index, tunnel in enumerate(tunnels):
            tunnel.sock.setblocking(False)
            selector.register(tunnel.sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + timeout
        while len(closed) < len(tunnels) and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed[key.data] = time.monotonic()
                    selector.unregister(key.fileobj)
        for tunnel in tunnels:
            tunnel.sock.settimeout(10)
    return closed


def busiest_second(times: Sequence[float]) -> int:
    """The most closes within any one second, [t, t + 1)."""
    ordered = sorted(times)
    return max(bisect.bisect_left(ordered, t + 1.0) - i for i, t in enumerate(ordered))


def alive(tunnels: Sequence[Tunnel]) -> bool:
    return all(clients.ws_ping(tunnel.sock) for tunnel in tunnels)


def close_all(tunnels: Sequence[Tunnel]) -> None:
    for tunnel in tunnels:
        tunnel.sock.close()


def test_a_stop_spreads_the_closes_of_1000_tunnels_over_close_spread(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """drain_timeout = 8, close_spread = 4: the tunnels still open close between 4 and 8 s
    after the stop, as evenly as the window allows, and the instance exits by 8 s.

    As evenly as: 1,000 closes over 4 s are 250 a second on average, so some
    second holds at least 250 whatever the spread.  Each worker gives each of
    its tunnels one slice of the window, which keeps its busiest second within
    one close of its mean; the two workers, their 10 ms ticks and the client's
    reading add a few more: 250 + 10 at most.  Independent uniform times would
    put about 277 in the busiest second, a close at one instant all 1,000.
    """
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [(b.name, b.address) for b in echo_pair]),
            drain_timeout=8,
            extra_global="close_spread = 4",
        )
    )
    tunnels = open_tunnels(port, 1000)
    try:
        lb.signal(signal.SIGTERM)
        stopped = time.monotonic()
        closed = wait_closed(tunnels, 8 + 2)
        assert lb.wait(2) == 0
        exited = time.monotonic() - stopped
        assert len(closed) == 1000, f"{1000 - len(closed)} tunnels still open"
        after = sorted(t - stopped for t in closed.values())
        assert after[0] >= 4.0 and after[-1] <= 8 + LATE, (after[0], after[-1])
        assert exited < 8 + 1.0  # within drain_timeout, and the supervisor's exit
        busiest = busiest_second(after)
        assert busiest <= 250 + 10, busiest
        stops = [c for c in lb.conns() if c["reason"] == "worker stopped"]
        assert len(stops) == 1000
    finally:
        close_all(tunnels)


def test_tunnels_past_max_tunnel_age_close_within_ten_percent_of_it_and_no_others(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    aged_port, other_port = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{aged_port}", "app", name="aged", extra="max_tunnel_age = 3")
            + listener(f"127.0.0.1:{other_port}", "app", name="other"),
            backend("app", [(b.name, b.address) for b in echo_pair]),
            drain_timeout=10,
        )
    )
    others = open_tunnels(other_port, 20)  # older than the aged ones: they would close first
    aged = open_tunnels(aged_port, 40)
    try:
        closed = wait_closed(aged, 3.3 + 3)
        assert len(closed) == 40, f"{40 - len(closed)} of 40 still open"
        for index, at in closed.items():
            tunnel = aged[index]
            assert tunnel.began + 2.7 <= at <= tunnel.opened + 3.3 + LATE, at - tunnel.began
        times = sorted(closed.values())
        assert times[-1] - times[0] > 0.2, times  # not all at one instant
        assert alive(others)  # older than the aged ones, on a listener without a max age
        lines = lb.conns()
        assert [c["reason"] for c in lines] == ["max tunnel age 3 s"] * 40
        assert {c["listener"] for c in lines} == {"aged"}
    finally:
        close_all(others + aged)


def backends_a_and_b(a: list[EchoBackend], b: list[EchoBackend], health: str = "") -> str:
    return backend(
        "A", [(x.name, x.address) for x in a], extra=f'on_server_down = "close"\n{health}'
    ) + backend("B", [(x.name, x.address) for x in b])  # on_server_down = "keep"


def test_on_server_down_close_closes_the_tunnels_of_a_server_in_maint_spread_and_no_others(
    start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    """A's server in maint: its tunnels close over close_spread.  A's server in drain, and
    B's in maint (B keeps), keep theirs."""
    a1, a2, b1 = EchoBackend("a1"), EchoBackend("a2"), EchoBackend("b1")
    procs.extend([a1, a2, b1])
    port_a, port_b = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port_a}", "A", name="la")
            + listener(f"127.0.0.1:{port_b}", "B", name="lb"),
            backends_a_and_b([a1, a2], [b1]),
            drain_timeout=10,
            extra_global="close_spread = 2",
        )
    )
    on_a, on_b = open_tunnels(port_a, 40), open_tunnels(port_b, 10)
    try:
        leaving = [t for t in on_a if t.server == "a1"]
        draining = [t for t in on_a if t.server == "a2"]
        assert len(leaving) >= 10 and len(draining) >= 10, [t.server for t in on_a]
        for state, server in (("drain", "A/a2"), ("maint", "B/b1")):
            result = cli(state, "-c", str(lb.config_path), server)
            assert result.returncode == 0, result.stderr
        # Set last: the worker's look that finds a1 in maint sees a2 and b1 too.
        assert cli("maint", "-c", str(lb.config_path), "A/a1").returncode == 0
        marked = time.monotonic()
        closed = wait_closed(leaving, 1 + 2 + 3)
        assert len(closed) == len(leaving), f"{len(leaving) - len(closed)} still open"
        times = sorted(closed.values())
        # Seen within a second (the worker looks once a second), closed over the next 2 s.
        assert times[-1] <= marked + 1 + 2 + LATE, times[-1] - marked
        assert times[-1] - times[0] > 0.5, times  # spread, not at one instant
        assert alive(draining) and alive(on_b)
        lines = lb.wait_conns(len(leaving))
        assert [c["reason"] for c in lines] == ["server in maint"] * len(leaving)
        assert {c["server"] for c in lines} == {"a1"}
    finally:
        close_all(on_a + on_b)


def test_on_server_down_close_closes_the_tunnels_of_a_server_whose_checks_fail(
    start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    """A server that stops answering its checks goes down: its tunnels close, and those of
    the server still up stay."""
    a1, a2, b1 = EchoBackend("a1"), EchoBackend("a2"), EchoBackend("b1")
    procs.extend([a1, a2, b1])
    port_a, port_b = free_port(), free_port()
    health = '[backends.health]\ntype = "http"\ninterval = 0.3\ntimeout = 0.2\nfall = 2\n'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port_a}", "A", name="la")
            + listener(f"127.0.0.1:{port_b}", "B", name="lb"),
            backends_a_and_b([a1, a2], [b1], health),
            drain_timeout=10,
            extra_global="close_spread = 1",
        )
    )
    on_a, on_b = open_tunnels(port_a, 20), open_tunnels(port_b, 5)
    try:
        leaving = [t for t in on_a if t.server == "a1"]
        staying = [t for t in on_a if t.server == "a2"]
        assert leaving and staying, [t.server for t in on_a]
        a1.signal(signal.SIGSTOP)  # its checks time out; its tunnels are still established
        try:
            closed = wait_closed(leaving, 10)
        finally:
            a1.signal(signal.SIGCONT)
        assert len(closed) == len(leaving), f"{len(leaving) - len(closed)} still open"
        downs = [r for r in lb.events("server_state") if r["to"] == "down"]
        assert [r["server"] for r in downs] == ["a1"]
        assert alive(staying) and alive(on_b)
        lines = lb.wait_conns(len(leaving))
        assert [c["reason"] for c in lines] == ["server down"] * len(leaving)
    finally:
        close_all(on_a + on_b)
