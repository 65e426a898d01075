"""The live pool: a file in the runtime dir, mapped with ``mmap`` by every process.

The layout and the one-writer-per-part rule are in :mod:`lb.pool.layout`, and
so is how totals outlive reloads (the carried block, the fold, and the order
in which :class:`Totals` reads).  We map a plain file rather than using
``multiprocessing.shared_memory``: its resource tracker may unlink a segment
when a child exits, and the CLI must be able to open the pool of a running
instance by path.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from lb.errors import LBError
from lb.pool import layout as L
from lb.pool.spare import Spare, copy_spare
from lb.tls import data_path

if TYPE_CHECKING:
    from lb.config import Config

# A reader's patience with a record that is being written.  A writer holds a
# record for microseconds, or for a scheduler time slice (milliseconds) if the
# kernel preempts it mid-write; READ_TRIES pauses of READ_PAUSE (10 ms or more
# in all) outlast both, then the reader reports the record unreadable: its
# writer died mid-write.
READ_TRIES = 40
READ_PAUSE = 0.00025  # seconds; a sleep, so a preempted writer on our CPU can finish
CARRIED_UNREADABLE = "the carried totals are unreadable: their last write never finished"

T = TypeVar("T")


def read_locked(q: memoryview[int], seq_at: int, copy: Callable[[], T]) -> T | None:
    """A sequence lock's read (see :mod:`lb.pool.layout`): what ``copy()`` returned while
    the word at ``seq_at`` held the same even value before and after, or None when it
    stays odd (its writer died mid-write) or never settles, after ``READ_TRIES`` tries."""
    for _ in range(READ_TRIES):
        seq = q[seq_at]
        if not seq & 1:
            value = copy()
            if q[seq_at] == seq:
                return value
        time.sleep(READ_PAUSE)
    return None


@contextlib.contextmanager
def write_locked(q: memoryview[int], seq_at: int) -> Iterator[None]:
    """A sequence lock's write, for the record's one writer: the stores made inside go
    out under an odd sequence.  The first store is odd even if a writer that died
    mid-write left the sequence odd, so the last one leaves it even, and unlike the
    even value a reader may have seen before.  A write that raises leaves it odd."""
    seq = (q[seq_at] + 1) | 1
    q[seq_at] = seq  # odd: readers wait
    yield
    q[seq_at] = seq + 1


@dataclass(frozen=True, slots=True)
class HealthRecord:
    """One consistent read of a server's health record."""

    health: int
    rise_count: int
    fall_count: int
    checked_at: float  # monotonic seconds of the last check; 0 if never
    changed_at: float  # wall clock of the last health change; 0 if never
    latency: float  # seconds the last check took
    checks: int
    text: str  # last result, e.g. "HTTP 200" or "connection refused"
    ok_at: float = 0.0  # monotonic seconds of the last successful check; 0 if never
    up_at: float = 0.0  # monotonic seconds of the last change from down to up; 0 if never


