"""A generation's answers to the operator (drain, maint, ready)."""

from __future__ import annotations

from pathlib import Path

from lb.config import parse_config
from lb.generation import Generation, carry_over, pool_path
from lb.pool import layout as L
from lb.pool.shm import HealthRecord, create_pool


def generation(tmp_path: Path, servers: dict[str, int]) -> Generation:
    """Generation 1 with ``servers[name]`` servers in each backend ``name``."""
    backends = [
        {
            "name": name,
            "servers": [
                {"name": f"{name}{i}", "address": f"127.0.0.1:{2000 + i}"} for i in range(n)
            ],
        }
        for name, n in servers.items()
    ]
    config = parse_config(
        {
            "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
            "backends": backends,
        }
    )
    return Generation(1, config, create_pool(pool_path(str(tmp_path), 1), config, 1, nslots=1))


def drain(g: Generation, backend: str, server: str) -> dict[str, object]:
    return g.set_admin({"backend": backend, "server": server, "state": "drain"})


def test_an_unknown_server_is_answered_with_the_servers_of_its_backend(tmp_path: Path) -> None:
    g = generation(tmp_path, {"app": 2, "chat": 1})
    assert drain(g, "app", "nope") == {
        "ok": False,
        "errors": ["no server app/nope; the servers of app: app/app0, app/app1"],
    }
    assert drain(g, "api", "app0") == {
        "ok": False,
        "errors": [
            "no server api/app0 (no backend 'api'); the servers: app/app0, app/app1, chat/chat0"
        ],
    }
    assert drain(g, "app", "app1")["to"] == "drain"
    g.pool.close()


def test_a_long_list_of_servers_is_cut_short(tmp_path: Path) -> None:
    g = generation(tmp_path, {"app": 25})
    [line] = drain(g, "app", "nope")["errors"]
    first_twenty = ", ".join(f"app/app{i}" for i in range(20))
    assert line == (
        f"no server app/nope; the servers of app: {first_twenty}"
        " and 5 more (splicelb status lists them)"
    )
    g.pool.close()


def test_a_reload_carries_when_servers_came_back(tmp_path: Path) -> None:
    """A slow start under way goes on in the new generation's pool."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = generation(tmp_path / "old", {"app": 2})
    new = generation(tmp_path / "new", {"app": 2})
    old.pool.set_admin(0, L.MAINT)
    old.pool.set_admin(0, L.READY, ready_at=100.0)
    old.pool.write_record(1, HealthRecord(L.UP, 2, 0, 90.0, 1e9, 0.01, 7, "HTTP 200", 90, 80))
    carry_over(old.pool, new.pool)
    assert (new.pool.admin(0), new.pool.ready_at(0)) == (L.READY, 100.0)
    assert new.pool.up_at(1) == 80.0
    assert new.pool.ready_at(1) == 0.0
    old.pool.close()
    new.pool.close()
