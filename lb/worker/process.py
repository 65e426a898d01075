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
- :mod:`~lb.worker.limits`: the balancer's own limits (descriptors, ports);
- :mod:`~lb.worker.handover`: open tunnels handed to the next generation on reload,
  and adopted from the previous one.

Its own jobs: the end of every connection (counters, its log line, accepting
again below the cap), the once-a-second work, and stopping.  The
once-a-second work re-arms itself before it does anything, and each of its
parts (heartbeat, the tunnels' byte counts, taking from the other slots, the
end of limit episodes) runs on its own, so no failure in one stops the
others; the heartbeat comes first and is written from inside the loop, so a
stuck loop stops beating.

Garbage: the worker breaks the reference cycles of its connections' objects
when they end, so reference counting frees them; the cyclic collector would
only walk them, again and again, and a full collection over ten thousand
tunnels stalls every tunnel for tens of milliseconds.  So once a second (and
after each batch of adopted tunnels) the worker moves every object to the
collector's permanent generation (``gc.freeze``, which costs nothing): the
collector only ever walks what is younger than that.

Signals: SIGTERM stops accepting and, on reload (the pool's ``H_HANDOVER_TO``
names a newer generation), hands the open tunnels over to its workers; what
is not handed over may finish for up to ``drain_timeout`` (a second SIGTERM,
or SIGQUIT, closes everything at once);
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

import gc
import signal
import socket
import ssl
import time
import traceback
from typing import Any

from lb import __version__
from lb import log as lblog
from lb.config import Config
from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.worker.accept import HEARTBEAT_INTERVAL, Acceptor
from lb.worker.closing import Closer, Departures, MaxAge
from lb.worker.conn import Connection, Context
from lb.worker.deadlines import Deadlines
from lb.worker.handover import BATCH, Receiver, Sender, State, flows_of, state_of
from lb.worker.limits import Episode
from lb.worker.loop import Loop, Timer
from lb.worker.pipes import PipePool, plan_for_worker
from lb.worker.requests import RequestFlow, RequestStream
from lb.worker.runtime import (
    BackendRuntime,
    ListenerRuntime,
    build_backends,
    build_listeners,
    client_tables,
    format_peer,
)
from lb.worker.splice import Flow, Pump, Tunnel
from lb.worker.tally import Tally

