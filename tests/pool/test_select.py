"""Server choice: eligibility from the live pool and the balancing algorithms."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.config import parse_config
from lb.pool import layout as L
from lb.pool.select import (
    BackendPicker,
    LeastConn,
    Random2,
    RoundRobin,
    Source,
    smooth_sequence,
)
from lb.pool.shm import HealthRecord, Pool, create_pool

CONFIG = {
    "global": {"workers": 2},
    "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
    "backends": [
        {
            "name": "app",
            "servers": [{"name": f"s{i}", "address": f"127.0.0.1:{9000 + i}"} for i in range(3)],
        }
    ],
}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = create_pool(str(tmp_path / "pool"), parse_config(CONFIG), 1, nslots=2)
    yield p
    p.close()


def picker(pool: Pool, maxconn: dict[int, int] | None = None) -> BackendPicker:
    return BackendPicker(pool, [0, 1, 2], RoundRobin({0: 1, 1: 1, 2: 1}), maxconn or {}, 5.0)


def test_smooth_sequence_honours_weights_and_interleaves() -> None:
    order = smooth_sequence([0, 1, 2], {0: 5, 1: 1, 2: 1})
    assert Counter(order) == {0: 5, 1: 1, 2: 1}
    assert order[:3] != [0, 0, 0]  # smooth: the heavy server does not take a burst


def test_round_robin_cycles_through_every_server(pool: Pool) -> None:
    p = picker(pool)
    assert [p.pick("c") for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_down_and_admin_states_leave_rotation(pool: Pool) -> None:
    p = picker(pool)
    pool.write_record(1, HealthRecord(L.DOWN, 0, 3, time.monotonic(), time.time(), 0.1, 3, "x"))
    pool.set_admin(2, L.MAINT)
    assert {p.pick("c") for _ in range(5)} == {0}
    pool.set_admin(0, L.DRAIN)
    assert p.pick("c") is None
    pool.set_admin(2, L.READY)
    assert p.pick("c") == 2


def test_suspect_server_is_avoided_until_a_check_succeeds(pool: Pool) -> None:
    p = picker(pool)
    geo = pool.geometry
    pool.d[geo.counter(1, 0) + L.C_SUSPECT_AT] = time.monotonic()  # worker slot 1 marks s0
    pool.q[geo.slot(1) + L.S_SUSPECT_VERSION] += 1
    assert 0 not in {p.pick("c") for _ in range(6)}
    failed = HealthRecord(L.UP, 0, 1, time.monotonic(), 0, 0.01, 1, "connection refused")
    pool.write_record(0, failed)
    pool.bump_health_version()
    assert 0 not in {p.pick("c") for _ in range(6)}  # a failed check settles nothing
    now = time.monotonic()
    pool.write_record(0, HealthRecord(L.UP, 1, 0, now, 0, 0.01, 2, "HTTP 200", ok_at=now))
    pool.bump_health_version()
    assert 0 in {p.pick("c") for _ in range(6)}


def test_suspect_mark_expires_after_its_hold(pool: Pool) -> None:
    p = BackendPicker(pool, [0, 1, 2], RoundRobin({0: 1, 1: 1, 2: 1}), {}, 0.2)
    geo = pool.geometry
    pool.d[geo.counter(0, 2) + L.C_SUSPECT_AT] = time.monotonic()
    pool.q[geo.slot(0) + L.S_SUSPECT_VERSION] += 1
    assert 2 not in {p.pick("c") for _ in range(6)}
    time.sleep(0.25)
    assert 2 in {p.pick("c") for _ in range(6)}


def test_tried_servers_and_full_servers_are_skipped(pool: Pool) -> None:
    p = picker(pool, maxconn={1: 1})
    pool.q[pool.geometry.counter(0, 1) + L.C_ACTIVE] = 1  # s1 is at its cap
    assert p.pick("c", tried=[0]) == 2
    assert p.pick("c", tried=[0, 2]) is None


def test_leastconn_prefers_the_least_loaded(pool: Pool) -> None:
    balancer = LeastConn({0: 1, 1: 1, 2: 1}, pool)
    balancer.rebuild([0, 1, 2])
    geo = pool.geometry
    pool.q[geo.counter(0, 0) + L.C_ACTIVE] = 3
    pool.q[geo.counter(1, 1) + L.C_ACTIVE] = 1
    assert balancer.pick("c", lambda s: True) == 2


def test_random2_never_picks_the_busier_of_two(pool: Pool) -> None:
    balancer = Random2({0: 1, 1: 1}, pool)
    balancer.rebuild([0, 1])
    pool.q[pool.geometry.counter(0, 0) + L.C_ACTIVE] = 10
    picks = Counter(balancer.pick("c", lambda s: True) for _ in range(200))
    assert picks[1] > picks[0]


def test_source_keeps_a_client_on_its_server() -> None:
    balancer = Source({0: 1, 1: 1, 2: 1}, {0: "a", 1: "b", 2: "c"})
    balancer.rebuild([0, 1, 2])
    first = {f"10.0.0.{i}": balancer.pick(f"10.0.0.{i}", lambda s: True) for i in range(50)}
    assert len(set(first.values())) == 3
    again = {c: balancer.pick(c, lambda s: True) for c in first}
    assert again == first
    balancer.rebuild([0, 2])
    moved = {c for c in first if balancer.pick(c, lambda s: True) != first[c]}
    assert moved == {c for c in first if first[c] == 1}  # only the lost server's clients move
