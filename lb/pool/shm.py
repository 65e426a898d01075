"""The live pool: a file in the runtime dir, mapped with ``mmap`` by every process.

The layout and the one-writer-per-part rule are in :mod:`lb.pool.layout`.  We
map a plain file rather than using ``multiprocessing.shared_memory``: its
resource tracker may unlink a segment when a child exits, and the CLI must be
able to open the pool of a running instance by path.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from lb.errors import LBError
from lb.pool import layout as L

if TYPE_CHECKING:
    from lb.config import Config

# A reader's patience with a record that is being written.  A writer holds a
# record for microseconds, or for a scheduler time slice (milliseconds) if the
# kernel preempts it mid-write; READ_TRIES pauses of READ_PAUSE (10 ms or more
# in all) outlast both, then the reader reports the record unreadable: its
# writer died mid-write.
READ_TRIES = 40
READ_PAUSE = 0.00025  # seconds; a sleep, so a preempted writer on our CPU can finish


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


class Pool:
    """A mapped pool file; see :mod:`lb.pool.layout` for who writes what."""

    def __init__(self, path: str, mm: mmap.mmap) -> None:
        self.path = path
        self._mm = mm
        self.raw = memoryview(mm)
        self.q = self.raw.cast("Q")
        self.d = self.raw.cast("d")
        q = self.q
        if q[L.H_MAGIC] != L.MAGIC or q[L.H_VERSION] != L.LAYOUT_VERSION:
            self.close()
            raise LBError(f"{path}: not a splicelb pool file of this version")
        self.geometry = L.Geometry(
            nservers=q[L.H_NSERVERS],
            nslots=q[L.H_NSLOTS],
            names_len=q[L.H_NAMES_LEN],
            nlisteners=q[L.H_NLISTENERS],
        )
        start = self.geometry.names_off * 8
        self.names: dict[str, Any] = orjson.loads(bytes(self.raw[start : start + q[L.H_NAMES_LEN]]))

    @classmethod
    def create(cls, path: str, names: dict[str, Any], nservers: int, nslots: int) -> Pool:
        """Write a new pool file atomically (temp file, then rename) and map it."""
        blob = orjson.dumps(names)
        nlisteners = len(names.get("listeners", ()))
        geo = L.Geometry(nservers, nslots, len(blob), nlisteners)
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
        for view in (self.q, self.d, self.raw):
            view.release()
        self._mm.close()

    # -- health records (writer: the prober) ---------------------------------

    def health(self, server: int) -> int:
        return int(self.q[self.geometry.record(server) + L.R_HEALTH])

    def checked_at(self, server: int) -> float:
        return float(self.d[self.geometry.record(server) + L.R_CHECKED_AT])

    def ok_at(self, server: int) -> float:
        return float(self.d[self.geometry.record(server) + L.R_OK_AT])

    def read_record(self, server: int) -> HealthRecord | None:
        """A consistent copy of one record, or None if it stays unreadable.

        Sequence lock: the copy counts if the sequence was the same even value
        before and after it.  A record whose sequence stays odd (its writer died
        mid-write) or never settles is reported after ``READ_TRIES`` tries.
        """
        base = self.geometry.record(server)
        q = self.q
        for _ in range(READ_TRIES):
            seq = q[base + L.R_SEQ]
            if not seq & 1:
                record = self._copy(base)
                if q[base + L.R_SEQ] == seq:
                    return record
            time.sleep(READ_PAUSE)
        return None

    def write_record(self, server: int, record: HealthRecord) -> None:
        """Publish a record; bumps ``health_version`` if the health changed.

        Only the record's one writer calls this.  The first store is odd even if
        a writer that died mid-write left the sequence odd, so the last one
        leaves it even, and unlike the even value a reader may have seen before.
        """
        base = self.geometry.record(server)
        q, d = self.q, self.d
        text = L.encode_text(record.text)
        changed = q[base + L.R_HEALTH] != record.health
        seq = (q[base + L.R_SEQ] + 1) | 1
        q[base + L.R_SEQ] = seq  # odd: readers wait
        q[base + L.R_HEALTH] = record.health
        q[base + L.R_RISE_COUNT] = record.rise_count
        q[base + L.R_FALL_COUNT] = record.fall_count
        d[base + L.R_CHECKED_AT] = record.checked_at
        d[base + L.R_CHANGED_AT] = record.changed_at
        d[base + L.R_LATENCY] = record.latency
        q[base + L.R_CHECKS] = record.checks
        d[base + L.R_OK_AT] = record.ok_at
        text_at = base * 8 + L.R_TEXT_OFF
        self.raw[text_at : text_at + L.TEXT_BYTES] = text
        q[base + L.R_SEQ] = seq + 1
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
        q, d = self.q, self.d
        text_at = base * 8 + L.R_TEXT_OFF
        return HealthRecord(
            health=q[base + L.R_HEALTH],
            rise_count=q[base + L.R_RISE_COUNT],
            fall_count=q[base + L.R_FALL_COUNT],
            checked_at=d[base + L.R_CHECKED_AT],
            changed_at=d[base + L.R_CHANGED_AT],
            latency=d[base + L.R_LATENCY],
            checks=q[base + L.R_CHECKS],
            ok_at=d[base + L.R_OK_AT],
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

    def set_admin(self, server: int, state: int) -> None:
        self.q[self.geometry.admin_off + server] = state
        self.q[L.H_ADMIN_VERSION] += 1

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
    return {
        "generation": generation,
        "listeners": [
            {"name": lc.name, "bind": str(lc.bind), "mode": lc.mode} for lc in config.listeners
        ],
        "backends": backends,
        "nservers": index,
    }


def create_pool(path: str, config: Config, generation: int, nslots: int) -> Pool:
    names = names_table(config, generation)
    return Pool.create(path, names, names["nservers"], nslots)
