"""The live pool file: layout round trips, readers never see a torn record, and a
writer that dies mid-write leaves a record readers report instead of waiting on."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from pathlib import Path

from lb.config import parse_config
from lb.pool import layout as L
from lb.pool.shm import HealthRecord, Pool, create_pool

CONFIG = {
    "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
    "backends": [
        {
            "name": "app",
            "servers": [{"name": f"s{i}", "address": f"127.0.0.1:{2000 + i}"} for i in range(4)],
        }
    ],
}
RUN_FOR = 1.5


def record_for(n: int) -> HealthRecord:
    """Every field derived from n, so a reader can tell one write from a mix of two."""
    return HealthRecord(
        health=n % 3,
        rise_count=n,
        fall_count=2 * n,
        checked_at=float(n),
        changed_at=n / 2,
        latency=n / 1000,
        checks=n,
        text=f"result {n} " + "x" * (n % 60),
        ok_at=float(n) + 0.5,
        up_at=float(n) + 0.25,
    )


def consistent(r: HealthRecord) -> bool:
    n = r.checks
    return r == record_for(n)


def writer(path: str, until: float, counts: multiprocessing.Queue[int]) -> None:
    pool = Pool.open(path)
    n = 0
    while time.monotonic() < until:
        n += 1
        for server in range(4):
            pool.write_record(server, record_for(n))
    counts.put(n)
    pool.close()


def reader(path: str, until: float, counts: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    pool = Pool.open(path)
    reads = torn = unreadable = 0
    while time.monotonic() < until:
        for server in range(4):
            reads += 1
            record = pool.read_record(server)
            if record is None:
                unreadable += 1
            elif not consistent(record):
                torn += 1
    counts.put((reads, torn, unreadable))
    pool.close()


def test_readers_in_other_processes_never_see_a_torn_record(tmp_path: Path) -> None:
    path = str(tmp_path / "pool")
    pool = create_pool(path, parse_config(CONFIG), 1, nslots=2)
    for server in range(4):
        pool.write_record(server, record_for(0))
    ctx = multiprocessing.get_context("fork")
    writes: multiprocessing.Queue[int] = ctx.Queue()
    reads: multiprocessing.Queue[tuple[int, int, int]] = ctx.Queue()
    until = time.monotonic() + RUN_FOR
    procs = [ctx.Process(target=writer, args=(path, until, writes))]
    procs += [ctx.Process(target=reader, args=(path, until, reads)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        written = writes.get(timeout=RUN_FOR + 10)
        results = [reads.get(timeout=RUN_FOR + 10) for _ in range(2)]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    assert written > 1000  # the writer really hammered the records
    assert all(torn == 0 for _, torn, _ in results), f"torn reads seen: {results}"
    # A reader gives up only when the writer stalls mid-write past its patience
    # (preempted on a busy machine): rare even against a writer that never rests.
    assert all(unreadable * 100 < n for n, _, unreadable in results), results
    assert sum(n for n, _, _ in results) > 1000
    pool.close()


def test_a_reader_that_skips_the_sequence_lock_does_see_torn_records(tmp_path: Path) -> None:
    """The hazard the sequence lock prevents is real: copying fields without it tears."""
    path = str(tmp_path / "pool")
    pool = create_pool(path, parse_config(CONFIG), 1, nslots=1)
    ctx = multiprocessing.get_context("fork")
    writes: multiprocessing.Queue[int] = ctx.Queue()
    until = time.monotonic() + RUN_FOR
    proc = ctx.Process(target=writer, args=(path, until, writes))
    proc.start()
    base = pool.geometry.record(0)
    torn = 0
    try:
        while time.monotonic() < until and torn == 0:
            q = pool.q
            if q[base + L.R_CHECKS] != q[base + L.R_RISE_COUNT]:  # two fields of one write
                torn += 1
    finally:
        proc.join(RUN_FOR + 5)
    assert torn > 0
    pool.close()


def test_names_table_and_counters_round_trip(tmp_path: Path) -> None:
    pool = create_pool(str(tmp_path / "pool"), parse_config(CONFIG), 7, nslots=3)
    other = Pool.open(str(tmp_path / "pool"))
    assert other.names["generation"] == 7
    assert [s["name"] for s in other.names["backends"][0]["servers"]] == ["s0", "s1", "s2", "s3"]
    pool.q[pool.geometry.counter(2, 3) + L.C_ACTIVE] = 5
    pool.q[pool.geometry.counter(0, 3) + L.C_ACTIVE] = 2
    assert other.server_active(3) == 7
    pool.set_admin(1, L.MAINT)
    assert other.admin(1) == L.MAINT
    other.close()
    pool.close()


class DieOnSecondStore:
    """A pool's word view that lets one store through and SIGKILLs its process at the next."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.stores = 0

    def __getitem__(self, index: int) -> int:
        return int(self.view[index])

    def __setitem__(self, index: int, value: int) -> None:
        if self.stores:
            os.kill(os.getpid(), signal.SIGKILL)
        self.view[index] = value
        self.stores += 1


