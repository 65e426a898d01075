"""Choosing a server: which servers are eligible, and the balancing algorithms.

A worker keeps one :class:`BackendPicker` per backend.  Eligibility (health up
or unchecked, admin ``ready``, not suspect) is recomputed only when the pool's
versions change or a suspect mark expires; the common pick reads a few words
of shared memory and steps through a cached sequence.

Algorithms share one small interface, :class:`Balancer`: ``rebuild`` gets the
eligible servers (global indexes) whenever they change, ``pick`` returns one
of them that ``usable`` accepts, or None.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

from lb.pool import layout as L
from lb.pool.shm import Pool

INF = float("inf")
SUSPECT_HOLD_UNCHECKED = 5.0  # seconds a suspect mark holds where no prober checks


Usable = Callable[[int], bool] | None  # None: every eligible server is usable


class Balancer(Protocol):
    # Whether it reads every worker's active connections per server as they change
    # (the worker then keeps its own in shared memory as they change, not 10 ms late).
    reads_active: bool

    def rebuild(self, eligible: Sequence[int]) -> None: ...

    def pick(self, host: str, usable: Usable) -> int | None: ...


def _all(_server: int) -> bool:
    return True


def smooth_sequence(servers: Sequence[int], weights: dict[int, int]) -> list[int]:
    """nginx's smooth weighted round-robin, unrolled into one full cycle."""
    total = sum(weights[s] for s in servers)
    current = dict.fromkeys(servers, 0)
    order: list[int] = []
    for _ in range(total):
        for s in servers:
            current[s] += weights[s]
        best = max(servers, key=current.__getitem__)
        current[best] -= total
        order.append(best)
    return order


class RoundRobin:
    """Weighted round-robin; skips servers ``usable`` refuses."""

    reads_active = False

    def __init__(self, weights: dict[int, int]) -> None:
        self._weights = weights
        self._order: list[int] = []
        self._next = 0

    def rebuild(self, eligible: Sequence[int]) -> None:
        self._order = smooth_sequence(eligible, self._weights)

    def pick(self, host: str, usable: Usable) -> int | None:
        order = self._order
        n = len(order)
        if usable is None:  # the common case: no retry, no server with a cap
            if not n:
                return None
            self._next += 1
            return order[(self._next - 1) % n]
        for _ in range(n):
            server = order[self._next % n]
            self._next += 1
            if usable(server):
                return server
        return None


class LeastConn:
    """Fewest active connections (all workers) per unit of weight; ties rotate."""

    reads_active = True

    def __init__(self, weights: dict[int, int], pool: Pool) -> None:
        self._weights = weights
        self._pool = pool
        self._eligible: list[int] = []
        self._turn = 0

    def rebuild(self, eligible: Sequence[int]) -> None:
        self._eligible = list(eligible)

    def pick(self, host: str, usable: Usable) -> int | None:
        usable = usable or _all
        candidates = [s for s in self._eligible if usable(s)]
        if not candidates:
            return None
        self._turn += 1
        start = self._turn % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        active = self._pool.server_active
        return min(rotated, key=lambda s: active(s) / self._weights[s])


class Random2:
    """Power of two random choices, weighted, the less loaded one wins."""

    reads_active = True

    def __init__(self, weights: dict[int, int], pool: Pool) -> None:
        self._weights = weights
        self._pool = pool
        self._eligible: list[int] = []
        self._cum: list[int] = []

    def rebuild(self, eligible: Sequence[int]) -> None:
        self._eligible = list(eligible)
        self._cum = []
        total = 0
        for s in self._eligible:
            total += self._weights[s]
            self._cum.append(total)

    def pick(self, host: str, usable: Usable) -> int | None:
        usable = usable or _all
        candidates = [s for s in self._eligible if usable(s)]
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        weights = [self._weights[s] for s in candidates]
        a, b = random.choices(candidates, weights=weights, k=2)
        active = self._pool.server_active
        return a if active(a) / self._weights[a] <= active(b) / self._weights[b] else b


