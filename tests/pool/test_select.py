"""Server choice: eligibility from the live pool and the balancing algorithms."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from lb.config import parse_config
from lb.pool import layout as L
from lb.pool.select import (
    HASH_CACHE_KEY_LEN,
    HASH_CACHE_KEYS,
    BackendPicker,
    Balancer,
    Hash,
    LeastConn,
    Random2,
    RoundRobin,
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
    balancer.rebuild([0, 1, 2], {})
    geo = pool.geometry
    pool.q[geo.counter(0, 0) + L.C_ACTIVE] = 3
    pool.q[geo.counter(1, 1) + L.C_ACTIVE] = 1
    assert balancer.pick("c", lambda s: True) == 2


def test_random2_never_picks_the_busier_of_two(pool: Pool) -> None:
    balancer = Random2({0: 1, 1: 1}, pool)
    balancer.rebuild([0, 1], {})
    pool.q[pool.geometry.counter(0, 0) + L.C_ACTIVE] = 10
    picks = Counter(balancer.pick("c", lambda s: True) for _ in range(200))
    assert picks[1] > picks[0]


# --- hashing --------------------------------------------------------------------------

NAMES = {0: "s0", 1: "s1", 2: "s2"}
KEYS = [f"session-{i}".encode() for i in range(10_000)]


def hashing(pool: Pool, weights: dict[int, int], factor: int = 0) -> Hash:
    balancer = Hash(weights, NAMES, pool, factor)
    balancer.rebuild(sorted(weights), {})
    return balancer


def shares(balancer: Balancer, keys: list[bytes] | list[str]) -> dict[int, float]:
    """Each server's share of the keys, in percent."""
    counts = Counter(balancer.pick(key, None) for key in keys)
    return {server: 100 * n / len(keys) for server, n in counts.items() if server is not None}


def test_hash_spreads_keys_evenly_over_equal_servers(pool: Pool) -> None:
    found = shares(hashing(pool, {0: 1, 1: 1, 2: 1}), KEYS)
    assert all(abs(share - 100 / 3) <= 2 for share in found.values()), found
    assert len(found) == 3


def test_source_spreads_client_addresses_evenly(pool: Pool) -> None:
    """The client address is hashed as well as any key: no server gets half the clients."""
    addresses = [f"10.{i // 250 % 250}.{i % 250}.{i // 62500 + 1}" for i in range(10_000)]
    found = shares(hashing(pool, {0: 1, 1: 1, 2: 1}), addresses)
    assert all(abs(share - 100 / 3) <= 2 for share in found.values()), found


def test_hash_shares_follow_the_weights(pool: Pool) -> None:
    found = shares(hashing(pool, {0: 1, 1: 2, 2: 3}), KEYS)
    assert abs(found[0] - 100 / 6) <= 2, found
    assert abs(found[1] - 200 / 6) <= 2, found
    assert abs(found[2] - 300 / 6) <= 2, found


def test_a_key_keeps_its_server_and_workers_agree(pool: Pool) -> None:
    """Two workers (two balancers) send a key to the same server, whatever the order in
    which the servers are listed: the server's name is hashed, not its index."""
    first = hashing(pool, {0: 1, 1: 2, 2: 3})
    other = Hash({0: 1, 1: 2, 2: 3}, NAMES, pool)
    other.rebuild([2, 0, 1], {})
    assert [first.pick(key, None) for key in KEYS[:500]] == [
        other.pick(key, None) for key in KEYS[:500]
    ]
    assert [first.pick(key, None) for key in KEYS[:500]] == [
        first.pick(key, None) for key in KEYS[:500]
    ]


@pytest.mark.parametrize("weights", [{0: 1, 1: 1, 2: 1}, {0: 1, 1: 2, 2: 3}])
def test_removing_a_server_moves_only_its_keys(pool: Pool, weights: dict[int, int]) -> None:
    balancer = hashing(pool, weights)
    before = {key: balancer.pick(key, None) for key in KEYS}
    balancer.rebuild([0, 2], {})
    after = {key: balancer.pick(key, None) for key in KEYS}
    moved = {key for key in KEYS if after[key] != before[key]}
    assert moved == {key for key in KEYS if before[key] == 1}
    assert {after[key] for key in moved} == {0, 2}  # spread over the others, not piled on one
    balancer.rebuild([0, 1, 2], {})
    assert {key: balancer.pick(key, None) for key in KEYS} == before  # back: takes them back


