"""Per-client limits that every worker shares: a table of client entries in the live pool.

A listener with ``client_maxconn`` (open connections per client) or
``client_rate`` and ``client_burst`` (new connections per second, a token
bucket) has a table of its own at the end of the pool file; all of a pool's
tables together take at most ``CLIENT_TABLE_BYTES`` (1 MiB), fixed when the
pool is created: the table never grows.  A client is its address, an IPv6
one by its /64 (one host usually holds a whole /64); an IPv4-mapped IPv6
address is its IPv4 address.

Theory of operation
-------------------
Workers are processes, and Python has no atomic read-modify-write on shared
memory: two workers that add one to the same word at once may store the same
sum, and a count that loses a step keeps its error for ever.  So no word here
is ever read, changed and written back by two workers; each needs only that
an aligned 8-byte (or 4-byte) store is seen whole (see :mod:`lb.pool.layout`):

* an entry is a key word, the rate's state (``E_TAT``), then one 4-byte count
  of open connections per worker slot.  A worker adds to and takes from its
  own count only, one for each connection it admitted and counted there (it
  remembers where: its *ticket*), so the counts never drift; a client's open
  connections are the sum of its entry's counts.  A worker that starts in a
  slot zeroes the slot's counts first: its predecessor's connections died
  with it;
* the rate is GCRA, a token bucket kept as one time (the *theoretical
  arrival time*): when the client's bucket will be full again.  A new
  connection is admitted if that time is at most ``client_burst - 1``
  intervals (of ``1 / client_rate`` s) ahead of now, and the time then moves
  on by one interval.  Two workers that admit the same client at the same
  instant may both store the same time: a token is lost to the bucket, never
  owed (the time says when the bucket is full again: an error is gone once it
  has refilled);
* a key is found by linear probing over at most ``CLIENT_PROBES`` entries
  from the place its hash gives (a multiplier drawn when the pool is made, so
  that clients cannot choose to collide).  An entry is taken by storing the
  key, one word: an empty one (key 0), or, when none is left in reach, one
  that is *stale*: no open connection and, if the listener has a rate, a
  bucket full again for ``STALE_AFTER`` seconds (without one the time is
  never written).  Entries are never emptied, so a search stops at the first
  empty entry: its key cannot be further on.  A stale entry's time says
  "full", which is right for its new client.

How exact it is: a client may go over ``client_maxconn`` by up to
``workers - 1`` when its connections arrive at several workers in the same
instant (each sees the sum before the others' additions), as a server's
``maxconn`` may; the same race admits a connection over the rate now and
then.  Two workers that take the same entry in the same instant for two
clients leave one client's connection counted under the other until it ends.
A worker preempted between finding its client's entry and counting in it
(with a rate: for more than ``STALE_AFTER``) may count in an entry that
another client took meanwhile: the same error, as short.

When no entry is free within reach, the client is not limited (and the
operator is told once): a full table never refuses anyone it cannot count.

On reload, the new generation's pool starts with empty tables: a tunnel
handed over to one of its workers is counted there as it is adopted
(:meth:`ClientTable.adopt`, never refused), one that stays with an old worker
is not, so a client may hold up to its limit in new connections beside its
old ones that drain.

Cost per new connection, once a worker has seen the client: a dictionary
lookup (where it last found the client), one word read to check that the
entry is still the client's, the workers' counts (item by item for up to
two workers, else one slice), the bucket's time read and stored, and the
worker's count stored; per end of connection one read and one store.  Each
read or store through a ``memoryview`` costs a few hundred instructions of
the interpreter, so the code reads no word twice.  What it costs per
connection is measured in ``docs/benchmark.md``.
"""

from __future__ import annotations

import math
import socket
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

from lb.pool import layout as L
from lb.pool.shm import Pool

