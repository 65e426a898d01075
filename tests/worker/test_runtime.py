"""What a worker builds from its config: each listener's client limits, in the pool's tables."""

from __future__ import annotations

from pathlib import Path

from lb.config import parse_config
from lb.pool.clients import ClientTable, Refusal
from lb.pool.shm import Pool, create_pool
from lb.worker.runtime import client_tables

CONFIG = parse_config(
    {
        "listeners": [
            {"name": "open", "bind": "127.0.0.1:1", "default_backend": "app"},
            {
                "name": "limited",
                "bind": "127.0.0.1:2",
                "default_backend": "app",
                "client_maxconn": 1,
            },
            {"name": "rated", "bind": "127.0.0.1:3", "default_backend": "app", "client_rate": 1},
        ],
        "backends": [{"name": "app", "servers": [{"name": "a", "address": "127.0.0.1:4"}]}],
    }
)


def test_each_listener_with_limits_counts_in_a_table_of_its_own(tmp_path: Path) -> None:
    pool = create_pool(str(tmp_path / "pool"), CONFIG, 1, 2)
    full: list[tuple[str, int]] = []
    tables = client_tables(CONFIG, pool, 0, lambda name, entries: full.append((name, entries)))
    assert tables[0] is None
    limited, rated = tables[1], tables[2]
    assert isinstance(limited, ClientTable) and isinstance(rated, ClientTable)
    assert isinstance(limited.admit("192.0.2.1", 1.0), int)
    assert limited.admit("192.0.2.1", 1.0) == Refusal("client limit: 1 open connection", 1)
    assert isinstance(rated.admit("192.0.2.1", 1.0), int)  # its own count: the rate only
    assert rated.admit("192.0.2.1", 1.0) == Refusal("client rate: 1/s", 1)


def test_a_pool_made_without_client_tables_limits_nobody(tmp_path: Path) -> None:
    """A pool from the release before (a generation an upgrade left running)."""
    names = {"listeners": [{"name": lc.name} for lc in CONFIG.listeners], "backends": []}
    pool = Pool.create(str(tmp_path / "pool"), names, 1, 2)
    assert client_tables(CONFIG, pool, 0, lambda name, entries: None) == [None, None, None]
