"""Choosing a server: which servers are eligible, and the balancing algorithms.

A worker keeps one :class:`BackendPicker` per backend.  Eligibility (health up
or unchecked, admin ``ready``, not suspect) is recomputed only when the pool's
versions change, a suspect mark expires or a slow start takes its next step;
the common pick reads a few words of shared memory and steps through a cached
sequence.

Algorithms share one small interface, :class:`Balancer`: ``rebuild`` gets the
eligible servers (global indexes) whenever they change, with the share of
their weight that servers in slow start have now; ``pick`` returns one of
them that ``usable`` accepts, or None.

Slow start: a server back in rotation (up after down, from the prober's
record; ready after drain or maint, from the supervisor's admin time) counts
with ``RAMP_FLOOR`` of its weight at first, rising linearly to all of it over
the backend's ``slowstart`` seconds, in every algorithm.  The share is
recomputed ``RAMP_STEPS`` times over the ramp, as a suspect mark's hold is
handled: the cache expires at the next step, and only while some server ramps
is the clock read at every pick.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from hashlib import blake2b
from math import log
from typing import Protocol

from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.pool.spare import Spare

INF = float("inf")
SUSPECT_HOLD_UNCHECKED = 5.0  # seconds a suspect mark holds where no prober checks
RAMP_FLOOR = 1 / 20  # the share of its weight a server has when its slow start begins
RAMP_STEPS = 50  # times its share is recomputed over the slow start
HASH_CACHE_KEYS = 4096  # keys whose server a hash balancer remembers until it is rebuilt
HASH_CACHE_KEY_LEN = 256  # ... if no longer than this: at most about 2 MB per backend


Usable = Callable[[int], bool] | None  # None: every eligible server is usable
Key = str | bytes  # what a hash hashes: the client's address, or a value from its request
Ramp = Mapping[int, float]  # servers in slow start -> the share of their weight they have now


class Balancer(Protocol):
    # Whether it reads every worker's active connections per server as they change
    # (the worker then keeps its own in shared memory as they change, not 10 ms late).
    reads_active: bool

    def rebuild(self, eligible: Sequence[int], ramp: Ramp) -> None: ...

    def pick(self, key: Key, usable: Usable) -> int | None: ...


def _all(_server: int) -> bool:
    return True


def effective(weights: Mapping[int, int], eligible: Sequence[int], ramp: Ramp) -> dict[int, float]:
    """The weights the eligible servers count with now (less than configured in slow start)."""
    return {s: weights[s] * ramp.get(s, 1.0) for s in eligible}


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
    """Weighted round-robin; skips servers ``usable`` refuses.

    A cached cycle of nginx's smooth order; while a server ramps up (slow
    start) the weights change at every step, and the same order is computed
    one pick at a time instead.
    """

    reads_active = False

    def __init__(self, weights: dict[int, int]) -> None:
        self._weights = weights
        self._order: list[int] = []
        self._next = 0
        self._ramping: dict[int, float] = {}  # effective weights while a server ramps up
        self._current: dict[int, float] = {}  # smooth round-robin's running scores

    def rebuild(self, eligible: Sequence[int], ramp: Ramp) -> None:
        if ramp:
            self._order = []
            self._ramping = effective(self._weights, eligible, ramp)
            self._current = {s: self._current.get(s, 0.0) for s in eligible}
        else:
            self._ramping = {}
            self._order = smooth_sequence(eligible, self._weights)

    def pick(self, key: Key, usable: Usable) -> int | None:
        if self._ramping:
            return self._pick_smooth(usable)
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

    def _pick_smooth(self, usable: Usable) -> int | None:
        """One step of smooth weighted round-robin, over the servers ``usable`` accepts."""
        current, best, total = self._current, None, 0.0
        for server, weight in self._ramping.items():
            if usable is not None and not usable(server):
                continue
            current[server] += weight
            total += weight
            if best is None or current[server] > current[best]:
                best = server
        if best is not None:
            current[best] -= total
        return best


class LeastConn:
    """Fewest active connections (all workers) per unit of weight; ties rotate."""

    reads_active = True

    def __init__(self, weights: dict[int, int], pool: Pool) -> None:
        self._weights = weights
        self._pool = pool
        self._eligible: list[int] = []
        self._effective: dict[int, float] = {}
        self._turn = 0

    def rebuild(self, eligible: Sequence[int], ramp: Ramp) -> None:
        self._eligible = list(eligible)
        self._effective = effective(self._weights, eligible, ramp)

    def pick(self, key: Key, usable: Usable) -> int | None:
        usable = usable or _all
        candidates = [s for s in self._eligible if usable(s)]
        if not candidates:
            return None
        self._turn += 1
        start = self._turn % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        active, weights = self._pool.server_active, self._effective
        return min(rotated, key=lambda s: active(s) / weights[s])


class Random2:
    """Power of two random choices, weighted, the less loaded one wins."""

    reads_active = True

    def __init__(self, weights: dict[int, int], pool: Pool) -> None:
        self._weights = weights
        self._pool = pool
        self._eligible: list[int] = []
        self._effective: dict[int, float] = {}

    def rebuild(self, eligible: Sequence[int], ramp: Ramp) -> None:
        self._eligible = list(eligible)
        self._effective = effective(self._weights, eligible, ramp)

    def pick(self, key: Key, usable: Usable) -> int | None:
        usable = usable or _all
        candidates = [s for s in self._eligible if usable(s)]
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        weights = self._effective
        a, b = random.choices(candidates, weights=[weights[s] for s in candidates], k=2)
        active = self._pool.server_active
        return a if active(a) / weights[a] <= active(b) / weights[b] else b


class Hash:
    """Weighted rendezvous hashing: a key (the client's address, a cookie, ...) picks
    the server, and keeps it while that server is eligible.

    Each server's score for a key is ``-w / ln(u)``: ``w`` its weight, ``u`` in
    (0, 1) from a 64-bit hash of the key salted with the server's name
    (blake2b).  The highest score wins: a server wins a share w / sum(w) of the
    keys, and a key's order of servers does not depend on which others there
    are, so a server that leaves moves only its own keys (each to its next
    server in the key's order) and takes them back when it returns.  With
    equal weights the order of ``u`` is the order of the scores, and the
    logarithm is skipped.  A key's order is remembered until the next rebuild
    (a client that opens several connections is hashed once), for up to
    ``HASH_CACHE_KEYS`` keys of up to ``HASH_CACHE_KEY_LEN`` characters (a
    client chooses its cookies: the memory stays bounded), then forgotten all
    at once.

    With a ``balance_factor`` (percent, over 100), a server whose active
    connections (all workers) would exceed its share of ``balance_factor``
    percent of the average is skipped for the next one in the key's order
    (HAProxy's ``hash-balance-factor``, "consistent hashing with bounded
    loads"): a hot key spills over instead of overloading one server.
    """

    def __init__(
        self, weights: dict[int, int], names: dict[int, str], pool: Pool, balance_factor: int = 0
    ) -> None:
        self._weights = weights
        self._names = names  # a spare slot's name changes with the server in it
        self._salts: dict[str, bytes] = {}  # by server name: a key's server is the same on
        # every node with the same servers, whatever slots or order they came in
        self._q = pool.q
        geo = pool.geometry
        self._active_words = [  # where each worker keeps a server's active count
            [geo.counter(slot, s) + L.C_ACTIVE for slot in range(geo.nslots)]
            for s in range(geo.nservers)
        ]
        self._factor = balance_factor / 100
        self.reads_active = balance_factor > 0
        self._servers: list[tuple[int, bytes, float]] = []  # eligible: index, salt, weight
        self._effective: dict[int, float] = {}
        self._uniform = True  # every eligible server has the same weight
        self._total_weight = 0.0
        self._cache: dict[Key, tuple[int, ...]] = {}  # key -> its order, while nothing changes

    def rebuild(self, eligible: Sequence[int], ramp: Ramp) -> None:
        weights = self._effective = effective(self._weights, eligible, ramp)
        self._servers = [(s, self._salt(self._names[s]), weights[s]) for s in eligible]
        self._uniform = len(set(weights.values())) <= 1
        self._total_weight = sum(weights.values())
        self._cache.clear()

    def _salt(self, name: str) -> bytes:
        salt = self._salts.get(name)
        if salt is None:
            salt = self._salts[name] = blake2b(name.encode(), digest_size=16).digest()
        return salt

    def scores(self, key: bytes) -> list[tuple[float, int]]:
        """(score, server) for every eligible server; the highest score wins."""
        found: list[tuple[float, int]] = []
        for server, salt, weight in self._servers:
            digest = blake2b(key, digest_size=8, salt=salt).digest()
            hashed = int.from_bytes(digest, "big")
            if self._uniform:
                found.append((hashed, server))
            else:  # u: 52 bits of the hash, centred, so 0 < u < 1 exactly and ln(u) < 0
                found.append((weight / -log(((hashed >> 12) + 0.5) * 2.0**-52), server))
        return found

    def order(self, key: Key) -> tuple[int, ...]:
        """The eligible servers in the key's order, its server first."""
        cache = self._cache
        order = cache.get(key)
        if order is None:
            scores = self.scores(key.encode() if isinstance(key, str) else key)
            scores.sort(reverse=True)
            order = tuple(server for _, server in scores)
            if len(key) <= HASH_CACHE_KEY_LEN:
                if len(cache) >= HASH_CACHE_KEYS:
                    cache.clear()
                cache[key] = order
        return order

    def pick(self, key: Key, usable: Usable) -> int | None:
        order = self.order(key)
        if usable is not None:
            order = tuple(filter(usable, order))
        if self._factor and order:
            has_room = self._has_room()
            for server in order:
                if has_room(server):
                    return server
        return order[0] if order else None  # with a bound, all over it: the key's own

    def _has_room(self) -> Callable[[int], bool]:
        """Whether a server is within its bound with one more connection.

        A server's bound is its share (by weight) of ``balance_factor`` times
        the eligible servers' active connections, this one included: never
        less than one, and the bounds add up to more than the connections, so
        some server always has room.
        """
        q, words = self._q, self._active_words
        loads = {s: sum(map(q.__getitem__, words[s])) for s, _, _ in self._servers}
        room = (sum(loads.values()) + 1) * self._factor / self._total_weight
        weights = self._effective
        return lambda server: loads[server] < max(1.0, room * weights[server])


class BackendPicker:
    """Eligibility cache plus one balancer, for one backend in one worker."""

    __slots__ = (
        "_added",
        "_balancer",
        "_checked",
        "_key",
        "_on_spares",
        "_pool",
        "_q",
        "_servers",
        "_slowstart",
        "_spare_words",
        "_spares",
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
        slowstart: float = 0.0,
        spares: Sequence[int] = (),
        checked: bool = False,
        on_spares: Callable[[dict[int, Spare]], None] | None = None,
    ) -> None:
        """``spares``: the backend's spare slots (lb.pool.servers); ``on_spares`` gets the
        servers in them whenever they are read again, before the balancer is rebuilt;
        ``checked``: the backend has health checks (a spare server must pass one)."""
        self._pool = pool
        self._servers = tuple(servers)
        self._spares = tuple(spares)
        self._checked = checked
        self._on_spares = on_spares
        self._added: dict[int, float] = {}  # spare servers in use: when they were added
        self._balancer = balancer
        self.maxconn = maxconn  # servers with a cap only
        self._suspect_hold = suspect_hold
        self._slowstart = slowstart
        self._key: tuple[int, ...] = (-1, -1, -1, -1, -1)
        self._valid_until = 0.0
        self._q = pool.q
        geo = pool.geometry
        self._suspect_words = [geo.slot(s) + L.S_SUSPECT_VERSION for s in range(geo.nslots)]
        off = geo.spare_off if self._spares else 0  # no spare slot: a word that stays 0
        self._spare_words = (
            (off + L.P_API_VERSION, off + L.P_DNS_VERSION) if off else (L.H_SPARE_OFF,) * 2
        )

    def _versions(self) -> tuple[int, ...]:
        q = self._q
        suspects = sum(map(q.__getitem__, self._suspect_words))
        api, dns = self._spare_words
        return q[L.H_HEALTH_VERSION], q[L.H_ADMIN_VERSION], suspects, q[api], q[dns]

    def _stale(self) -> bool:
        """Whether the eligible servers may have changed since ``_rebuild``."""
        q = self._q  # what _versions reads, inline: this runs for every connection
        suspects = sum(map(q.__getitem__, self._suspect_words))
        api, dns = self._spare_words
        key = (q[L.H_HEALTH_VERSION], q[L.H_ADMIN_VERSION], suspects, q[api], q[dns])
        if key != self._key:
            return True
        # A suspect mark's hold runs out, or a slow start takes its next step, without
        # any version changing: only then does the cache expire (and is the clock read).
        return self._valid_until != INF and time.monotonic() >= self._valid_until

    def _rebuild(self, now: float) -> None:
        """Recompute the eligible servers."""
        key = self._versions()
        pool = self._pool
        eligible: list[int] = []
        valid_until = INF
        for s in self._servers + self._spare_servers():
            if pool.health(s) == L.DOWN or pool.admin(s) != L.READY:
                continue
            suspect_at = pool.suspect_since(s)
            # Suspect until a check succeeds after the mark (a failing one keeps it out
            # while fall counts down), or until the hold runs out.
            if suspect_at > pool.ok_at(s) and now < suspect_at + self._suspect_hold:
                valid_until = min(valid_until, suspect_at + self._suspect_hold)
                continue
            eligible.append(s)
        ramp: dict[int, float] = {}
        if self._slowstart:
            valid_until = min(valid_until, self._ramp(eligible, now, ramp))
        self._balancer.rebuild(eligible, ramp)
        self._key, self._valid_until = key, valid_until

    def _spare_servers(self) -> tuple[int, ...]:
        """Read the spare slots again; the servers in them that may take traffic (a
        checked backend's only once they passed a check: see lb.pool.servers)."""
        if not self._spares:
            return ()
        pool = self._pool
        used = {s: spare for s in self._spares if (spare := pool.spare(s)) is not None}
        if self._on_spares is not None:
            self._on_spares(used)
        self._added = {s: spare.added_at for s, spare in used.items()}
        if not self._checked:
            return tuple(used)
        return tuple(
            s
            for s, spare in used.items()
            if pool.checked_epoch(s) == spare.epoch and pool.health(s) == L.UP
        )

    def _ramp(self, eligible: Sequence[int], now: float, ramp: dict[int, float]) -> float:
        """Put the servers in slow start in ``ramp`` with their share of weight; returns
        when the shares are next to be recomputed (INF: no server ramps)."""
        pool, slowstart = self._pool, self._slowstart
        step = slowstart / RAMP_STEPS
        until = INF
        for s in eligible:
            # 0: never out of rotation (a spare server ramps from when it was added too)
            since = max(pool.up_at(s), pool.ready_at(s), self._added.get(s, 0.0))
            if since and now < since + slowstart:
                ramp[s] = RAMP_FLOOR + (1 - RAMP_FLOOR) * max(0.0, now - since) / slowstart
                until = min(until, now + step, since + slowstart)
        return until

    def pick(self, key: Key, tried: Sequence[int] = ()) -> int | None:
        """A server for a new connection, or None (the caller answers 503); ``key`` is
        what a hash balancer hashes (the others ignore it)."""
        if self._stale():
            self._rebuild(time.monotonic())
        maxconn, pool = self.maxconn, self._pool
        if not tried and not maxconn:
            return self._balancer.pick(key, None)

        def usable(server: int) -> bool:
            if server in tried:
                return False
            cap = maxconn.get(server)
            return cap is None or pool.server_active(server) < cap

        return self._balancer.pick(key, usable)