class Pool:
    """A mapped pool file; see :mod:`lb.pool.layout` for who writes what."""

    def __init__(self, path: str, mm: mmap.mmap) -> None:
        self.path = path
        self._mm = mm
        self.raw = memoryview(mm)
        self.q = self.raw.cast("Q")
        self.d = self.raw.cast("d")
        self.i = self.raw.cast("I")  # the client tables' open counts (4 bytes each)
        q = self.q
        self.version = version = q[L.H_VERSION]
        if q[L.H_MAGIC] != L.MAGIC or not L.OLDEST_READABLE <= version <= L.LAYOUT_VERSION:
            self.close()
            raise LBError(f"{path}: not a splicelb pool file of this version")
        if version == L.LAYOUT_VERSION:
            self.geometry = L.Geometry(
                nservers=q[L.H_NSERVERS],
                nslots=q[L.H_NSLOTS],
                names_len=q[L.H_NAMES_LEN],
                nlisteners=q[L.H_NLISTENERS],
                client_tables=q[L.H_CLIENT_TABLES],
                client_entries=q[L.H_CLIENT_ENTRIES],
            )
        else:  # a generation of the code before an upgrade
            self.geometry = L.Geometry.older(q[: L.HEADER_WORDS].tolist(), version)
        geo = self.geometry
        geo.spare_off = spare_off = q[L.H_SPARE_OFF]  # 0: a file made before spare servers
        if spare_off:
            geo.nspare, geo.nbackends = q[spare_off + L.P_NSPARE], q[spare_off + L.P_NBACKENDS]
        else:
            geo.nspare = geo.nbackends = 0
        start = geo.names_off * 8
        self.names: dict[str, Any] = orjson.loads(bytes(self.raw[start : start + q[L.H_NAMES_LEN]]))
        self.first_spare = q[L.H_NSERVERS] - geo.nspare  # spare slot i is server first_spare + i

    @classmethod
    def create(
        cls,
        path: str,
        names: dict[str, Any],
        nservers: int,
        nslots: int,
        client_tables: int = 0,
        client_entries: int | None = None,
        nspare: int = 0,
    ) -> Pool:
        """Write a new pool file atomically (temp file, then rename) and map it.

        ``client_tables``: how many listeners limit their clients (lb.pool.clients), each
        a table of ``client_entries`` places (default: as many as fit the layout's bound).
        ``nspare``: the last ``nspare`` of the ``nservers`` are spare slots (lb.pool.servers).
        """
        blob = orjson.dumps(names)
        nlisteners = len(names.get("listeners", ()))
        if client_entries is None:
            client_entries = L.client_entries(client_tables, nslots)
        if not client_tables:
            client_entries = 0
        nbackends = len(names.get("backends", ()))
        geo = L.Geometry(
            nservers,
            nslots,
            len(blob),
            nlisteners,
            client_tables,
            client_entries,
            nspare,
            nbackends,
        )
        size = geo.total_words * 8
        tmp = f"{path}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a crashed predecessor's (unlink never follows a link)
        # Never through a link, never an existing file; readable by the instance's user only.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS at the first store
            with mmap.mmap(fd, size) as mm:
                q = memoryview(mm).cast("Q")
                header = (L.MAGIC, L.LAYOUT_VERSION, names.get("generation", 0), nservers, nslots)
                for index, value in enumerate(header):
                    q[index] = value
                q[L.H_NAMES_OFF], q[L.H_NAMES_LEN] = geo.names_off, len(blob)
                q[L.H_HEALTH_OFF], q[L.H_ADMIN_OFF] = geo.health_off, geo.admin_off
                q[L.H_SLOTS_OFF], q[L.H_SLOT_SIZE] = geo.slots_off, geo.slot_words
                q[L.H_NLISTENERS] = nlisteners
                q[L.H_CLIENT_TABLES], q[L.H_CLIENT_ENTRIES] = client_tables, client_entries
                q[L.H_CLIENT_SEED] = secrets.randbits(64) | 1
                q[L.H_SPARE_OFF] = geo.spare_off
                q[geo.spare_off + L.P_NSPARE] = nspare
                q[geo.spare_off + L.P_NBACKENDS] = nbackends
                mm[geo.names_off * 8 : geo.names_off * 8 + len(blob)] = blob
                q.release()
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return cls._map(path, fd)

    @classmethod
    def open(cls, path: str) -> Pool:
        fd = os.open(path, os.O_RDWR)
        return cls._map(path, fd)

    @classmethod
    def _map(cls, path: str, fd: int) -> Pool:
        try:
            mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        return cls(path, mm)

    def close(self) -> None:
        for view in (self.q, self.d, self.i, self.raw):
            view.release()
        self._mm.close()

    # -- health records (writer: the prober) ---------------------------------

    def health(self, server: int) -> int:
        return int(self.q[self.geometry.record(server) + L.R_HEALTH])

    def checked_at(self, server: int) -> float:
        return float(self.d[self.geometry.record(server) + L.R_CHECKED_AT])

    def ok_at(self, server: int) -> float:
        return float(self.d[self.geometry.record(server) + L.R_OK_AT])

    def up_at(self, server: int) -> float:
        geo = self.geometry
        return float(self.d[geo.record(server) + geo.up_at]) if geo.up_at >= 0 else 0.0

    def read_record(self, server: int) -> HealthRecord | None:
        """A consistent copy of one record, or None if it stays unreadable
        (:func:`read_locked`)."""
        base = self.geometry.record(server)
        return read_locked(self.q, base + L.R_SEQ, lambda: self._copy(base))

    def write_record(self, server: int, record: HealthRecord) -> None:
        """Publish a record (:func:`write_locked`; only the record's one writer calls
        this); bumps ``health_version`` if the health changed."""
        base = self.geometry.record(server)
        q, d = self.q, self.d
        text = L.encode_text(record.text)
        changed = q[base + L.R_HEALTH] != record.health
        with write_locked(q, base + L.R_SEQ):
            q[base + L.R_HEALTH] = record.health
            q[base + L.R_RISE_COUNT] = record.rise_count
            q[base + L.R_FALL_COUNT] = record.fall_count
            d[base + L.R_CHECKED_AT] = record.checked_at
            d[base + L.R_CHANGED_AT] = record.changed_at
            d[base + L.R_LATENCY] = record.latency
            q[base + L.R_CHECKS] = record.checks
            d[base + L.R_OK_AT] = record.ok_at
            if self.geometry.up_at >= 0:
                d[base + self.geometry.up_at] = record.up_at
            text_at = base * 8 + self.geometry.text_off
            self.raw[text_at : text_at + L.TEXT_BYTES] = text
        if changed:
            q[L.H_HEALTH_VERSION] += 1

    def repair_record(self, server: int) -> bool:
        """Finish a write that its writer died in: rewrite the fields as they stand.

        For the record's writer at its start, when no write of its own can be
        under way; True if the record was left odd and is readable again.
        """
        base = self.geometry.record(server)
        if not self.q[base + L.R_SEQ] & 1:
            return False
        self.write_record(server, self._copy(base))
        return True

    def _copy(self, base: int) -> HealthRecord:
        """The fields of the record at ``base`` as they stand, consistent or not."""
        q, d, geo = self.q, self.d, self.geometry
        text_at = base * 8 + geo.text_off
        return HealthRecord(
            health=q[base + L.R_HEALTH],
            rise_count=q[base + L.R_RISE_COUNT],
            fall_count=q[base + L.R_FALL_COUNT],
            checked_at=d[base + L.R_CHECKED_AT],
            changed_at=d[base + L.R_CHANGED_AT],
            latency=d[base + L.R_LATENCY],
            checks=q[base + L.R_CHECKS],
            ok_at=d[base + L.R_OK_AT],
            up_at=d[base + geo.up_at] if geo.up_at >= 0 else 0.0,
            text=L.decode_text(bytes(self.raw[text_at : text_at + L.TEXT_BYTES])),
        )

    def observe_latency(self, server: int, seconds: float) -> None:
        """Count one check's latency in the server's histogram (writer: the prober)."""
        base = self.geometry.histogram(server)
        bucket = next(
            (i for i, bound in enumerate(L.LATENCY_BUCKETS) if seconds <= bound),
            len(L.LATENCY_BUCKETS),
        )
        self.q[base + bucket] += 1
        self.d[base + len(L.LATENCY_BUCKETS) + 1] += seconds

    def latency_histogram(self, server: int) -> tuple[list[int], float]:
        """Counts per bucket (the last is +Inf) and the sum of latencies."""
        base = self.geometry.histogram(server)
        n = len(L.LATENCY_BUCKETS) + 1
        return [self.q[base + i] for i in range(n)], float(self.d[base + n])

    def bump_health_version(self) -> None:
        """Make workers recompute eligibility though no health changed."""
        self.q[L.H_HEALTH_VERSION] += 1

    # -- admin states (writer: the supervisor) -------------------------------

    def admin(self, server: int) -> int:
        return int(self.q[self.geometry.admin_off + server])

    def ready_at(self, server: int) -> float:
        """When the server last went back to ``ready`` from drain or maint (0: never)."""
        at = self.geometry.admin_at_off
        return float(self.d[at + server]) if at >= 0 else 0.0

    def set_admin(self, server: int, state: int, ready_at: float | None = None) -> None:
        """Set an admin state; going back to ``ready`` records when, unless ``ready_at``
        says (a reload carries it over)."""
        geo, q = self.geometry, self.q
        if ready_at is None and state == L.READY and q[geo.admin_off + server] != L.READY:
            ready_at = time.monotonic()
        if ready_at is not None and geo.admin_at_off >= 0:
            self.d[geo.admin_at_off + server] = ready_at  # first: see lb.pool.layout
        q[geo.admin_off + server] = state
        q[L.H_ADMIN_VERSION] += 1

    # -- spare servers (writers: see lb.pool.servers) --------------------------

    def spare(self, server: int) -> Spare | None:
        """The server in spare slot ``server`` (a server index), or None if the slot is
        free, is not a spare slot, or stays mid-write (its writer died in it)."""
        geo = self.geometry
        slot = server - self.first_spare
        if not 0 <= slot < geo.nspare:
            return None
        base = geo.spare_off + L.SPARE_HEADER_WORDS + slot * L.SPARE_WORDS
        spare = read_locked(self.q, base + L.D_SEQ, lambda: self._spare_copy(server, base))
        return spare if spare is not None and spare.used else None

    def _spare_copy(self, server: int, base: int) -> Spare:
        return copy_spare(self.q, self.d, self.raw, server, base)

    def spare_versions(self) -> tuple[int, int]:
        """The words the spare slots' writers bump after a change (0, 0: no region)."""
        off = self.geometry.spare_off
        return (self.q[off + L.P_API_VERSION], self.q[off + L.P_DNS_VERSION]) if off else (0, 0)

    def checked_epoch(self, server: int) -> int:
        """The epoch of the spare server its health record is about (writer: the prober)."""
        geo = self.geometry
        at = geo.spare_off + L.SPARE_HEADER_WORDS + geo.nspare * L.SPARE_WORDS
        return int(self.q[at + server - self.first_spare])

    def backends(self) -> list[dict[str, Any]]:
        """The names table's backends with the servers in their spare slots now: each
        server as ``{"name", "address", "index", "source"}``; a spare one also has its
        ``weight`` and ``epoch``."""
        backends = []
        for backend in self.names["backends"]:
            servers = [{**s, "source": "config"} for s in backend["servers"]]
            for kind in ("api_slots", "dns_slots"):
                first, count = backend.get(kind, (0, 0))
                for index in range(first, first + count):
                    spare = self.spare(index)
                    if spare is not None:
                        servers.append(spare.entry())
            backends.append({**backend, "servers": servers})
        return backends

    # -- the carried block (writer: the supervisor) ------------------------------

    def folds(self) -> int:
        """How many finished generations the carried block holds (for its writer)."""
        return int(self.q[self.geometry.carried_off + L.K_FOLDS])

    def read_carried(self) -> list[int] | None:
        """One consistent copy of the carried block, or None if it stays mid-write
        (its writer died in it), after the same bounded patience as a health record."""
        base, size = self.geometry.carried_off, self.geometry.carried_words
        block = self.q[base : base + size]  # a view: each tolist() reads the words anew
        return read_locked(self.q, base + L.K_SEQ, block.tolist)

    def carry_from(self, previous: Pool) -> None:
        """Start this new pool's carried block from ``previous``'s, by names, before
        anyone can take this pool for the current one (it is not published yet)."""
        geo, old_geo = self.geometry, previous.geometry
        old = previous._carried()
        words = [0] * geo.carried_words
        words[L.K_FOLDS] = old[L.K_FOLDS]
        for src, dst in _pairs(previous, self):
            words[dst] = old[src]
        for slot in range(min(geo.nslots, old_geo.nslots)):
            words[geo.accepted_at(slot)] = old[old_geo.accepted_at(slot)]
        self._write_carried(words)

    def fold(self, finished: Pool, number: int) -> None:
        """Add the final slots of a finished generation to the carried block, by names;
        ``number`` (the fold's) becomes its ``K_FOLDS``.  Active counts are not added:
        a finished generation has nothing open, whatever its slots last said."""
        geo = self.geometry
        words, fq = self._carried(), finished.q
        pairs = _pairs(finished, self)
        for slot in range(finished.geometry.nslots):
            base = finished.geometry.slot(slot)
            for src, dst in pairs:
                words[dst] += fq[base + src]
            if slot < geo.nslots:
                words[geo.accepted_at(slot)] += fq[base + L.S_ACCEPTED]
        words[L.K_FOLDS] = number
        self._write_carried(words)

    def _carried(self) -> list[int]:
        """The carried block as it stands: for its one writer, who needs no lock to read."""
        base = self.geometry.carried_off
        return self.q[base : base + self.geometry.carried_words].tolist()

    def _write_carried(self, words: list[int]) -> None:
        """Store the whole block under its sequence lock."""
        base, q = self.geometry.carried_off, self.q
        with write_locked(q, base + L.K_SEQ):
            q[base + 1 : base + len(words)] = array("Q", words[1:])

    # -- reading the workers' slots ------------------------------------------

    def server_active(self, server: int) -> int:
        """Active connections to a server, summed over every worker slot."""
        q, geo = self.q, self.geometry
        return sum(q[geo.counter(slot, server) + L.C_ACTIVE] for slot in range(geo.nslots))

    def suspect_since(self, server: int) -> float:
        """The latest time any worker marked the server suspect (0: never)."""
        d, geo = self.d, self.geometry
        return max(
            (d[geo.counter(slot, server) + L.C_SUSPECT_AT] for slot in range(geo.nslots)),
            default=0.0,
        )


