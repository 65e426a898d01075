"""The client tables: one count per client across workers, a token bucket per client, and
a table that, full, limits nobody it cannot count."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.pool import layout as L
from lb.pool.clients import (
    STALE_AFTER,
    UNCOUNTED,
    ClientTable,
    Refusal,
    client_key,
)
from lb.pool.shm import Pool

NAMES = {"listeners": [{"name": "a"}, {"name": "b"}], "backends": [], "nservers": 0}
NOW = 1000.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    pool = Pool.create(str(tmp_path / "pool"), NAMES, 0, nslots=2, client_tables=2)
    yield pool
    pool.close()


def table(
    pool: Pool,
    slot: int = 0,
    maxconn: int = 0,
    rate: float = 0.0,
    burst: int = 0,
    number: int = 0,
    full: list[int] | None = None,
) -> ClientTable:
    return ClientTable(
        pool, number, slot, maxconn, rate, burst, (full if full is not None else []).append
    )


def test_a_client_is_its_ipv4_address_or_its_ipv6_64() -> None:
    assert client_key("192.0.2.1") != client_key("192.0.2.2")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1")  # dual-stack listener
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("fe80::1%eth0") == client_key("fe80::2")
    keys = {client_key(host) for host in ("::1", "0.0.0.0", "192.0.2.1", "::", "2001:db8::1")}
    assert len(keys) == 4 and 0 not in keys  # "::" and "::1" share ::/64; nothing is empty


def test_open_connections_are_counted_once_across_workers(pool: Pool) -> None:
    first, second = table(pool, 0, maxconn=3), table(pool, 1, maxconn=3)
    tickets = [first.admit("192.0.2.1", NOW), second.admit("192.0.2.1", NOW)]
    tickets.append(first.admit("192.0.2.1", NOW))
    assert all(isinstance(t, int) and t >= 0 for t in tickets)
    for worker in (first, second):
        refusal = worker.admit("192.0.2.1", NOW)
        assert refusal == Refusal("client limit: 3 open connections", 1)
    assert isinstance(second.admit("192.0.2.2", NOW), int)  # another client
    assert first.open_connections("192.0.2.1") == 3
    ticket = tickets.pop(0)
    assert isinstance(ticket, int)
    first.release(ticket)  # one ends, in the first worker: the second may admit one more
    assert isinstance(second.admit("192.0.2.1", NOW), int)
    assert isinstance(first.admit("192.0.2.1", NOW), Refusal)


def test_listeners_count_apart(pool: Pool) -> None:
    a, b = table(pool, maxconn=1, number=0), table(pool, maxconn=1, number=1)
    assert isinstance(a.admit("192.0.2.1", NOW), int)
    assert isinstance(b.admit("192.0.2.1", NOW), int)
    assert isinstance(a.admit("192.0.2.1", NOW), Refusal)


def test_the_rate_is_a_token_bucket_shared_by_the_workers(pool: Pool) -> None:
    first, second = table(pool, 0, rate=2, burst=3), table(pool, 1, rate=2, burst=3)
    # a burst of 3 at once, whichever worker takes them, then one every 0.5 s
    assert [first.admit("192.0.2.1", NOW), second.admit("192.0.2.1", NOW)] == [UNCOUNTED] * 2
    assert first.admit("192.0.2.1", NOW) == UNCOUNTED
    assert second.admit("192.0.2.1", NOW) == Refusal("client rate: 2/s", 1)
    assert first.admit("192.0.2.1", NOW + 0.4) == Refusal("client rate: 2/s", 1)
    assert second.admit("192.0.2.1", NOW + 0.5) == UNCOUNTED
    assert first.admit("192.0.2.1", NOW + 0.6) == Refusal("client rate: 2/s", 1)
    assert second.admit("192.0.2.2", NOW + 0.6) == UNCOUNTED  # another client's bucket
    # after 1.5 s without a connection the bucket is full again: 3 at once
    later = NOW + 0.5 + 1.5
    assert [first.admit("192.0.2.1", later) for _ in range(3)] == [UNCOUNTED] * 3
    assert isinstance(first.admit("192.0.2.1", later), Refusal)


def test_retry_after_is_when_a_token_is_back_rounded_up(pool: Pool) -> None:
    slow = table(pool, rate=0.1, burst=2)  # a token every 10 s
    assert slow.admit("192.0.2.1", NOW) == slow.admit("192.0.2.1", NOW) == UNCOUNTED
    assert slow.admit("192.0.2.1", NOW + 2.5) == Refusal("client rate: 0.1/s", 8)
    assert slow.admit("192.0.2.1", NOW + 10) == UNCOUNTED


def test_a_connection_refused_for_its_rate_is_not_counted_open(pool: Pool) -> None:
    both = table(pool, maxconn=2, rate=1, burst=1)
    assert isinstance(both.admit("192.0.2.1", NOW), int)
    assert isinstance(both.admit("192.0.2.1", NOW), Refusal)
    assert both.open_connections("192.0.2.1") == 1
    assert isinstance(both.admit("192.0.2.1", NOW + 1), int)
    assert both.admit("192.0.2.1", NOW + 2) == Refusal("client limit: 2 open connections", 1)


def test_an_adopted_tunnel_counts_even_over_the_limit(pool: Pool) -> None:
    worker = table(pool, maxconn=1, rate=1, burst=1)
    assert isinstance(worker.admit("192.0.2.1", NOW), int)
    ticket = worker.adopt("192.0.2.1")
    assert ticket >= 0 and worker.open_connections("192.0.2.1") == 2
    worker.release(ticket)
    assert worker.open_connections("192.0.2.1") == 1


def test_a_worker_starting_in_a_slot_drops_its_predecessors_counts_only(pool: Pool) -> None:
    dead, other = table(pool, 0, maxconn=5), table(pool, 1, maxconn=5)
    for _ in range(3):
        dead.admit("192.0.2.1", NOW)
    other.admit("192.0.2.1", NOW)
    successor = table(pool, 0, maxconn=5)
    successor.reset()
    assert successor.open_connections("192.0.2.1") == 1


def tiny_pool(path: Path) -> Pool:
    """One table of one place: the CLIENT_PROBES entries a search can reach."""
    return Pool.create(str(path), NAMES, 0, nslots=2, client_tables=1, client_entries=1)


def test_a_full_table_limits_nobody_it_has_no_room_for(tmp_path: Path) -> None:
    pool = tiny_pool(tmp_path / "pool")
    warned: list[int] = []
    worker = table(pool, maxconn=1, full=warned)
    hosts = [f"192.0.2.{n}" for n in range(L.CLIENT_PROBES)]
    tickets = [worker.admit(host, NOW) for host in hosts]
    assert all(isinstance(t, int) and t >= 0 for t in tickets)
    assert warned == []
    # no room: a new client is admitted however many it opens, the operator told once
    assert [worker.admit("198.51.100.1", NOW) for _ in range(3)] == [UNCOUNTED] * 3
    assert warned == [1]
    assert all(isinstance(worker.admit(host, NOW), Refusal) for host in hosts)  # still held
    # a client with nothing open any more leaves its entry to the next new client
    first = tickets[0]
    assert isinstance(first, int)
    worker.release(first)
    assert worker.admit("198.51.100.1", NOW) != UNCOUNTED
    assert isinstance(worker.admit("198.51.100.1", NOW), Refusal)
    assert worker.open_connections(hosts[0]) == 0
    assert isinstance(worker.admit(hosts[0], NOW), int)  # not limited: no room again
    assert isinstance(worker.admit(hosts[0], NOW), int)
    assert warned == [1]
    pool.close()


def test_a_client_keeps_its_entry_while_its_bucket_refills(tmp_path: Path) -> None:
    pool = tiny_pool(tmp_path / "pool")
    worker = table(pool, rate=1, burst=1)
    hosts = [f"192.0.2.{n}" for n in range(L.CLIENT_PROBES)]
    assert [worker.admit(host, NOW) for host in hosts] == [UNCOUNTED] * len(hosts)
    assert all(isinstance(worker.admit(host, NOW), Refusal) for host in hosts)
    # their buckets are full again at NOW + 1: the entries are taken STALE_AFTER later
    newcomer = "198.51.100.1"
    assert [worker.admit(newcomer, NOW + 1 + STALE_AFTER / 2) for _ in range(2)] == [UNCOUNTED] * 2
    assert worker.admit(newcomer, NOW + 1 + STALE_AFTER * 2) == UNCOUNTED
    assert isinstance(worker.admit(newcomer, NOW + 1 + STALE_AFTER * 2), Refusal)
    pool.close()


def hammer(path: str, slot: int, until: float, done: multiprocessing.Queue[int]) -> None:
    pool = Pool.open(path)
    worker = table(pool, slot, maxconn=1_000_000)
    rounds = 0
    while time.monotonic() < until:
        tickets = [worker.admit("192.0.2.1", NOW) for _ in range(10)]
        for ticket in tickets:
            assert isinstance(ticket, int) and ticket >= 0
            worker.release(ticket)
        rounds += 1
    done.put(rounds)
    pool.close()


def test_counts_never_drift_when_workers_count_at_once(tmp_path: Path) -> None:
    """Two processes opening and closing one client's connections as fast as they can: at
    the end the client has none open (a shared count updated by both would lose steps)."""
    path = str(tmp_path / "pool")
    pool = Pool.create(path, NAMES, 0, nslots=2, client_tables=2)
    done: multiprocessing.Queue[int] = multiprocessing.Queue()
    until = time.monotonic() + 1.0
    procs = [
        multiprocessing.Process(target=hammer, args=(path, slot, until, done)) for slot in (0, 1)
    ]
    for proc in procs:
        proc.start()
    try:
        rounds = [done.get(timeout=30) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    assert min(rounds) > 10
    assert table(pool, maxconn=1).open_connections("192.0.2.1") == 0
    pool.close()


def test_an_older_pool_file_without_client_tables_still_opens(tmp_path: Path) -> None:
    pool = Pool.create(str(tmp_path / "pool"), NAMES, 0, nslots=2)
    assert (pool.geometry.client_tables, pool.q[L.H_CLIENT_TABLES]) == (0, 0)
    assert pool.geometry.spare_off == pool.geometry.clients_off  # no room for client tables
    with pytest.raises(ValueError, match="no client table 0"):
        table(pool)
    pool.close()