STALE_AFTER = 1.0  # seconds an entry keeps a client whose bucket is full, without a connection
CONN_RETRY_AFTER = 1  # seconds a client over client_maxconn is told to wait (a guess: none is due)
KEYS_CACHED = 4096  # client addresses whose entry a worker remembers (a search costs a few µs)
UNCOUNTED = -1  # the ticket of a connection that no count holds
_MASK = (1 << 64) - 1
_COUNTS = 2 * L.ENTRY_HEADER_WORDS  # where an entry's counts start, in 4-byte units
_LOW = (1 << 32) - 1
_TAT = L.E_TAT
# Where a worker found a client: its entry (first word), its key, and its ticket (where the
# worker counts the client's connections, in 4-byte units).
Place = tuple[int, int, int]
_V4_MAPPED = bytes(10) + b"\xff\xff"
_V4_MARK = 0xFFFF << 48  # an IPv4 key is the address under ffff::/16, a multicast prefix


@dataclass(frozen=True, slots=True)
class Refusal:
    """A new connection over its client's limit: why (the conn line's reason) and when to
    try again (``Retry-After``, whole seconds)."""

    reason: str
    retry_after: int


def client_key(host: str) -> int:
    """The key of a client address as accept gives it: an IPv6 address's /64 prefix, an
    IPv4 address (or an IPv4-mapped one) under a prefix no client has; never 0 (empty).

    Stored inverted, so that the prefix of ``::1``, 0, is a key like any other."""
    if ":" not in host:
        return ~(_V4_MARK | int.from_bytes(socket.inet_aton(host), "big")) & _MASK
    raw = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    if raw[:12] == _V4_MAPPED:
        return ~(_V4_MARK | int.from_bytes(raw[12:], "big")) & _MASK
    return ~int.from_bytes(raw[:8], "big") & _MASK or 1  # ffff:ffff:ffff:ffff::/64: multicast


