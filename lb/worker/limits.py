"""The balancer's own limits: descriptors, local ports, kernel memory.

An error such as ``EMFILE`` or ``EADDRNOTAVAIL`` on the balancer's side of a
connection says nothing about a server: every other server would fail the
same way.  So a connection that meets one is answered 503 (http) or closed
(tcp) with a reason that names the limit; no server is marked suspect, no
failed connect is counted against one, and no other server is tried.  The
operator hears of it once per episode: a warning when the limit is first
met (naming it and the setting that raises it), and one line when it has not
been met for ``QUIET`` seconds, with how many times it was met.

Descriptors are also planned: each connection holds two (the client's socket
and the server's), so a worker accepts no more connections than its
open-file limit leaves room for, after what it keeps for itself (idle pipes,
listening sockets, its loop).  Past that cap new connections wait in the
kernel's listen backlog instead of failing.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass
from time import monotonic
from typing import Any

from lb.worker.pipes import KEEP_PIPES

QUIET = 1.0  # seconds without meeting a limit that end its episode
PER_CONNECTION = 2  # descriptors: the client's socket and the server's
OWN = 32  # descriptors a worker holds for itself: loop, signals, logging, the pool


@dataclass(frozen=True, slots=True)
class Limit:
    what: str  # what ran out
    setting: str  # what raises it


LIMITS = {
    errno.EMFILE: Limit("file descriptors", "LimitNOFILE (systemd) or ulimit -n"),
    errno.ENFILE: Limit("the system's file descriptors", "sysctl fs.file-max"),
    errno.EADDRNOTAVAIL: Limit(
        "local ports",
        "sysctl net.ipv4.ip_local_port_range, the backend's source addresses, or more servers",
    ),
    errno.ENOBUFS: Limit("kernel buffer memory", "sysctl net.ipv4.tcp_mem, or memory"),
    errno.ENOMEM: Limit("kernel memory", "memory"),
}
LOCAL_ERRNOS = frozenset(LIMITS)


def reason(err: int, where: str) -> str:
    """The ``reason`` of a connection that met a local limit."""
    return f"local limit: {os.strerror(err)} ({where})"


class Episode:
    """One warning when a limit is first met, one line when it has been quiet a while."""

    __slots__ = ("count", "end_event", "last", "log", "start_event", "started")

    def __init__(self, log: Any, start_event: str, end_event: str) -> None:
        self.log = log
        self.start_event = start_event
        self.end_event = end_event
        self.count = 0
        self.started = self.last = 0.0

    def hit(self, err: int, where: str) -> None:
        now = monotonic()
        if not self.count:
            self.started = now
            limit = LIMITS.get(err, Limit(os.strerror(err), "?"))
            self.log.warning(
                self.start_event,
                reason=os.strerror(err),
                where=where,
                limit=limit.what,
                raise_with=limit.setting,
            )
        self.count += 1
        self.last = now

    def check(self, now: float) -> None:
        """Periodic: end the episode once the limit has not been met for ``QUIET`` s."""
        if self.count and now - self.last >= QUIET:
            self.log.info(
                self.end_event, count=self.count, lasted_s=round(self.last - self.started, 3)
            )
            self.count = 0


def raise_open_files() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    share: int  # connections global.maxconn gives each worker
    needed: int  # descriptors that share needs
    limit: int  # the open-file limit
    cap: int  # connections a worker accepts: the share, or what the limit leaves room for

    @property
    def short(self) -> bool:
        return self.cap < self.share

    def warning(self, maxconn: int) -> str:
        return (
            f"global.maxconn = {maxconn} gives each worker {self.share} connections, which "
            f"need {self.needed} file descriptors; the open-file limit is {self.limit} "
            f"(LimitNOFILE, ulimit -n): each worker accepts at most {self.cap} at once"
        )


def plan_descriptors(share: int, listening: int, limit: int) -> DescriptorPlan:
    """What ``share`` connections need per worker that holds ``listening`` sockets."""
    reserved = OWN + listening + 2 * KEEP_PIPES
    needed = reserved + PER_CONNECTION * share
    cap = max(1, min(share, (limit - reserved) // PER_CONNECTION))
    return DescriptorPlan(share, needed, limit, cap)
