"""A worker process: one event loop serving connections from its listening sockets.

The worker puts together the pieces of :mod:`lb.worker`, each with one job:

- :mod:`~lb.worker.runtime`: its listeners and backends, built once from the config;
- :mod:`~lb.worker.accept`: accepting, at its cap, and taking from the other slots;
- :mod:`~lb.worker.conn`: a connection from accept to its log line, which reports
  back through the :class:`~lb.worker.conn.Context` the worker lends it;
- :mod:`~lb.worker.splice`: the tunnels, moving bytes with ``splice``;
- :mod:`~lb.worker.deadlines`: head, connect and idle timeouts;
- :mod:`~lb.worker.closing`: closes at chosen times, spread out;
- :mod:`~lb.worker.tally`: the counters, published to its slot in the live pool;
- :mod:`~lb.worker.limits`: the balancer's own limits (descriptors, ports).

Its own jobs: the end of every connection (counters, its log line, accepting
again below the cap), the once-a-second work, and stopping.  The
once-a-second work re-arms itself before it does anything, and each of its
parts (heartbeat, the tunnels' byte counts, taking from the other slots, the
end of limit episodes) runs on its own, so no failure in one stops the
others; the heartbeat comes first and is written from inside the loop, so a
stuck loop stops beating.

Signals: SIGTERM stops accepting and lets connections finish for up to
``drain_timeout`` (a second SIGTERM, or SIGQUIT, closes everything at once);
SIGUSR1 stops accepting and closes every connection, spread evenly over
``CLOSE_SPREAD`` seconds (the supervisor retires the oldest of too many
draining generations so, and their clients do not all reconnect at once).

Closes are spread (:mod:`~lb.worker.closing`), so that clients do not all
reconnect at one instant: on SIGTERM, what is still open then is closed at
random times over the last ``close_spread`` seconds of ``drain_timeout``; a
tunnel on a listener with a ``max_tunnel_age`` closes at a random point
within 10% of it; the tunnels of a server that goes down or into maint, in a
backend with ``on_server_down = "close"``, close over ``close_spread`` from
when the once-a-second work sees it.
"""

from __future__ import annotations

import signal
import socket
import time
import traceback
from typing import Any

from lb import log as lblog
from lb.config import Config
from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.worker.accept import HEARTBEAT_INTERVAL, Acceptor
from lb.worker.closing import Closer, Departures, MaxAge
from lb.worker.conn import Connection, Context
from lb.worker.deadlines import Deadlines
from lb.worker.limits import Episode
from lb.worker.loop import Loop
from lb.worker.pipes import PipePool, plan_for_worker
from lb.worker.runtime import ListenerRuntime, build_backends, build_listeners, format_peer
from lb.worker.splice import Pump
from lb.worker.tally import Tally

DEADLINE_GRID = 0.05  # head and connect timeouts fire at most this late
CLOSE_SPREAD = 2.0  # seconds over which SIGUSR1 closes a worker's connections

