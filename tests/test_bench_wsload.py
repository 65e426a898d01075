"""bench/wsload.py against the echo backend directly: upgrades counted, a storm reconnected."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo() -> Iterator[tuple[int, int]]:
    """The benchmark's echo backend, 2 processes: (its port, its pid)."""
    proc = subprocess.Popen(
        [sys.executable, "bench/echo_server.py", "--procs", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening "), line
        yield int(line.split()[1]), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def wsload(*argv: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.wsload", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


@pytest.mark.timeout(90)
def test_upgrades_are_counted_without_errors(echo: tuple[int, int]) -> None:
    port, _ = echo
    result = wsload("upgrades", "--port", str(port), "--seconds", "0.5", "--warmup", "0.2")
    assert result["errors"] == {}
    assert isinstance(result["completed"], int) and result["completed"] > 10
    assert result["rate"] == result["completed"] / 0.5


@pytest.mark.timeout(90)
def test_a_refused_upgrade_is_an_error() -> None:
    """An answer other than 101 (nginx's, say) is counted, never taken for an upgrade."""
    with subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as http:
        try:
            assert http.stdout is not None
            line = http.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
            http_port = line.split(" port ")[1].split()[0]
            result = wsload("upgrades", "--port", http_port, "--seconds", "0.5", "--warmup", "0")
        finally:
            http.kill()
    assert result["completed"] == 0
    errors = result["errors"]
    assert isinstance(errors, dict) and errors.get("refused", 0) > 0, errors


@pytest.mark.timeout(90)
def test_every_storm_client_reconnects_after_the_backend_closes_them(
    echo: tuple[int, int],
) -> None:
    port, pid = echo
    result = wsload(
        "storm",
        "--port",
        str(port),
        "--count",
        "300",
        "--per-proc",
        "100",
        "--trigger-pid",
        str(pid),
    )
    assert (result["clients"], result["back"], result["failed"]) == (300, 300, 0)
    assert result["procs"] == 3
    all_back, p99, longest = result["all_back_ms"], result["p99_ms"], result["max_ms"]
    assert isinstance(all_back, float) and isinstance(p99, float) and isinstance(longest, float)
    assert 0 < p99 <= longest <= all_back
