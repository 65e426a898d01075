"""What every fault test asks of the instance once its fault is over.

An instance that met a fault must still serve: a burst of new connections is
answered, and every worker takes part in it (a worker that stopped accepting
while still looking healthy is the failure this suite exists for), and a
client that never finishes its head still gets its 408 (the worker's
deadlines still fire).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

from tests.integration import clients
from tests.integration.harness import SpliceLB, backend, config, listener, wait_until

REQUEST = b"GET / HTTP/1.1\r\nHost: burst.test\r\nConnection: close\r\n\r\n"

HEAD_TIMEOUT = 1.0  # the fault configs' head_timeout: the slowloris check waits this long
BURST = 200


def fault_config(
    port: int,
    servers: list[tuple[str, str]],
    workers: int = 2,
    extra: str = "",
    backend_extra: str = "",
) -> str:
    """An http listener with a short head_timeout in front of ``servers``."""
    return config(
        listener(f"127.0.0.1:{port}", "app", extra=f"head_timeout = {HEAD_TIMEOUT:g}"),
        backend("app", servers, extra=backend_extra),
        workers=workers,
        extra_global=extra,
    )


def get(port: int) -> int:
    """One plain request on its own connection; the status it got."""
    reply = clients.exchange(
        port, b"GET / HTTP/1.1\r\nHost: burst.test\r\nConnection: close\r\n\r\n"
    )
    return clients.status_of(reply)


def serves_burst(lb: SpliceLB, port: int, count: int = BURST) -> None:
    """``count`` new connections, 8 at a time, all answered 200, by every running worker."""
    before = len(lb.conns())
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: get(port), range(count)))
    assert statuses == [200] * count, sorted(set(statuses))
    lines = wait_until(
        lambda: lb.conns()[before:] if len(lb.conns()) >= before + count else None,
        15,
        f"{count} conn lines for the burst",
    )
    workers = {r["pid"] for r in lb.events("worker_start")}
    draining = {r["pid"] for r in lb.events("worker_drain")}  # older generations': no new ones
    serving = {line["pid"] for line in lines}
    accepting = {pid for pid in workers - draining if _alive(pid)}
    assert accepting <= serving, f"workers {sorted(accepting - serving)} served nothing of {count}"


def answers_slowloris(port: int, clients_at_once: int = 8) -> None:
    """Heads that never end get 408 within head_timeout (and a bit), on every worker
    (the kernel spreads the ``clients_at_once`` connections over the workers)."""
    socks = [
        socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(clients_at_once)
    ]
    began = time.monotonic()
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
        replies = [clients.read_all(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert [clients.status_of(reply) for reply in replies] == [408] * clients_at_once
    assert time.monotonic() - began < HEAD_TIMEOUT + 3


def still_serves(lb: SpliceLB, port: int) -> None:
    """Both checks: the end of every fault test."""
    serves_burst(lb, port)
    answers_slowloris(port)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