class ClientTable:
    """One listener's client limits over its table in a pool, as one worker counts in it.

    ``admit`` a new connection (a ticket, or a :class:`Refusal`), ``adopt`` a tunnel
    handed over (a ticket, never refused), ``release`` a ticket when its connection ends.
    """

    __slots__ = (
        "base",
        "column",
        "count_words",
        "d",
        "entries",
        "entry_words",
        "full",
        "i",
        "interval",
        "known",
        "maxconn",
        "nslots",
        "on_full",
        "over_maxconn",
        "q",
        "rate_reason",
        "seed",
        "tolerance",
    )

    def __init__(
        self,
        pool: Pool,
        table: int,
        slot: int,
        maxconn: int,
        rate: float,
        burst: int,
        on_full: Callable[[int], None],
    ) -> None:
        """``on_full(entries)`` is called the first time a client finds no room."""
        geo = pool.geometry
        if not 0 <= table < geo.client_tables:
            raise ValueError(f"the pool has no client table {table}")
        self.q, self.d, self.i = pool.q, pool.d, pool.i
        self.base = geo.client_table(table)
        self.entries = geo.client_entries
        self.entry_words = geo.entry_words
        self.count_words = geo.entry_words - L.ENTRY_HEADER_WORDS  # two counts a word
        self.nslots = geo.nslots
        self.column = _COUNTS + slot  # this worker's count within an entry, in 4-byte units
        self.seed = pool.q[L.H_CLIENT_SEED]
        self.maxconn = maxconn
        self.interval = 1 / rate if rate else 0.0
        # GCRA: admitted while the bucket's time, moved on by one interval, is at most
        # ``burst`` intervals ahead of now.
        self.tolerance = (burst - 1) * self.interval
        plural = "s" if maxconn != 1 else ""
        self.over_maxconn = Refusal(
            f"client limit: {maxconn} open connection{plural}", CONN_RETRY_AFTER
        )
        self.rate_reason = f"client rate: {rate:g}/s"
        self.on_full = on_full
        self.full = False  # told the operator already
        # By client address: where this worker last found its client (see _place).
        self.known: dict[str, Place] = {}

    def reset(self) -> None:
        """Zero this worker's counts in every entry: a predecessor in the slot left its own
        (its connections died with it).  Before the worker admits anything."""
        words = self.entry_words * 2  # in 4-byte units
        start = self.base * 2 + self.column
        count = self.entries + L.CLIENT_PROBES - 1
        self.i[start : start + count * words : words] = array("I", bytes(4 * count))

    def admit(self, host: str, now: float) -> int | Refusal:
        """Count a new connection from ``host`` (at ``now``, monotonic) against its
        client's limits: a ticket for ``release`` (``UNCOUNTED`` if no count holds it),
        or why it is refused.  The hot path: every word it reads or stores costs."""
        place = self.known.get(host)
        if place is None or self.q[place[0]] != place[1]:  # unknown here, or taken since
            place = self._place(host, now)
            if place is None:
                return UNCOUNTED  # no room: not limited (see the module's docstring)
        entry, _, ticket = place
        maxconn, i, mine = self.maxconn, self.i, 0
        if maxconn:
            mine = i[ticket]
            # Its open connections, all workers': item by item for up to two (a slice
            # costs three times as much); the other's count is the next or previous word.
            nslots = self.nslots
            if nslots <= 2:
                held = mine if nslots == 1 else mine + i[ticket ^ 1]
            else:
                counts = 2 * entry + _COUNTS
                held = sum(i[counts : counts + nslots])
            if held >= maxconn:
                return self.over_maxconn
        interval = self.interval
        if interval:
            d, tat = self.d, entry + _TAT
            due = d[tat]
            ahead = due - now  # below 0: the bucket is full
            if ahead > self.tolerance:
                return Refusal(self.rate_reason, max(1, math.ceil(ahead - self.tolerance)))
            d[tat] = (due if ahead > 0 else now) + interval
        if not maxconn:
            return UNCOUNTED
        i[ticket] = mine + 1
        return ticket

    def adopt(self, host: str) -> int:
        """Count a tunnel handed over from an older generation: open here now, whatever
        the limit (it is not a new connection: no token is taken)."""
        if not self.maxconn:
            return UNCOUNTED
        place = self._place(host, monotonic())
        if place is None:
            return UNCOUNTED
        self.i[place[2]] += 1
        return place[2]

    def release(self, ticket: int) -> None:
        """The connection of ``ticket`` ended (never called with ``UNCOUNTED``)."""
        i = self.i
        count = i[ticket]
        if count:  # never below zero, even if a reset came between (it never does)
            i[ticket] = count - 1

    def open_connections(self, host: str) -> int:
        """The open connections counted for ``host``'s client (for tests and readers)."""
        entry = self._find(client_key(host))
        return 0 if entry < 0 else self._open(entry)

    def _open(self, entry: int) -> int:
        """The sum of the entry's counts: of its words (two counts each, far from
        overflowing the low half into the high one), then of their halves."""
        q, at = self.q, entry + L.ENTRY_HEADER_WORDS
        words = q[at] if self.count_words == 1 else sum(q[at : at + self.count_words])
        return int((words & _LOW) + (words >> 32))

    def _place(self, host: str, now: float) -> Place | None:
        """Where ``host``'s client is (its entry taken if need be), remembered; or None."""
        key = client_key(host)
        entry = self._entry(key, now)
        if entry < 0:
            return None
        known = self.known
        if len(known) >= KEYS_CACHED:
            known.clear()
        place = known[host] = (entry, key, 2 * entry + self.column)
        return place

    def _home(self, key: int) -> int:
        """The word where the search for ``key`` starts: its hash scaled to the places."""
        return self.base + (((key * self.seed) & _MASK) * self.entries >> 64) * self.entry_words

    def _find(self, key: int) -> int:
        """The entry (its first word) that holds ``key``, or -1."""
        q, at, step = self.q, self._home(key), self.entry_words
        for _ in range(L.CLIENT_PROBES):
            found = q[at]
            if found == key:
                return at
            if not found:
                return -1
            at += step
        return -1

    def _entry(self, key: int, now: float) -> int:
        """The entry of ``key``, taken for it if it has none; -1 if none is free in reach."""
        q, home, step = self.q, self._home(key), self.entry_words
        at = home
        for _ in range(L.CLIENT_PROBES):
            found = q[at]
            if found == key:
                return at
            if not found:  # the key is not further on: take this one
                q[at] = key
                return at
            at += step
        stale, d = now - STALE_AFTER, self.d
        at = home
        for _ in range(L.CLIENT_PROBES):
            if d[at + L.E_TAT] < stale and not self._open(at):
                q[at] = key
                return at
            at += step
        if not self.full:
            self.full = True
            self.on_full(self.entries)
        return -1
