"""Spare server slots: servers that come and go without a reload.

Theory of operation
-------------------
A backend may reserve spare slots in the live pool: ``spare_servers`` for
servers an operator adds (``splicelb server add``, written by the
supervisor) and ``discovery.max_servers`` for those DNS names (written by
the prober, which resolves).  A spare slot is a server index past the
configured servers, so it has what every server has (health record, admin
word, check histogram, a counter block in every worker slot), plus a spare
record: whether it is used, its address, port, weight, name, where it came
from, and an *epoch* that counts the servers the slot has held.

Each slot has one writer (the supervisor for ``api_slots``, the prober for
``dns_slots``), which writes its record under a sequence lock, as the
prober writes health records, then bumps its own version word in the
region's header.  A worker compares both version words with what it saw at
its last pick, as it compares the health and admin versions, and reads the
records of its backends' spare slots again when one moved: a change reaches
every worker at its next connection.

A server in a spare slot of a checked backend takes no traffic before it
passes a check: the prober, seeing a slot's epoch change, resets the
slot's health record (unchecked, "not checked yet"), then stores that
epoch as the slot's *checked epoch*, and a worker counts the server only
while the checked epoch is the record's and its health is ``up``.  A server
that goes up this way starts its slow start then (one in an unchecked
backend, when it was added).

A server that leaves frees its slot and keeps its open tunnels (they end
as they would).  A free slot is taken again for a new server in this order:
one never used, then the one free longest with no open connection, then the
one free longest; the counters of a slot taken again go on from those of
the server that held it before (the metrics name the server, not the slot).

A reload carries the spare servers over to the new pool (by backend, into
the new pool's slots of the same kind) with their health, admin state and
totals, as it carries those of the configured servers.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from lb.pool import layout as L
from lb.pool.shm import Pool, read_locked, write_locked
from lb.pool.spare import Spare


def _record(pool: Pool, server: int) -> int:
    return (
        pool.geometry.spare_off + L.SPARE_HEADER_WORDS + (server - pool.first_spare) * L.SPARE_WORDS
    )


def slots(pool: Pool, backend: str, kind: str) -> range:
    """The server indexes of a backend's spare slots of ``kind`` (``api`` or ``dns``)."""
    for entry in pool.names["backends"]:
        if entry["name"] == backend:
            first, count = entry.get(f"{kind}_slots", (0, 0))
            return range(first, first + count)
    return range(0)


def write(pool: Pool, server: int, spare: Spare) -> None:
    """Store a slot's record; only the slot's one writer calls this (then ``bump``)."""
    base, q, d = _record(pool, server), pool.q, pool.d
    packed = socket.inet_pton(spare.family, spare.host) if spare.host else b""
    name = spare.name.encode()[: L.NAME_BYTES]
    with write_locked(q, base + L.D_SEQ):
        q[base + L.D_STATE] = L.SPARE_USED if spare.used else L.SPARE_FREE
        q[base + L.D_EPOCH] = spare.epoch
        q[base + L.D_WEIGHT] = spare.weight
        q[base + L.D_PORT] = spare.port
        q[base + L.D_FAMILY] = spare.family
        q[base + L.D_SOURCE] = spare.source
        d[base + L.D_ADDED_AT] = spare.added_at
        d[base + L.D_FREED_AT] = spare.freed_at
        at = base * 8
        pool.raw[at + L.D_HOST_OFF : at + L.D_HOST_OFF + 16] = packed.ljust(16, b"\0")
        name_at = at + L.D_NAME_OFF
        pool.raw[name_at : name_at + L.NAME_BYTES] = name.ljust(L.NAME_BYTES, b"\0")


def raw(pool: Pool, server: int) -> Spare:
    """A slot's record as it stands, used or free (for its one writer)."""
    return pool._spare_copy(server, _record(pool, server))


def repair(pool: Pool, indexes: range) -> list[Spare]:
    """Finish the writes a writer of these slots died in (their sequence left odd), as
    the records stand; for the slots' writer, at its start.  Returns the records it
    made readable again (a torn record reads as a free slot, and would stay taken)."""
    repaired = []
    for server in indexes:
        if pool.q[_record(pool, server) + L.D_SEQ] & 1:
            spare = raw(pool, server)
            write(pool, server, spare)
            repaired.append(spare)
    return repaired


def bump(pool: Pool, source: int) -> None:
    """Tell the workers that the slots of ``source`` changed (after the writes)."""
    off = pool.geometry.spare_off
    pool.q[off + (L.P_API_VERSION if source == L.SOURCE_API else L.P_DNS_VERSION)] += 1


def take(pool: Pool, indexes: range) -> int | None:
    """A free slot for a new server, in the order the module says; None: all used."""
    free = [raw(pool, s) for s in indexes]
    free = [s for s in free if not s.used]
    if not free:
        return None
    best = min(free, key=lambda s: (s.epoch > 0, pool.server_active(s.index) > 0, s.freed_at))
    return best.index


