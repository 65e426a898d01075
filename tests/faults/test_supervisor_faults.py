"""Faults around the supervisor: a reload that does not happen, a full runtime_dir, a stuck
prober, stuck workers one after another, reloads in a storm.  Each test ends with the
instance serving (tests/faults/checks.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.faults.checks import fault_config, still_serves
from tests.integration import clients
from tests.integration.harness import EchoBackend, SpliceLB, cli, free_port, wait_until

INJECT = ("-m", "tests.faults.inject")  # then its options, then "--" and splicelb's


def servers(pair: tuple[EchoBackend, EchoBackend]) -> list[tuple[str, str]]:
    return [(b.name, b.address) for b in pair]


def reload_with(lb: SpliceLB, text: str) -> subprocess.CompletedProcess[str]:
    lb.config_path.write_text(text.replace("@RUNTIME@", str(lb.runtime_dir)))
    return cli("reload", "-c", str(lb.config_path), timeout=60)


def when(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_an_abandoned_reload_that_added_workers_strands_no_connection(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    # Generation 2 has three workers; the third fails to boot (its Worker() raises), after
    # the other two bound and accept on the new sockets: the reload is abandoned.
    third_of_two = "args[2] == 2 and args[3] == 2"  # Worker(self, config, slot, generation, ...)
    lb = start_lb(
        fault_config(port, servers(echo_pair), workers=1),
        workers=1,
        launcher=(
            *INJECT,
            "--raise",
            "lb.worker.process:Worker.__init__",
            "--when",
            third_of_two,
            "--",
        ),
    )
    failed = reload_with(lb, fault_config(port, servers(echo_pair), workers=3))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "failed to boot" in failed.stdout + failed.stderr
    still_serves(lb, port)  # every connection of the burst answered: none hashed to a dead queue


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at tmp_path/run (the runtime dir), unmounted at the end."""
    mount = tmp_path / "run"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill a file system to the last block."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_runtime_dir_fails_the_reload_and_the_instance_serves_on(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], tmpfs: Path
) -> None:
    port = free_port()
    text = fault_config(port, servers(echo_pair))
    lb = start_lb(text)
    filler = fill(tmpfs)
    full = reload_with(lb, text)
    assert full.returncode == 1
    assert "global.runtime_dir" in full.stdout + full.stderr
    assert "No space left" in full.stdout + full.stderr
    assert lb.popen.poll() is None  # the supervisor lives on
    still_serves(lb, port)
    filler.unlink()
    done = reload_with(lb, text)
    assert done.returncode == 0, done.stdout + done.stderr
    still_serves(lb, port)


