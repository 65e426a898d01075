"""``splicelb status`` reads the live pool of a running instance."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    ToolServer,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("status", *args)


def test_status_shows_servers_workers_and_open_tunnels(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = echo_pair
    port = free_port()
    health = '[backends.health]\ntype = "http"\ninterval = 0.5\n'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [("echo1", a.address), ("echo2", b.address)], extra=health)
            + backend("plain", [("solo", a.address)]),
        )
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tunnel:
        tunnel.sendall(clients.upgrade_request())
        assert tunnel.recv(200).startswith(b"HTTP/1.1 101")

        def snapshot() -> dict[str, object]:
            result = status("-c", str(lb.config_path), "--json")
            assert result.returncode == 0, result.stderr
            return dict(json.loads(result.stdout))

        state = wait_until(
            lambda: (
                (s := snapshot())
                and all(x["health"] == "up" for x in s["backends"][0]["servers"])  # type: ignore[index]
                and s
            ),
            10,
            "both servers up",
        )

        def table_lines() -> list[list[str]]:
            result = status("--runtime-dir", str(lb.runtime_dir))
            assert result.returncode == 0, result.stderr
            return [line.split() for line in result.stdout.splitlines()]

        table = wait_until(
            lambda: (t := table_lines()) and t[2][3] == "1" and t,
            10,
            "the open tunnel on the listener's line",
        )
    assert state["generation"] == 1
    [public] = state["listeners"]
    assert (public["name"], public["bind"], public["mode"]) == (
        "public",
        f"127.0.0.1:{port}",
        "http",
    )
    assert (public["active"], public["total"]) == (1, 1)
    assert sorted(w["pid"] for w in state["workers"]) == sorted(lb.worker_pids())
    assert sum(w["connections"] for w in state["workers"]) == 1
    app, plain = state["backends"]
    assert [s["name"] for s in app["servers"]] == ["echo1", "echo2"]
    assert sum(s["active"] for s in app["servers"]) == 1
    assert sum(s["total"] for s in app["servers"]) == 1
    assert sum(s["bytes_in"] for s in app["servers"]) == len(clients.upgrade_request())
    assert all(s["admin"] == "ready" for s in app["servers"])
    assert app["servers"][0]["check"]["result"] == "HTTP 200"
    assert plain["servers"][0]["health"] == "unchecked"
    assert plain["servers"][0]["address"] == a.address

    assert table[1:3] == [
        ["LISTENER", "BIND", "MODE", "ACTIVE", "TOTAL"],
        ["public", f"127.0.0.1:{port}", "http", "1", "1"],
    ]
    assert table[4][:5] == ["BACKEND", "SERVER", "ADDRESS", "HEALTH", "ADMIN"]
    assert any(line[:4] == ["app", "echo1", a.address, "up"] for line in table)
    assert any(line[:4] == ["plain", "solo", a.address, "unchecked"] for line in table)


def test_status_without_an_instance_says_so_in_one_line(tmp_path: Path) -> None:
    result = status("--runtime-dir", str(tmp_path))
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.strip() == f"splicelb: no instance is running in {tmp_path}"


def test_byte_counters_move_while_a_tunnel_stays_open(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    """Counters of an open tunnel are published within about a second, not only at its end."""
    far = ToolServer("sha", "--send", str(300_000))
    procs.append(far)
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "bulk", mode="tcp"),
            backend("bulk", [("far", far.address)]),
            workers=1,
        ),
        workers=1,
    )

    def server_counters() -> dict[str, int]:
        result = status("-c", str(lb.config_path), "--json")
        assert result.returncode == 0, result.stderr
        [server] = json.loads(result.stdout)["backends"][0]["servers"]
        return {"in": server["bytes_in"], "out": server["bytes_out"], "active": server["active"]}

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"x" * 500_000)
        got = 0
        while got < 300_000:
            chunk = sock.recv(65536)
            assert chunk, "the server's bytes stopped short"
            got += len(chunk)
        counters = wait_until(
            lambda: (c := server_counters())["in"] == 500_000 and c["out"] == 300_000 and c,
            5,
            "the open tunnel's bytes in the status",
        )
        assert counters["active"] == 1  # still open
    [line] = lb.wait_conns(1)
    assert (line["bytes_in"], line["bytes_out"]) == (500_000, 300_000)
    assert server_counters() == {"in": 500_000, "out": 300_000, "active": 0}
