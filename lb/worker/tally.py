"""A worker's counters, laid out like its slot in the live pool and copied there in batches.

Counters are added up in :attr:`Tally.values`, a list of Python ints laid
out like the slot, and copied to the slot ``PUBLISH_DELAY`` after the first
change since the last copy: adding to a list costs a fraction of adding to
shared memory (through a ``memoryview``), and one copy serves every
connection of those 10 ms, however many.  One exception: a server's active
connections are also stored in the slot as they change where other workers
read them to pick (``leastconn``, ``random2``, a server's ``maxconn``: see
:attr:`Tally.live_active`).  Only there: a store through the ``memoryview``
costs several list additions.

The slot's words that others write or that are stored as they change (the
header's, a server's failed connects and suspect mark) are never copied.

A tunnel adopted from an older generation may belong to a listener or a
server this generation's config no longer has: it is counted in words past
the slot's (server index ``nservers``, ``foreign_listener_at``), which are
never published, so that counting it costs the hot path no test.
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Iterable

from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.worker.loop import Loop

PUBLISH_DELAY = 0.01  # longest the slot's counters lag behind the worker's tally
_ANSWER_INDEX = {status: i for i, status in enumerate(L.ANSWER_STATUSES)}
_OTHER_ANSWER = L.ANSWER_STATUSES.index(0)


class Tally:
    __slots__ = (
        "active",
        "adopted",
        "base",
        "foreign_listener_at",
        "listener_ats",
        "live_active",
        "loop",
        "pool",
        "publishing",
        "q",
        "runs",
        "server_at",
        "server_counters",
        "values",
    )

    def __init__(self, pool: Pool, slot: int, loop: Loop, live: Iterable[int]) -> None:
        geo = pool.geometry
        self.pool = pool
        self.q = pool.q
        self.loop = loop
        self.base = geo.slot(slot)
        self.active = 0  # connections this worker holds
        self.adopted = 0  # tunnels it adopted from an older generation
        self.publishing = False  # a copy to the slot is due
        # The slot's words as Python ints: what a predecessor in this slot counted goes on.
        self.values = list(pool.q[self.base : self.base + geo.slot_words])
        self.values += [0] * (L.COUNTER_WORDS + L.LISTENER_WORDS)  # foreign: never published
        self.server_counters = [geo.counter(slot, s) for s in range(geo.nservers)]
        self.server_at = [c - self.base for c in self.server_counters]  # by server index
        self.server_at.append(geo.slot_words)  # the foreign server (index nservers)
        self.listener_ats = [  # by listener index
            geo.listener_counter(slot, i) - self.base for i in range(geo.nlisteners)
        ]
        self.foreign_listener_at = geo.slot_words + L.COUNTER_WORDS
        # By server index: where its active count goes in the slot as it changes (0: late).
        self.live_active = [0] * (geo.nservers + 1)
        for server in live:
            self.live_active[server] = self.server_counters[server] + L.C_ACTIVE
        self.runs = _published_runs(
            self.server_at[:-1], geo.slot_words - geo.nlisteners * L.LISTENER_WORDS, geo.slot_words
        )

    def start(self, generation: int) -> None:
        """Claim the slot: a predecessor killed in it left active counts of its own."""
        q, base, values = self.q, self.base, self.values
        q[base + L.S_PID], q[base + L.S_GENERATION] = os.getpid(), generation
        for counter, at in zip(self.server_counters, self.server_at[:-1], strict=True):
            q[counter + L.C_ACTIVE] = 0
            values[at + L.C_ACTIVE] = 0
        for at in self.listener_ats:
            values[at + L.C_ACTIVE] = 0
        self.publish()

    def accepted(self, listener_at: int) -> None:
        values = self.values
        self.active += 1
        values[listener_at + L.C_ACTIVE] += 1
        values[listener_at + L.C_TOTAL] += 1
        if not self.publishing:
            self._publish_soon()

    def tunnel_opened(self, server: int, listener_at: int, head: int) -> None:
        """A tunnel to ``server``; ``head``: bytes already forwarded (the request head)."""
        values, at = self.values, self.server_at[server]
        values[at + L.C_ACTIVE] += 1
        values[at + L.C_TOTAL] += 1
        live = self.live_active[server]
        if live:  # other workers pick by it: see the module's docstring
            self.q[live] = values[at + L.C_ACTIVE]
        if head:
            values[at + L.C_BYTES_IN] += head
            values[listener_at + L.C_BYTES_IN] += head
        if not self.publishing:
            self._publish_soon()

    def count_bytes(self, server: int, listener_at: int, up: int, down: int) -> None:
        values, at = self.values, self.server_at[server]
        values[at + L.C_BYTES_IN] += up
        values[listener_at + L.C_BYTES_IN] += up
        values[at + L.C_BYTES_OUT] += down
        values[listener_at + L.C_BYTES_OUT] += down
        if not self.publishing:
            self._publish_soon()

    def finished(
        self, listener_at: int, server: int, status: int | None, bytes_in: int, bytes_out: int
    ) -> None:
        """A connection ended; ``server``: its tunnel's (-1: answered or dropped, nothing
        spliced, so its few bytes are counted here)."""
        values = self.values
        self.active -= 1
        values[listener_at + L.C_ACTIVE] -= 1
        if server >= 0:
            at = self.server_at[server]
            values[at + L.C_ACTIVE] -= 1
            live = self.live_active[server]
            if live:
                self.q[live] = values[at + L.C_ACTIVE]
        else:
            values[listener_at + L.C_BYTES_IN] += bytes_in
            values[listener_at + L.C_BYTES_OUT] += bytes_out
        if status is not None:
            values[L.S_ANSWERS + _ANSWER_INDEX.get(status, _OTHER_ANSWER)] += 1
        if not self.publishing:
            self._publish_soon()

    def adopted_tunnel(self, server: int, listener_at: int) -> None:
        """A tunnel handed over by an older generation: open here now (its totals were
        counted where it began)."""
        values = self.values
        self.active += 1
        self.adopted += 1
        values[listener_at + L.C_ACTIVE] += 1
        at = self.server_at[server]
        values[at + L.C_ACTIVE] += 1
        live = self.live_active[server]
        if live:
            self.q[live] = values[at + L.C_ACTIVE]
        if not self.publishing:
            self._publish_soon()

    def mark_suspect(self, server: int) -> None:
        """Passive health: every worker avoids ``server`` until a check clears the mark."""
        counter = self.server_counters[server]
        self.pool.d[counter + L.C_SUSPECT_AT] = time.monotonic()
        self.q[counter + L.C_FAILED] += 1
        self.q[self.base + L.S_SUSPECT_VERSION] += 1

    def set_state(self, state: int) -> None:
        self.q[self.base + L.S_STATE] = state

    def beat(self) -> None:
        self.pool.d[self.base + L.S_BEAT] = time.monotonic()

    def _publish_soon(self) -> None:
        self.publishing = True
        self.loop.call_later(PUBLISH_DELAY, self.publish)

    def publish(self) -> None:
        """Copy the counters to this worker's slot (see the module's docstring)."""
        self.publishing = False
        values = self.values
        values[L.S_CONNECTIONS] = self.active
        values[L.S_ADOPTED] = self.adopted
        values[L.S_ACCEPTED] = sum(values[at + L.C_TOTAL] for at in self.listener_ats)
        words = array("Q", values)
        q, base = self.q, self.base
        for start, end in self.runs:
            q[base + start : base + end] = words[start:end]


def _published_runs(servers: list[int], listeners: int, end: int) -> list[tuple[int, int]]:
    """The runs of slot words ``publish`` copies: all but those stored as they change
    (the header's, ``C_FAILED``) and the doubles (``C_SUSPECT_AT``).  A server's active
    count is copied even where it is also stored as it changes: the same value."""
    runs = [
        (L.S_CONNECTIONS, L.S_ACCEPTED + 1),
        (L.S_ADOPTED, L.S_ADOPTED + 1),
        (L.S_ANSWERS, L.S_ANSWERS + len(L.ANSWER_STATUSES)),
    ]
    runs += [(at + L.C_ACTIVE, at + L.C_BYTES_OUT + 1) for at in servers]
    runs.append((listeners, end))  # every listener's four words
    return runs