def test_a_stopped_prober_is_replaced_after_worker_timeout(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    health = '[backends.health]\ntype = "http"\npath = "/"\ninterval = 0.5\n'
    lb = start_lb(fault_config(port, servers(echo_pair), extra="worker_timeout = 2") + health)
    [prober] = [r["pid"] for r in lb.events("prober_start")]
    os.kill(prober, signal.SIGSTOP)
    try:
        wait_until(lambda: lb.events("prober_timeout"), 10, "the stuck prober to be noticed")
        wait_until(lambda: len(lb.events("prober_start")) == 2, 10, "a new prober")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(prober, signal.SIGCONT)
    assert not psutil.pid_exists(prober) or psutil.Process(prober).status() == "zombie"
    # the new prober checks: every server's last check is recent again
    status = wait_until(
        lambda: _recently_checked(lb), 10, "fresh health checks from the new prober"
    )
    assert status
    still_serves(lb, port)


def _recently_checked(lb: SpliceLB) -> bool:
    done = cli("status", "--json", "-c", str(lb.config_path))
    if done.returncode:
        return False
    servers = [s for b in json.loads(done.stdout)["backends"] for s in b["servers"]]
    return all(s.get("check", {}).get("age_s", 99) < 1.5 for s in servers)


def test_a_worker_killed_for_a_stale_heartbeat_is_replaced_at_once_every_time(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """Being stuck is not failing to boot: the replacement never waits for a backoff."""
    port = free_port()
    lb = start_lb(
        fault_config(port, servers(echo_pair), workers=1, extra="worker_timeout = 1"), workers=1
    )
    for started in range(2, 8):
        os.kill(running_workers(lb)[-1], signal.SIGSTOP)
        wait_until(lambda n=started: len(lb.events("worker_start")) == n, 15, "a replacement")
    kills = [when(r) for r in lb.events("worker_exit")]
    starts = [when(r) for r in lb.events("worker_start")[1:]]
    gaps = [start - kill for kill, start in zip(kills, starts, strict=True)]
    assert max(gaps) < 1.0, gaps  # a backoff would have grown to 3.2 s by the sixth
    still_serves(lb, port)


def test_a_reload_storm_leaves_a_bounded_number_of_generations_draining(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    # Tunnels that stay in their generation (not handed over): generations pile up draining.
    text = fault_config(port, servers(echo_pair), backend_extra='on_reload = "close"')
    lb = start_lb(text.replace("drain_timeout = 5", "drain_timeout = 120"))
    tunnels: list[list[socket.socket]] = []
    for _ in range(6):
        tunnels.append(
            [clients.ws_tunnel(port) for _ in range(10)]
        )  # each generation has some to drain
        done = reload_with(lb, text.replace("drain_timeout = 5", "drain_timeout = 120"))
        assert done.returncode == 0, done.stdout + done.stderr
    # Generations 1..7 exist; 7 serves, at most two drain: 1..4 were retired.
    retired = wait_until(
        lambda: len(lb.events("generation_retired")) >= 4 and lb.events("generation_retired"),
        10,
        "retirements",
    )
    assert sorted(r["child_generation"] for r in retired) == [1, 2, 3, 4]
    for group in tunnels[:4]:  # their tunnels are closed, spread out in time
        for sock in group:
            sock.settimeout(10)
            assert clients.read_all(sock) == b""
    for group in tunnels[4:]:  # the two youngest draining generations keep theirs
        for sock in group:
            assert clients.ws_ping(sock)
    workers = wait_until(lambda: _workers_at_most(lb, 2 * 3), 15, "retired workers to exit")
    assert workers
    closes = [c for c in lb.conns() if c["reason"].startswith("worker retired")]
    assert len(closes) == 40
    for generation in (1, 2, 3, 4):
        times = sorted(when(c) for c in closes if c["generation"] == generation)
        assert times[-1] - times[0] > 1.0, times  # spread over the window, not at one instant
    still_serves(lb, port)


def _workers_at_most(lb: SpliceLB, most: int) -> bool:
    workers = [p for p in psutil.Process(lb.pid).children() if p.status() != "zombie"]
    return len(workers) <= most + 2  # and the prober, and one more moment of slack for the admin


def running_workers(lb: SpliceLB) -> list[int]:
    alive = {p.pid for p in psutil.Process(lb.pid).children() if p.status() != "zombie"}
    return [pid for pid in lb.worker_pids() if pid in alive]


def last_reload(lb: SpliceLB) -> str:
    reloads = lb.events("reload")
    return str(reloads[-1]["outcome"]) if reloads else ""


def test_a_raising_step_of_the_supervisors_loop_is_logged_and_the_loop_goes_on(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        fault_config(port, servers(echo_pair)),
        launcher=(*INJECT, "--raise", "lb.supervisor:Supervisor._maintain=3", "--"),
    )
    [error] = wait_until(lambda: lb.events("supervisor_error"), 10, "supervisor_error")
    assert error["step"] == "maintain" and "injected fault" in error["error"]
    victim = lb.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)  # the loop still reaps and replaces
    wait_until(lambda: len(lb.events("worker_start")) == 3, 10, "a replacement worker")
    still_serves(lb, port)
