"""The supervisor: binds the sockets, forks the workers and the prober, watches, reloads.

Theory of operation (after gunicorn's arbiter)
----------------------------------------------
Signal handlers only put the signal on a queue (and wake the loop through
``signal.set_wakeup_fd``).  The main loop takes signals off the queue and
dispatches them to ``handle_<name>``, answers the control socket, then does
its verbs: reap the children that died, kill the ones whose heartbeat is
stale, bring the current generation back to what its config asks for (one
worker per slot, one prober), and move reloads along.

Reload = start a new generation, then retire the old ones: the new workers
accept on the same listening sockets as the old (the supervisor keeps them),
and only once every new worker is accepting are the old workers told to stop
accepting and drain.  At no moment does a listening socket lack a worker for
longer than a respawn takes, and a socket's queue survives every handover,
so no connection is refused or lost.  A reload that does not happen (its
config is invalid, its pool cannot be created, its workers do not boot)
leaves the instance as it was: the sockets it bound are closed again, so the
kernel hashes no connection into a queue that no worker reads.  At most
``MAX_DRAINING`` generations drain at once: past that, the oldest is told to
close its connections, spread over a couple of seconds.

Faults: each verb of the loop runs on its own, and one that raises is logged
(``supervisor_error``) and tried again on the next turn, so a fault in one
(a full ``runtime_dir``, a failed ``fork``) never stops reaping, the
watchdog or the control socket.  A worker or prober whose heartbeat is older
than ``worker_timeout`` is killed and replaced at once: it was stuck, which
is not a failure to boot, so it does not count toward the boot backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import signal
import socket
import time
import traceback
from typing import Any

from lb import __version__, control, server_api
from lb import log as lblog
from lb.children import (
    EXIT_BOOT_ERROR,
    EXIT_OK,
    EXIT_START_FAILED,
    Child,
    LogSettings,
    spawn,
    worker_plan,
)
from lb.config import Config, load_config
from lb.errors import ConfigError, LBError
from lb.generation import POOL_LINK, Generation
from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.rundir import RuntimeDir
from lb.sockets import SocketTable
from lb.systemd import Notifier
from lb.tls import data_path, expiry_warnings
from lb.upgrade import ChildState, GenerationState, Handoff, check_installed, exec_in_place
from lb.worker.limits import raise_open_files

BOOT_GRACE = 1.0  # a child that dies sooner than this after its start failed at boot
MAX_BOOT_FAILURES = 5  # in a row, before the supervisor gives up
BACKOFF_MAX = 10.0
STOP_GRACE = 5.0  # seconds after drain_timeout before stragglers get SIGKILL
RELOAD_TIMEOUT = 30.0  # a new generation not serving by then is abandoned
TICK = 0.25  # the loop's longest sleep
MAX_DRAINING = 2  # generations that may drain at once; the oldest past that are retired
ERROR_REPEAT = 10.0  # seconds before the same supervisor_error is logged again
HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        log_level: str | None = None,
        log_format: str | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        """``handoff``: what the image before an upgrade left this one (see lb.upgrade)."""
        self.config = config
        self.handoff = handoff
        self.runtime_dir = config.global_.runtime_dir
        g = config.global_
        self.log_settings = LogSettings(log_level or g.log_level, log_format or g.log_format)
        self.log: Any = None
        self.notifier = Notifier()
        self.sockets = SocketTable()
        self.generations: dict[int, Generation] = {}
        self.current: Generation | None = None
        self.previous: Generation | None = None  # the one a reload started from
        self.children: dict[int, Child] = {}
        self.restarts: dict[tuple[str, int], tuple[int, float]] = {}  # failures, not before
        self.queue: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.reload_queued: list[socket.socket | None] = []
        self.control: socket.socket | None = None
        self.selector = selectors.DefaultSelector()
        self.control_clients = control.Clients(self.selector)
        self._wakeup = (-1, -1)
        self._errors: dict[str, tuple[str, float, int]] = {}  # step -> last error, when, repeats
        self.rundir: RuntimeDir | None = None  # claimed by _start
        self.dns_admin = server_api.DnsAdmin()

    # -- start -----------------------------------------------------------------

    def run(self) -> int:
        self.log = lblog.configure(
            "supervisor", 1, level=self.log_settings.level, fmt=self.log_settings.fmt
        )
        try:
            if self.handoff is None:
                self._start()
            else:
                self._resume(self.handoff)
        except (LBError, OSError) as exc:
            self.log.error("start_failed", reason=str(exc))
            self._cleanup()
            return EXIT_START_FAILED
        self.log.info(
            "ready",
            listeners=[f"{lc.name}={lc.bind}" for lc in self.config.listeners],
            workers=self.config.global_.workers,
            runtime_dir=self.runtime_dir,
            version=__version__,
        )
        if self.handoff is not None:
            self.reload([None])  # the new generation, from the code just executed
        self._loop()
        self._cleanup()
        self.log.info("stopped", exit_code=self.exit_code)
        lblog.flush()
        return self.exit_code

    def _start(self) -> None:
        self.rundir = RuntimeDir.claim(self.runtime_dir)  # before any file in it is touched
        raise_open_files()  # the soft limit is often 1024 outside systemd; children inherit it
        self.sockets.prepare(self.config)
        self._plan_descriptors(self.config)
        self._log_tls(self.config)
        generation = Generation.create(1, self.config, None)
        generation.sockets = self.sockets.counts()
        self.generations[1] = self.current = generation
        generation.publish()
        self.control = control.listen(self.runtime_dir)
        self._install_signals()
        self.selector.register(self._wakeup[0], selectors.EVENT_READ, "wakeup")
        self.control_clients.serve(self.control)
        self.notifier.status(f"starting {self.config.global_.workers} workers")
        self._spawn_generation(generation)

    def _resume(self, handoff: Handoff) -> None:
        """Take back what the image before an upgrade held: descriptors, generations,
        children (still this process's), then hear signals again."""
        self.rundir = RuntimeDir(handoff.runtime_dir, *handoff.rundir)
        self.sockets.take_over(handoff.sockets, handoff.admin)
        for g in handoff.generations:
            config = self.config
            workers = len(g.handover)  # what that generation runs, whatever the file says now
            if workers != config.global_.workers:
                config = dataclasses.replace(
                    config, global_=dataclasses.replace(config.global_, workers=workers)
                )
            generation = Generation(
                g.number,
                config,
                Pool.open(g.pool),
                serving=g.serving,
                retiring=g.retiring,
                retired=g.retired,
                sockets={(family, tuple(addr)): n for (family, addr), n in g.sockets},
                handover=[socket.socket(fileno=fd) for fd in g.handover],
            )
            self.generations[g.number] = generation
        self.current = self.generations[handoff.current]
        self.previous = self.generations.get(handoff.previous)
        for c in handoff.children:
            child = Child(c.pid, c.kind, c.slot, self.generations[c.generation], c.started)
            self.children[c.pid] = child
        self.control = socket.socket(fileno=handoff.control)
        self.control.setblocking(False)
        self._install_signals()
        self.selector.register(self._wakeup[0], selectors.EVENT_READ, "wakeup")
        self.control_clients.serve(self.control)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # blocked across the exec
        self.log.info("upgraded", from_version=handoff.version, version=__version__)

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
            self._guarded(self._wait, 0 if self.queue else TICK)
            while self.queue:
                name = signal.Signals(self.queue.pop(0)).name[3:].lower()
                self._guarded(getattr(self, f"handle_{name}"))
            self._guarded(self._reap)
            now = time.monotonic()
            self._guarded(self.notifier.watchdog, now)
            self._guarded(lblog.tick)  # lines the log could not take: counted, reported
            self._guarded(self.control_clients.sweep, now)
            if self.stopping:
                if not self.children:
                    return
                if now > self.stop_deadline:
                    self._signal(self.children.values(), signal.SIGKILL)
                continue
            self._guarded(self._kill_stale, now)
            self._guarded(self.dns_admin.check, self.current.pool)  # type: ignore[union-attr]
            self._guarded(self._maintain, now)
            self._guarded(self._progress, now)

    def _guarded(self, step: Any, *args: Any) -> None:
        """Run one verb of the loop; a fault is logged and the loop goes on (the verb
        runs again next turn).  The same fault is logged again only after a while."""
        try:
            step(*args)
        except Exception as exc:
            name = getattr(step, "__name__", repr(step))
            error, now = repr(exc), time.monotonic()
            last, when, repeats = self._errors.get(name, ("", 0.0, 0))
            if error == last and now - when < ERROR_REPEAT:
                self._errors[name] = (last, when, repeats + 1)
                return
            self._errors[name] = (error, now, 0)
            self.log.error(
                "supervisor_error",
                step=name.lstrip("_"),
                error=error,
                repeated=repeats,
                traceback="".join(traceback.format_exception(exc))[-2000:],
            )

    def _wait(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wakeup[0], 4096):
                        pass
            elif key.data == control.SELECTOR_TAG:
                got = self.control_clients.on_ready(key.fileobj, events)
                if got is not None:
                    self._on_control(*got)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._child_exited(child, os.waitstatus_to_exitcode(status))

    def _child_exited(self, child: Child, code: int) -> None:
        lived = time.monotonic() - child.started
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        expected = self.stopping or child.generation.retiring
        (self.log.info if expected and code == 0 else self.log.warning)(
            f"{child.kind}_exit",
            child_pid=child.pid,
            slot=child.slot,
            child_generation=child.generation.number,
            reason=how,
            uptime_s=round(lived, 3),
        )
        if expected or child.generation is not self.current:
            return
        child.generation.pool.q[L.H_RESTARTS] += 1
        failures, _ = self.restarts.get((child.kind, child.slot), (0, 0.0))
        booting = not child.killed_at and (code == EXIT_BOOT_ERROR or lived < BOOT_GRACE)
        failures = failures + 1 if booting else 0  # a stuck child that was killed booted fine
        if code == EXIT_BOOT_ERROR and not child.generation.serving and child.generation.number > 1:
            self._abandon_reload(f"{child.kind} {child.slot} of the new generation failed to boot")
            return
        if code == EXIT_BOOT_ERROR and failures >= MAX_BOOT_FAILURES:
            self.log.error(
                "halt", reason=f"{child.kind} {child.slot} failed to boot {failures} times in a row"
            )
            self.exit_code = EXIT_BOOT_ERROR
            self.begin_stop(graceful=True)
            return
        delay = min(BACKOFF_MAX, 0.1 * 2 ** (failures - 1)) if failures else 0.0
        self.restarts[(child.kind, child.slot)] = (failures, time.monotonic() + delay)

    def _kill_stale(self, now: float) -> None:
        """SIGKILL a worker or prober whose loop stopped beating (stuck, or stopped)."""
        timeout = self.config.global_.worker_timeout
        for child in list(self.children.values()):
            if child.kind not in ("worker", "prober") or now - child.started < timeout:
                continue
            if now - max(_heartbeat(child), child.started, child.killed_at) > timeout:
                self.log.warning(
                    f"{child.kind}_timeout",
                    child_pid=child.pid,
                    slot=child.slot,
                    reason=f"no heartbeat for {timeout:g} s",
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.killed_at = now  # one kill per timeout; the reaper does the rest

    def _maintain(self, now: float) -> None:
        generation = self.current
        assert generation is not None
        wanted = [("prober", 0)] + [("worker", s) for s in range(generation.config.global_.workers)]
        if generation.config.global_.admin_bind is not None:
            wanted.append(("admin", 0))
        present = {(c.kind, c.slot) for c in self.children.values() if c.generation is generation}
        for kind, slot in wanted:
            _, not_before = self.restarts.get((kind, slot), (0, 0.0))
            if (kind, slot) not in present and now >= not_before:
                self._spawn(kind, slot, generation)

    def _progress(self, now: float) -> None:
        """Move a starting generation to serving; clear away finished old ones."""
        current = self.current
        assert current is not None
        if not current.serving:
            slots = {
                c.slot: c.pid
                for c in self.children.values()
                if c.generation is current and c.kind == "worker"
            }
            if current.workers_running(slots):
                self._serving(current)
            elif current.number > 1 and now - current.started > RELOAD_TIMEOUT:
                self._abandon_reload(f"the new workers were not serving after {RELOAD_TIMEOUT:g} s")
        for number, generation in list(self.generations.items()):
            if generation.retiring and not any(
                c.generation is generation for c in self.children.values()
            ):
                generation.remove(carry_to=self.generations.values())  # its totals go on
                del self.generations[number]

    def _retire_excess(self) -> None:
        """Past ``MAX_DRAINING`` draining generations, the oldest close their connections
        now, spread over a couple of seconds (their workers' SIGUSR1)."""
        draining = [
            g
            for _, g in sorted(self.generations.items())
            if g.retiring
            and not g.retired
            and any(c.generation is g for c in self.children.values())
        ]
        for generation in draining[: max(0, len(draining) - MAX_DRAINING)]:
            generation.retired = True
            workers = [
                c
                for c in self.children.values()
                if c.generation is generation and c.kind == "worker"
            ]
            self._signal(workers, signal.SIGUSR1)
            self.log.info(
                "generation_retired",
                child_generation=generation.number,
                workers=len(workers),
                reason=f"more than {MAX_DRAINING} generations draining",
            )

    # -- generations and reload --------------------------------------------------

    def _spawn_generation(self, generation: Generation) -> None:
        self._spawn("prober", 0, generation)
        for slot in range(generation.config.global_.workers):
            self._spawn("worker", slot, generation)
        if generation.config.global_.admin_bind is not None:
            self._spawn("admin", 0, generation)

    def _spawn(self, kind: str, slot: int, generation: Generation) -> None:
        own: dict[str, list[socket.socket]] = {}
        if kind == "worker":
            own = self.sockets.for_workers(generation.config)
            generation.tls_contexts()  # before the fork: shared by the generation's workers
        elif kind == "admin":
            admin = self.sockets.admin_socket(generation.config)
            own = {"admin": [admin]} if admin is not None else {}
        # A worker keeps its slot's handover socket, where older workers hand tunnels over.
        keep = generation.handover[slot : slot + 1] if kind == "worker" else []
        mine = {id(s) for socks in [*own.values(), keep] for s in socks}
        close: list[int | socket.socket] = [s for s in self.sockets.all() if id(s) not in mine]
        close += [s for g in self.generations.values() for s in g.handover if id(s) not in mine]
        if self.control is not None:
            close.append(self.control)
        close += self.control_clients.sockets()
        if self.rundir is not None:  # the lock ends with the supervisor, not with a child
            close += self.rundir.inherited()
        close += list(self._wakeup)
        child = spawn(kind, slot, generation, own, close, self.log_settings)
        self.children[child.pid] = child

    def _serving(self, generation: Generation) -> None:
        generation.serving = True
        old = [g for g in self.generations.values() if g is not generation and not g.retiring]
        for previous in old:
            previous.retiring = True
            previous.pool.q[L.H_HANDOVER_TO] = generation.number  # its workers hand over
            self._signal(
                [c for c in self.children.values() if c.generation is previous], signal.SIGTERM
            )
        gone = self.sockets.keep_only(generation.config)
        self._retire_excess()
        workers = generation.config.global_.workers
        status = f"serving: generation {generation.number}, {workers} workers"
        self.notifier.ready(status)
        if generation.number > 1:
            self.log.info(
                "reload",
                outcome="done",
                listeners_closed=len(gone),
                draining=[g.number for g in old],
            )
        else:
            self.log.info("serving", workers=workers)
        for waiter in generation.waiters:
            control.reply(waiter, {"ok": True, "generation": generation.number})
        generation.waiters.clear()
        if self.reload_queued:
            queued, self.reload_queued = self.reload_queued, []
            self.reload(queued)

    def reload(self, waiters: list[socket.socket | None]) -> None:
        """Re-read the config and start a new generation (or say why not)."""
        current = self.current
        assert current is not None
        if not current.serving:  # one reload at a time; this one follows
            self.reload_queued += waiters
            return
        clients = [w for w in waiters if w is not None]
        self.log.info("reload", outcome="started", config=self.config.path)
        try:
            config = load_config(self.config.path)
            if config.global_.runtime_dir != self.runtime_dir:
                raise ConfigError(["global.runtime_dir: cannot change on reload; restart instead"])
            self.sockets.prepare(config)
        except ConfigError as exc:
            self._reload_failed(clients, exc.problems)
            return
        except LBError as exc:
            self._reload_failed(clients, [str(exc)])
            return
        number = max(self.generations) + 1
        try:
            generation = Generation.create(number, config, current.pool)
        except (LBError, OSError) as exc:
            self.sockets.trim(current.sockets)
            self._reload_failed(
                clients, [f"global.runtime_dir: cannot create the live pool: {exc}"]
            )
            return
        try:
            generation.publish()
        except OSError as exc:
            generation.remove()
            self.sockets.trim(current.sockets)
            self._reload_failed(clients, [f"global.runtime_dir: cannot publish the pool: {exc}"])
            current.publish()  # the link may be gone: point it back
            return
        for what in generation.dropped:
            self.log.warning("server_dropped", server=what, reason="not carried over by the reload")
        self.notifier.reloading(f"reloading: starting generation {number}")
        self._plan_descriptors(config)
        self._log_tls(config)
        generation.sockets = self.sockets.counts()
        generation.pool.q[L.H_RELOADS] += 1
        generation.waiters = clients
        self.generations[number] = generation
        self.previous, self.current, self.config = current, generation, config
        self.log = self.log.bind(generation=number)
        self.restarts.clear()
        self._spawn_generation(generation)

    def _plan_descriptors(self, config: Config) -> None:
        """Warn when ``global.maxconn`` needs more descriptors than a worker may open."""
        plan = worker_plan(config, self.sockets.for_workers(config), 0)
        if plan.short:
            self.log.warning(
                "fd_limit", reason=plan.warning(config.global_.maxconn), limit=plan.limit
            )

    def _log_tls(self, config: Config) -> None:
        """Say, per terminating listener, how its bytes move (lb.tls.data_path), and which
        of its certificates expire soon."""
        for backend in config.backends:
            if backend.tls is not None and not backend.tls.verify:
                self.log.warning(
                    "tls_verify_off",
                    backend=backend.name,
                    reason="verify = false: its servers' certificates are not checked",
                )
        for lc in config.listeners:
            if lc.tls is None:
                continue
            path, why = data_path()
            self.log.info("tls_path", listener=lc.name, path=path, reason=why)
            for warning in expiry_warnings(lc.tls):
                self.log.warning("tls_cert_expiry", listener=lc.name, problem=warning)

    def upgrade(self, conn: socket.socket) -> None:
        """Re-execute this process with the installed code (see lb.upgrade); the client is
        answered first, and asks the new image when its generation serves."""
        current = self.current
        assert current is not None
        if self.stopping or not current.serving:
            control.reply(conn, {"ok": False, "errors": ["a reload is under way: try again"]})
            return
        try:
            check_installed(self.config.path)
        except LBError as exc:
            self.log.error("upgrade", outcome="rejected", reason=str(exc))
            control.reply(conn, {"ok": False, "errors": [str(exc)]})
            return
        self.log.info("upgrade", outcome="started", version=__version__)
        control.answer_at_once(conn, {"ok": True, "pid": os.getpid(), "generation": current.number})
        self.notifier.reloading("upgrading: executing the installed splicelb")
        lblog.flush()
        try:
            exec_in_place(self._handoff(), HANDLED)
        except OSError as exc:  # still the old image, as it was
            self.log.error("upgrade", outcome="failed", reason=str(exc))
            self.notifier.ready(f"serving: generation {current.number} (upgrade failed)")

    def _handoff(self) -> Handoff:
        assert self.rundir is not None and self.control is not None and self.current is not None
        listening, admin = self.sockets.handoff()
        return Handoff(
            config=self.config.path,
            log_level=self.log_settings.level,
            log_format=self.log_settings.fmt,
            version=__version__,
            runtime_dir=self.runtime_dir,
            rundir=[self.rundir.fd, self.rundir.lock],
            control=self.control.fileno(),
            sockets=listening,
            admin=admin,
            generations=[
                GenerationState(
                    number=g.number,
                    pool=g.pool.path,
                    serving=g.serving,
                    retiring=g.retiring,
                    retired=g.retired,
                    sockets=[[list(k), n] for k, n in g.sockets.items()],
                    handover=[sock.fileno() for sock in g.handover],
                )
                for g in self.generations.values()
            ],
            children=[
                ChildState(c.pid, c.kind, c.slot, c.generation.number, c.started)
                for c in self.children.values()
            ],
            current=self.current.number,
            previous=self.previous.number if self.previous is not None else 0,
            notify=self.notifier.environ,
        )

    def _reload_failed(self, clients: list[socket.socket], problems: list[str]) -> None:
        self.log.error("reload", outcome="rejected", problems=problems)
        for conn in clients:
            control.reply(conn, {"ok": False, "errors": problems})

    def _abandon_reload(self, reason: str) -> None:
        """The new generation cannot serve: stop it and go on with the previous one."""
        failed, previous = self.current, self.previous
        assert failed is not None and previous is not None
        self.log.error("reload", outcome="failed", reason=reason)
        self._signal([c for c in self.children.values() if c.generation is failed], signal.SIGKILL)
        failed.retiring = True
        self.current, self.config = previous, previous.config
        self.log = self.log.bind(generation=previous.number)
        previous.publish()
        self.sockets.keep_only(previous.config)
        self.sockets.trim(previous.sockets)  # the reload's extra sockets: no worker reads them
        self.restarts.clear()
        self.notifier.ready(f"serving: generation {previous.number} (reload failed: {reason})")
        for waiter in failed.waiters:
            control.reply(waiter, {"ok": False, "errors": [reason]})
        failed.waiters.clear()

    # -- the control socket --------------------------------------------------------

    def _on_control(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """A control client's whole request; answered with ``control.reply``, now or later."""
        command = request.get("cmd")
        if command == "reload":
            self.reload([conn])
        elif command == "upgrade":
            self.upgrade(conn)
        elif command == "admin":
            control.reply(conn, self._set_admin(request))
        elif command == "server":
            control.reply(conn, self._server(request))
        elif command == "ping":
            assert self.current is not None
            control.reply(
                conn,
                {
                    "ok": True,
                    "pid": os.getpid(),
                    "generation": self.current.number,
                    "serving": self.current.serving,
                    "version": __version__,
                },
            )
        else:
            control.reply(conn, {"ok": False, "errors": [f"unknown command {command!r}"]})

    def _server(self, request: dict[str, Any]) -> dict[str, Any]:
        """``splicelb server add|remove|weight`` (see lb.server_api)."""
        assert self.current is not None
        answer = server_api.handle(self.current.pool, request)
        if answer["ok"]:
            fields = {k: v for k, v in answer.items() if k != "ok"}
            self.log.info(f"server_{request['action']}", **fields)
        return answer

    def _set_admin(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.current is not None
        answer = self.current.set_admin(request)
        if answer["ok"]:
            self.log.info(
                "admin_state",
                backend=answer["backend"],
                server=answer["server"],
                to=answer["to"],
                **{"from": answer["from"]},
            )
        return answer

    # -- signals -----------------------------------------------------------------

    def handle_hup(self) -> None:
        if not self.stopping:
            self.reload([None])

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
            self.notifier.stopping("stopping: draining connections" if graceful else "stopping")
            for generation in self.generations.values():
                for waiter in generation.waiters:
                    control.reply(waiter, {"ok": False, "errors": ["the instance is stopping"]})
                generation.waiters.clear()
        if graceful:
            self.log.info("stopping", graceful=True, drain_timeout=drain)
            self._signal(self.children.values(), signal.SIGTERM)
        else:
            self.log.info("stopping", graceful=False)
            self.stop_deadline = min(self.stop_deadline, time.monotonic() + STOP_GRACE)
            self._signal(self.children.values(), signal.SIGQUIT)

    def _signal(self, children: Any, sig: int) -> None:
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    # -- cleanup ---------------------------------------------------------------

    def _cleanup(self) -> None:
        """Close and remove what this instance made; a start refused before it claimed
        the runtime dir made nothing there, and removes nothing."""
        self.sockets.close()
        self.control_clients.close()
        if self.control is not None:
            self.control.close()
        self.notifier.close()
        if self.rundir is None:
            return
        for generation in self.generations.values():
            generation.remove()
        self.generations.clear()
        for name in (POOL_LINK, control.CONTROL_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.rundir.fd)
        self.rundir.release()


def _heartbeat(child: Child) -> float:
    """The child's last heartbeat in its generation's pool (0: none yet)."""
    pool = child.generation.pool
    if child.kind == "prober":
        return float(pool.d[L.H_PROBER_BEAT]) if pool.q[L.H_PROBER_PID] == child.pid else 0.0
    base = pool.geometry.slot(child.slot)
    return float(pool.d[base + L.S_BEAT]) if pool.q[base + L.S_PID] == child.pid else 0.0
