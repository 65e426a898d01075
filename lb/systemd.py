"""systemd's notify protocol, spoken by the supervisor only.

``NOTIFY_SOCKET`` names a datagram socket (a path, or an abstract name after
``@``).  We send ``READY=1`` once every listener is accepting,
``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload starts and ``READY=1``
when it is done, ``STOPPING=1`` on the way out, ``STATUS=`` lines a person can
read, and ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from the supervisor's
loop (so a stuck loop stops it).  The variables are removed from the
environment so the children never speak for the service.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications if systemd (or a test) asked for them; else does nothing."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        # As they were: an upgrade puts them back for the image it executes.
        self.environ = {name: env.pop(name) for name in NOTIFY_VARIABLES if name in env}
        address = self.environ.get("NOTIFY_SOCKET", "")
        watchdog_usec = self.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = self.environ.get("WATCHDOG_PID", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = 0.0
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 1e6 / 2
        self._watchdog_at = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # systemd gone: nothing to tell
            self._sock.sendto("\n".join(lines).encode(), self._address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self, now: float) -> None:
        """Ping the watchdog if it is due; called from every turn of the supervisor's loop."""
        if self.watchdog_interval and now >= self._watchdog_at:
            self._watchdog_at = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