# Exit codes of a worker, read by the supervisor.
WORKER_OK = 0
WORKER_BOOT_ERROR = 3


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
        self.log_conn = log_conn  # None when info lines are filtered out: nothing is built
        self.draining = False
        self.connections: set[Connection] = set()
        workers = config.global_.workers
        self.loop = loop = Loop(
            on_error=self._error,
            busy_poll=config.global_.busy_poll_us / 1e6,
            # With 1 worker there is nothing to take: no second poll between busy polls.
            on_idle=self._take if workers > 1 else None,
        )
        self.deadlines = Deadlines(loop, DEADLINE_GRID, self._error)
        self.closer = Closer(loop, self._error)
        plan = plan_for_worker(workers)  # against the user's pipe budget: see lb.worker.pipes
        self.pipes = PipePool.from_plan(plan, lambda fields: log.warning("pipe_refused", **fields))
        if slot == 0:  # every worker plans alike: the first one says so for the instance
            for fields in plan.warnings():
                log.warning("pipe_budget", **fields)
        self.local_limits = Episode(log, "local_limit", "local_limit_over")
        self.pump = Pump(loop, self.pipes, self.deadlines, self._starved)
        self.backends = build_backends(config, pool)
        close_on_down = [
            server
            for backend in config.backends
            if backend.on_server_down == "close"
            for server in self.backends[backend.name].names
        ]
        self.departures = Departures(pool, close_on_down, self.closer, config.global_.close_spread)
        live = {server for backend in self.backends.values() for server in backend.live}
        self.tally = Tally(pool, slot, loop, live)
        self.listeners: list[ListenerRuntime] = build_listeners(
            config, sockets, self.tally.listener_ats
        )
        self.acceptor = Acceptor(
            loop, pool, self.tally, self.listeners, slot, workers, maxconn, self._accepted, log
        )
        ages = {i: lc.max_tunnel_age for i, lc in enumerate(config.listeners) if lc.max_tunnel_age}
        self.ctx = Context(
            loop=loop,
            pump=self.pump,
            deadlines=self.deadlines,
            backends=self.backends,
            finish=self._finish,
            tunnel_opened=self.tally.tunnel_opened,
            count_bytes=self.tally.count_bytes,
            connect_failed=self._connect_failed,
            local_limit=self._local_limit,
            max_age=MaxAge(self.closer, ages) if ages else None,
        )

    # -- life ------------------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
        self.tally.start(self.generation)
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGUSR1, self.close_spread)
        self._every_second()
        self.acceptor.resume()
        self.tally.set_state(L.SLOT_RUNNING)  # the supervisor now counts us as accepting
        self.log.info("worker_start", slot=self.slot, maxconn=self.maxconn)
        try:
            loop.run()
        finally:
            self.tally.publish()
            self.pipes.close()
            self.acceptor.close()
            self.tally.set_state(L.SLOT_EMPTY)
            loop.shutdown()
        self.log.info("worker_stopped", slot=self.slot)
        return WORKER_OK

    def _error(self, exc: BaseException) -> None:
        """A callback failed: say so once (its owner ends what it owns; the rest go on)."""
        self.log.error(
            "worker_error",
            error=repr(exc),
            traceback="".join(traceback.format_exception(exc))[-2000:],
        )

    def _every_second(self) -> None:
        """The heartbeat, then the rest of the periodic work, each part on its own."""
        self.loop.call_later(HEARTBEAT_INTERVAL, self._every_second)  # first, whatever happens
        now = time.monotonic()
        for job in (
            self.tally.beat,
            self.pump.sweep,
            self._take,  # also when this worker does not busy-poll, or is never idle
            lambda: self.acceptor.backoff.check(now),
            lambda: self.local_limits.check(now),
            lambda: self.departures.check(self.connections, now),  # on_server_down = "close"
            lblog.tick,  # lines the log could not take: counted, reported
        ):
            try:
                job()
            except Exception as exc:
                self._error(exc)

    def _take(self) -> bool:
        return self.acceptor.take()

    def drain(self) -> None:
        """Stop accepting; leave when the last connection ends or at drain_timeout."""
        if self.draining:
            self.stop_now()
            return
        self._stop_accepting()
        self.log.info(
            "worker_drain", active=self.tally.active, timeout=self.config.global_.drain_timeout
        )
        if self.tally.active == 0:
            self.loop.stop()
        else:
            drain = self.config.global_.drain_timeout
            self.loop.call_later(drain, self.stop_now)
            end = time.monotonic() + drain  # what is left closes over its last close_spread
            start = end - self.config.global_.close_spread
            self.closer.spread(list(self.connections), start, end, "worker stopped")

    def _stop_accepting(self) -> None:
        self.draining = True
        self.tally.set_state(L.SLOT_DRAINING)
        self.acceptor.stop()
        for listener in self.listeners:  # ours are copies: the supervisor keeps the sockets
            for sock in listener.socks:
                sock.close()
        self.pipes.drain()  # the idle pipes' share of the budget, for the next generation

    def stop_now(self) -> None:
        self.acceptor.stop()
        self._abort(list(self.connections), "worker stopped")
        self.loop.stop()

    def close_spread(self) -> None:
        """Close every connection, spread over ``CLOSE_SPREAD`` seconds, then stop."""
        if not self.draining:
            self._stop_accepting()
        left = list(self.connections)
        self.log.info("worker_retire", active=len(left), spread_s=CLOSE_SPREAD)
        now = time.monotonic()
        reason = "worker retired: too many generations draining"
        self.closer.spread(left, now, now + CLOSE_SPREAD, reason)
        if not self.connections:
            self.loop.stop()

    def _abort(self, connections: list[Connection], reason: str) -> None:
        for conn in connections:
            try:
                conn.abort(reason)
            except Exception as exc:
                self._error(exc)
                conn.fail(exc)

    # -- connections -------------------------------------------------------------

    def _accepted(self, fd: int, addr: tuple[Any, ...], listener: ListenerRuntime) -> None:
        """A new connection; whatever fails in its start, it ends answered or closed."""
        self.tally.accepted(listener.tally_at)
        conn = Connection(self.ctx, listener, fd, addr)
        self.connections.add(conn)
        try:
            conn.start()
        except Exception as exc:
            self._error(exc)
            conn.fail(exc)

    def _finish(self, conn: Connection, status: int | None, reason: str, bytes_out: int) -> None:
        """The one end of every connection: counters and its log line."""
        self.connections.discard(conn)
        backend = conn.backend
        spliced = conn.tunnel is not None
        self.tally.finished(
            conn.listener.tally_at, conn.server if spliced else -1, status, conn.bytes_in, bytes_out
        )
        log_conn = self.log_conn
        if log_conn is not None:
            log_conn(
                client=format_peer(conn.addr),
                listener=conn.listener.name,
                backend=backend.name if backend else None,
                server=backend.names[conn.server] if backend and spliced else None,
                websocket=conn.websocket,
                status=status,
                bytes_in=conn.bytes_in,
                bytes_out=bytes_out,
                duration_ms=round((time.monotonic() - conn.started) * 1000, 3),
                reason=reason,
            )
        acceptor = self.acceptor
        if self.draining:
            if self.tally.active == 0:
                self.loop.stop()
        elif not acceptor.accepting and self.tally.active < acceptor.cap:
            acceptor.resume()  # below the cap again

    def _connect_failed(self, conn: Connection, why: str) -> None:
        """Passive health: mark the server suspect so every worker avoids it."""
        self.tally.mark_suspect(conn.server)
        assert conn.backend is not None
        self.log.warning(
            "connect_failed",
            backend=conn.backend.name,
            server=conn.backend.names[conn.server],
            reason=why,
        )

    def _local_limit(self, err: int, where: str) -> None:
        self.local_limits.hit(err, where)

    def _starved(self, exc: OSError) -> None:
        self.local_limits.hit(exc.errno or 0, "pipe")
