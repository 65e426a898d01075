"""Process lifecycle: crashes, stuck workers, reloads under load, graceful stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

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


def echo_config(
    port: int, pair: tuple[EchoBackend, EchoBackend], extra_global: str = "", drain: float = 5
) -> str:
    return config(
        listener(f"127.0.0.1:{port}", "app"),
        backend("app", [(b.name, b.address) for b in pair]),
        extra_global=extra_global,
        drain_timeout=drain,
    )


def test_sigkill_worker_under_load_spares_other_tunnels_and_new_connections(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    tunnels = [clients.ws_tunnel(port) for _ in range(40)]
    owner = {}  # tunnel index -> worker pid, read from the sockets' owners
    for i, sock in enumerate(tunnels):
        local = sock.getsockname()[1]
        for proc in psutil.Process(lb.pid).children():
            if any(c.raddr and c.raddr.port == local for c in proc.net_connections("tcp")):
                owner[i] = proc.pid
    victim, survivor = lb.worker_pids()
    assert set(owner.values()) == {victim, survivor}  # both workers hold tunnels
    load = LoadGen(port, rate=200, duration=4)
    procs.append(load)
    time.sleep(1.5)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: [r for r in lb.events("worker_start") if r["pid"] not in (victim, survivor)],
        5,
        "a replacement worker",
    )
    assert time.monotonic() - killed_at < 1.0 + 0.3, "replacement took longer than 1 s"
    assert replaced[0]["slot"] == next(
        r["slot"] for r in lb.events("worker_start") if r["pid"] == victim
    )
    summary = load.summary(30)
    in_flight = [f for f in summary["failures"] if f["started"] <= killed_at + 0.01]
    assert summary["failures"] == in_flight and len(in_flight) <= 2, summary["failures"]
    assert summary["requests_ok"] >= 700
    for i, sock in enumerate(tunnels):
        assert clients.ws_ping(sock) == (owner[i] == survivor), f"tunnel {i} of worker {owner[i]}"
        sock.close()


def test_stuck_worker_is_replaced_after_worker_timeout(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair, extra_global="worker_timeout = 2"))
    victim = lb.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    line = wait_until(lambda: lb.events("worker_timeout"), 10, "worker_timeout")[0]
    assert line["child_pid"] == victim
    assert 1.5 < time.monotonic() - stopped_at < 4.5
    wait_until(lambda: len(lb.events("worker_start")) == 3, 5, "the replacement")
    wait_until(lambda: not psutil.pid_exists(victim), 5, "the stuck worker to be gone")
    # Nothing queued on the stuck worker's socket is lost: every request is served.
    for _ in range(20):
        reply = clients.exchange(
            port, b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("busy_poll", ["", "busy_poll_us = 0"], ids=["polling", "no-polling"])
def test_connections_queued_for_a_stuck_worker_are_taken_by_another(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], busy_poll: str
) -> None:
    """A stuck worker (stopped here) leaves what the kernel queues on its socket to the
    other worker within seconds, long before worker_timeout would replace it; with busy
    polling off too (the other worker then takes at its sweep)."""
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair, extra_global=f"worker_timeout = 120\n{busy_poll}"))
    victim, survivor = lb.worker_pids()
    os.kill(victim, signal.SIGSTOP)
    try:
        for i in range(20):  # about half of them hash to the stopped worker's socket
            reply = clients.exchange(
                port, b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=10
            )
            assert reply.startswith(b"HTTP/1.1 200"), i
    finally:
        os.kill(victim, signal.SIGCONT)
    assert {line["pid"] for line in lb.wait_conns(20)} == {survivor}
    assert psutil.pid_exists(victim) and not lb.events("worker_timeout")


def test_long_lived_tunnels_stay_spread_over_the_workers(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """A worker takes from the other's queue only when that one is behind: tunnels
    opened one at a time are shared out, not held by whichever worker wakes first."""
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    tunnels = [clients.ws_tunnel(port) for _ in range(40)]
    try:

        def held() -> list[int] | None:  # once the workers have published all 40
            status = cli("status", "--runtime-dir", str(lb.runtime_dir), "--json")
            counts = [w["connections"] for w in json.loads(status.stdout)["workers"]]
            return counts if sum(counts) == 40 else None

        counts = wait_until(held, 10, "40 tunnels counted")
        assert len(counts) == 2 and min(counts) >= 10, counts  # taken by the first awake: 40/0
    finally:
        for sock in tunnels:
            sock.close()


def test_a_stop_while_the_children_start_ends_at_once(
    echo_pair: tuple[EchoBackend, EchoBackend], tmp_path: Path, procs: list[Proc]
) -> None:
    """SIGTERM just after start (systemctl stop, a quick Ctrl-C) reaches children that are
    still booting: each ends at once, none is left to be killed after drain_timeout."""
    for attempt in range(5):
        port = free_port()
        path = tmp_path / f"splicelb{attempt}.toml"
        runtime = tmp_path / f"run{attempt}"
        path.write_text(echo_config(port, echo_pair, drain=30).replace("@RUNTIME@", str(runtime)))
        lb = Proc([sys.executable, "-m", "lb", "run", "-c", str(path)])
        procs.append(lb)
        children = Path(f"/proc/{lb.pid}/task/{lb.pid}/children")
        deadline = time.monotonic() + 20
        while not children.read_text() and time.monotonic() < deadline:
            pass  # no sleep: the signal must come while the children boot
        lb.signal(signal.SIGTERM)
        assert lb.wait(10) == 0, attempt  # not after drain_timeout (30 s) and a SIGKILL
        time.sleep(0.1)
        assert not any("SIGKILL" in line for line in lb.lines), (attempt, lb.lines)


def test_reload_under_load_loses_nothing_and_keeps_every_tunnel(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair, drain=60))
    load = LoadGen(port, tunnels=1000, rate=500, duration=9)
    procs.append(load)
    wait_until(lambda: load.event("tunnels_open"), 60, "1000 tunnels")
    time.sleep(2)
    result = cli("reload", "-c", str(lb.config_path))
    reloaded_at = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert "generation 2 is serving" in result.stdout
    summary = load.summary(60)
    assert summary["failures"] == []
    # the load ran through the reload (a machine busy with other work makes fewer)
    assert summary["requests_ok"] == summary["requests"] >= 500 * 9 * 0.5
    assert summary["tunnels"] == 1000
    # Every tunnel (all held by the old generation) still echoed well after the reload.
    assert summary["last_echo_min"] > reloaded_at + 2
    drains = lb.events("worker_drain")
    assert {d["generation"] for d in drains} == {1}
    assert sum(d["active"] for d in drains) >= 1000


def test_invalid_reload_is_rejected_while_traffic_continues(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    load = LoadGen(port, tunnels=20, rate=100, duration=3)
    procs.append(load)
    wait_until(lambda: load.event("tunnels_open"), 30, "tunnels")
    good = lb.config_path.read_text()
    lb.config_path.write_text(
        good.replace('name = "app"\n', 'name = "app"\nbalance = "fastest"\n', 1)
    )
    result = cli("reload", "-c", str(lb.config_path))
    assert result.returncode == 1
    assert result.stderr.startswith("backends[0].balance: ")
    os.kill(lb.pid, signal.SIGHUP)  # the same through the signal: logged, nothing changes
    wait_until(
        lambda: len([r for r in lb.events("reload") if r["outcome"] == "rejected"]) == 2,
        5,
        "two rejections",
    )
    summary = load.summary(30)
    assert summary["failures"] == []
    assert not lb.events("worker_drain")
    assert len(lb.events("worker_start")) == 2


def test_reload_adds_and_removes_a_listener_and_a_backend(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = echo_pair
    kept, removed, added = free_port(), free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{kept}", "one", name="kept")
            + listener(f"127.0.0.1:{removed}", "two", name="removed"),
            backend("one", [("echo1", a.address)]) + backend("two", [("echo2", b.address)]),
        )
    )
    whoami = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert clients.exchange(kept, whoami).endswith(b"echo1")
    assert clients.exchange(removed, whoami).endswith(b"echo2")
    tunnel = clients.ws_tunnel(removed)  # a tunnel on the listener about to go
    lb.config_path.write_text(
        config(
            listener(f"127.0.0.1:{kept}", "three", name="kept")
            + listener(f"127.0.0.1:{added}", "three", name="added"),
            backend("three", [("echo2", b.address)]),
        ).replace("@RUNTIME@", str(lb.runtime_dir))
    )
    result = cli("reload", "--runtime-dir", str(lb.runtime_dir))
    assert result.returncode == 0, result.stderr
    assert clients.exchange(kept, whoami).endswith(b"echo2")  # same socket, new routing
    assert clients.exchange(added, whoami).endswith(b"echo2")
    try:
        socket.create_connection(("127.0.0.1", removed), timeout=5).close()
        raise AssertionError("the removed listener still accepts")
    except ConnectionRefusedError:
        pass
    assert clients.ws_ping(tunnel)  # open tunnels are not touched by a reload
    tunnel.close()
    status = cli("status", "--runtime-dir", str(lb.runtime_dir), "--json")
    assert '"name": "three"' in status.stdout and '"name": "one"' not in status.stdout


def test_health_and_admin_state_survive_a_reload(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, b = echo_pair
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"
    health = '[backends.health]\ntype = "http"\ninterval = 0.5\ntimeout = 0.3\n'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend(
                "app", [("echo1", a.address), ("echo2", b.address), ("dead", dead)], extra=health
            ),
        )
    )
    wait_until(lambda: [r for r in lb.events("server_state") if r["server"] == "dead"], 5, "dead")
    assert cli("maint", "-c", str(lb.config_path), "app/echo2").returncode == 0
    assert cli("reload", "-c", str(lb.config_path)).returncode == 0
    status = cli("status", "-c", str(lb.config_path), "--json").stdout
    servers = {s["name"]: s for s in json.loads(status)["backends"][0]["servers"]}
    assert servers["echo2"]["admin"] == "maint"
    assert servers["dead"]["health"] == "down"
    whoami = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = {clients.exchange(port, whoami).rsplit(b"\n", 1)[-1] for _ in range(10)}
    assert answers == {b"echo1"}


def test_sigterm_drains_open_tunnels_then_exits_0(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    # close_spread = 0: what is left closes at drain_timeout (spread: test_closing.py)
    lb = start_lb(echo_config(port, echo_pair, extra_global="close_spread = 0", drain=3))
    finishing, lingering = clients.ws_tunnel(port), clients.ws_tunnel(port)
    children = psutil.Process(lb.pid).children(recursive=True)
    lb.signal(signal.SIGTERM)
    wait_until(lambda: len(lb.events("worker_drain")) == 2, 5, "workers draining")
    for _ in range(5):  # the exchange goes on during the drain
        assert clients.ws_ping(finishing)
        time.sleep(0.2)
    finishing.close()
    began = time.monotonic()
    assert lb.wait(15) == 0
    assert 1.0 < time.monotonic() - began < 6  # the lingering tunnel held it until drain_timeout
    assert lingering.recv(100) == b""  # closed at drain_timeout
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive


def test_a_child_that_keeps_failing_at_boot_halts_with_one_clear_line(
    echo_pair: tuple[EchoBackend, EchoBackend], tmp_path: Path, procs: list[Proc]
) -> None:
    bad_ca = tmp_path / "not-a-ca.pem"
    bad_ca.write_text("this is not a certificate\n")
    port = free_port()
    text = config(
        listener(f"127.0.0.1:{port}", "app"),
        backend(
            "app",
            [("echo1", echo_pair[0].address)],
            extra=f'[backends.health]\ntype = "https"\nca_file = "{bad_ca}"\n',
        ),
    )
    path = tmp_path / "splicelb.toml"
    path.write_text(text.replace("@RUNTIME@", str(tmp_path / "run")))
    lb = Proc([sys.executable, "-m", "lb", "run", "-c", str(path)])
    procs.append(lb)
    assert lb.wait(30) == 3
    halts = [line for line in lb.lines if '"event":"halt"' in line]
    assert len(halts) == 1 and "prober 0 failed to boot 5 times in a row" in halts[0]
    crashes = [line for line in lb.lines if '"event":"prober_crash"' in line]
    assert len(crashes) == 5 and all('"boot":true' in c for c in crashes)


def test_a_second_sigterm_or_sigquit_closes_everything_at_once(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    for second in (signal.SIGTERM, signal.SIGQUIT):
        port = free_port()
        lb = start_lb(echo_config(port, echo_pair, drain=60))
        tunnel = clients.ws_tunnel(port)
        lb.signal(signal.SIGTERM)
        wait_until(lambda lb=lb: len(lb.events("worker_drain")) == 2, 5, "draining")
        assert clients.ws_ping(tunnel)  # still served while draining
        began = time.monotonic()
        lb.signal(second)
        assert lb.wait(15) == 0
        assert time.monotonic() - began < 5  # not the 60 s drain_timeout
        assert tunnel.recv(100) == b""
        tunnel.close()
        assert lb.events("stopping")[-1]["graceful"] is False
        lb.kill()
