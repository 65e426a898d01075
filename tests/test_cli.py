"""The command line as a user runs it: ``splicelb check``, ``--help``, and ``status``
on a pool whose health record cannot be read."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lb import control
from lb.config import DEFAULT_CONFIG_PATH, parse_config
from lb.errors import LBError
from lb.generation import POOL_LINK, pool_path
from lb.pool import layout as L
from lb.pool.shm import HealthRecord, Pool, create_pool
from lb.rundir import RuntimeDir
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


def test_check_warns_of_a_runtime_dir_that_cannot_be_created(tmp_path: Path) -> None:
    """A warning, not a problem: the file is valid; the host is not ready for it."""
    (tmp_path / "file").write_text("")
    config = (REPO / "examples" / "splicelb.toml").read_text()
    path = tmp_path / "splicelb.toml"
    path.write_text(config.replace('"/tmp/splicelb-demo"', f'"{tmp_path}/file/run"', 1))
    result = cli("check", "-c", str(path))
    assert result.returncode == 0
    assert result.stdout.startswith(f"{path}: OK")
    assert result.stderr.splitlines() == [
        f"warning: global.runtime_dir: {tmp_path}/file/run cannot be created:"
        f" {tmp_path}/file is not a directory"
    ]


def test_check_reports_a_missing_file(tmp_path: Path) -> None:
    result = cli("check", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert "absent.toml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


TO_THE_INSTANCE = (
    "give the instance's config with -c PATH, or its runtime dir with --runtime-dir DIR"
)
TO_THE_CONFIG = "give one with -c PATH"


@pytest.mark.parametrize(
    ("argv", "advice"),
    [
        (["status"], TO_THE_INSTANCE),
        (["drain", "app/a1"], TO_THE_INSTANCE),
        (["reload"], TO_THE_INSTANCE),
        (["check"], TO_THE_CONFIG),
        (["run"], TO_THE_CONFIG),
    ],
    ids=["status", "drain", "reload", "check", "run"],
)
def test_a_command_without_c_and_without_the_default_config_says_how_to_give_one(
    argv: list[str], advice: str
) -> None:
    if os.path.exists(DEFAULT_CONFIG_PATH):
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this host")
    result = cli(*argv)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"splicelb: no config file at {DEFAULT_CONFIG_PATH} (the default); {advice}"
    ]


def test_every_command_has_help_with_an_example() -> None:
    for command in ("run", "check", "status", "reload", "drain", "maint", "ready", "tail"):
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


@contextlib.contextmanager
def live_pool(tmp_path: Path, nservers: int = 2) -> Iterator[tuple[str, Pool]]:
    """A runtime dir with a live pool, held as a running instance holds it (this
    process stands in for the supervisor): the dir and the pool."""
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    servers = [{"name": f"s{i}", "address": f"127.0.0.1:{2000 + i}"} for i in range(nservers)]
    config = parse_config(
        {
            "listeners": [
                {"name": "public", "bind": "127.0.0.1:1", "default_backend": "app"},
                {"name": "raw", "bind": "127.0.0.1:2", "mode": "tcp", "default_backend": "app"},
            ],
            "backends": [{"name": "app", "health": {"type": "http"}, "servers": servers}],
        }
    )
    pool = create_pool(pool_path(str(runtime_dir), 1), config, 1, nslots=1)
    os.symlink(os.path.basename(pool.path), runtime_dir / POOL_LINK)
    held = RuntimeDir.claim(str(runtime_dir))
    try:
        yield str(runtime_dir), pool
    finally:
        pool.close()
        held.release()


def test_status_shows_a_server_whose_health_record_is_unreadable_as_unknown(
    tmp_path: Path,
) -> None:
    """A record left mid-write (its writer died) is reported, not waited on for ever."""
    with live_pool(tmp_path) as (runtime_dir, pool):
        now = time.monotonic()
        up = HealthRecord(L.UP, 2, 0, now, time.time(), 0.002, 5, "HTTP 200", now)
        pool.write_record(0, up)
        pool.write_record(1, up)
        pool.q[pool.geometry.record(1) + L.R_SEQ] += 1  # a writer's first store, and no more

        result = cli("status", "--runtime-dir", runtime_dir, "--json", timeout=30)
        assert result.returncode == 0, result.stderr
        first, second = json.loads(result.stdout)["backends"][0]["servers"]
        assert (first["health"], first["check"]["result"]) == ("up", "HTTP 200")
        assert second["health"] == "unknown"
        assert "unreadable" in second["health_reason"]
        assert "check" not in second
        assert (second["admin"], second["active"]) == ("ready", 0)  # the rest is still read

        table = cli("status", "--runtime-dir", runtime_dir, timeout=30)
        assert table.returncode == 0, table.stderr
        [line] = [x for x in table.stdout.splitlines() if x.startswith("app ") and " s1 " in x]
        assert line.split()[:5] == ["app", "s1", "127.0.0.1:2001", "unknown", "ready"]
        assert "health record unreadable" in line


def test_status_shows_each_listener_with_its_connections(tmp_path: Path) -> None:
    with live_pool(tmp_path) as (runtime_dir, pool):
        geo = pool.geometry
        for listener, (active, total, bytes_in) in enumerate([(3, 7, 900), (0, 2, 40)]):
            at = geo.listener_counter(0, listener)
            pool.q[at + L.C_ACTIVE] = active
            pool.q[at + L.C_TOTAL] = total
            pool.q[at + L.C_BYTES_IN] = bytes_in

        result = cli("status", "--runtime-dir", runtime_dir, "--json", timeout=30)
        assert result.returncode == 0, result.stderr
        public, raw = json.loads(result.stdout)["listeners"]
        assert public == {
            "name": "public",
            "bind": "127.0.0.1:1",
            "mode": "http",
            "active": 3,
            "total": 7,
            "bytes_in": 900,
            "bytes_out": 0,
        }
        assert (raw["name"], raw["mode"], raw["active"], raw["total"]) == ("raw", "tcp", 0, 2)

        table = cli("status", "--runtime-dir", runtime_dir, timeout=30)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert [line.split() for line in lines[1:4]] == [
            ["LISTENER", "BIND", "MODE", "ACTIVE", "TOTAL"],
            ["public", "127.0.0.1:1", "http", "3", "7"],
            ["raw", "127.0.0.1:2", "tcp", "0", "2"],
        ]


# -- the control socket, as the command line meets it ----------------------------------------

Behaviour = Callable[[socket.socket, threading.Event], None]


@contextlib.contextmanager
def fake_instance(tmp_path: Path, behaviour: Behaviour) -> Iterator[str]:
    """A control socket whose connections each get ``behaviour``; yields the runtime dir."""
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(control.control_path(str(runtime_dir)))
    listener.listen(1)
    listener.settimeout(60)
    done = threading.Event()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                if done.is_set():  # the connection that wakes us at the end
                    return
                behaviour(conn, done)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield str(runtime_dir)
    finally:
        done.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:
            wake.connect(control.control_path(str(runtime_dir)))
        thread.join(10)
        listener.close()


def close_unread(conn: socket.socket, _done: threading.Event) -> None:
    """Close with the request unread: a Unix socket then resets its peer."""
    select.select([conn], [], [], 10)


def answer_not_json(conn: socket.socket, _done: threading.Event) -> None:
    control.read_line(conn)
    conn.sendall(b"<html>\n")


def answer_before_reading(conn: socket.socket, _done: threading.Event) -> None:
    """Answer at once (as a busy instance does), then end without reading the request."""
    conn.sendall(control.encode({"ok": False, "errors": ["busy: try again shortly"]}))
    conn.shutdown(socket.SHUT_RDWR)
    while conn.recv(65536):  # what the client sent: left unread, the close would reset it
        pass


@pytest.mark.parametrize(
    ("behaviour", "line"),
    [
        (close_unread, "splicelb: the instance closed the control connection without an answer"),
        (answer_not_json, "splicelb: the instance's answer is not a JSON object"),
        (answer_before_reading, "splicelb: busy: try again shortly"),
    ],
    ids=["reset", "not-json", "answered-before-reading"],
)
def test_a_failing_control_connection_is_one_line_and_exit_1(
    tmp_path: Path, behaviour: Behaviour, line: str
) -> None:
    with fake_instance(tmp_path, behaviour) as runtime_dir:
        result = cli("drain", "--runtime-dir", runtime_dir, "app/a1", timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [line]


def test_an_instance_that_does_not_answer_is_reported_after_the_timeout(tmp_path: Path) -> None:
    def silent(conn: socket.socket, done: threading.Event) -> None:
        done.wait(10)

    with fake_instance(tmp_path, silent) as runtime_dir, pytest.raises(LBError) as failed:
        control.request(runtime_dir, {"cmd": "ping"}, timeout=0.3)
    assert str(failed.value) == "the instance did not answer within 0.3 s"


# -- what a command loads --------------------------------------------------------------------

# What only `splicelb run` needs: the supervisor, the workers, the prober, the admin
# endpoint, and the libraries they stand on. A command that reads state loads none of it,
# and answers in the time the rest takes to load.
RUN_ONLY = (
    "lb.supervisor",
    "lb.children",
    "lb.worker",
    "lb.admin",
    "lb.metrics",
    "lb.log",
    "lb.upgrade",
    "probes",
    "asyncio",
    "ssl",
    "uvloop",
    "aiohttp",
    "httptools",
    "prometheus_client",
    "structlog",
    "psutil",
)

# Runs the command line with the given arguments, then writes what it had loaded.
LOADED_AFTER = """
import sys
from lb.cli import cli
try:
    cli.main(sys.argv[2:], prog_name="splicelb")
