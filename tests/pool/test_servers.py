"""Spare server slots in the live pool (lb.pool.servers) and how workers pick from them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.config import parse_config
from lb.generation import carry_over
from lb.pool import layout as L
from lb.pool import servers
from lb.pool.select import BackendPicker, Hash, RoundRobin
from lb.pool.shm import HealthRecord, Pool, create_pool


def make_config(spare: int = 2, max_servers: int = 3, health: bool = False) -> Any:
    backend: dict[str, Any] = {
        "name": "app",
        "servers": [{"name": "s0", "address": "127.0.0.1:9000"}],
        "spare_servers": spare,
        "discovery": {"name": "chat.test", "type": "A", "port": 9001, "max_servers": max_servers},
    }
    if health:
        backend["health"] = {"type": "tcp"}
    return parse_config(
        {
            "global": {"workers": 2},
            "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
            "backends": [backend],
        }
    )


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = create_pool(str(tmp_path / "pool"), make_config(), 1, nslots=2)
    yield p
    p.close()


def add(pool: Pool, kind: str, name: str, host: str, weight: int = 1) -> int:
    index = servers.take(pool, servers.slots(pool, "app", kind))
    assert index is not None
    source = L.SOURCE_API if kind == "api" else L.SOURCE_DNS
    servers.add(pool, index, name, socket.AF_INET, host, 9001, weight, source)
    servers.bump(pool, source)
    return index


def test_spare_slots_follow_the_configured_servers_and_hold_no_server_at_first(pool: Pool) -> None:
    assert (pool.geometry.nservers, pool.geometry.nspare, pool.first_spare) == (6, 5, 1)
    assert servers.slots(pool, "app", "api") == range(1, 3)
    assert servers.slots(pool, "app", "dns") == range(3, 6)
    assert [s["name"] for s in pool.backends()[0]["servers"]] == ["s0"]
    assert pool.spare_versions() == (0, 0)


def test_a_server_added_is_read_back_whole_and_listed_with_its_source(pool: Pool) -> None:
    index = add(pool, "api", "b1", "10.0.0.7", weight=3)
    spare = pool.spare(index)
    assert spare is not None
    assert (spare.name, spare.address, spare.weight, spare.epoch) == ("b1", "10.0.0.7:9001", 3, 1)
    assert spare.sockaddr == ("10.0.0.7", 9001)
    [backend] = pool.backends()
    assert [(s["name"], s["source"]) for s in backend["servers"]] == [
        ("s0", "config"),
        ("b1", "api"),
    ]
    assert pool.spare_versions() == (1, 0)
    servers.remove(pool, index)
    assert pool.spare(index) is None


def test_a_free_slot_is_taken_never_used_first_then_the_one_free_longest(pool: Pool) -> None:
    first = add(pool, "dns", "a", "10.0.0.1")
    second = add(pool, "dns", "b", "10.0.0.2")
    servers.remove(pool, second)
    servers.remove(pool, first)
    third = add(pool, "dns", "c", "10.0.0.3")
    assert third not in (first, second)  # never used
    assert add(pool, "dns", "d", "10.0.0.4") == second  # freed before the other
    assert servers.raw(pool, second).epoch == 2


def test_a_record_its_writer_died_in_reads_as_no_server(pool: Pool) -> None:
    index = add(pool, "api", "b1", "10.0.0.7")
    base = (
        pool.geometry.spare_off + L.SPARE_HEADER_WORDS + (index - pool.first_spare) * L.SPARE_WORDS
    )
    pool.q[base + L.D_SEQ] += 1  # odd: a write that never finished
    assert pool.spare(index) is None
    servers.reweigh(pool, index, 2)  # its writer's next write makes it readable again
    assert pool.spare(index) is not None


def picker(pool: Pool, checked: bool = False) -> BackendPicker:
    weights, names = {0: 1}, {0: "s0"}

    def changed(used: dict[int, Any]) -> None:
        for index, spare in used.items():
            weights[index], names[index] = spare.weight, spare.name

    spares = [*servers.slots(pool, "app", "api"), *servers.slots(pool, "app", "dns")]
    return BackendPicker(pool, [0], RoundRobin(weights), {}, 5.0, 0.0, spares, checked, changed)


def test_workers_pick_a_server_at_the_first_connection_after_it_came_and_not_after_it_left(
    pool: Pool,
) -> None:
    p = picker(pool)
    assert {p.pick("") for _ in range(4)} == {0}
    index = add(pool, "api", "b1", "10.0.0.7", weight=3)
    assert [p.pick("") for _ in range(4)].count(index) == 3
    servers.remove(pool, index)
    servers.bump(pool, L.SOURCE_API)
    assert {p.pick("") for _ in range(4)} == {0}


def test_in_a_checked_backend_a_new_server_waits_for_its_check(tmp_path: Path) -> None:
    pool = create_pool(str(tmp_path / "pool"), make_config(health=True), 1, nslots=2)
    p = picker(pool, checked=True)
    index = add(pool, "dns", "a", "10.0.0.1")
    pool.write_record(index, HealthRecord(L.UP, 1, 0, 1.0, 1.0, 0.0, 1, "an old server's"))
    assert {p.pick("") for _ in range(4)} == {0}  # its record is another server's
    servers.set_checked_epoch(pool, index, 1)
    pool.bump_health_version()
    assert index in {p.pick("") for _ in range(4)}
    pool.close()


def test_a_reload_carries_spare_servers_with_their_health(tmp_path: Path, pool: Pool) -> None:
    api = add(pool, "api", "b1", "10.0.0.7", weight=2)
    dns = add(pool, "dns", "10.0.0.1:9001", "10.0.0.1")
    servers.set_checked_epoch(pool, dns, 1)
    pool.write_record(dns, HealthRecord(L.DOWN, 0, 3, 1.0, 1.0, 0.0, 9, "HTTP 500"))
    pool.set_admin(api, L.DRAIN)
    new = create_pool(str(tmp_path / "new"), make_config(spare=1, max_servers=1), 2, nslots=2)
    assert carry_over(pool, new) == []
    listed = {s["name"]: s for s in new.backends()[0]["servers"]}
    assert (listed["b1"]["source"], listed["b1"]["weight"]) == ("api", 2)
    assert new.admin(listed["b1"]["index"]) == L.DRAIN
    moved = listed["10.0.0.1:9001"]["index"]
    record = new.read_record(moved)
    assert record is not None and record.text == "HTTP 500"
    assert new.checked_epoch(moved) == listed["10.0.0.1:9001"]["epoch"]
    # past the new config's slots: left out, and said so
    add(pool, "api", "b2", "10.0.0.8")
    other = create_pool(str(tmp_path / "other"), make_config(spare=1), 3, nslots=2)
    assert carry_over(pool, other) == ["app/b2: no api slot left (raise spare_servers)"]
    new.close()
    other.close()


def test_a_pool_file_from_before_spare_slots_opens_with_none(tmp_path: Path) -> None:
    pool = create_pool(str(tmp_path / "pool"), make_config(spare=0, max_servers=1), 1, nslots=2)
    pool.q[L.H_SPARE_OFF] = 0  # what an earlier release's file holds there
    again = Pool.open(pool.path)
    assert (again.geometry.nspare, again.spare_versions()) == (0, (0, 0))
    assert [s["name"] for s in again.backends()[0]["servers"]] == ["s0"]
    again.close()
    pool.close()


def test_two_nodes_hash_a_key_to_the_same_server_whatever_slots_it_is_in(tmp_path: Path) -> None:
    """Same servers, found in another order (other slots): every key goes to the same
    server; a server that leaves moves only its keys, on both."""
    addresses = [f"10.0.0.{i}" for i in range(1, 6)]
    keys = [f"key-{i}" for i in range(1000)]
    picks = []
    pools = []
    for node, order in enumerate((addresses, addresses[::-1])):
        pool = create_pool(str(tmp_path / f"node{node}"), make_config(max_servers=8), 1, nslots=1)
        pools.append(pool)
        names: dict[int, str] = {0: "s0"}
        weights = {0: 1}
        for host in order:
            index = add(pool, "dns", f"{host}:9001", host)
            names[index], weights[index] = f"{host}:9001", 1
        spares = list(servers.slots(pool, "app", "dns"))
        p = BackendPicker(pool, [0], Hash(weights, names, pool), {}, 5.0, 0.0, spares)
        picks.append((p, names))
    before = [[names[p.pick(key)] for key in keys] for p, names in picks]  # type: ignore[index]
    assert before[0] == before[1]
    assert len(set(before[0])) == 6
    for pool in pools:
        gone = next(
            s["index"] for s in pool.backends()[0]["servers"] if s["name"] == "10.0.0.3:9001"
        )
        servers.remove(pool, gone)
        servers.bump(pool, L.SOURCE_DNS)
    after = [[names[p.pick(key)] for key in keys] for p, names in picks]  # type: ignore[index]
    assert after[0] == after[1]
    moved = {k for k, b, a in zip(keys, before[0], after[0], strict=True) if b != a}
    assert moved == {k for k, b in zip(keys, before[0], strict=True) if b == "10.0.0.3:9001"}
    for pool in pools:
        pool.close()


def test_a_new_server_ramps_up_with_slowstart_from_when_it_was_added(pool: Pool) -> None:
    weights, names = {0: 1}, {0: "s0"}

    def changed(used: dict[int, Any]) -> None:
        for index, spare in used.items():
            weights[index], names[index] = spare.weight, spare.name

    spares = list(servers.slots(pool, "app", "api"))
    p = BackendPicker(pool, [0], RoundRobin(weights), {}, 5.0, 60.0, spares, False, changed)
    index = add(pool, "api", "b1", "10.0.0.7")
    picks = [p.pick("") for _ in range(200)]
    assert 0 < picks.count(index) < 20  # about 1/20 of its weight at first: ~5%, not 50%
