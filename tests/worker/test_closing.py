"""lb.worker.closing: closes at chosen times, spread; max tunnel age; servers that leave."""

from __future__ import annotations

import gc
import random
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.config import parse_config
from lb.pool import layout as L
from lb.pool.shm import HealthRecord, Pool, create_pool
from lb.worker.closing import AGE_JITTER, Closer, Departures, MaxAge
from lb.worker.loop import Loop

GRID = 0.01


class Conn:
    """A connection as the closer sees it; counts how often it is looked at."""

    def __init__(self, server: int = -1, raises: bool = False) -> None:
        self.server = server
        self.raises = raises
        self._finished = False
        self.looked_at = 0
        self.closed_at: float | None = None
        self.reasons: list[str] = []
        self.failed: BaseException | None = None

    @property
    def finished(self) -> bool:
        self.looked_at += 1
        return self._finished

    def abort(self, reason: str) -> None:
        self.reasons.append(reason)
        if self.raises:
            raise RuntimeError("abort failed")
        self._finished = True
        self.closed_at = time.monotonic()

    def fail(self, exc: BaseException) -> None:
        self.failed = exc
        self._finished = True


@pytest.fixture
def errors() -> list[BaseException]:
    return []


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop(on_error=lambda exc: None)
    watchdog = loop.call_later(10, loop.stop)  # a broken test ends instead of hanging
    yield loop
    watchdog.cancel()
    loop.shutdown()


@pytest.fixture
def closer(loop: Loop, errors: list[BaseException]) -> Closer:
    return Closer(loop, errors.append, grid=GRID, rng=random.Random(7))


def times(closer: Closer) -> dict[Conn, float]:
    """The close time each connection has now."""
    return {entry[2]: entry[0] for entry in closer.heap if entry[2] is not None}


def run_until_closed(loop: Loop, conns: list[Conn], timeout: float) -> None:
    def check() -> None:
        if all(c.reasons for c in conns):
            loop.stop()
        else:
            loop.call_later(GRID / 2, check)

    loop.call_later(0, check)
    stop = loop.call_later(timeout, loop.stop)
    loop.run()
    stop.cancel()


def test_spread_gives_each_connection_one_slice_of_the_window(closer: Closer) -> None:
    conns = [Conn() for _ in range(1000)]
    closer.spread(conns, 100.0, 104.0, "worker stopped")
    when = times(closer)
    assert len(when) == len(closer) == 1000
    slices = sorted(int((when[c] - 100.0) / 0.004) for c in conns)
    assert slices == list(range(1000))  # one in each 4 ms slice: none clumps
    # ... and which connection gets which slice is random, not the order given.
    by_time = sorted(conns, key=when.__getitem__)
    assert by_time != conns


def test_a_connection_in_a_spread_is_at_a_uniformly_random_time(loop: Loop) -> None:
    """Each connection's own time is uniform over the window (the slices are not given
    in order): the first connection's slice, over many spreads, is any of them."""
    counts = [0] * 4
    rng = random.Random(11)
    for _ in range(4000):
        closer = Closer(loop, lambda exc: None, rng=rng)
        first, *rest = [Conn() for _ in range(4)]
        closer.spread([first, *rest], 0.0, 4.0, "x")
        counts[int(times(closer)[first])] += 1
    assert all(900 < count < 1100 for count in counts), counts


def test_spread_closes_every_connection_within_the_window_with_its_reason(
    loop: Loop, closer: Closer, errors: list[BaseException]
) -> None:
    conns = [Conn() for _ in range(50)]
    start = time.monotonic() + 0.1
    closer.spread(conns, start, start + 0.4, "worker stopped")
    run_until_closed(loop, conns, 5)
    closed = sorted(c.closed_at or 0 for c in conns)
    assert all(c.reasons == ["worker stopped"] for c in conns)
    assert start <= closed[0] and closed[-1] <= start + 0.4 + GRID + 0.1
    assert closed[-1] - closed[0] > 0.3  # over the window, not at one instant
    assert len(closer) == 0 and not closer.heap and not errors


def test_the_earlier_time_wins(loop: Loop, closer: Closer) -> None:
    conn = Conn()
    now = time.monotonic()
    closer.at(conn, now + 5, "later")
    closer.at(conn, now + 0.05, "sooner")
    closer.at(conn, now + 3, "later again")
    assert len(closer) == 1
    run_until_closed(loop, [conn], 2)
    assert conn.reasons == ["sooner"]
    assert conn.closed_at is not None and conn.closed_at - now < 1


def test_a_connection_that_ended_is_skipped(loop: Loop, closer: Closer) -> None:
    ended, other = Conn(), Conn()
    now = time.monotonic()
    closer.at(ended, now + 0.02, "x")
    closer.at(other, now + 0.04, "x")
    ended._finished = True  # ended on its own, without telling the closer
    run_until_closed(loop, [other], 2)
    assert ended.reasons == [] and other.reasons == ["x"]
    closer.at(ended, now, "x")  # already ended: nothing to set
    assert len(closer) == 0


def test_a_failing_close_does_not_stop_the_others(
    loop: Loop, closer: Closer, errors: list[BaseException]
) -> None:
    conns = [Conn(raises=i == 3) for i in range(8)]
    now = time.monotonic()
    for conn in conns:
        closer.at(conn, now + 0.02, "x")  # all in one tick
    run_until_closed(loop, conns, 2)
    assert all(c.reasons == ["x"] for c in conns)
    assert isinstance(conns[3].failed, RuntimeError) and conns[3].finished
    assert [str(e) for e in errors] == ["abort failed"]
    later = Conn()  # and the closer still closes on time afterwards
    closer.at(later, time.monotonic() + 0.02, "y")
    run_until_closed(loop, [later], 2)
    assert later.reasons == ["y"]