class Source:
    """The client address picks the server (rendezvous hashing, weighted).

    A client keeps its server while that server is eligible; when one server
    leaves, only its own clients move.
    """

    reads_active = False

    def __init__(self, weights: dict[int, int], names: dict[int, str]) -> None:
        self._weights = weights
        self._keys = {s: names[s].encode() for s in names}
        self._eligible: list[int] = []

    def rebuild(self, eligible: Sequence[int]) -> None:
        self._eligible = list(eligible)

    def pick(self, host: str, usable: Usable) -> int | None:
        usable = usable or _all
        key = host.encode()
        best, best_score = None, -1
        for s in self._eligible:
            if not usable(s):
                continue
            score = zlib.crc32(self._keys[s], zlib.crc32(key)) * self._weights[s]
            if score > best_score:
                best, best_score = s, score
        return best


class BackendPicker:
    """Eligibility cache plus one balancer, for one backend in one worker."""

    __slots__ = (
        "_balancer",
        "_key",
        "_pool",
        "_q",
        "_servers",
        "_suspect_hold",
        "_suspect_words",
        "_valid_until",
        "maxconn",
    )

    def __init__(
        self,
        pool: Pool,
        servers: Sequence[int],
        balancer: Balancer,
        maxconn: dict[int, int],
        suspect_hold: float,
    ) -> None:
        self._pool = pool
        self._servers = tuple(servers)
        self._balancer = balancer
        self.maxconn = maxconn  # servers with a cap only
        self._suspect_hold = suspect_hold
        self._key: tuple[int, int, int] = (-1, -1, -1)
        self._valid_until = 0.0
        self._q = pool.q
        geo = pool.geometry
        self._suspect_words = [geo.slot(s) + L.S_SUSPECT_VERSION for s in range(geo.nslots)]

    def _versions(self) -> tuple[int, int, int]:
        q = self._q
        suspects = sum(map(q.__getitem__, self._suspect_words))
        return q[L.H_HEALTH_VERSION], q[L.H_ADMIN_VERSION], suspects

    def _stale(self) -> bool:
        """Whether the eligible servers may have changed since ``_rebuild``."""
        q = self._q  # what _versions reads, inline: this runs for every connection
        suspects = sum(map(q.__getitem__, self._suspect_words))
        if (q[L.H_HEALTH_VERSION], q[L.H_ADMIN_VERSION], suspects) != self._key:
            return True
        # A suspect mark's hold runs out without any version changing: only then
        # does the cache expire (and only then is the clock read).
        return self._valid_until != INF and time.monotonic() >= self._valid_until

    def _rebuild(self, now: float) -> None:
        """Recompute the eligible servers."""
        key = self._versions()
        pool = self._pool
        eligible: list[int] = []
        valid_until = INF
        for s in self._servers:
            if pool.health(s) == L.DOWN or pool.admin(s) != L.READY:
                continue
            suspect_at = pool.suspect_since(s)
            # Suspect until a check succeeds after the mark (a failing one keeps it out
            # while fall counts down), or until the hold runs out.
            if suspect_at > pool.ok_at(s) and now < suspect_at + self._suspect_hold:
                valid_until = min(valid_until, suspect_at + self._suspect_hold)
                continue
            eligible.append(s)
        self._balancer.rebuild(eligible)
        self._key, self._valid_until = key, valid_until

    def pick(self, host: str, tried: Sequence[int] = ()) -> int | None:
        """A server for a new connection, or None (the caller answers 503)."""
        if self._stale():
            self._rebuild(time.monotonic())
        maxconn, pool = self.maxconn, self._pool
        if not tried and not maxconn:
            return self._balancer.pick(host, None)

        def usable(server: int) -> bool:
            if server in tried:
                return False
            cap = maxconn.get(server)
            return cap is None or pool.server_active(server) < cap

        return self._balancer.pick(host, usable)
