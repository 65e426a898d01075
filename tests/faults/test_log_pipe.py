"""Fault: nobody reads the instance's stdout (a stuck log shipper, a journald that lags).

Once the instance has started, the test stops reading its stdout pipe and
makes several times as many connections as the pipe holds conn lines, so the
pipe fills and stays full.  All along, every one of 100 WebSocket tunnels
echoes within a bound and every new connection is answered: a worker that
waits to write a log line stalls every tunnel it holds.  Once the pipe is
read again, every line in it is whole JSON and the workers say how many
lines they dropped.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import termios
import time
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.faults.checks import REQUEST, fault_config, still_serves
from tests.integration import clients
from tests.integration.harness import EchoBackend, SpliceLB, free_port, wait_until

PIPE_SIZE = 1 << 16  # a pipe's default size
TUNNELS = 100
EXCHANGE_TIMEOUT = 2.0  # seconds an echo through a tunnel may take (it takes milliseconds)
ANSWER_TIMEOUT = 5.0  # seconds a short connection may take to be answered
FILL = 1000  # short connections while the pipe fills: each leaves a conn line of 300+ bytes
PARALLEL = 8
ROUNDS = 3  # with the pipe full: a batch of short connections, and an echo on every tunnel
BATCH = 64


def open_tunnel(port: int) -> socket.socket:
    """A WebSocket tunnel through the balancer to an echo backend (101 read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(clients.upgrade_request())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def echo_all(tunnels: list[socket.socket], timeout: float) -> list[int]:
    """One frame on every tunnel at once; the tunnels whose echo did not come within ``timeout``."""
    payload = os.urandom(32).hex().encode()
    expected = bytes([0x81, len(payload)]) + payload
    waiting: dict[socket.socket, tuple[int, bytes]] = {}
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(tunnels):
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
            selector.register(sock, selectors.EVENT_READ)
            waiting[sock] = (index, b"")
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(deadline - time.monotonic()):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                index, got = waiting[sock]
                chunk = sock.recv(len(expected) - len(got))
                got += chunk
                if chunk and len(got) < len(expected):
                    waiting[sock] = (index, got)
                    continue
                assert got == expected, (index, got)
                selector.unregister(sock)
                del waiting[sock]
    return sorted(index for index, _ in waiting.values())


def answered(port: int) -> int | None:
    """One short connection: its status, or None when no answer came in time."""
    try:
        return clients.status_of(clients.exchange(port, REQUEST, timeout=ANSWER_TIMEOUT))
    except (OSError, AssertionError):
        return None


def queued(fd: int) -> int:
    """Bytes in the pipe that nobody has read."""
    count = array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def caught_up(lb: SpliceLB, port: int, pipe: int) -> None:
    """Until the test has read every line written before this call."""
    wait_until(lambda: queued(pipe) == 0, 15, "the test to empty the pipe")  # room for the mark
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        mark = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendall(REQUEST)
        clients.read_all(sock)
    wait_until(lambda: any(r["client"] == mark for r in lb.conns()), 15, "the pipe read to its end")


def test_tunnels_and_new_connections_go_on_while_nobody_reads_stdout(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(fault_config(port, [(b.name, b.address) for b in echo_pair]))
    workers = lb.worker_pids()
    assert lb.popen.stdout is not None
    pipe = lb.popen.stdout.fileno()
    fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # the harness's is larger
    tunnels = [open_tunnel(port) for _ in range(TUNNELS)]
    statuses: list[int | None] = []
    pool = ThreadPoolExecutor(PARALLEL)
    try:
        assert not echo_all(tunnels, EXCHANGE_TIMEOUT)
        lb.hold_stdout()
        for _ in range(FILL // PARALLEL):
            batch = list(pool.map(lambda _: answered(port), range(PARALLEL)))
            statuses += batch
            if None in batch:
                break  # a worker stopped answering: the tunnels tell more, below
        assert queued(pipe) > PIPE_SIZE // 2  # full, and unread
        for _ in range(ROUNDS):
            more = [pool.submit(answered, port) for _ in range(BATCH)]
            stalled = echo_all(tunnels, EXCHANGE_TIMEOUT)
            assert not stalled, (
                f"{len(stalled)} of {TUNNELS} tunnels did not echo within "
                f"{EXCHANGE_TIMEOUT:g} s while nobody read stdout"
            )
            statuses += [future.result(ANSWER_TIMEOUT * 3) for future in more]
    finally:
        pool.shutdown(cancel_futures=True)
        for sock in tunnels:
            sock.close()
    assert statuses == [200] * (FILL + ROUNDS * BATCH), Counter(statuses)

    lb.release_stdout()
    caught_up(lb, port, pipe)
    still_serves(lb, port)
    reports = wait_until(
        lambda: [r for r in lb.events("log_dropped") if r["role"] == "worker"],
        15,
        "a worker's log_dropped line",
    )
    assert all(r["level"] == "warning" and r["lines"] > 0 for r in reports), reports
    broken = []
    for line in list(lb.lines):
        try:
            json.loads(line)
        except ValueError:
            broken.append(line)
    assert not broken, broken[:3]
    assert lb.worker_pids() == workers  # none restarted
    assert not lb.errors  # nothing on stderr: no traceback
