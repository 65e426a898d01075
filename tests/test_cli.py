"""The command line as a user runs it: ``splicelb check`` and ``--help``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