finally:
    with open(sys.argv[1], "w") as out:
        out.write("\\n".join(sys.modules))
"""


def run_only_modules_loaded(tmp_path: Path, *args: str) -> list[str]:
    """``splicelb ARGS``, which must succeed; the modules of RUN_ONLY it loaded."""
    out = tmp_path / "modules"
    result = subprocess.run(
        [sys.executable, "-c", LOADED_AFTER, str(out), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = out.read_text().splitlines()
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in RUN_ONLY))


def answer_as_an_instance(conn: socket.socket, _done: threading.Event) -> None:
    """Answer as an instance whose every command succeeds (an upgrade to generation 2)."""
    request = json.loads(control.read_line(conn))
    if request["cmd"] == "admin":
        answer = {"ok": True, "from": "ready", "to": request["state"]}
    elif request["cmd"] == "upgrade":
        answer = {"ok": True, "generation": 1, "pid": 4242}
    else:  # reload, and the upgrade's pings
        answer = {"ok": True, "generation": 2, "serving": True, "pid": 4242, "version": "0"}
    conn.sendall(control.encode(answer))


@pytest.mark.parametrize(
    "argv",
    [["drain", "app/s0"], ["maint", "app/s0"], ["ready", "app/s0"], ["reload"], ["upgrade"]],
    ids=lambda argv: argv[0],
)
def test_commands_that_talk_to_the_instance_load_nothing_only_run_needs(
    tmp_path: Path, argv: list[str]
) -> None:
    with fake_instance(tmp_path, answer_as_an_instance) as runtime_dir:
        assert (
            run_only_modules_loaded(tmp_path, argv[0], "--runtime-dir", runtime_dir, *argv[1:])
            == []
        )


def test_help_check_and_status_load_nothing_only_run_needs(tmp_path: Path) -> None:
    assert run_only_modules_loaded(tmp_path, "--help") == []
    assert run_only_modules_loaded(tmp_path, "check", "-c", "examples/splicelb.toml") == []
    with live_pool(tmp_path) as (runtime_dir, _pool):
        assert run_only_modules_loaded(tmp_path, "status", "--runtime-dir", runtime_dir) == []
        assert (
            run_only_modules_loaded(tmp_path, "status", "--runtime-dir", runtime_dir, "--json")
            == []
        )


def test_check_warns_when_maxconn_is_above_what_the_local_ports_allow(tmp_path: Path) -> None:
    """Each tunnel takes a local port toward its server, per source address: two servers
    and no source address hold two port ranges' worth; a second address doubles it."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = high - low + 1
    config = (REPO / "examples" / "splicelb.toml").read_text()
    assert "maxconn = 10000 " in config
    path = tmp_path / "splicelb.toml"
    path.write_text(config.replace("maxconn = 10000 ", f"maxconn = {3 * ports} ", 1))
    result = cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: backends[0] (app): global.maxconn {3 * ports} is above the {2 * ports}"
        " tunnels its 2 servers can take from 1 source address with"
        f" net.ipv4.ip_local_port_range {low}-{high} ({ports} ports); add addresses to its"
        " source, widen the port range, or add servers"
    ]
    assert "source = [] " in config
    sourced = config.replace("maxconn = 10000 ", f"maxconn = {3 * ports} ", 1).replace(
        "source = [] ", 'source = ["127.0.0.1", "127.0.0.2"] ', 1
    )
    path.write_text(sourced)
    result = cli("check", "-c", str(path))
    assert (result.returncode, result.stderr) == (0, "")
