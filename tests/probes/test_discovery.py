"""DNS discovery's rules (probes.discovery), without a DNS server: the integration tests
(tests/integration/test_discovery.py) run them against dnsmasq."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.config import parse_config
from lb.pool import layout as L
from lb.pool.servers import read_answer
from lb.pool.shm import Pool, create_pool
from probes.discovery import Discoverer, Found, Lookup, next_lookup, srv_weights


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> Log:
        return self

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.lines if event == name]


CONFIG = {
    "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
    "backends": [
        {
            "name": "app",
            "discovery": {
                "name": "_ws._tcp.chat.test",
                "resolvers": ["127.0.0.1:1"],
                "max_servers": 2,
            },
        }
    ],
}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = create_pool(str(tmp_path / "pool"), parse_config(CONFIG), 1, nslots=1)
    yield p
    p.close()


def found(*hosts: str, weight: int = 1) -> Lookup:
    servers = [Found(f"{h}:80", socket.AF_INET, h, 80, weight) for h in hosts]
    return Lookup(servers, 0.0, [])


def names(pool: Pool) -> list[str]:
    return sorted(s["name"] for s in pool.backends()[0]["servers"])


def test_srv_weights_keep_their_proportions_and_zero_gets_the_least_share() -> None:
    assert srv_weights([10, 30]) == [85, 256]
    assert srv_weights([0, 100]) == [1, 256]
    assert srv_weights([0, 0]) == [1, 1]
    assert srv_weights([65535, 1]) == [256, 1]


def test_a_shorter_ttl_is_honoured_down_to_a_second() -> None:
    discovery = parse_config(CONFIG).backends[0].discovery
    assert discovery is not None
    assert next_lookup(discovery, 0) == 5
    assert next_lookup(discovery, 2) == 2
    assert next_lookup(discovery, 0.2) == 1
    assert next_lookup(discovery, 60) == 5


def test_failures_change_nothing_and_warn_once_per_streak(pool: Pool) -> None:
    log = Log()
    d = Discoverer(pool, 0, parse_config(CONFIG).backends[0], log)
    d._answered(found("10.0.0.1"))
    for _ in range(3):
        d._failed("timeout after 1 s")
    assert names(pool) == ["10.0.0.1:80"]
    assert len(log.events("discovery_failed")) == 1
    answer = read_answer(pool, 0)
    assert answer is not None and (answer.failures, answer.text) == (3, "timeout after 1 s")
    d._answered(found("10.0.0.1"))
    assert log.events("discovery_recovered") == [{"failures": 3}]
    d._failed("timeout after 1 s")
    assert len(log.events("discovery_failed")) == 2  # a new streak


def test_an_empty_answer_applies_once_confirmed_twice(pool: Pool) -> None:
    log = Log()
    d = Discoverer(pool, 0, parse_config(CONFIG).backends[0], log)
    d._answered(found("10.0.0.1"))
    assert d._answered(found()) == 1  # asks again in a second
    assert d._answered(found()) == 1
    assert names(pool) == ["10.0.0.1:80"]
    d._answered(found())
    assert names(pool) == []
    assert log.events("discovery_empty")
    # an answer between empty ones starts the count again
    d._answered(found("10.0.0.1"))
    d._answered(found())
    d._answered(found("10.0.0.2"))
    d._answered(found())
    assert names(pool) == ["10.0.0.2:80"]


def test_more_servers_than_max_servers_keep_the_first_by_name_and_say_which_key(
    pool: Pool,
) -> None:
    log = Log()
    d = Discoverer(pool, 0, parse_config(CONFIG).backends[0], log)
    for _ in range(3):
        d._answered(found("10.0.0.3", "10.0.0.1", "10.0.0.2"))
    assert names(pool) == ["10.0.0.1:80", "10.0.0.2:80"]
    assert [e["reason"] for e in log.events("discovery_skipped")] == [
        "3 servers in DNS, 1 ignored: raise backends[0].discovery.max_servers"
    ]
    d._answered(found("10.0.0.3", "10.0.0.1", weight=7))
    assert names(pool) == ["10.0.0.1:80", "10.0.0.3:80"]
    assert {s["weight"] for s in pool.backends()[0]["servers"]} == {7}


def test_a_server_record_a_dead_prober_left_mid_write_is_repaired_not_leaked(pool: Pool) -> None:
    Discoverer(pool, 0, parse_config(CONFIG).backends[0], Log())._answered(found("10.0.0.1"))
    [index] = [s["index"] for s in pool.backends()[0]["servers"]]
    base = (
        pool.geometry.spare_off + L.SPARE_HEADER_WORDS + (index - pool.first_spare) * L.SPARE_WORDS
    )
    pool.q[base + L.D_SEQ] += 1  # the prober died between its two stores
    assert names(pool) == []
    log = Log()
    d = Discoverer(pool, 0, parse_config(CONFIG).backends[0], log)  # the next prober
    assert names(pool) == ["10.0.0.1:80"]
    assert [e["server"] for e in log.events("record_repaired")] == ["10.0.0.1:80"]
    d._answered(found("10.0.0.1", "10.0.0.2"))  # both slots: the first was not leaked
    assert names(pool) == ["10.0.0.1:80", "10.0.0.2:80"]
