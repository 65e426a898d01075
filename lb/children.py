"""Forking the supervisor's children and what a child does first.

A child resets the supervisor's signal handling (the supervisor blocks its
signals around ``fork``, so none reaches the child before that: caught by
the supervisor's handler in the child, a SIGTERM sent in that window was
lost, and the child ran on until killed), asks the kernel for SIGTERM
when the supervisor dies, closes every descriptor that is not its own (the
listening sockets of other generations, the control socket; a worker keeps
every slot's sockets of its listeners), then boots its role.  A failure
while booting exits with ``EXIT_BOOT_ERROR`` (the supervisor then backs off,
or halts if it keeps happening); a failure after that exits with
``EXIT_CHILD_CRASHED``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

from lb import log as lblog
from lb.admin import Admin
from lb.config import Config
from lb.generation import Generation
from lb.parent import set_pdeathsig
from lb.worker.limits import DescriptorPlan, plan_descriptors
from lb.worker.process import Worker
from probes.process import Prober

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_CHILD_CRASHED = 2  # a child's exit code after an unexpected exception
EXIT_BOOT_ERROR = 3  # a child could not start; the supervisor halts if this repeats

# The supervisor's signals: blocked around fork, default (or ignored) in a child.
SUPERVISOR_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGINT}


@dataclass(slots=True)
class Child:
    pid: int
    kind: str  # "worker" | "prober" | "admin"
    slot: int
    generation: Generation
    started: float
    killed_at: float = 0.0  # when it was killed for a stale heartbeat (0: never)


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str
    fmt: str


def spawn(
    kind: str,
    slot: int,
    generation: Generation,
    sockets: dict[str, list[socket.socket]],
    close: Iterable[int | socket.socket],
    log: LogSettings,
) -> Child:
    """Fork a child; in the child this never returns."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            _child_main(kind, slot, generation, sockets, close, log, mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the parent's (a child never returns)
    return Child(pid, kind, slot, generation, time.monotonic())


def _child_main(
    kind: str,
    slot: int,
    generation: Generation,
    sockets: dict[str, list[socket.socket]],
    close: Iterable[int | socket.socket],
    log: LogSettings,
    mask: Iterable[int],
) -> NoReturn:
    code = EXIT_BOOT_ERROR
    try:
        parent = os.getppid()
        signal.set_wakeup_fd(-1)
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the supervisor's
        # Anything sent since the fork is delivered now: a SIGTERM ends the child at once.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        set_pdeathsig(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(EXIT_OK)  # the supervisor died while we were forking
        for item in close:
            with contextlib.suppress(OSError):
                item.close() if isinstance(item, socket.socket) else os.close(item)
        run = _boot(kind, slot, generation, sockets, log)
        code = EXIT_CHILD_CRASHED  # from here on a failure is a crash, not a boot error
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CHILD_CRASHED
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            lblog.configure(kind, generation.number).error(
                f"{kind}_crash", error=repr(exc), slot=slot, boot=code == EXIT_BOOT_ERROR
            )
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
        with contextlib.suppress(BaseException):
            lblog.flush()  # the count of lines the log could not take, if any
        os._exit(code)


def _boot(
    kind: str,
    slot: int,
    generation: Generation,
    sockets: dict[str, list[socket.socket]],
    log: LogSettings,
) -> Callable[[], int]:
    """Build a child's state; its ``run`` is returned, not called."""
    config = generation.config
    logger = lblog.configure(kind, generation.number, level=log.level, fmt=log.fmt)
    if kind == "prober":
        return Prober(config, generation.pool, logger).run
    if kind == "admin":
        return Admin(config.global_, sockets["admin"][0], logger).run
    cap = worker_plan(config, sockets, slot).cap
    log_conn = lblog.conn_logger(logger, kind, generation.number, level=log.level, fmt=log.fmt)
    return Worker(
        config,
        slot,
        generation.number,
        sockets,
        generation.pool,
        cap,
        logger,
        log_conn,
        generation.handover[slot] if slot < len(generation.handover) else None,
        generation.tls,
    ).run


def worker_plan(
    config: Config, sockets: dict[str, list[socket.socket]], slot: int
) -> DescriptorPlan:
    """The connections ``slot``'s worker may hold: its share of ``global.maxconn``, or
    fewer where its open-file limit leaves room for fewer (see :mod:`lb.worker.limits`)."""
    g = config.global_
    share = max(1, g.maxconn // g.workers + (1 if slot < g.maxconn % g.workers else 0))
    listening = sum(len(socks) for socks in sockets.values())
    return plan_descriptors(share, listening, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
