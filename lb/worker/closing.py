"""Closing connections at chosen times, spread out so that their clients do not all
reconnect at once.

Theory of operation
-------------------
When tunnels must end (a stop, a retired generation, a reload that cannot hand
them over, a server that left, a tunnel past its listener's
``max_tunnel_age``), closing them at one instant makes every client reconnect
at that instant: a storm on the balancer and on the servers.  A
:class:`Closer` closes each one at a time of its own instead.

``spread(connections, start, end, reason)`` gives each connection a uniformly
random time in ``[start, end]``, one in each of as many equal slices of the
window as there are connections (which connection gets which slice is random
too): the closes are as even as the window allows.  Independent times would
clump: 1,000 of them over 4 s put about 280 in the busiest second, where the
mean is 250.  ``at(connection, when, reason)`` sets one time.  A connection
has at most one time: the earlier wins (a stop does not postpone the close
that a server's departure set).

The times are entries ``[when, sequence, connection, reason]`` in a heap, and
one loop timer is set for the earliest, rounded up to ``grid`` (many closes,
one wake-up).  A tick takes the entries that are due out of the heap and sets
the next timer before it closes any: its work follows the closes that come
due, never the number of open connections or of times set.  A connection that
ended before its time is skipped when its time comes (``finished``), and
:meth:`Closer.forget` voids its entry at once (a tunnel whose max age is an
hour away): the entry lets go of the connection, and the heap sheds its voided
entries whenever they are more than half of it, so a closed connection is not
kept alive and a void costs O(1), amortized.  Whatever one close raises, that
connection is handed to its ``fail`` and the others are closed all the same.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any, Protocol

from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.worker.loop import Loop, Timer

AGE_JITTER = 0.1  # a tunnel's max age is stretched or shrunk by up to this fraction, at random
# How late a close may come (besides the loop's own lateness).  Finer than the deadlines'
# 50 ms: a spread's closes come in ticks, and one second can hold one tick more than its
# share (21 ticks of 50 ms put 5% more than the mean in it; of 10 ms, 1%).
GRID = 0.01
COMPACT_AFTER = 64  # voided entries the heap keeps at least before it sheds them


class Closable(Protocol):
    """A connection, as the closer sees it."""

    @property
    def finished(self) -> bool: ...

    def abort(self, reason: str) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class ServerConnection(Closable, Protocol):
    @property
    def server(self) -> int: ...  # the server's index in the pool; -1 before one is picked


class Closer:
    """Closes connections at the times it is given (see the module's docstring).

    ``grid``: how late a close may come; ``rng``: the randomness of the times (a seeded
    ``random.Random`` makes them the same on every run).
    """

    __slots__ = (
        "closes",
        "grid",
        "heap",
        "loop",
        "on_error",
        "rng",
        "sequence",
        "tick_at",
        "timer",
        "voided",
    )

    def __init__(
        self,
        loop: Loop,
        on_error: Callable[[BaseException], None],
        *,
        grid: float = GRID,
        rng: random.Random | None = None,
    ) -> None:
        self.loop = loop
        self.grid = grid
        self.on_error = on_error
        self.rng = rng or random.Random()
        self.heap: list[list[Any]] = []  # [when, sequence, connection or None once voided, reason]
        self.closes: dict[Closable, list[Any]] = {}  # a connection's entry, while it has one
        self.sequence = itertools.count()  # entries with the same time never compare connections
        self.voided = 0  # entries in the heap whose connection let go of them
        self.tick_at = math.inf
        self.timer: Timer | None = None

    def __len__(self) -> int:
        """Connections with a close time."""
        return len(self.closes)

    def at(self, conn: Closable, when: float, reason: str) -> None:
        """Close ``conn`` at ``when`` (``time.monotonic()``), saying ``reason`` in its log
        line, unless it ends before or has an earlier time already."""
        if conn.finished:
            return
        entry = self.closes.get(conn)
        if entry is not None:
            if entry[0] <= when:
                return
            self._void(entry)
        entry = [when, next(self.sequence), conn, reason]
        self.closes[conn] = entry
        heapq.heappush(self.heap, entry)
        if when < self.tick_at:
            self._schedule(when)

    def spread(
        self, connections: Iterable[Closable], start: float, end: float, reason: str
    ) -> None:
        """Close each of ``connections`` at a uniformly random time in ``[start, end]``, one
        in each of as many equal slices of it as there are connections."""
        conns = [conn for conn in connections if not conn.finished]
        if not conns:
            return
        rng = self.rng
        rng.shuffle(conns)
        step = (end - start) / len(conns)
        for index, conn in enumerate(conns):
            self.at(conn, start + (index + rng.random()) * step, reason)

    def forget(self, conn: Closable) -> None:
        """``conn`` ended: its close time, if it has one, is void."""
        entry = self.closes.pop(conn, None)
        if entry is not None:
            self._void(entry)

    def _void(self, entry: list[Any]) -> None:
        entry[2] = None
        self.voided += 1
        if self.voided > COMPACT_AFTER and 2 * self.voided > len(self.heap):
            self.heap = [kept for kept in self.heap if kept[2] is not None]
            heapq.heapify(self.heap)
            self.voided = 0

    def _schedule(self, when: float) -> None:
        tick = math.ceil(when / self.grid) * self.grid
        if tick >= self.tick_at:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.tick_at = tick
        self.timer = self.loop.call_at(tick, self._tick)

    def _tick(self) -> None:
        self.timer, self.tick_at = None, math.inf
        now = monotonic()
        heap, closes = self.heap, self.closes
        due: list[tuple[Closable, str]] = []
        try:
            while heap and heap[0][0] <= now:
                _, _, conn, reason = heapq.heappop(heap)
                if conn is None:
                    self.voided -= 1
                else:
                    del closes[conn]
                    due.append((conn, reason))
        finally:  # whatever happens, the next tick is set before any connection is closed
            if heap:
                self._schedule(heap[0][0])
        for conn, reason in due:
            if conn.finished:
                continue
            try:
                conn.abort(reason)
            except Exception as exc:
                self.on_error(exc)
                try:
                    conn.fail(exc)
                except Exception as again:
                    self.on_error(again)


class MaxAge:
    """The listeners' ``max_tunnel_age``: a tunnel gets its close time when it opens, at a
    random point within +/-``AGE_JITTER`` of its age (tunnels opened together, as after a
    restart, do not all close together), and loses it when it closes."""

    __slots__ = ("closer", "listeners")

    def __init__(self, closer: Closer, ages: dict[int, float]) -> None:
        """``ages``: by listener index, the listeners that have one."""
        self.closer = closer
        # By listener: the shortest age, the width of the range past it, the close's reason.
        self.listeners = {
            index: (age * (1 - AGE_JITTER), age * 2 * AGE_JITTER, f"max tunnel age {age:g} s")
            for index, age in ages.items()
            if age
        }

    def opened(self, conn: Closable, listener: int, at: float) -> None:
        """A tunnel of listener ``listener`` opened at ``at``."""
        age = self.listeners.get(listener)
        if age is not None:
            shortest, width, reason = age
            self.closer.at(conn, at + shortest + width * self.closer.rng.random(), reason)

    def closed(self, conn: Closable) -> None:
        self.closer.forget(conn)


class Departures:
    """Servers that leave: the tunnels of a server that goes down (its health, from the
    prober) or into maint (its admin state, from the operator), in a backend with
    ``on_server_down = "close"``, are closed over ``spread`` seconds from when it is seen.
    A server in drain keeps them.

    ``check`` reads the pool's two versions and looks at the servers only when one
    changed, and at the connections only when a server left.
    """

    __slots__ = ("closer", "gone", "pool", "servers", "spread", "versions")

    def __init__(self, pool: Pool, servers: Iterable[int], closer: Closer, spread: float) -> None:
        """``servers``: the indexes of the servers whose backend says "close"."""
        self.pool = pool
        self.servers = tuple(servers)
        self.closer = closer
        self.spread = spread
        self.versions = (-1, -1)  # health, admin, as of the last check
        self.gone: dict[int, str] = {}  # servers down or in maint at the last check: why

    def check(self, connections: Iterable[ServerConnection], now: float) -> int:
        """Spread the closes of the connections to servers that left since the last check;
        how many there are."""
        if not self.servers:
            return 0
        pool = self.pool
        versions = (pool.q[L.H_HEALTH_VERSION], pool.q[L.H_ADMIN_VERSION])
        if versions == self.versions:
            return 0
        self.versions = versions  # read before the states: a change after this is seen next time
        gone = {}
        for server in self.servers:
            if pool.admin(server) == L.MAINT:
                gone[server] = "server in maint"
            elif pool.health(server) == L.DOWN:
                gone[server] = "server down"
        left = {server: why for server, why in gone.items() if server not in self.gone}
        self.gone = gone
        if not left:
            return 0
        leaving: dict[str, list[ServerConnection]] = {}
        for conn in connections:
            why = left.get(conn.server)
            if why is not None:
                leaving.setdefault(why, []).append(conn)
        for why, conns in leaving.items():
            self.closer.spread(conns, now, now + self.spread, why)
        return sum(map(len, leaving.values()))