def fold(finished: Pool, into: Iterable[Pool]) -> None:
    """Put a finished generation's totals in the carried blocks of ``into`` (the pools
    the supervisor keeps), before its pool file is unlinked.

    The mark comes first, then the blocks (see :mod:`lb.pool.layout`).  Called again
    for the same pool (a step that raised half-way), it skips the blocks that hold it.
    """
    targets = list(into)
    number = finished.q[L.H_FOLDED] or 1 + max((p.folds() for p in targets), default=0)
    finished.q[L.H_FOLDED] = number
    for pool in targets:
        if pool.folds() < number:
            pool.fold(finished, number)


class Totals:
    """What the instance has counted, by the current pool's names: the current pool's
    carried block (generations that have finished) plus the slots of every pool still
    running (the current one and older ones draining); see :mod:`lb.pool.layout`.

    ``others`` must have been opened before ``current``: a pool unlinked after that
    is still mapped here, and one unlinked before is in ``current``'s carried block.
    """

    __slots__ = ("accepted", "pool", "running", "words")

    def __init__(self, current: Pool, others: Iterable[Pool]) -> None:
        carried = current.read_carried()
        if carried is None:
            raise LBError(CARRIED_UNREADABLE)
        geo = current.geometry
        folds = carried[L.K_FOLDS]
        self.pool = current
        # Laid out like a slot of the current pool: counters only, active ones included.
        self.words = carried[: geo.slot_words]
        self.accepted = carried[geo.slot_words :]  # carried, by slot of the current pool
        # Loaded after the copy, so a pool the copy holds is always seen marked.
        self.running = [p for p in (current, *others) if not 0 < p.q[L.H_FOLDED] <= folds]
        words = self.words
        for pool in self.running:
            pairs = _pairs(pool, current, active=True)
            q, pool_geo = pool.q, pool.geometry
            for slot in range(pool_geo.nslots):
                base = pool_geo.slot(slot)
                for src, dst in pairs:
                    words[dst] += q[base + src]

    def slot_accepted(self, pool: Pool) -> list[int]:
        """What each slot of ``pool`` accepted in the generations that have finished, from
        ``pool``'s own carried block: a worker goes on from it, and keeps it when a reload
        makes its generation an older one (a worker's count never falls)."""
        if pool is self.pool:
            return self.accepted
        carried = pool.read_carried()
        if carried is None:
            raise LBError(CARRIED_UNREADABLE)
        return carried[pool.geometry.slot_words :]

    def server(self, index: int) -> dict[str, int]:
        at = self.pool.geometry.server_at(index)
        return {name: self.words[at + word] for name, word in L.SERVER_COUNTERS}

    def listener(self, index: int) -> dict[str, int]:
        at = self.pool.geometry.listener_at(index)
        return {name: self.words[at + word] for name, word in L.LISTENER_COUNTERS}

    def answers(self) -> dict[int, int]:
        """The balancer's own answers by status, in order (those counted as "other" left
        out)."""
        return {
            status: self.words[L.S_ANSWERS + i]
            for i, status in sorted(enumerate(L.ANSWER_STATUSES), key=lambda pair: pair[1])
            if status
        }