def add(
    pool: Pool, server: int, name: str, family: int, host: str, port: int, weight: int, source: int
) -> Spare:
    """Put a new server in the free slot ``server`` (a new epoch)."""
    old = raw(pool, server)
    spare = Spare(
        index=server,
        used=True,
        epoch=old.epoch + 1,
        weight=weight,
        family=family,
        host=host,
        port=port,
        source=source,
        added_at=time.monotonic(),
        freed_at=old.freed_at,
        name=name,
    )
    write(pool, server, spare)
    return spare


def remove(pool: Pool, server: int) -> None:
    old = raw(pool, server)
    write(
        pool,
        server,
        Spare(
            server, False, old.epoch, old.weight, old.family, old.host, old.port,
            old.source, old.added_at, time.monotonic(), old.name,
        ),
    )  # fmt: skip


def reweigh(pool: Pool, server: int, weight: int) -> None:
    old = raw(pool, server)
    write(
        pool,
        server,
        Spare(
            server, True, old.epoch, weight, old.family, old.host, old.port,
            old.source, old.added_at, old.freed_at, old.name,
        ),
    )  # fmt: skip


def set_checked_epoch(pool: Pool, server: int, epoch: int) -> None:
    """The epoch the slot's health record is about now (writer: the prober)."""
    geo = pool.geometry
    at = geo.spare_off + L.SPARE_HEADER_WORDS + geo.nspare * L.SPARE_WORDS
    pool.q[at + server - pool.first_spare] = epoch


# -- a backend's DNS answer (writer: the prober) ---------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """The state of a backend's DNS discovery, as ``status`` shows it."""

    ok_at: float  # wall clock of the last good answer; 0: none yet
    failures: int  # lookups failed in a row since then
    servers: int  # servers in the last good answer (after max_servers)
    text: str  # why the last lookup failed, or a warning about the last answer


def _answer_at(pool: Pool, backend: int) -> int:
    geo = pool.geometry
    return (
        geo.spare_off
        + L.SPARE_HEADER_WORDS
        + geo.nspare * (L.SPARE_WORDS + 1)
        + backend * L.DISCOVERY_WORDS
    )


def write_answer(pool: Pool, backend: int, answer: Answer) -> None:
    base, q, d = _answer_at(pool, backend), pool.q, pool.d
    with write_locked(q, base + L.G_SEQ):
        d[base + L.G_OK_AT] = answer.ok_at
        q[base + L.G_FAILURES] = answer.failures
        q[base + L.G_SERVERS] = answer.servers
        at = base * 8 + L.G_TEXT_OFF
        pool.raw[at : at + L.TEXT_BYTES] = L.encode_text(answer.text)


def read_answer(pool: Pool, backend: int) -> Answer | None:
    """A consistent read of a backend's discovery state; None: no region, or mid-write."""
    if not pool.geometry.spare_off or backend >= pool.geometry.nbackends:
        return None
    base, q, d = _answer_at(pool, backend), pool.q, pool.d
    at = base * 8 + L.G_TEXT_OFF
    return read_locked(
        q,
        base + L.G_SEQ,
        lambda: Answer(
            float(d[base + L.G_OK_AT]),
            int(q[base + L.G_FAILURES]),
            int(q[base + L.G_SERVERS]),
            L.decode_text(bytes(pool.raw[at : at + L.TEXT_BYTES])),
        ),
    )


# -- reload ---------------------------------------------------------------------


def carry(old: Pool, new: Pool) -> list[str]:
    """Put the spare servers of ``old`` in ``new`` (not yet published: no other writer),
    by backend and kind, with their epochs and checked epochs; what does not fit, or
    whose name the new config gives a configured server, is left out and described."""
    dropped: list[str] = []
    new_names = {b["name"]: {s["name"] for s in b["servers"]} for b in new.names["backends"]}
    for backend in old.names["backends"]:
        name = backend["name"]
        for kind, source in (("api", L.SOURCE_API), ("dns", L.SOURCE_DNS)):
            target = list(slots(new, name, kind))
            for server in slots(old, name, kind):
                spare = old.spare(server)
                if spare is None:
                    continue
                if name not in new_names:
                    continue  # the backend is gone
                if spare.name in new_names[name]:
                    dropped.append(f"{name}/{spare.name}: the config now names a server so")
                    continue
                if not target:
                    key = "spare_servers" if source == L.SOURCE_API else "discovery.max_servers"
                    dropped.append(f"{name}/{spare.name}: no {kind} slot left (raise {key})")
                    continue
                index = target.pop(0)
                write(new, index, _moved(spare, index))
                if old.checked_epoch(server) == spare.epoch:
                    set_checked_epoch(new, index, spare.epoch)
    return dropped


def _moved(spare: Spare, index: int) -> Spare:
    return Spare(
        index, True, spare.epoch, spare.weight, spare.family, spare.host, spare.port,
        spare.source, spare.added_at, spare.freed_at, spare.name,
    )  # fmt: skip
