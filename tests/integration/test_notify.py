"""systemd's notify protocol, received on a real datagram socket passed as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import (
    EchoBackend,
    SpliceLB,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)


class NotifySocket:
    """What systemd would receive: one datagram per notification, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.senders: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            for level, kind, creds in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    self.senders.add(struct.unpack("3i", creds)[0])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str, after: float = 0.0) -> list[dict[str, str]]:
        return [m for t, m in self.messages if key in m and t >= after]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_reloading_stopping_and_watchdog(
    abstract: bool,
    tmp_path: Path,
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
) -> None:
    address = f"@splicelb-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    notify = NotifySocket(address)
    try:
        port = free_port()
        started = time.monotonic()
        lb = start_lb(
            config(
                listener(f"127.0.0.1:{port}", "app"),
                backend("app", [(b.name, b.address) for b in echo_pair]),
            ),
            env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
        )
        [ready] = wait_until(lambda: notify.with_key("READY"), 10, "READY=1")
        assert ready["READY"] == "1" and "serving" in ready["STATUS"]
        # READY comes once every worker accepts: both had logged their start by then.
        ready_at = next(t for t, m in notify.messages if "READY" in m)
        assert len(lb.events("worker_start")) == 2

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lb.signal(signal.SIGHUP)
        [reloading] = wait_until(lambda: notify.with_key("RELOADING"), 10, "RELOADING=1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        assert "reloading" in reloading["STATUS"]
        reloaded = wait_until(lambda: notify.with_key("READY", after=ready_at + 1e-6), 10, "READY")
        assert "generation 2" in reloaded[0]["STATUS"]

        watchdogs = notify.with_key("WATCHDOG", after=started)
        time.sleep(1.0)
        assert len(notify.with_key("WATCHDOG", after=started)) >= len(watchdogs) + 3

        lb.signal(signal.SIGTERM)
        [stopping] = wait_until(lambda: notify.with_key("STOPPING"), 10, "STOPPING=1")
        assert stopping["STOPPING"] == "1"
        assert lb.wait(20) == 0
        # The children never speak for the service: every sender was the supervisor.
        assert all(
            set(m) <= {"READY", "RELOADING", "MONOTONIC_USEC", "STOPPING", "STATUS", "WATCHDOG"}
            for _, m in notify.messages
        )
    finally:
        notify.close()