def test_servers_out_of_rotation_or_full_are_skipped_in_the_keys_order(pool: Pool) -> None:
    """A key whose server is down, drained, in maint, tried or at its maxconn goes to the
    server it would go to without that one (its next in the key's order)."""
    balancer = Hash({0: 1, 1: 1, 2: 1}, NAMES, pool)
    p = BackendPicker(pool, [0, 1, 2], balancer, {0: 1}, 5.0)
    keys = [key for key in KEYS[:300] if p.pick(key) == 0]
    without = Hash({0: 1, 1: 1, 2: 1}, NAMES, pool)
    without.rebuild([1, 2], {})
    next_server = {key: without.pick(key, None) for key in keys}

    assert {key: p.pick(key, tried=[0]) for key in keys} == next_server
    pool.q[pool.geometry.counter(1, 0) + L.C_ACTIVE] = 1  # s0 at its maxconn
    assert {key: p.pick(key) for key in keys} == next_server
    pool.q[pool.geometry.counter(1, 0) + L.C_ACTIVE] = 0
    for state in (L.DRAIN, L.MAINT):
        pool.set_admin(0, state)
        assert {key: p.pick(key) for key in keys} == next_server
    pool.set_admin(0, L.READY)
    pool.write_record(0, HealthRecord(L.DOWN, 0, 3, time.monotonic(), time.time(), 0, 3, "x"))
    assert {key: p.pick(key) for key in keys} == next_server


def skewed_keys(n: int) -> list[bytes]:
    """Half the connections carry one hot key, a quarter another, the rest their own."""
    return [
        b"hot" if i % 2 == 0 else b"warm" if i % 4 == 1 else f"cold-{i}".encode() for i in range(n)
    ]


def open_connections(pool: Pool, balancer: Hash, keys: list[bytes]) -> list[list[int]]:
    """Pick a server for each key in turn, each connection staying open (its worker
    counts it in the pool): the active connections per server after each pick."""
    loads = []
    for key in keys:
        server = balancer.pick(key, None)
        assert server is not None
        pool.q[pool.geometry.counter(0, server) + L.C_ACTIVE] += 1
        loads.append([pool.server_active(s) for s in range(3)])
    return loads


def test_bounded_load_keeps_every_server_within_the_factor_of_the_average(pool: Pool) -> None:
    loads = open_connections(pool, hashing(pool, {0: 1, 1: 1, 2: 1}, factor=150), skewed_keys(600))
    for after in loads:
        assert max(after) <= math.ceil(1.5 * sum(after) / 3), after


def test_without_a_bound_a_hot_key_overloads_its_server(pool: Pool) -> None:
    """What the bound prevents (the same keys, no hash_balance_factor)."""
    loads = open_connections(pool, hashing(pool, {0: 1, 1: 1, 2: 1}), skewed_keys(600))
    assert max(loads[-1]) > math.ceil(1.5 * sum(loads[-1]) / 3), loads[-1]


def test_a_hot_key_spills_to_its_next_server(pool: Pool) -> None:
    balancer = hashing(pool, {0: 1, 1: 1, 2: 1}, factor=150)
    first = balancer.pick(b"hot", None)
    assert first is not None
    second = hashing(pool, {s: 1 for s in range(3) if s != first}).pick(b"hot", None)
    assert second is not None
    loads = open_connections(pool, balancer, [b"hot"] * 3)
    # The second connection would put its server at 2 > 1.5 x 2/3: it goes to the key's
    # next server; the third fits (2 <= 1.5 x 3/3).
    assert [after[first] for after in loads] == [1, 1, 2]
    assert [after[second] for after in loads] == [0, 1, 1]


# --- slow start -----------------------------------------------------------------------

SLOWSTART = 10.0
ALGORITHMS = ["roundrobin", "leastconn", "random2", "hash"]


def balancer_of(kind: str, pool: Pool) -> Balancer:
    weights = {0: 1, 1: 1, 2: 1}
    if kind == "leastconn":
        return LeastConn(weights, pool)
    if kind == "random2":
        return Random2(weights, pool)
    if kind == "hash":
        return Hash(weights, NAMES, pool)
    return RoundRobin(weights)


def share_of(pool: Pool, p: BackendPicker, server: int, n: int = 3000) -> float:
    """The server's share of ``n`` new connections (percent), each with its own key and
    staying open, as a worker counts them: leastconn and random2 see them."""
    for s in range(3):
        pool.q[pool.geometry.counter(0, s) + L.C_ACTIVE] = 0
    counts: Counter[int | None] = Counter()
    for i in range(n):
        picked = p.pick(f"client-{i}")
        assert picked is not None
        counts[picked] += 1
        pool.q[pool.geometry.counter(0, picked) + L.C_ACTIVE] += 1
    return 100 * counts[server] / n