def counter_keys(pool: Pool) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """The pool's servers by (backend, server name) and its listeners by name: the names
    totals follow across generations.

    Not a server's address: the metrics name a server by backend and name, and a
    counter of one name must never fall, so a server a reload moves to another
    address keeps its totals (its health, which is the address's, starts over).
    """
    servers = {
        (backend["name"], server["name"]): int(server["index"])
        for backend in pool.backends()
        for server in backend["servers"]
    }
    listeners = {listener["name"]: i for i, listener in enumerate(pool.names["listeners"])}
    return servers, listeners


def _pairs(src: Pool, dst: Pool, *, active: bool = False) -> list[tuple[int, int]]:
    """(word in a slot of ``src``, word in a slot of ``dst``) for the answers and the
    counters of every server and listener both name: the totals, and the active
    counts too if ``active`` (a reader's sum, never a carried block)."""
    src_servers, src_listeners = counter_keys(src)
    dst_servers, dst_listeners = counter_keys(dst)
    server_words = (L.C_ACTIVE, *L.SERVER_TOTALS) if active else L.SERVER_TOTALS
    listener_words = (L.C_ACTIVE, *L.LISTENER_TOTALS) if active else L.LISTENER_TOTALS
    sgeo, dgeo = src.geometry, dst.geometry
    pairs = [(at, at) for at in range(L.S_ANSWERS, L.S_ANSWERS + len(L.ANSWER_STATUSES))]
    for key, index in src_servers.items():
        if key in dst_servers:
            s, d = sgeo.server_at(index), dgeo.server_at(dst_servers[key])
            pairs += [(s + word, d + word) for word in server_words]
    for name, index in src_listeners.items():
        if name in dst_listeners:
            s, d = sgeo.listener_at(index), dgeo.listener_at(dst_listeners[name])
            pairs += [(s + word, d + word) for word in listener_words]
    return pairs


