"""Operating a running instance: admin states, the control socket's guard, metrics, logs."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import listening_ports
from lb.cli import cli as splicelb
from lb.control import control_path
from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    LoadGen,
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

WHOAMI = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def whoami(port: int) -> str:
    return clients.exchange(port, WHOAMI).rsplit(b"\n", 1)[-1].decode()


def open_tunnel(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive: a tunnel
    assert sock.recv(1000).startswith(b"HTTP/1.1 200")
    return sock


def still_served(sock: socket.socket) -> str:
    sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock.recv(1000).rsplit(b"\n", 1)[-1].decode()


def test_drain_maint_and_ready_against_a_running_instance(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = echo_pair
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [("echo1", a.address), ("echo2", b.address)]),
        ),
        workers=2,
    )
    cfg = str(lb.config_path)
    tunnels = [open_tunnel(port) for _ in range(4)]
    on_echo1 = [t for t in tunnels if still_served(t) == "echo1"]
    assert on_echo1

    result = cli("drain", "-c", cfg, "app/echo1")
    assert result.returncode == 0 and result.stdout.strip() == "app/echo1: ready -> drain"
    assert {whoami(port) for _ in range(10)} == {"echo2"}  # no new connection reaches it
    assert all(still_served(t) == "echo1" for t in on_echo1)  # existing ones keep working
    state = json.loads(cli("status", "-c", cfg, "--json").stdout)
    echo1 = state["backends"][0]["servers"][0]
    assert echo1["admin"] == "drain" and echo1["active"] == len(on_echo1)

    assert cli("maint", "-c", cfg, "app/echo1").stdout.strip() == "app/echo1: drain -> maint"
    assert {whoami(port) for _ in range(6)} == {"echo2"}
    assert cli("ready", "-c", cfg, "app/echo1").returncode == 0
    assert {whoami(port) for _ in range(6)} == {"echo1", "echo2"}
    for t in tunnels:
        t.close()

    unknown = cli("drain", "-c", cfg, "app/nope")
    assert (unknown.returncode, unknown.stderr) == (
        1,
        "splicelb: no server app/nope; the servers of app: app/echo1, app/echo2\n",
    )
    unknown = cli("maint", "-c", cfg, "web/echo1")
    assert (unknown.returncode, unknown.stderr) == (
        1,
        "splicelb: no server web/echo1 (no backend 'web'); the servers: app/echo1, app/echo2\n",
    )
    malformed = cli("drain", "-c", cfg, "echo1")
    assert malformed.returncode == 2 and "BACKEND/SERVER" in malformed.stderr
    events = lb.events("admin_state")
    assert [(e["from"], e["to"]) for e in events] == [
        ("ready", "drain"),
        ("drain", "maint"),
        ("maint", "ready"),
    ]


@pytest.mark.parametrize(
    "argv", [["status"], ["reload"], ["drain", "app/a"], ["maint", "app/a"], ["ready", "app/a"]]
)
def test_commands_without_an_instance_say_so_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    result = cli(argv[0], "--runtime-dir", str(tmp_path), *argv[1:])
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"splicelb: no instance is running in {tmp_path}"]


NOBODY = 65534
DENIED = "permission denied (run as the instance's user)"


def cli_as_nobody(*args: str) -> tuple[int, str, str]:
    """``splicelb ARGS`` as user nobody: exit code, stdout, stderr.

    Run in a forked child that drops to nobody (nobody may not be able to
    exec this interpreter); an exception that escapes prints its traceback
    to stderr, as the interpreter would.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sys.stdout = open(out.fileno(), "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(err.fileno(), "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                splicelb.main(list(args), prog_name="splicelb")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def connect_as_nobody(path: str) -> str:
    """Connect to the control socket as user nobody (in a forked child); what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        outcome = "connected"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(path)
                sock.sendall(b'{"cmd": "ping"}\n')
                outcome = sock.recv(1000).decode().strip() or "closed"
        except PermissionError:
            outcome = "permission denied"
        except Exception as exc:
            outcome = repr(exc)
        os.write(w, outcome.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_control_socket_refuses_other_users(
    echo_pair: tuple[EchoBackend, EchoBackend], procs: list[Proc]
) -> None:
    port = free_port()
    # A runtime dir other users may enter (as /run/splicelb is): only the socket guards.
    top = Path(tempfile.mkdtemp(prefix="splicelb-test-", dir="/tmp"))
    top.chmod(0o755)
    (top / "run").mkdir()
    (top / "run").chmod(0o755)  # made by systemd (RuntimeDirectoryMode=0755), not by splicelb
    try:
        lb = SpliceLB(
            top,
            config(
                listener(f"127.0.0.1:{port}", "app"), backend("app", [("e", echo_pair[0].address)])
            ),
        )
        procs.append(lb)
        check_guard(lb)
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(top, ignore_errors=True)


def check_guard(lb: SpliceLB) -> None:
    assert os.stat(lb.runtime_dir).st_mode & 0o005 == 0o005  # the dir is open to others
    path = control_path(str(lb.runtime_dir))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert connect_as_nobody(path) == "permission denied"  # the file mode
    code, out, err = cli_as_nobody("drain", "--runtime-dir", str(lb.runtime_dir), "app/e")
    assert (code, out, err.splitlines()) == (1, "", [f"splicelb: {path}: {DENIED}"])
    os.chmod(path, 0o666)  # even if someone widens it, the peer's uid is checked
    # The answer is read after the request is written, so it always arrives.
    answer = json.loads(connect_as_nobody(path))
    assert answer == {"ok": False, "errors": [DENIED]}
    code, out, err = cli_as_nobody("drain", "--runtime-dir", str(lb.runtime_dir), "app/e")
    assert (code, out, err.splitlines()) == (1, "", [f"splicelb: {DENIED}"])
    own = json.loads(cli("status", "--runtime-dir", str(lb.runtime_dir), "--json").stdout)
    assert own["generation"] == 1


def test_metrics_match_the_traffic(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = echo_pair
    port, admin = free_port(), free_port()
    health = '[backends.health]\ntype = "http"\ninterval = 0.5\ntimeout = 0.3\n'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra='allowed_origins = ["https://ok.example"]'),
            backend("app", [("echo1", a.address), ("echo2", b.address)], extra=health),
            admin_bind=f"127.0.0.1:{admin}",
        )
    )
    wait_until(lambda: len(lb.events("admin_start")) == 1, 10, "the admin endpoint")
    requests = [clients.exchange(port, WHOAMI) for _ in range(6)]
    forbidden = clients.exchange(
        port, clients.upgrade_request(extra="Origin: https://x.example\r\n")
    )
    too_big = clients.exchange(
        port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    )
    assert clients.status_of(forbidden) == 403 and clients.status_of(too_big) == 431
    tunnel = open_tunnel(port)
    lb.wait_conns(8)
    time.sleep(1.2)  # a couple of health checks for the latency histogram

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    servers = [("app", "echo1"), ("app", "echo2")]
    totals = sum(
        value("splicelb_server_connections_total", backend=bk, server=sv) for bk, sv in servers
    )
    assert totals == 7  # six requests and the open tunnel; answered ones never reach a server
    assert value("splicelb_listener_connections_total", listener="public") == 9
    assert value("splicelb_listener_connections_active", listener="public") == 1
    assert (
        sum(
            value("splicelb_server_connections_active", backend=bk, server=sv) for bk, sv in servers
        )
        == 1
    )
    assert value("splicelb_answers_total", status="403") == 1
    assert value("splicelb_answers_total", status="431") == 1
    sent_in = 6 * len(WHOAMI) + len(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (
        sum(value("splicelb_server_bytes_in_total", backend=bk, server=sv) for bk, sv in servers)
        == sent_in
    )
    received = sum(len(r) for r in requests)
    assert (
        sum(value("splicelb_server_bytes_out_total", backend=bk, server=sv) for bk, sv in servers)
        >= received
    )
    assert value("splicelb_server_up", backend="app", server="echo1") == 1
    assert value("splicelb_server_admin_state", backend="app", server="echo1", state="ready") == 1
    assert value("splicelb_server_check_latency_seconds_count", backend="app", server="echo1") >= 2
    assert value("splicelb_workers", state="running") == 2
    assert value("splicelb_generation") == 1
    assert value("splicelb_reloads_total") == 0
    tunnel.close()

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=10) as reply:
        assert json.loads(reply.read())["backends"][0]["name"] == "app"
    post = urllib.request.Request(f"http://127.0.0.1:{admin}/status", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)
    assert refused.value.code == 405  # read-only


def test_log_lines_from_several_workers_under_load_are_whole_json_objects(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [(x.name, x.address) for x in echo_pair]),
        )
    )
    load = LoadGen(port, tunnels=50, rate=400, duration=4)
    procs.append(load)
    summary = load.summary(60)
    assert summary["failures"] == []
    lb.stop()
    lines = list(lb.lines)
    records = [json.loads(line) for line in lines]  # every line is one whole object
    assert all(isinstance(r, dict) for r in records)
    conns = [r for r in records if r["event"] == "conn"]
    assert len(conns) == summary["requests"] + summary["tunnels"]
    assert len({r["pid"] for r in conns}) == 2
    for record in records:
        assert {"timestamp", "level", "event", "pid", "role", "generation"} <= set(record)
        assert record["timestamp"].endswith("Z")


def test_console_logs_on_a_terminal_and_with_the_flag(
    echo_pair: tuple[EchoBackend, EchoBackend], tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    path = tmp_path / "splicelb.toml"
    path.write_text(
        config(
            listener(f"127.0.0.1:{port}", "app"), backend("app", [("e", echo_pair[0].address)])
        ).replace("@RUNTIME@", str(tmp_path / "run"))
    )
    # On a terminal: human-readable lines, not JSON.
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "lb", "run", "-c", str(path)])
    out, text = b"", ""
    try:
        deadline = time.monotonic() + 20
        # The supervisor's "ready" and a worker's "worker_start" come from different
        # processes, in either order: read until both are in.
        while not ("worker_start" in text and " ready " in text) and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 65536)
                text = re.sub(r"\x1b\[[0-9;]*m", "", out.decode(errors="replace"))  # colours
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)
    lines = text.splitlines()  # from several processes: in no set order
    ready = next((line for line in lines if " ready " in line), None)
    assert ready is not None, text
    assert "worker_start" in text and not any(line.startswith("{") for line in lines)
    assert "[info" in ready
    # Piped, with --log-format console and --log-level warning: console lines, info dropped.
    lb = Proc(
        [
            sys.executable,
            "-m",
            "lb",
            "run",
            "-c",
            str(path),
            "--log-format",
            "console",
            "--log-level",
            "warning",
        ]
    )
    procs.append(lb)
    wait_until(lambda: port in listening_ports(), 20, "the balancer to listen")  # no info lines
    clients.exchange(port, b"\x16\x03garbage\r\n\r\n")  # a 400: logged at info, so not shown
    lb.signal(signal.SIGTERM)
    assert lb.wait(20) == 0
    time.sleep(0.2)
    assert not any(line.startswith("{") for line in lb.lines)
    assert not any("worker_start" in line or "conn" in line.split() for line in lb.lines)
