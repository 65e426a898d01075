"""Faults on the control socket: local clients that stall, or flood it.

The supervisor serves the control socket from its own loop, the loop that
also reaps and respawns children and pings systemd's watchdog.  A client
that connects and never finishes its request must hold none of that up; it
is answered and closed at its deadline.  A flood of such clients costs the
supervisor a bounded number of descriptors: the ones over the bound are
answered "busy" at once.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from lb.control import CLIENT_TIMEOUT, MAX_CLIENTS, control_path
from tests.faults.checks import fault_config, still_serves
from tests.integration.harness import EchoBackend, SpliceLB, cli, free_port, wait_until
from tests.integration.test_notify import NotifySocket

WATCHDOG_USEC = 1_500_000  # systemd kills a supervisor that is silent for this long
REPLACED_WITHIN = 2.0  # seconds for a SIGKILLed worker to be replaced
ANSWERED_WITHIN = 5.0  # seconds for a command line to answer, its interpreter's start included
DEADLINE_SLACK = 1.0  # seconds past CLIENT_TIMEOUT a stalled client may wait (the loop's tick)
TIMED_OUT = {"ok": False, "errors": [f"no complete request within {CLIENT_TIMEOUT:g} s"]}


class StalledClient:
    """A control client that connects, sends ``sent`` (perhaps nothing) and then stalls."""

    def __init__(self, path: str, sent: bytes = b"") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking, so that a full listen queue is waited on (a Unix socket with a
        # timeout fails at once instead), for 10 s at most.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
        try:
            self.sock.connect(path)
        except BlockingIOError:
            self.sock.close()
            raise AssertionError("the control socket took no connection for 10 s") from None
        self.connected_at = time.monotonic()
        self.sock.sendall(sent)

    def is_open(self) -> bool:
        """Neither answered nor closed yet."""
        return not select.select([self.sock], [], [], 0)[0]

    def outcome(self, deadline: float) -> tuple[float, bytes]:
        """When the supervisor closed the connection, and what it sent before."""
        data = b""
        try:
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = self.sock.recv(65536)
                if not chunk:
                    return time.monotonic(), data
                data += chunk
        except TimeoutError:
            raise AssertionError(f"still open {deadline - self.connected_at:g} s in") from None

    def close(self) -> None:
        self.sock.close()


def watchdog_gaps(notify: NotifySocket, start: float, end: float) -> list[float]:
    """The silences between WATCHDOG=1 pings from ``start`` to ``end``, the edges included."""
    pings = [t for t, m in notify.messages if "WATCHDOG" in m and start <= t <= end]
    times = [start, *pings, end]
    return [b - a for a, b in itertools.pairwise(times)]


def timed(call: Callable[[], object]) -> float:
    began = time.monotonic()
    call()
    return time.monotonic() - began


def test_stalled_control_clients_hold_up_nothing(
    tmp_path: Path, echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    stalled: list[StalledClient] = []
    try:
        port = free_port()
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        lb = start_lb(fault_config(port, [(b.name, b.address) for b in echo_pair]), env=env)
        wait_until(lambda: notify.with_key("READY"), 10, "READY=1")
        runtime_dir = str(lb.runtime_dir)
        held_from = time.monotonic()
        stalled.append(StalledClient(control_path(runtime_dir)))  # sends nothing
        stalled.append(StalledClient(control_path(runtime_dir), b'{"cmd": "pi'))  # half a line

        # A worker dies: the supervisor reaps it and starts another at once.
        started = len(lb.events("worker_start"))
        os.kill(lb.worker_pids()[0], signal.SIGKILL)
        wait_until(
            lambda: len(lb.events("worker_start")) > started, REPLACED_WITHIN, "a new worker"
        )
        assert all(client.is_open() for client in stalled)

        # The command line is answered while the stalled clients are still held.
        def status() -> None:
            result = cli("status", "--runtime-dir", runtime_dir, "--json")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["generation"] == 1

        def reload() -> None:
            result = cli("reload", "--runtime-dir", runtime_dir)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "reloaded: generation 2 is serving"

        assert timed(status) < ANSWERED_WITHIN
        assert all(client.is_open() for client in stalled)
        assert timed(reload) < ANSWERED_WITHIN
        held_until = time.monotonic()

        # systemd heard from the supervisor all along.
        gaps = watchdog_gaps(notify, held_from, held_until)
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

        # The stalled clients are told, and closed, at their deadline.
        for client in stalled:
            closed_at, said = client.outcome(client.connected_at + CLIENT_TIMEOUT + DEADLINE_SLACK)
            assert json.loads(said) == TIMED_OUT
            assert closed_at - client.connected_at > CLIENT_TIMEOUT - 0.5  # not before it
    finally:
        for client in stalled:
            client.close()
        notify.close()
    still_serves(lb, port)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_control_clients_costs_a_bounded_number_of_descriptors(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(fault_config(port, [(b.name, b.address) for b in echo_pair]))
    runtime_dir = str(lb.runtime_dir)
    path = control_path(runtime_dir)
    before = open_descriptors(lb.pid)
    extra = 8
    flood: list[StalledClient] = []
    try:
        for _ in range(MAX_CLIENTS + extra):
            flood.append(StalledClient(path))
        held, turned_away = flood[:MAX_CLIENTS], flood[MAX_CLIENTS:]

        # The ones over the bound are answered "busy" at once, and closed.
        for client in turned_away:
            _, said = client.outcome(time.monotonic() + 2)
            assert json.loads(said)["errors"][0].startswith("busy:"), said
        assert all(client.is_open() for client in held)
        # (The last one turned away may be a moment from its close.)
        wait_until(lambda: open_descriptors(lb.pid) <= before + MAX_CLIENTS, 1, "the bound")
        busy = cli("drain", "--runtime-dir", runtime_dir, "app/echo1")
        assert (busy.returncode, busy.stdout) == (1, "")
        assert busy.stderr.splitlines() == [
            f"splicelb: busy: {MAX_CLIENTS} control connections are open; try again shortly"
        ]

        # At their deadline the held ones are told and closed; the socket serves again.
        for client in held:
            _, said = client.outcome(client.connected_at + CLIENT_TIMEOUT + DEADLINE_SLACK)
            assert json.loads(said) == TIMED_OUT
    finally:
        for client in flood:
            client.close()
    wait_until(lambda: open_descriptors(lb.pid) <= before, 5, "the flood's descriptors to close")
    drained = cli("drain", "--runtime-dir", runtime_dir, "app/echo1")
    assert drained.stdout.strip() == "app/echo1: ready -> drain", drained.stderr
    assert cli("ready", "--runtime-dir", runtime_dir, "app/echo1").returncode == 0
    still_serves(lb, port)
