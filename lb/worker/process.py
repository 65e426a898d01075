"""A worker process: one event loop accepting on its own listening sockets.

The supervisor forks a worker with every listener's ``SO_REUSEPORT``
sockets (socket k belongs to slot k mod workers) and the path of the live
pool.  The worker accepts on its slot's sockets in batches until ``EAGAIN``
(and on the other slots' when their worker is behind: below), hands every
connection to a :class:`~lb.worker.conn.Connection`, publishes its counters
in its own pool slot and beats its heartbeat from inside the loop, so a
stuck loop stops beating.  SIGTERM: stop accepting and let connections
finish for up to ``drain_timeout``; SIGQUIT: close everything at once.

Counters are added up in :attr:`Worker.tally`, a list of Python ints laid
out like the slot, and copied to the slot ``PUBLISH_DELAY`` after the first
change since the last copy: adding to a list costs a fraction of adding to
shared memory (through a ``memoryview``), and one copy serves every
connection of those 10 ms, however many.  One exception: a server's active
connections are also stored in the slot as they change where other workers
read them to pick (``leastconn``, ``random2``, a server's ``maxconn``: see
:attr:`Worker.live_active`).  Only there: a store through the ``memoryview``
costs several list additions (``bench.instructions``: a few hundred instructions
per connection saved where nothing reads the count as it changes).

Taking from the other slots
---------------------------
The kernel spreads a listener's connections over its sockets, one per
slot, by a hash of their addresses; a worker that is preempted, busy with a
batch or stuck leaves its share waiting while another worker may have
nothing to do.  So a worker keeps the other slots' sockets in an epoll set
of their own (``queued``) that never wakes it, and looks at it when it is
idle: between its busy polls (the loop's ``on_idle``), and at each sweep.
It takes what waits there when that slot's worker is behind: it holds more
connections than this one (its count in the pool, at most ``PUBLISH_DELAY``
late), or it is not accepting (its slot is empty or starting, or its
heartbeat is more than ``STALLED_AFTER`` old).  Otherwise the connections
are left to the slot's worker.  So:

- long-lived connections stay spread over the workers as the hash spreads
  them (taken by whichever worker woke first, 200 tunnels opened one at a
  time all went to one worker);
- a worker that sleeps is not woken for another's connections (every
  arrival waking two workers cost 25% more CPU per connection at low rates);
- a stuck worker's queue is served within about ``STALLED_AFTER`` plus a
  sweep, not after ``worker_timeout``; a slot's queue still passes to its
  successor.

With 2 workers under ``wrk`` this made 6% more new connections per second
(interleaved rounds, ahead in each) and left kept-alive requests as they were.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import socket
import time
import traceback
from array import array
from dataclasses import dataclass
from typing import Any

from lb.config import Config
from lb.pool import layout as L
from lb.pool.select import (
    SUSPECT_HOLD_UNCHECKED,
    BackendPicker,
    Balancer,
    LeastConn,
    Random2,
    RoundRobin,
    Source,
)
from lb.pool.shm import Pool
from lb.route import Router
from lb.sockets import set_keepalive_fd
from lb.worker.conn import Connection
from lb.worker.loop import Loop
from lb.worker.pipes import PipePool
from lb.worker.splice import Tunnel

ACCEPT_BATCH = 64  # connections accepted per readable event, for fairness between listeners
ACCEPT_BACKOFF = 0.1  # seconds accepting pauses when out of file descriptors
HEARTBEAT_INTERVAL = 1.0
SWEEP_MAX = 1.0  # longest pause between two sweeps for idle tunnels
PUBLISH_DELAY = 0.01  # longest the slot's counters lag behind the worker's tally
DEADLINE_TICK = 0.05  # how often head and connect timeouts are checked (so: how late they fire)
STALLED_AFTER = 2 * HEARTBEAT_INTERVAL  # a slot's worker with an older heartbeat is not accepting

# Exit codes of a worker, read by the supervisor.
WORKER_OK = 0
WORKER_BOOT_ERROR = 3


@dataclass(slots=True)
class ListenerRuntime:
    index: int
    name: str
    mode: str
    router: Router
    default_backend: str
    head_timeout: float
    tunnel_timeout: float
    socks: list[socket.socket]  # all of the listener's: socket k belongs to slot k mod workers
    tally_at: int  # where its counters start in the worker's tally (see Worker.tally)


@dataclass(slots=True)
class BackendRuntime:
    name: str
    picker: BackendPicker
    connect_timeout: float
    retries: int
    addresses: dict[int, tuple[int, Any]]  # server index -> (family, sockaddr)
    names: dict[int, str]


@dataclass(frozen=True, slots=True)
class Listening:
    """One listening socket as a worker watches it."""

    fd: int
    accept: Any  # the socket's _accept: (fd, addr), without a socket object
    listener: ListenerRuntime
    owner: int  # the offset in the pool of the slot it belongs to (see Worker._take)


def format_peer(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_balancer(
    kind: str, weights: dict[int, int], names: dict[int, str], pool: Pool
) -> Balancer:
    if kind == "leastconn":
        return LeastConn(weights, pool)
    if kind == "random2":
        return Random2(weights, pool)
    if kind == "source":
        return Source(weights, names)
    return RoundRobin(weights)


class Worker:
    """The state of one worker process; ``run`` returns its exit code."""

    def __init__(
        self,
        config: Config,
        slot: int,
        generation: int,
        sockets: dict[str, list[socket.socket]],
        pool: Pool,
        maxconn: int,
        log: Any,
        log_conn: Any = None,
    ) -> None:
        self.config = config
        self.slot = slot
        self.generation = generation
        self.pool = pool
        self.maxconn = maxconn
        self.log = log
        self.pipes = PipePool()
        self.q = pool.q
        geo = pool.geometry
        self.slot_base = geo.slot(slot)
        # This slot's counter blocks, by server index (computed once).
        self.server_counters = [geo.counter(slot, s) for s in range(geo.nservers)]
        # The slot's words as Python ints, by their index in the slot (see the module's
        # docstring): what a predecessor in this slot counted goes on from where it was.
        self.tally = list(pool.q[self.slot_base : self.slot_base + geo.slot_words])
        self.server_tally_at = [c - self.slot_base for c in self.server_counters]
        # By server index: where its active count goes in the slot as it changes, for a
        # server whose count other workers read to pick; 0 for the rest (published late).
        self.live_active = [0] * geo.nservers
        self._published = _published_runs(
            self.server_tally_at, geo.slot_words - geo.nlisteners * L.LISTENER_WORDS, geo.slot_words
        )
        self.publishing = False  # a copy of the tally to the slot is due
        self.log_conn = log_conn
        self.connections: set[Connection] = set()
        self.deadlines: dict[Connection, float] = {}  # connections waiting with a time limit
        self.ticking = False  # the deadline tick runs only while there are deadlines
        self.active = 0
        self.accepting = False
        self.draining = False
        self.backends = self._backends(config, pool)
        self.listeners = [
            ListenerRuntime(
                index=i,
                name=lc.name,
                mode=lc.mode,
                router=Router(lc),
                default_backend=lc.default_backend,
                head_timeout=lc.head_timeout,
                tunnel_timeout=lc.tunnel_timeout,
                socks=sockets[lc.name],
                tally_at=geo.listener_counter(slot, i) - self.slot_base,
            )
            for i, lc in enumerate(config.listeners)
        ]
        workers = config.global_.workers
        listening = [
            Listening(sock.fileno(), sock._accept, listener, geo.slot(k % workers))  # type: ignore[attr-defined]
            for listener in self.listeners
            for k, sock in enumerate(listener.socks)
        ]
        self.own = [ls for ls in listening if ls.owner == self.slot_base]
        # The other slots' sockets, in a set of their own that never wakes the loop:
        # see "Taking from the other slots".
        self.others = {ls.fd: ls for ls in listening if ls.owner != self.slot_base}
        self.queued = select.epoll()
        for fd in self.others:
            self.queued.register(fd, select.EPOLLIN)
        self.loop = Loop(
            on_error=self._error,
            busy_poll=config.global_.busy_poll_us / 1e6,
            # With 1 worker there is nothing to take: no second poll between busy polls.
            on_idle=self._take if self.others else None,
        )

    def _backends(self, config: Config, pool: Pool) -> dict[str, BackendRuntime]:
        backends: dict[str, BackendRuntime] = {}
        index = 0
        for bc in config.backends:
            ids = list(range(index, index + len(bc.servers)))
            index += len(bc.servers)
            weights = {i: s.weight for i, s in zip(ids, bc.servers, strict=True)}
            names = {i: s.name for i, s in zip(ids, bc.servers, strict=True)}
            hold = (
                (bc.health.fall + 1) * bc.health.interval + bc.health.timeout
                if bc.health is not None
                else SUSPECT_HOLD_UNCHECKED
            )
            balancer = make_balancer(bc.balance, weights, names, pool)
            caps = {i: s.maxconn for i, s in zip(ids, bc.servers, strict=True) if s.maxconn}
            for i in ids:
                if balancer.reads_active or i in caps:
                    self.live_active[i] = self.server_counters[i] + L.C_ACTIVE
            picker = BackendPicker(pool, ids, balancer, caps, hold)
            addresses = {
                i: (s.address.family, s.address.sockaddr)
                for i, s in zip(ids, bc.servers, strict=True)
            }
            backends[bc.name] = BackendRuntime(
                bc.name, picker, bc.connect_timeout, bc.retries, addresses, names
            )
        return backends

    # -- life ------------------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
        q, base = self.q, self.slot_base
        q[base + L.S_PID], q[base + L.S_GENERATION] = os.getpid(), self.generation
        for counter, at in zip(self.server_counters, self.server_tally_at, strict=True):
            q[counter + L.C_ACTIVE] = 0  # a predecessor killed in this slot left its own
            self.tally[at + L.C_ACTIVE] = 0
        for listener in self.listeners:
            self.tally[listener.tally_at + L.C_ACTIVE] = 0
        self._publish()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        self._beat()
        self._sweep_every = min(
            SWEEP_MAX, min(lc.tunnel_timeout for lc in self.config.listeners) / 10
        )
        loop.call_later(self._sweep_every, self._sweep)
        self._resume()
        q[base + L.S_STATE] = L.SLOT_RUNNING  # the supervisor now counts us as accepting
        self.log.info("worker_start", slot=self.slot, maxconn=self.maxconn)
        try:
            loop.run()
        finally:
            self._publish()
            self.pipes.close()
            self.queued.close()
            q[base + L.S_STATE] = L.SLOT_EMPTY
            loop.shutdown()
        self.log.info("worker_stopped", slot=self.slot)
        return WORKER_OK

    def _error(self, exc: BaseException) -> None:
        """A callback failed: say so and go on (the other connections are fine)."""
        self.log.error(
            "worker_error",
            error=repr(exc),
            traceback="".join(traceback.format_exception(exc))[-2000:],
        )

    def _beat(self) -> None:
        self.pool.d[self.slot_base + L.S_BEAT] = time.monotonic()
        self.loop.call_later(HEARTBEAT_INTERVAL, self._beat)

    def _sweep(self) -> None:
        """Publish byte counters; close tunnels idle for tunnel_timeout (a tunnel holds no timer).

        It also turns on TCP keepalive on the server sockets of tunnels that
        have lasted until now: a connection that ends within a sweep never
        needs it (the first probe waits 60 s), and leaving it out of the
        connect path saves four ``setsockopt`` calls per connection.
        """
        now = time.monotonic()
        self._take()  # also when this worker does not busy-poll, or is never idle
        for conn in [c for c in self.connections if c.tunnel is not None]:
            tunnel = conn.tunnel
            if tunnel is None or tunnel.closed:
                continue
            if tunnel.flush():  # bytes moved since the last sweep: active, and counted
                tunnel.active_at = now
            elif now - tunnel.active_at >= conn.listener.tunnel_timeout:
                tunnel.close("tunnel idle timeout")
            elif not tunnel.keepalive:
                set_keepalive_fd(tunnel.down.src)
                tunnel.keepalive = True
        self.loop.call_later(self._sweep_every, self._sweep)

    def tick(self) -> None:
        """Start the deadline tick (a connection just set the first deadline)."""
        self.ticking = True
        self.loop.call_later(DEADLINE_TICK, self._expire)

    def _expire(self) -> None:
        """Time out the connections whose head or connect step is past its deadline.

        The tick stops when no deadline is left: an idle worker wakes only for
        its heartbeat and its sweep.
        """
        now = time.monotonic()
        for conn in [c for c, deadline in self.deadlines.items() if deadline <= now]:
            conn.expire()
        if self.deadlines:
            self.loop.call_later(DEADLINE_TICK, self._expire)
        else:
            self.ticking = False

    def drain(self) -> None:
        """Stop accepting; leave when the last connection ends or at drain_timeout."""
        if self.draining:
            self.stop_now()
            return
        self.draining = True
        self.q[self.slot_base + L.S_STATE] = L.SLOT_DRAINING
        self._pause()
        for listener in self.listeners:  # ours are copies: the supervisor keeps the sockets
            for sock in listener.socks:
                sock.close()
        self.log.info("worker_drain", active=self.active, timeout=self.config.global_.drain_timeout)
        if self.active == 0:
            self.loop.stop()
        else:
            self.loop.call_later(self.config.global_.drain_timeout, self.stop_now)

    def stop_now(self) -> None:
        self._pause()
        for conn in list(self.connections):
            conn.abort("worker stopped")
        self.loop.stop()

    # -- accepting -------------------------------------------------------------

    def _resume(self) -> None:
        if self.accepting or self.draining:
            return
        self.accepting = True
        loop = self.loop
        for ls in self.own:
            loop.add_reader(ls.fd, functools.partial(self._accept, ls.accept, ls.listener))

    def _pause(self) -> None:
        if not self.accepting:
            return
        self.accepting = False
        for ls in self.own:  # shared with the supervisor: unregister, never close
            self.loop.remove_reader(ls.fd)

    def _take(self) -> bool:
        """Idle: accept what waits on the other slots' sockets whose worker is behind
        (see "Taking from the other slots"); whether there was any."""
        if not self.accepting:
            return False
        took, q, tally = False, self.q, self.tally
        for fd, _ in self.queued.poll(0):
            ls = self.others[fd]
            if self.active < q[ls.owner + L.S_CONNECTIONS] or self._not_accepting(ls.owner):
                accepted = ls.listener.tally_at + L.C_TOTAL
                before = tally[accepted]
                self._accept(ls.accept, ls.listener)
                took = took or tally[accepted] != before  # its owner may have emptied it since
        return took

    def _not_accepting(self, owner: int) -> bool:
        """Whether the worker of the slot at ``owner`` is gone, starting or stuck."""
        if self.q[owner + L.S_STATE] != L.SLOT_RUNNING:
            return True
        return time.monotonic() - self.pool.d[owner + L.S_BEAT] > STALLED_AFTER

    def _accept(self, accept: Any, listener: ListenerRuntime) -> None:
        tally, at = self.tally, listener.tally_at
        connections, set_blocking = self.connections, os.set_blocking
        if not self.publishing:
            self._publish_soon()
        for _ in range(ACCEPT_BATCH):
            if self.active >= self.maxconn:
                self._pause()  # the listen backlog holds the rest until we are below the cap
                return
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning("accept_paused", reason=exc.strerror)
                    self._pause()
                    self.loop.call_later(ACCEPT_BACKOFF, self._resume)
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            set_blocking(fd, False)
            self.active += 1
            tally[at + L.C_ACTIVE] += 1
            tally[at + L.C_TOTAL] += 1
            conn = Connection(self, listener, fd, addr)
            connections.add(conn)
            conn.start()

    # -- called by connections -------------------------------------------------

    def open_tunnel(self, conn: Connection, server_fd: int) -> Tunnel:
        tally, at = self.tally, self.server_tally_at[conn.server]
        tally[at + L.C_ACTIVE] += 1
        tally[at + L.C_TOTAL] += 1
        live = self.live_active[conn.server]
        if live:  # other workers pick by it: see the module's docstring
            self.q[live] = tally[at + L.C_ACTIVE]
        if conn.bytes_in:  # the head, forwarded by send() (mode = "http")
            tally[at + L.C_BYTES_IN] += conn.bytes_in
            tally[conn.listener.tally_at + L.C_BYTES_IN] += conn.bytes_in
        if not self.publishing:
            self._publish_soon()
        tunnel = conn.tunnel = Tunnel(conn, server_fd)
        tunnel.start(speculate=conn.listener.mode == "tcp")
        return tunnel

    def count_bytes(self, conn: Connection, up: int, down: int) -> None:
        """Bytes a tunnel moved (see ``Tunnel.flush``): to its server's and listener's counters."""
        tally, at, lat = self.tally, self.server_tally_at[conn.server], conn.listener.tally_at
        tally[at + L.C_BYTES_IN] += up
        tally[lat + L.C_BYTES_IN] += up
        tally[at + L.C_BYTES_OUT] += down
        tally[lat + L.C_BYTES_OUT] += down
        if not self.publishing:
            self._publish_soon()

    def _publish_soon(self) -> None:
        """The tally changed: copy it to the slot in ``PUBLISH_DELAY``."""
        self.publishing = True
        self.loop.call_later(PUBLISH_DELAY, self._publish)

    def _publish(self) -> None:
        """Copy the tally's counters to this worker's slot (see the module's docstring)."""
        self.publishing = False
        tally = self.tally
        tally[L.S_CONNECTIONS] = self.active
        tally[L.S_ACCEPTED] = sum(tally[lt.tally_at + L.C_TOTAL] for lt in self.listeners)
        words = array("Q", tally)
        q, base = self.q, self.slot_base
        for start, end in self._published:
            q[base + start : base + end] = words[start:end]

    def connect_failed(self, conn: Connection, why: str) -> None:
        """Passive health: mark the server suspect so every worker avoids it."""
        counter = self.server_counters[conn.server]
        self.pool.d[counter + L.C_SUSPECT_AT] = time.monotonic()
        self.q[counter + L.C_FAILED] += 1
        self.q[self.slot_base + L.S_SUSPECT_VERSION] += 1
        assert conn.backend is not None
        self.log.warning(
            "connect_failed",
            backend=conn.backend.name,
            server=conn.backend.names[conn.server],
            reason=why,
        )

    def finish(self, conn: Connection, status: int | None, reason: str, bytes_out: int) -> None:
        """The one end of every connection: counters and its log line."""
        self.connections.discard(conn)
        self.active -= 1
        tally, at = self.tally, conn.listener.tally_at
        tally[at + L.C_ACTIVE] -= 1
        if conn.tunnel is not None:
            sat = self.server_tally_at[conn.server]
            tally[sat + L.C_ACTIVE] -= 1
            live = self.live_active[conn.server]
            if live:
                self.q[live] = tally[sat + L.C_ACTIVE]
        else:  # answered or dropped: its few bytes were never spliced
            tally[at + L.C_BYTES_IN] += conn.bytes_in
            tally[at + L.C_BYTES_OUT] += bytes_out
        if status is not None:
            tally[L.S_ANSWERS + _ANSWER_INDEX.get(status, 7)] += 1
        if not self.publishing:
            self._publish_soon()
        backend = conn.backend
        log_conn = self.log_conn
        if log_conn is not None:  # None when info lines are filtered out: nothing is built
            log_conn(
                client=format_peer(conn.addr),
                listener=conn.listener.name,
                backend=backend.name if backend else None,
                server=backend.names[conn.server] if backend and conn.tunnel else None,
                websocket=conn.websocket,
                status=status,
                bytes_in=conn.bytes_in,
                bytes_out=bytes_out,
                duration_ms=round((time.monotonic() - conn.started) * 1000, 3),
                reason=reason,
            )
        if self.draining:
            if self.active == 0:
                self.loop.stop()
        elif not self.accepting and self.active < self.maxconn:
            self._resume()


def _published_runs(servers: list[int], listeners: int, end: int) -> list[tuple[int, int]]:
    """The runs of slot words ``_publish`` copies: all but those stored as they change
    (the header's, ``C_FAILED``) and the doubles (``C_SUSPECT_AT``).  A server's active
    count is copied even where it is also stored as it changes: the same value."""
    runs = [
        (L.S_CONNECTIONS, L.S_ACCEPTED + 1),
        (L.S_ANSWERS, L.S_ANSWERS + len(L.ANSWER_STATUSES)),
    ]
    runs += [(at + L.C_ACTIVE, at + L.C_BYTES_OUT + 1) for at in servers]
    runs.append((listeners, end))  # every listener's four words
    return runs


_ANSWER_INDEX = {status: i for i, status in enumerate(L.ANSWER_STATUSES)}