DEADLINE_GRID = 0.05  # head and connect timeouts fire at most this late
CLOSE_SPREAD = 2.0  # seconds over which SIGUSR1 closes a worker's connections
HANDOVER_WAIT = 0.01  # seconds before looking again for tunnels to hand over
HANDOVER_PATIENCE = 1.0  # seconds without a tunnel taken before the rest stays here

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
        handover: socket.socket | None = None,
        tls: dict[str, ssl.SSLContext] | None = None,
    ) -> None:
        """``handover``: this slot's handover socket, where older workers hand tunnels over;
        ``tls``: the TLS listeners' server contexts, if the supervisor made them (see
        Generation.tls_contexts)."""
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
        if isinstance(log_conn, lblog.ConnLog):  # a write per batch of lines, not per line
            log_conn.batch(loop.at_turn_end)
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
        self.clients = client_tables(config, pool, slot, self._client_table_full)
        self.listeners: list[ListenerRuntime] = build_listeners(
            config, sockets, self.tally.listener_ats, self.clients, tls
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
        self.listener_names = {listener.name: listener for listener in self.listeners}
        self.foreign: dict[tuple[str, str], BackendRuntime] = {}  # adopted from gone backends
        self.receiver = Receiver(loop, handover, self._adopt, self._room, log) if handover else None
        self.sender: Sender | None = None
        self.handover_started = self.handover_moved = 0.0  # began, last moved a tunnel
        self.drain_end = 0.0  # when drain_timeout is over (monotonic)
        self.handover_timer: Timer | None = None  # the next batch
        self.handed = 0

    # -- life ------------------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
        self.tally.start(self.generation)
        for table in self.clients:  # a predecessor in this slot left counts of its own
            if table is not None:
                table.reset()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGUSR1, self.close_spread)
        self._every_second()
        self.acceptor.resume()
        self.tally.set_state(L.SLOT_RUNNING)  # the supervisor now counts us as accepting
        self.log.info("worker_start", slot=self.slot, maxconn=self.maxconn, version=__version__)
        try:
            loop.run()
        finally:
            self.tally.publish()
            if isinstance(self.log_conn, lblog.ConnLog):
                self.log_conn.flush()  # the last conn lines before worker_stopped
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
            gc.freeze,  # see "Garbage" in the module's docstring
        ):
            try:
                job()
            except Exception as exc:
                self._error(exc)

    def _take(self) -> bool:
        return self.acceptor.take()

    def drain(self) -> None:
        """Stop accepting; hand the tunnels over on reload; leave when the last connection
        ends or at drain_timeout."""
        if self.draining:
            self.stop_now()
            return
        self._stop_accepting()
        target = int(self.pool.q[L.H_HANDOVER_TO])
        self.log.info(
            "worker_drain",
            active=self.tally.active,
            timeout=self.config.global_.drain_timeout,
            handover_to=target if target > self.generation else None,
        )
        if self._drained():
            self.loop.stop()
            return
        drain = self.config.global_.drain_timeout
        self.drain_end = time.monotonic() + drain
        self.loop.call_later(drain, self._drain_deadline)
        if target > self.generation:  # what is not handed over closes when it is done
            self.sender = Sender(
                self.loop, self.config.global_.runtime_dir, target, self._credit, self.log
            )
            self.handover_started = self.handover_moved = time.monotonic()
            self._hand_over()
        else:
            self._spread_the_rest()

    def _spread_the_rest(self) -> None:
        """What is left closes at random times over the last close_spread of drain_timeout
        (or at once, past it)."""
        now = time.monotonic()
        end = max(self.drain_end, now)
        start = max(now, end - self.config.global_.close_spread)
        self.closer.spread(list(self.connections), start, end, "worker stopped")

    def _drain_deadline(self) -> None:
        """drain_timeout is over: everything closes, once a handover under way is done
        (it ends within HANDOVER_PATIENCE of its last progress)."""
        if self.sender is not None:
            self.loop.call_later(HANDOVER_WAIT, self._drain_deadline)
        else:
            self.stop_now()

    def _stop_accepting(self) -> None:
        self.draining = True
        if self.receiver is not None:  # tunnels already on their way are still taken
            self.receiver.stop_listening()
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

    # -- handover ----------------------------------------------------------------

    def _hand_over(self) -> None:
        """Send up to a batch of tunnels to the new generation; again next turn until
        none is left that can go (see lb.worker.handover)."""
        sender = self.sender
        if sender is None:
            return
        sent, waiting, busy = 0, False, False
        patient = time.monotonic() - self.handover_started < HANDOVER_PATIENCE
        for conn in list(self.connections):
            tunnel, backend = conn.tunnel, conn.backend
            if tunnel is None or tunnel.closed:
                waiting = waiting or tunnel is None  # not a tunnel yet: look again soon
                continue
            assert backend is not None
            if not backend.handover or not tunnel.movable:  # TLS terminated here: it stays
                continue
            requests = conn.requests
            if requests is not None and not requests.idle:  # only between two requests
                waiting = waiting or (patient and not requests.ending)
                continue
            if sent >= BATCH:
                busy = True
                break
            message, fds = state_of(conn)
            result = sender.send(message, fds)
            if result is None:  # no new worker left to take them: they drain
                break
            if result is False:  # the new workers' queues are full for now
                busy = True
                break
            tunnel.detach()
            conn.handed_over()
            self._handed(conn)
            sent += 1
        else:
            if waiting or (self.receiver is not None and self.receiver.channels):
                # connections before their tunnel, or tunnels still coming in: again soon
                self._handover_soon(HANDOVER_WAIT)
                return
            self._handover_done()
            if self._drained():
                self.loop.stop()
            return
        now = time.monotonic()
        if sent:
            self.handover_moved = now
        if busy and sender.outlets and now - self.handover_moved < HANDOVER_PATIENCE:
            # the next batch next turn; without credit, when credit arrives (or soon)
            self._handover_soon(0 if sent else HANDOVER_WAIT)
        else:  # what the new workers have no room for stays here, and drains
            self._handover_done()

    def _handover_soon(self, delay: float) -> None:
        if self.handover_timer is not None:
            self.handover_timer.cancel()
        self.handover_timer = self.loop.call_later(delay, self._hand_over_now)

    def _hand_over_now(self) -> None:
        self.handover_timer = None
        self._hand_over()

    def _credit(self) -> None:
        """A new worker granted credit: send at once (not when the poll comes)."""
        if self.sender is not None:
            self._handover_soon(0)

    def _handed(self, conn: Connection) -> None:
        """A tunnel went to the new generation: it ends here, without a conn line (the
        adopter writes it when it ends)."""
        self.connections.discard(conn)
        conn.finished = True
        self.closer.forget(conn)  # its max age, its close on this worker's drain: the adopter's
        self.tally.finished(conn.listener.tally_at, conn.server, None, 0, 0)
        conn.release_client()  # the adopter counts it against its client from now on
        self.handed += 1
        if self._drained():
            self._handover_done()
            self.loop.stop()

    def _handover_done(self) -> None:
        sender, self.sender = self.sender, None
        if sender is None:
            return
        self.log.info(
            "handover",
            to_generation=sender.generation,
            tunnels=self.handed,
            kept=sum(1 for c in self.connections if c.tunnel is not None),
            duration_ms=round((time.monotonic() - self.handover_started) * 1000, 3),
        )
        sender.close()
        self._spread_the_rest()

    def _adopt(self, state: State, fds: list[int]) -> None:
        """A tunnel handed over by an older generation's worker: served here from now on."""
        listener = self.listener_names.get(state["listener"]) or self._foreign_listener(state)
        backend, server = self._server_of(state)
        conn = Connection(self.ctx, listener, fds[0], tuple(state["client"]))
        conn.started = float(state["started"])
        conn.backend, conn.server = backend, server
        conn.websocket = bool(state["websocket"])
        conn.server_name = state.get("sni")  # mode = "tls" (absent from older versions)
        conn.bytes_in, conn.bytes_out = int(state["bytes_in"]), int(state["bytes_out"])
        idle = listener.tunnel_timeout if listener.index >= 0 else float(state["idle_timeout"])
        # Its client side reads requests (and counts them on), judged by this generation's
        # config, if it did and its listener is here in http mode (gone, or tcp now:
        # nothing to judge them by).
        judged = listener.index >= 0 and listener.mode == "http"
        requests = int(state.get("requests", 0)) if judged else 0
        tunnel = Tunnel(
            self.pump,
            conn,
            fds[0],
            fds[1],
            idle,
            float(state["active_at"]),
            state["keepalive"],
            up=RequestFlow if requests else Flow,
        )
        conn.tunnel = tunnel
        if requests:
            stream = RequestStream(conn)
            stream.requests = requests
            conn.read_requests(tunnel, stream)
        self.tally.adopted_tunnel(server, listener.tally_at)
        if listener.clients is not None:  # counted against its client here from now on
            conn.ticket = listener.clients.adopt(conn.addr[0])
        self.connections.add(conn)
        tunnel.resume(*flows_of(state, fds))
        if self.ctx.max_age is not None:  # its age counts from when it first opened
            self.ctx.max_age.opened(conn, listener.index, conn.started)

    def _drained(self) -> bool:
        """Nothing left to serve, and no tunnel still coming in from an older worker."""
        receiver = self.receiver
        return self.tally.active == 0 and (receiver is None or not receiver.channels)

    def _room(self) -> int:
        """How many more connections this worker may hold (its cap: lb.worker.limits)."""
        return self.acceptor.cap - self.tally.active

    def _foreign_listener(self, state: State) -> ListenerRuntime:
        """A listener this generation does not have: the tunnel keeps its name (its conn
        line), its counts go where nothing is published (see lb.worker.tally)."""
        listener = ListenerRuntime(
            index=-1,
            name=str(state["listener"]),
            mode=str(state["mode"]),
            router=None,  # type: ignore[arg-type]  # never routes: its tunnels are established
            default_backend="",
            head_timeout=0.0,
            tunnel_timeout=float(state["idle_timeout"]),
            socks=[],
            tally_at=self.tally.foreign_listener_at,
        )
        self.listener_names[listener.name] = listener
        return listener

    def _server_of(self, state: State) -> tuple[BackendRuntime, int]:
        """The adopted tunnel's backend and server index here, or a foreign one."""
        name, server = str(state["backend"]), str(state["server"])
        backend = self.backends.get(name)
        if backend is not None:
            for index, server_name in backend.names.items():
                if server_name == server:
                    return backend, index
        foreign = self.foreign.get((name, server))
        index = self.pool.geometry.nservers  # the foreign server's counters: never published
        if foreign is None:
            foreign = self.foreign[(name, server)] = BackendRuntime(
                name=name,
                picker=None,  # type: ignore[arg-type]  # never picks: its tunnels are established
                connect_timeout=0.0,
                retries=0,
                addresses={},
                names={index: server},
                live=frozenset(),
                handover=True,
            )
        return foreign, index

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
        if conn.ticket >= 0:
            conn.release_client()
        log_conn = self.log_conn
        if log_conn is not None:
            log_conn(  # positional, in lb.log.ConnLog's order: keywords cost more
                format_peer(conn.addr),  # client
                conn.listener.name,
                backend.name if backend else None,
                backend.names[conn.server] if backend and spliced else None,  # server
                conn.websocket,
                status,
                conn.bytes_in,
                bytes_out,
                conn.started,  # its duration_ms is the line's
                reason,
                sni=conn.server_name if conn.listener.mode == "tls" else False,
            )
        acceptor = self.acceptor
        if self.draining:
            if self._drained():
                self.loop.stop()
        elif not acceptor.accepting and self.tally.active < acceptor.cap:
            acceptor.resume()  # below the cap again
        if self.receiver is not None and self.receiver.channels:
            self.receiver.release()

    def _client_table_full(self, listener: str, entries: int) -> None:
        self.log.warning(
            "client_table_full",
            listener=listener,
            entries=entries,
            effect="clients the table has no room for are not limited",
        )

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
