"""``splicelb tail`` on the log file of a running instance: printed, followed, filtered."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.tail import EXIT_INTERRUPTED
from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)


class LoggingToFile(SpliceLB):
    """``splicelb run >> LOG``: its log lines go to a file, as an operator redirects them
    (appended, so that truncating the file for rotation leaves no hole)."""

    def __init__(self, tmp: Path, config: str, log: Path) -> None:
        self.log = log
        log.touch()
        redirect = ("sh", "-c", f'exec "$0" "$@" >> {shlex.quote(str(log))}')
        super().__init__(tmp, config, prefix=redirect)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[tuple[LoggingToFile, int]]:
    """An instance logging to tmp_path/splicelb.log: listener public on the port it
    gives, routing /gone to a backend with nobody listening (503) and the rest to app."""
    port = free_port()
    echo = EchoBackend("a1")
    routes = '  [[listeners.routes]]\n  path_prefix = "/gone"\n  backend = "gone"\n'
    text = config(
        listener(f"127.0.0.1:{port}", "app", extra=routes),
        backend("app", [("a1", echo.address)])
        + backend("gone", [("g1", f"127.0.0.1:{free_port()}")], extra="retries = 0"),
    )
    try:
        lb = LoggingToFile(tmp_path, text, tmp_path / "splicelb.log")
    except BaseException:
        echo.kill()
        raise
    try:
        wait_until(lambda: lb.events("serving"), 20, "every worker to serve")
        yield lb, port
    finally:
        lb.kill()
        echo.kill()


def tunnel(port: int) -> str:
    """A WebSocket tunnel through the balancer, closed by the client: its client address."""
    sock = clients.ws_tunnel(port)
    address = "{}:{}".format(*sock.getsockname())
    assert clients.ws_ping(sock)
    sock.close()
    return address


def refused(port: int) -> str:
    """A request the balancer answers 503 (nobody listens for /gone): the client address."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        address = "{}:{}".format(*sock.getsockname())
        assert clients.status_of(clients.read_all(sock)) == 503
    return address


def test_the_log_file_is_printed_for_people_and_filtered(
    balancer: tuple[LoggingToFile, int],
) -> None:
    lb, port = balancer
    ok, failed = tunnel(port), refused(port)
    lb.wait_conns(2)
    log = str(lb.log)

    everything = cli("tail", "--file", log, "--no-follow")
    assert everything.returncode == 0, everything.stderr
    lines = everything.stdout.splitlines()
    (ok_line,) = [line for line in lines if f"  {ok}  " in line]
    assert "  public → app/a1  ws (client closed)  " in ok_line
    assert ok_line.endswith(" B")  # in ... B, out ... B
    (failed_line,) = [line for line in lines if f"  {failed}  " in line]
    assert "  public → gone  503 (no server available)  " in failed_line
    assert any("  info     ready  " in line for line in lines)
    assert any("  warning  connect_failed  backend=gone server=g1" in line for line in lines)
    assert not any(line.startswith("{") for line in lines)  # every line was ours
    assert "\x1b[" not in everything.stdout  # not a terminal: no colours

    errors = cli("tail", "--file", log, "--no-follow", "--errors").stdout.splitlines()
    assert [line for line in errors if f"  {failed}  " in line] == [failed_line]
    assert not any(f"  {ok}  " in line for line in errors)
    assert all(
        "  warning  " in line or "  error    " in line or "  503 (" in line for line in errors
    )

    app = cli("tail", "--file", log, "--no-follow", "--backend", "app").stdout.splitlines()
    assert app == [ok_line]
    fives = cli("tail", "--file", log, "--no-follow", "--status", "5xx").stdout.splitlines()
    assert fives == [failed_line]
    last = cli("tail", "--file", log, "--no-follow", "-n", "2").stdout.splitlines()
    assert last == lines[-2:]  # nothing logs any more: the file's last two lines


def test_following_prints_new_lines_across_a_truncation_until_stopped(
    balancer: tuple[LoggingToFile, int],
) -> None:
    lb, port = balancer
    before = tunnel(port)
    lb.wait_conns(1)
    follower = Proc([sys.executable, "-m", "lb", "tail", "--file", str(lb.log)])

    def printed(address: str) -> list[str]:
        return [line for line in follower.lines if f"  {address}  " in line]

    try:
        wait_until(lambda: printed(before), 20, "the last lines already in the file")
        during = tunnel(port)  # the balancer appends its line while tail runs
        (line,) = wait_until(lambda: printed(during), 20, "a line added while following")
        assert "  public → app/a1  ws (client closed)  " in line

        os.truncate(lb.log, 0)  # logrotate's copytruncate
        wait_until(lambda: any("was truncated" in e for e in follower.errors), 20, "the notice")
        after = refused(port)
        (line,) = wait_until(lambda: printed(after), 20, "a line after the truncation")
        assert "  503 (no server available)  " in line
        with open(lb.log, "a") as handle:
            handle.write("not json\n")
        wait_until(lambda: "not json" in follower.lines, 20, "a line that is not ours")
        assert not any("\x1b[" in line for line in follower.lines)

        follower.signal(signal.SIGINT)
        assert follower.wait(20) == EXIT_INTERRUPTED
        assert follower.errors == [f"splicelb: {lb.log} was truncated: reading it from the start"]
    finally:
        follower.kill()