def names_table(config: Config, generation: int) -> dict[str, Any]:
    """What the pool's indexes mean, stored in the pool so readers need no config."""
    index = 0
    backends = []
    for backend in config.backends:
        servers = []
        for server in backend.servers:
            servers.append({"name": server.name, "address": str(server.address), "index": index})
            index += 1
        backends.append(
            {"name": backend.name, "checked": backend.health is not None, "servers": servers}
        )
    for entry, backend in zip(backends, config.backends, strict=True):  # spare slots last
        for kind, count in (("api_slots", backend.spare_servers), ("dns_slots", backend.dns_slots)):
            entry[kind] = [index, count]
            index += count
    return {
        "generation": generation,
        "listeners": [
            {
                "name": lc.name,
                "bind": str(lc.bind),
                "mode": lc.mode,
                # how a terminating listener's bytes move (lb.tls)
                **({} if lc.tls is None else {"tls": data_path()[0]}),
            }
            for lc in config.listeners
        ],
        "backends": backends,
        "nservers": index,
    }


def create_pool(path: str, config: Config, generation: int, nslots: int) -> Pool:
    names = names_table(config, generation)
    tables = sum(1 for lc in config.listeners if lc.limits_clients)
    nspare = sum(b.spare_servers + b.dns_slots for b in config.backends)
    return Pool.create(path, names, names["nservers"], nslots, tables, nspare=nspare)