def back_since(pool: Pool, how: str, seconds_ago: float) -> None:
    """Server 2 came back into rotation ``seconds_ago``: up after down, or ready after maint."""
    at = time.monotonic() - seconds_ago
    if how == "up":
        pool.write_record(2, HealthRecord(L.DOWN, 0, 3, at, time.time(), 0, 8, "HTTP 500"))
        pool.write_record(2, HealthRecord(L.UP, 2, 0, at, time.time(), 0, 9, "HTTP 200", at, at))
    else:
        pool.set_admin(2, L.MAINT)
        pool.set_admin(2, L.READY, ready_at=at)


@pytest.mark.parametrize("how", ["up", "ready"])
@pytest.mark.parametrize("kind", ALGORITHMS)
def test_a_server_back_in_rotation_ramps_up_to_its_share(pool: Pool, kind: str, how: str) -> None:
    p = BackendPicker(pool, [0, 1, 2], balancer_of(kind, pool), {}, 5.0, SLOWSTART)
    back_since(pool, how, 1.0)  # a tenth into its slow start: 0.05 + 0.95/10 of its weight
    early = share_of(pool, p, 2)
    assert 2 < early < 12, early  # its full share is 33%: 0.145 / 2.145 is 7%
    back_since(pool, how, SLOWSTART / 2)  # half way: 0.525 of its weight, 21%
    assert early + 5 < share_of(pool, p, 2) < 30
    back_since(pool, how, SLOWSTART + 0.1)
    assert abs(share_of(pool, p, 2) - 100 / 3) < 3


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_no_slow_start_by_default(pool: Pool, kind: str) -> None:
    p = BackendPicker(pool, [0, 1, 2], balancer_of(kind, pool), {}, 5.0)  # slowstart = 0
    back_since(pool, "ready", 1.0)
    assert abs(share_of(pool, p, 2) - 100 / 3) < 3


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_no_slow_start_for_a_server_never_out_of_rotation(pool: Pool, kind: str) -> None:
    p = BackendPicker(pool, [0, 1, 2], balancer_of(kind, pool), {}, 5.0, SLOWSTART)
    now = time.monotonic()  # its first check, as at start: unchecked -> up, never down
    pool.write_record(2, HealthRecord(L.UP, 1, 0, now, time.time(), 0, 1, "HTTP 200", now))
    assert abs(share_of(pool, p, 2) - 100 / 3) < 3


def test_the_clock_is_read_only_while_a_server_ramps(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[float] = []

    def monotonic() -> float:
        reads.append(now := time.perf_counter())
        return now

    monkeypatch.setattr("lb.pool.select.time", SimpleNamespace(monotonic=monotonic))
    p = BackendPicker(pool, [0, 1, 2], RoundRobin({0: 1, 1: 1, 2: 1}), {}, 5.0, SLOWSTART)
    p.pick("c")
    before = len(reads)
    for _ in range(100):
        p.pick("c")
    assert len(reads) == before  # nothing ramps: no clock
    pool.set_admin(2, L.MAINT)
    pool.set_admin(2, L.READY, ready_at=time.perf_counter())
    for _ in range(100):
        p.pick("c")
    assert len(reads) >= before + 100  # ramping: its step may be due at any pick
    pool.set_admin(2, L.READY, ready_at=time.perf_counter() - SLOWSTART)
    p.pick("c")
    before = len(reads)
    for _ in range(100):
        p.pick("c")
    assert len(reads) == before  # the ramp is over


def test_remembered_keys_stay_bounded_and_answers_stay_the_same(pool: Pool) -> None:
    """Clients choose their keys: however many and however long, the memory a balancer
    keeps for them is bounded, and every key still gets its own server."""
    balancer = hashing(pool, {0: 1, 1: 2, 2: 3})
    fresh = hashing(pool, {0: 1, 1: 2, 2: 3})
    keys = [*KEYS, *(b"x" * 5000 + key for key in KEYS[:100])]
    assert [balancer.pick(key, None) for key in keys] == [fresh.pick(key, None) for key in keys]
    assert [balancer.pick(key, None) for key in keys] == [fresh.pick(key, None) for key in keys]
    remembered = balancer._cache  # what the bound is about
    assert 0 < len(remembered) <= HASH_CACHE_KEYS
    assert all(len(key) <= HASH_CACHE_KEY_LEN for key in remembered)
