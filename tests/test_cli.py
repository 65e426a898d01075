"""The command line as a user runs it: ``splicelb check``, ``--help``, and ``status``
on a pool whose health record cannot be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lb.config import parse_config
from lb.generation import POOL_LINK, pool_path
from lb.pool import layout as L
from lb.pool.shm import HealthRecord, create_pool
from lb.status import write_pid_file
from tests.integration.harness import cli

REPO = Path(__file__).resolve().parents[1]


def test_check_accepts_the_example_config() -> None:
    result = cli("check", "-c", "examples/splicelb.toml")
    assert result.returncode == 0
    assert "OK" in result.stdout


def test_check_reports_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[global]
wrokers = 2

[[listeners]]
name = "public"
bind = "127.0.0.1:70000"
default_backend = "nope"

  [[listeners.routes]]
  path_prefix = "/ws"
  backend = "chat"

[[backends]]
name = "app"
balance = "fastest"

  [[backends.servers]]
  name = "a1"
  address = "127.0.0.1"

  [[backends.servers]]
  name = "a1"
  address = "127.0.0.1:9002"
"""
    )
    result = cli("check", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    expected_paths = [
        "global.wrokers:",
        "listeners[0].bind:",
        "listeners[0].default_backend:",
        "listeners[0].routes[0].backend:",
        "backends[0].balance:",
        "backends[0].servers[0].address:",
        "backends[0].servers[1].name:",
    ]
    for prefix in expected_paths:
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)
    assert len(lines) == len(expected_paths)
    assert any("70000 is out of range" in line for line in lines)
    assert any("unknown backend 'chat'" in line for line in lines)


def test_check_reports_a_missing_file(tmp_path: Path) -> None:
    result = cli("check", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert "absent.toml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_command_has_help_with_an_example() -> None:
    for command in ("run", "check", "status", "reload", "drain", "maint", "ready"):
        result = cli(command, "--help")
        assert result.returncode == 0
        assert "Example" in result.stdout and "splicelb " + command in result.stdout


def test_shell_completion_comes_from_click() -> None:
    env = {
        **os.environ,
        "_SPLICELB_COMPLETE": "bash_complete",
        "COMP_WORDS": "splicelb dr",
        "COMP_CWORD": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "lb"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert "plain,drain" in result.stdout.splitlines()
    source = subprocess.run(
        [sys.executable, "-m", "lb"],
        env={**os.environ, "_SPLICELB_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert "complete -o nosort -F _splicelb_completion splicelb" in source.stdout


def test_status_shows_a_server_whose_health_record_is_unreadable_as_unknown(
    tmp_path: Path,
) -> None:
    """A record left mid-write (its writer died) is reported, not waited on for ever."""
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    servers = [{"name": f"s{i}", "address": f"127.0.0.1:{2000 + i}"} for i in range(2)]
    config = parse_config(
        {
            "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
            "backends": [{"name": "app", "health": {"type": "http"}, "servers": servers}],
        }
    )
    pool = create_pool(pool_path(str(runtime_dir), 1), config, 1, nslots=1)
    os.symlink(os.path.basename(pool.path), runtime_dir / POOL_LINK)
    write_pid_file(str(runtime_dir))  # this process stands in for the supervisor
    now = time.monotonic()
    pool.write_record(0, HealthRecord(L.UP, 2, 0, now, time.time(), 0.002, 5, "HTTP 200", now))
    pool.write_record(1, HealthRecord(L.UP, 2, 0, now, time.time(), 0.002, 5, "HTTP 200", now))
    pool.q[pool.geometry.record(1) + L.R_SEQ] += 1  # a writer's first store, and no more

    result = cli("status", "--runtime-dir", str(runtime_dir), "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)["backends"][0]["servers"]
    assert (first["health"], first["check"]["result"]) == ("up", "HTTP 200")
    assert second["health"] == "unknown"
    assert "unreadable" in second["health_reason"]
    assert "check" not in second
    assert (second["admin"], second["active"]) == ("ready", 0)  # the rest is still read

    table = cli("status", "--runtime-dir", str(runtime_dir), timeout=30)
    assert table.returncode == 0, table.stderr
    [line] = [x for x in table.stdout.splitlines() if x.startswith("app ") and " s1 " in x]
    assert line.split()[:5] == ["app", "s1", "127.0.0.1:2001", "unknown", "ready"]
    assert "health record unreadable" in line
    pool.close()
