"""The supervisor: binds the sockets, forks the workers and the prober, and watches them.

Theory of operation (after gunicorn's arbiter)
----------------------------------------------
Signal handlers only put the signal on a queue (and wake the loop through
``signal.set_wakeup_fd``).  The main loop takes signals off the queue and
dispatches them to ``handle_<name>``, then does its three verbs: reap the
children that died, kill the ones whose heartbeat is stale, and bring the
children back to what the config asks for (one worker per slot, one prober).

The supervisor binds every listening socket before the first fork and keeps
them: a worker that dies leaves its accept queue to the one that replaces it
on the same slot, so a queued connection is never lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from lb import log as lblog
from lb.config import Config
from lb.errors import LBError
from lb.pool.shm import Pool, create_pool
from lb.sockets import bind_listener
from lb.status import PID_FILE, POOL_LINK
from lb.worker.process import Worker
from probes.process import Prober

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_CHILD_CRASHED = 2  # a child's exit code after an unexpected exception
EXIT_BOOT_ERROR = 3  # a child could not start: the supervisor halts instead of looping

BOOT_GRACE = 1.0  # a child that dies sooner than this after its start failed at boot
MAX_BOOT_FAILURES = 5  # in a row, before the supervisor gives up
BACKOFF_MAX = 10.0
STOP_GRACE = 5.0  # seconds after drain_timeout before stragglers get SIGKILL
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)
PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class Child:
    pid: int
    kind: str  # "worker" | "prober"
    slot: int
    generation: int
    started: float


@dataclass(slots=True)
class SlotState:
    """Restart bookkeeping for one child position (a worker slot or the prober)."""

    failures: int = 0
    not_before: float = 0.0


@dataclass
class Supervisor:
    config: Config
    log_level: str | None = None
    log_format: str | None = None
    generation: int = 1
    children: dict[int, Child] = field(default_factory=dict)
    sockets: dict[tuple[str, int], socket.socket] = field(default_factory=dict)
    restarts: dict[tuple[str, int], SlotState] = field(default_factory=dict)
    queue: list[int] = field(default_factory=list)
    stopping: bool = False
    stop_deadline: float = 0.0
    exit_code: int = EXIT_OK
    pool: Pool | None = None
    log: Any = None
    _wakeup: tuple[int, int] = (-1, -1)

    @property
    def runtime_dir(self) -> str:
        return self.config.global_.runtime_dir

    # -- start -----------------------------------------------------------------

    def run(self) -> int:
        g = self.config.global_
        self.log = lblog.configure(
            "supervisor",
            self.generation,
            level=self.log_level or g.log_level,
            fmt=self.log_format or g.log_format,
        )
        try:
            self._start()
        except LBError as exc:
            self.log.error("start_failed", reason=str(exc))
            self._cleanup()
            return EXIT_START_FAILED
        self.log.info(
            "ready",
            listeners=[f"{lc.name}={lc.bind}" for lc in self.config.listeners],
            workers=g.workers,
            runtime_dir=self.runtime_dir,
        )
        self._loop()
        self._cleanup()
        self.log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    def _start(self) -> None:
        os.makedirs(self.runtime_dir, mode=0o755, exist_ok=True)
        self._write_pid_file()
        for index, listener in enumerate(self.config.listeners):
            for slot in range(self.config.global_.workers):
                self.sockets[(listener.name, slot)] = bind_listener(listener, f"listeners[{index}]")
        path = os.path.join(self.runtime_dir, f"pool-{self.generation}.shm")
        self.pool = create_pool(path, self.config, self.generation, self.config.global_.workers)
        _replace_symlink(os.path.basename(path), os.path.join(self.runtime_dir, POOL_LINK))
        self._install_signals()
        self._spawn("prober", 0)
        for slot in range(self.config.global_.workers):
            self._spawn("worker", slot)

    def _write_pid_file(self) -> None:
        path = os.path.join(self.runtime_dir, PID_FILE)
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(path) as f:
                pid = int(f.read().strip())
            if pid != os.getpid() and _alive(pid):
                raise LBError(
                    f"global.runtime_dir: an instance is already running there (pid {pid})"
                )
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, path)

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (r, w)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._enqueue)

    def _enqueue(self, signum: int, _frame: Any) -> None:
        self.queue.append(signum)  # nothing else in a handler: the loop does the work

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._sleep(1.0)
            while self.queue:
                sig = self.queue.pop(0)
                handler = getattr(self, f"handle_{signal.Signals(sig).name[3:].lower()}")
                handler()
            self._reap()
            if self.stopping:
                if not self.children:
                    return
                if time.monotonic() > self.stop_deadline:
                    self._signal_all(signal.SIGKILL)
            else:
                self._maintain()

    def _sleep(self, timeout: float) -> None:
        if self.queue:
            return
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._wakeup[0]], [], [], timeout)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wakeup[0], 4096):
                        pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self._child_exited(child, os.waitstatus_to_exitcode(status))

    def _child_exited(self, child: Child, code: int) -> None:
        lived = time.monotonic() - child.started
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        level = "info" if self.stopping and code == 0 else "warning"
        getattr(self.log, level)(
            f"{child.kind}_exit",
            child_pid=child.pid,
            slot=child.slot,
            reason=how,
            uptime_s=round(lived, 3),
        )
        if self.stopping:
            return
        state = self.restarts.setdefault((child.kind, child.slot), SlotState())
        if code == EXIT_BOOT_ERROR or lived < BOOT_GRACE:
            state.failures += 1
        else:
            state.failures = 0
        if code == EXIT_BOOT_ERROR and state.failures >= MAX_BOOT_FAILURES:
            self.log.error(
                "halt",
                reason=f"{child.kind} {child.slot} failed to boot {state.failures} times in a row",
            )
            self.exit_code = EXIT_BOOT_ERROR
            self.begin_stop(graceful=True)
            return
        delay = min(BACKOFF_MAX, 0.1 * 2 ** (state.failures - 1)) if state.failures else 0.0
        state.not_before = time.monotonic() + delay

    def _maintain(self) -> None:
        now = time.monotonic()
        wanted = [("prober", 0)] + [("worker", s) for s in range(self.config.global_.workers)]
        present = {(c.kind, c.slot) for c in self.children.values()}
        for kind, slot in wanted:
            state = self.restarts.get((kind, slot))
            if (kind, slot) not in present and (state is None or now >= state.not_before):
                self._spawn(kind, slot)

    # -- signals -----------------------------------------------------------------

    def handle_hup(self) -> None:
        self.log.warning("reload_unsupported", reason="reload arrives with the lifecycle work")

    def handle_term(self) -> None:
        self.begin_stop(graceful=not self.stopping)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.begin_stop(graceful=False)

    def handle_chld(self) -> None:
        pass  # reaping happens on every turn of the loop

    def begin_stop(self, *, graceful: bool) -> None:
        drain = self.config.global_.drain_timeout
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + (drain if graceful else 0) + STOP_GRACE
        if graceful:
            self.log.info("stopping", graceful=True, drain_timeout=drain)
            self._signal_all(signal.SIGTERM)
        else:
            self.log.info("stopping", graceful=False)
            self.stop_deadline = min(self.stop_deadline, time.monotonic() + STOP_GRACE)
            self._signal_all(signal.SIGQUIT)

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # -- children ----------------------------------------------------------------

    def _spawn(self, kind: str, slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            self._child_main(kind, slot)
        self.children[pid] = Child(pid, kind, slot, self.generation, time.monotonic())

    def _child_main(self, kind: str, slot: int) -> NoReturn:
        code = EXIT_BOOT_ERROR
        try:
            parent = os.getppid()
            signal.set_wakeup_fd(-1)
            for sig in HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the supervisor's
            for fd in self._wakeup:
                os.close(fd)
            _set_pdeathsig(signal.SIGTERM)
            if os.getppid() != parent:
                os._exit(EXIT_OK)
            own: dict[str, socket.socket] = {}
            for (name, s), sock in self.sockets.items():
                if kind == "worker" and s == slot:
                    own[name] = sock
                else:
                    sock.close()  # only the parent's copy keeps it open
            run = self._boot_child(kind, slot, own)
            code = EXIT_CHILD_CRASHED  # from here on a failure is a crash, not a boot error
            code = run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_CHILD_CRASHED
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                lblog.configure(kind, self.generation).error(
                    f"{kind}_crash", error=repr(exc), slot=slot, boot=code == EXIT_BOOT_ERROR
                )
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
            os._exit(code)

    def _boot_child(self, kind: str, slot: int, own: dict[str, socket.socket]) -> Callable[[], int]:
        """Build a child's state; its ``run`` is returned, not called."""
        g = self.config.global_
        log = lblog.configure(
            kind,
            self.generation,
            level=self.log_level or g.log_level,
            fmt=self.log_format or g.log_format,
        )
        assert self.pool is not None
        if kind == "prober":
            return Prober(self.config, self.pool, log).run
        share = g.maxconn // g.workers + (1 if slot < g.maxconn % g.workers else 0)
        return Worker(self.config, slot, self.generation, own, self.pool, max(1, share), log).run

    # -- cleanup ---------------------------------------------------------------

    def _cleanup(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        if self.pool is not None:
            path = self.pool.path
            self.pool.close()
            self.pool = None
            for name in (path, os.path.join(self.runtime_dir, POOL_LINK)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        pid_file = os.path.join(self.runtime_dir, PID_FILE)
        with contextlib.suppress(FileNotFoundError, ValueError), open(pid_file) as f:
            if int(f.read().strip()) == os.getpid():
                os.unlink(pid_file)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_symlink(target: str, link: str) -> None:
    tmp = f"{link}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, link)


def _set_pdeathsig(sig: int) -> None:
    """Have the kernel signal this child when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