def test_a_tick_looks_only_at_the_closes_that_are_due(loop: Loop, closer: Closer) -> None:
    far = [Conn() for _ in range(10_000)]
    now = time.monotonic()
    for conn in far:
        closer.at(conn, now + 3600, "max tunnel age 3600 s")
    near = [Conn() for _ in range(5)]
    for conn in near:
        closer.at(conn, now + 0.02, "x")
    for conn in far:
        conn.looked_at = 0
    run_until_closed(loop, near, 2)
    assert sum(c.looked_at for c in far) == 0
    assert len(closer) == 10_000


def test_forgotten_connections_are_let_go_and_the_heap_sheds_their_entries(
    closer: Closer,
) -> None:
    now = time.monotonic()
    kept = [Conn() for _ in range(100)]
    for conn in kept:
        closer.at(conn, now + 3600, "x")
    gone = [Conn() for _ in range(10_000)]
    refs = [weakref.ref(conn) for conn in gone]
    for conn in gone:
        closer.at(conn, now + 3600, "x")
        closer.forget(conn)  # a tunnel that ended long before its max age
    del gone, conn
    gc.collect()
    assert all(ref() is None for ref in refs)  # nothing keeps a closed connection alive
    assert len(closer) == 100
    assert len(closer.heap) <= 2 * 100 + 2 * 64  # voided entries do not pile up
    assert set(times(closer)) == set(kept)


def test_max_age_sets_a_close_within_ten_percent_of_it(closer: Closer) -> None:
    ages = MaxAge(closer, {1: 60.0})
    conns = [Conn() for _ in range(200)]
    for conn in conns:
        ages.opened(conn, 1, 1000.0)
    other = Conn()
    ages.opened(other, 0, 1000.0)  # its listener has no max age
    when = times(closer)
    assert other not in when
    assert all(
        1000 + 60 * (1 - AGE_JITTER) <= when[c] <= 1000 + 60 * (1 + AGE_JITTER) for c in conns
    )
    assert max(when.values()) - min(when.values()) > 60 * AGE_JITTER  # not all at once
    assert {entry[3] for entry in closer.heap} == {"max tunnel age 60 s"}
    ages.closed(conns[0])
    assert conns[0] not in times(closer) and len(closer) == 199


# -- servers that leave -----------------------------------------------------------------

POOL_CONFIG = {
    "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "a"}],
    "backends": [
        {
            "name": "a",
            "on_server_down": "close",
            "servers": [{"name": f"a{i}", "address": f"127.0.0.1:{9000 + i}"} for i in range(2)],
        },
        {"name": "b", "servers": [{"name": "b0", "address": "127.0.0.1:9100"}]},
    ],
}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = create_pool(str(tmp_path / "pool"), parse_config(POOL_CONFIG), 1, nslots=2)
    yield p
    p.close()


def down(pool: Pool, server: int) -> None:
    pool.write_record(server, HealthRecord(L.DOWN, 0, 3, time.monotonic(), time.time(), 0, 3, "x"))


def test_departures_close_the_tunnels_of_servers_that_leave_and_nothing_else(
    pool: Pool, closer: Closer
) -> None:
    departures = Departures(pool, [0, 1], closer, spread=4.0)  # backend a says "close"
    conns = {server: [Conn(server) for _ in range(20)] for server in (-1, 0, 1, 2)}
    every = [c for group in conns.values() for c in group]
    assert departures.check(every, 100.0) == 0  # all up and ready
    pool.set_admin(2, L.MAINT)  # backend b keeps them
    pool.set_admin(1, L.DRAIN)  # drain keeps them
    assert departures.check(every, 100.0) == 0
    pool.set_admin(0, L.MAINT)
    assert departures.check(every, 100.0) == 20
    when = times(closer)
    assert set(when) == set(conns[0])
    assert all(100.0 <= t <= 104.0 for t in when.values())
    assert {entry[3] for entry in closer.heap} == {"server in maint"}
    assert departures.check(every, 101.0) == 0  # nothing changed since
    down(pool, 0)  # still gone: nothing new
    assert departures.check(every, 101.0) == 0
    down(pool, 1)
    assert departures.check(every, 102.0) == 20
    assert {entry[3] for entry in closer.heap if entry[2] in conns[1]} == {"server down"}
    assert set(times(closer)) == set(conns[0]) | set(conns[1])


def test_a_server_that_comes_back_and_leaves_again_has_its_tunnels_closed_again(
    pool: Pool, closer: Closer
) -> None:
    departures = Departures(pool, [0], closer, spread=1.0)
    first = [Conn(0) for _ in range(5)]
    pool.set_admin(0, L.MAINT)
    assert departures.check(first, 10.0) == 5
    pool.set_admin(0, L.READY)
    assert departures.check(first, 11.0) == 0
    second = [Conn(0) for _ in range(3)]  # opened while it was back
    pool.set_admin(0, L.MAINT)
    assert departures.check(first + second, 12.0) == 8
    when = times(closer)
    assert all(10.0 <= when[c] <= 11.0 for c in first)  # the earlier time stays
    assert all(12.0 <= when[c] <= 13.0 for c in second)


def test_departures_with_no_server_to_watch_read_nothing(pool: Pool, closer: Closer) -> None:
    departures = Departures(pool, [], closer, spread=1.0)
    pool.set_admin(0, L.MAINT)
    assert departures.check([Conn(0)], 1.0) == 0
    assert departures.versions == (-1, -1)