def die_mid_write(path: str, server: int, record: HealthRecord) -> None:
    """Write ``record`` and die for real after the first store (the sequence's odd one)."""
    pool = Pool.open(path)
    pool.q = DieOnSecondStore(pool.q)  # type: ignore[assignment]
    pool.write_record(server, record)


def timed_read(path: str, server: int, into: multiprocessing.Queue[object]) -> None:
    pool = Pool.open(path)
    began = time.monotonic()
    record = pool.read_record(server)
    into.put((time.monotonic() - began, record))


def read_elsewhere(path: str, server: int) -> tuple[float, HealthRecord | None]:
    """``read_record`` in another process: (seconds it took, what it gave); a hang fails."""
    ctx = multiprocessing.get_context("fork")
    into: multiprocessing.Queue[object] = ctx.Queue()
    proc = ctx.Process(target=timed_read, args=(path, server, into))
    proc.start()
    try:
        took, record = into.get(timeout=10)  # type: ignore[misc]
    except queue.Empty:
        raise AssertionError("read_record did not return within 10 s") from None
    finally:
        proc.kill()
        proc.join(5)
    return took, record


def test_a_writer_killed_mid_write_leaves_a_record_readers_report_not_wait_on(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "pool")
    pool = create_pool(path, parse_config(CONFIG), 1, nslots=1)
    pool.write_record(0, record_for(3))
    ctx = multiprocessing.get_context("fork")
    writer = ctx.Process(target=die_mid_write, args=(path, 0, record_for(4)))
    writer.start()
    writer.join(10)
    assert writer.exitcode == -signal.SIGKILL
    assert pool.q[pool.geometry.record(0) + L.R_SEQ] & 1  # left mid-write

    took, record = read_elsewhere(path, 0)
    assert record is None
    assert took < 1.0
    assert read_elsewhere(path, 1)[1] == HealthRecord(L.UNCHECKED, 0, 0, 0, 0, 0, 0, "")

    pool.write_record(0, record_for(5))  # the next write makes it readable again
    assert read_elsewhere(path, 0)[1] == record_for(5)
    pool.write_record(0, record_for(6))
    assert read_elsewhere(path, 0)[1] == record_for(6)
    pool.close()


def test_repair_rewrites_a_record_left_mid_write_as_it_stood(tmp_path: Path) -> None:
    """What a prober does at its start for the records its predecessor left odd."""
    path = str(tmp_path / "pool")
    pool = create_pool(path, parse_config(CONFIG), 1, nslots=1)
    pool.write_record(2, record_for(8))
    assert not pool.repair_record(2)  # readable: left alone
    writer = multiprocessing.get_context("fork").Process(
        target=die_mid_write, args=(path, 2, record_for(9))
    )
    writer.start()
    writer.join(10)
    assert writer.exitcode == -signal.SIGKILL
    version = pool.q[L.H_HEALTH_VERSION]
    assert pool.repair_record(2)
    assert read_elsewhere(path, 2)[1] == record_for(8)  # died before its first field
    assert pool.q[L.H_HEALTH_VERSION] == version  # no health changed
    pool.close()


def test_a_server_back_to_ready_from_drain_or_maint_records_when(tmp_path: Path) -> None:
    pool = create_pool(str(tmp_path / "pool"), parse_config(CONFIG), 1, nslots=1)
    pool.set_admin(1, L.READY)
    assert pool.ready_at(1) == 0.0  # ready already: never out of rotation
    for state in (L.DRAIN, L.MAINT):
        pool.set_admin(1, state)
        before = time.monotonic()
        pool.set_admin(1, L.READY)
        assert before <= pool.ready_at(1) <= time.monotonic()
        assert pool.admin(1) == L.READY
    pool.set_admin(2, L.READY, ready_at=12.5)  # as a reload carries it
    assert pool.ready_at(2) == 12.5
    assert pool.ready_at(0) == 0.0
    pool.close()
