"""examples/demo.py as a user runs it: its own ports, a stop on Ctrl-C, nothing left behind."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from examples.demo import STOPPED, parse_args
from tests.integration.harness import REPO, Proc, free_port, wait_until

DEMO = REPO / "examples" / "demo.py"
READY_WITHIN = 60.0  # two backends and splicelb start on two busy cores
STOP_WITHIN = 30.0

# Straight to 127.0.0.1, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> str:
    with OPENER.open(url, timeout=10) as reply:
        return str(reply.read().decode())


@contextlib.contextmanager
def demo_process(*args: str) -> Iterator[tuple[Proc, list[psutil.Process]]]:
    """The demo, and a list the test fills with its descendants; on the way out every
    one still running is killed (they run in process groups of their own)."""
    demo = Proc([sys.executable, str(DEMO), *args])
    descendants: list[psutil.Process] = []
    try:
        yield demo, descendants
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants.extend(psutil.Process(demo.pid).children(recursive=True))
        demo.kill()
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def printed(demo: Proc, pattern: str) -> str:
    """The first group of the first line of the demo's output that matches ``pattern``."""
    for line in demo.lines:
        if match := re.search(pattern, line):
            return match[1]
    raise AssertionError(f"the demo printed no line matching {pattern!r}: {demo.lines[-10:]}")


def test_demo_serves_on_its_ports_and_stops_on_sigint_leaving_nothing() -> None:
    port, admin_port = free_port(), free_port()
    with demo_process("--port", str(port), "--admin-port", str(admin_port)) as (demo, family):
        wait_until(
            lambda: (
                any("demo is up" in line for line in demo.lines) or demo.popen.poll() is not None
            ),
            READY_WITHIN,
            "the demo's ready line",
        )
        url = printed(demo, r"demo is up: open (\S+)")
        dashboard = printed(demo, r"live dashboard: (\S+)")
        runtime_dir = Path(printed(demo, r"runtime dir: (\S+)"))
        config = Path(printed(demo, r"config: (\S+)"))
        assert (url, dashboard) == (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{admin_port}/")
        assert runtime_dir.is_dir()
        assert config.is_file()
        family.extend(psutil.Process(demo.pid).children(recursive=True))
        records = [json.loads(line) for line in demo.lines if line.startswith("{")]
        workers = {r["pid"] for r in records if r.get("event") == "worker_start"}
        assert len(workers) == 2
        assert workers <= {process.pid for process in family}

        assert get(url + "whoami") in {"echo1", "echo2"}
        status = json.loads(get(dashboard + "status"))
        assert [s["name"] for s in status["backends"][0]["servers"]] == ["echo1", "echo2"]

        demo.signal(signal.SIGINT)
        assert demo.wait(STOP_WITHIN) == 0
        wait_until(lambda: any(STOPPED in line for line in demo.lines), 5, "the stop line")
        assert not runtime_dir.exists()
        assert not config.exists()
        _, alive = psutil.wait_procs(family, timeout=STOP_WITHIN)
        assert alive == []


def test_demo_on_a_busy_port_names_the_option_and_leaves_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with demo_process("--port", str(port), "--admin-port", str(free_port())) as (demo, _):
            assert demo.wait(READY_WITHIN) == 1
            wait_until(lambda: any(STOPPED in line for line in demo.lines), 5, "the stop line")
            wait_until(lambda: demo.errors, 5, "the error line")
    (error,) = demo.errors
    assert error.startswith("demo: splicelb exited with code 1 (listeners[0].bind: ")
    assert error.endswith("; choose another with --port)")
    workdir = printed(demo, rf"{STOPPED}: .*; (\S+) is removed")
    assert not Path(workdir).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "0"], "argument --port: expected a port number 1-65535, got '0'"),
        (["--admin-port", "http"], "argument --admin-port: expected a port number 1-65535"),
        (["--port", "9000", "--admin-port", "9000"], "--port and --admin-port must differ"),
    ],
)
def test_demo_refuses_bad_ports(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
