"""Open tunnels outlive reloads: the old workers hand them to the new generation.

Real clients on both ends: WebSocket tunnels exchanging messages that must
come back whole and in order, and TCP tunnels moving a numbered byte pattern
checked by SHA-256 on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from lb import __version__
from lb.pool import layout as L
from tests.integration import clients
from tests.integration.harness import (
    REPO,
    EchoBackend,
    LoadGen,
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
from tests.integration.tools import pattern, pattern_sha

INJECT = ("-m", "tests.faults.inject")


class Bulk(threading.Thread):
    """A TCP tunnel sending ``total`` bytes of the pattern at a steady pace and reading
    what the server sends: both are checked by SHA-256 at the end."""

    def __init__(self, port: int, total: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.local_port = self.sock.getsockname()[1]
        self.total, self.seconds = total, seconds
        self.received = hashlib.sha256()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        try:
            began, sent = time.monotonic(), 0
            for chunk in pattern(self.total):
                for start in range(0, len(chunk), 65536):
                    piece = chunk[start : start + 65536]
                    self.sock.sendall(piece)
                    sent += len(piece)
                    due = began + self.seconds * sent / self.total
                    time.sleep(max(0.0, due - time.monotonic()))
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc
        reader.join(60)

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received.update(chunk)
                self.count += len(chunk)
        except BaseException as exc:
            self.error = exc


def reload(lb: SpliceLB) -> float:
    done = cli("reload", "-c", str(lb.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic()


def workers_of(lb: SpliceLB) -> list[psutil.Process]:
    return [p for p in psutil.Process(lb.pid).children() if p.status() != "zombie"]


def tunnels_config(
    ws_port: int, tcp_port: int, echo: list[str], sha: str, app_extra: str = ""
) -> str:
    return config(
        listener(f"127.0.0.1:{ws_port}", "app")
        + listener(f"127.0.0.1:{tcp_port}", "sha", mode="tcp", name="bulk"),
        backend("app", [(f"echo{i + 1}", address) for i, address in enumerate(echo)], app_extra)
        + backend("sha", [("sha", sha)]),
        drain_timeout=2,  # a tunnel left behind would be closed 2 s after its reload
    )


def through(
    lb: SpliceLB, ws_port: int, tcp_port: int, sha: ToolServer, procs: list[Proc], change: Any
) -> None:
    """1,000 WebSocket tunnels exchanging messages and 20 TCP tunnels moving 8 MiB each way
    live through ``change(lb)`` (which returns when it is done): nothing lost, reordered or
    closed, and no old worker left."""
    load = LoadGen(ws_port, tunnels=1000, duration=30)
    procs.append(load)
    wait_until(lambda: load.event("tunnels_open"), 90, "1000 tunnels")
    bulk = [Bulk(tcp_port, 8 << 20, 12) for _ in range(20)]
    for tunnel in bulk:
        tunnel.start()
    last = change(lb)
    handovers = lb.events("handover")
    assert handovers and all(h["kept"] == 0 for h in handovers), handovers
    # no old worker remains: the prober and the two workers of the last generation
    wait_until(lambda: len(workers_of(lb)) == 3, 10, "the old generations to exit")
    summary = load.summary(60)
    troubles = [r for r in lb.records() if r.get("level") in ("warning", "error")]
    assert summary["failures"] == [], (len(summary["failures"]), troubles[:5])
    assert summary["tunnels"] == 1000
    assert summary["last_echo_min"] > last + 8  # every tunnel echoed 8 s after the change
    want = pattern_sha(8 << 20)
    for tunnel in bulk:
        tunnel.join(60)
        assert tunnel.error is None, tunnel.error
        assert (tunnel.count, tunnel.received.hexdigest()) == (8 << 20, want)
    results = wait_until(lambda: len(sha.results()) == 20 and sha.results(), 30, "their servers")
    assert all(r["received"] == 8 << 20 and r["received_sha"] == want for r in results), results
    # one conn line per tunnel, when it ended, with its whole life
    bulk_lines = [c for c in lb.conns() if c["listener"] == "bulk"]
    assert len(bulk_lines) == 20
    assert all(c["bytes_in"] == c["bytes_out"] == 8 << 20 for c in bulk_lines), bulk_lines[:2]
    assert min(c["duration_ms"] for c in bulk_lines) > 10_000


def test_tunnels_outlive_five_reloads_in_a_row(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    sha = ToolServer("sha", "--send", str(8 << 20))
    procs.append(sha)
    ws_port, tcp_port = free_port(), free_port()
    lb = start_lb(tunnels_config(ws_port, tcp_port, [b.address for b in echo_pair], sha.address))

    def five_reloads(lb: SpliceLB) -> float:
        for _ in range(5):
            last = reload(lb)
            time.sleep(1)
        wait_until(lambda: len(lb.events("handover")) >= 10, 20, "10 handovers")
        return last

    through(lb, ws_port, tcp_port, sha, procs, five_reloads)


def test_tunnels_outlive_an_upgrade_to_another_version(
    echo_pair: tuple[EchoBackend, EchoBackend], procs: list[Proc], tmp_path: Path
) -> None:
    """splicelb installed in a directory of its own; a new version is installed there while
    it runs (the same code, another version string and another layout of its pool's health
    records), then `splicelb upgrade`."""
    installed = tmp_path / "site"
    for package in ("lb", "probes"):
        shutil.copytree(REPO / package, installed / package)
    sha = ToolServer("sha", "--send", str(8 << 20))
    procs.append(sha)
    ws_port, tcp_port = free_port(), free_port()
    health = '[backends.health]\ntype = "http"\npath = "/healthz"\ninterval = 0.5\n'
    echo = [b.address for b in echo_pair]
    text = tunnels_config(ws_port, tcp_port, echo, sha.address, app_extra=health)
    lb = SpliceLB(tmp_path, text, cwd=installed)
    procs.append(lb)
    assert {r["version"] for r in lb.events("worker_start")} == {__version__}

    def status() -> dict[str, Any]:
        """`splicelb status --json` of the code installed now (it reads its own layout)."""
        run = [sys.executable, "-m", "lb", "status", "--json", "-c", str(lb.config_path)]
        done = subprocess.run(
            run, check=False, cwd=installed, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def health_of(view: dict[str, Any]) -> dict[str, str]:
        return {s["name"]: s["health"] for b in view["backends"] for s in b["servers"]}

    wait_until(lambda: set(health_of(status()).values()) == {"up", "unchecked"}, 10, "checks")

    def upgrade(lb: SpliceLB) -> float:
        init = installed / "lb" / "__init__.py"
        init.write_text(init.read_text().replace(__version__, NEW_VERSION))
        new_layout(installed / "lb" / "pool" / "layout.py")
        before = status()
        done = cli("upgrade", "-c", str(lb.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"upgraded: splicelb {NEW_VERSION}, generation 2 is serving" in done.stdout
        # the new code read the older pool: health carried, totals went on
        after = status()
        assert health_of(after) == health_of(before), (health_of(before), health_of(after))
        assert after["listeners"][0]["total"] >= before["listeners"][0]["total"] > 0
        wait_until(lambda: len(lb.events("handover")) == 2, 20, "2 handovers")
        return time.monotonic()

    through(lb, ws_port, tcp_port, sha, procs, upgrade)
    [upgraded] = lb.events("upgraded")
    assert (upgraded["pid"], upgraded["from_version"], upgraded["version"]) == (
        lb.pid,
        __version__,
        NEW_VERSION,
    )
    assert lb.popen.poll() is None  # the same process throughout
    new_workers = [r for r in lb.events("worker_start") if r["generation"] == 2]
    assert {r["version"] for r in new_workers} == {NEW_VERSION}


NEW_VERSION = "9.9.9+upgrade-test"


def new_layout(path: Path) -> None:
    """The next layout version, with one more word in each health record (before its
    text), that still reads this code's pools as an older layout."""
    text, current = path.read_text(), L.LAYOUT_VERSION
    changes = {
        f"LAYOUT_VERSION: Final = {current}\n": f"LAYOUT_VERSION: Final = {current + 1}\n",
        f"R_TEXT_OFF: Final = {L.R_TEXT_OFF // 8} * 8": (
            f"R_TEXT_OFF: Final = {L.R_TEXT_OFF // 8 + 1} * 8"
        ),
        f"RECORD_WORDS: Final = {L.RECORD_WORDS - L.TEXT_BYTES // 8} + TEXT_BYTES // 8": (
            f"RECORD_WORDS: Final = {L.RECORD_WORDS - L.TEXT_BYTES // 8 + 1} + TEXT_BYTES // 8"
        ),
    }
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    if "OLDER_RECORDS" in text:  # the layouts it reads
        text += f"\nOLDER_RECORDS[{current}] = ({L.RECORD_WORDS}, {L.R_TEXT_OFF}, {L.R_UP_AT})\n"
    path.write_text(text)


def test_a_worker_killed_in_the_middle_of_a_handover_loses_only_what_it_still_held(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    text = config(
        listener(f"127.0.0.1:{port}", "app"),
        backend("app", [(b.name, b.address) for b in echo_pair]),
        workers=1,
        drain_timeout=60,
    )
    # each tunnel takes the old worker 20 ms to send: a handover of 300 lasts 6 s
    lb = start_lb(
        text,
        workers=1,
        launcher=(*INJECT, "--slow", "lb.worker.handover:Sender.send=0.02", "--"),
    )
    tunnels = [clients.ws_tunnel(port) for _ in range(300)]
    [old] = lb.worker_pids()
    reload(lb)
    wait_until(lambda: adopted(lb) >= 50, 20, "50 tunnels adopted")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: old not in [p.pid for p in workers_of(lb)], 10, "the old worker gone")
    moved = adopted(lb)
    assert 50 <= moved < 300
    alive = [clients.ws_ping(sock) for sock in tunnels]
    assert sum(alive) == moved  # what had been sent lives on; the rest died with the worker
    for sock in tunnels:
        sock.close()


def adopted(lb: SpliceLB) -> int:
    done = cli("status", "--json", "-c", str(lb.config_path))
    if done.returncode:
        return 0
    workers = json.loads(done.stdout)["workers"]
    return sum(w["adopted"] for w in workers if w["generation"] == 2)


def test_a_backend_with_on_reload_close_keeps_its_tunnels_in_the_old_worker(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [(b.name, b.address) for b in echo_pair], extra='on_reload = "close"'),
            workers=1,
            drain_timeout=3,
            extra_global="close_spread = 0",  # at drain_timeout, not spread before it
        ),
        workers=1,
    )
    tunnel = clients.ws_tunnel(port)
    reloaded = reload(lb)
    [handover] = wait_until(lambda: lb.events("handover"), 10, "the handover")
    assert (handover["tunnels"], handover["kept"]) == (0, 1)
    assert clients.ws_ping(tunnel)  # served by the old worker while it drains
    tunnel.settimeout(10)
    assert clients.read_all(tunnel) == b""  # then closed at drain_timeout
    assert time.monotonic() - reloaded > 2.5


def test_a_tunnel_whose_listener_the_reload_removed_moves_and_keeps_its_name(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    keep, gone = free_port(), free_port()
    servers = [(b.name, b.address) for b in echo_pair]
    both = listener(f"127.0.0.1:{keep}", "app") + listener(
        f"127.0.0.1:{gone}", "old", name="leaving"
    )
    lb = start_lb(config(both, backend("app", servers) + backend("old", servers[:1])))
    tunnel = clients.ws_tunnel(gone)
    lb.config_path.write_text(
        config(listener(f"127.0.0.1:{keep}", "app"), backend("app", servers)).replace(
            "@RUNTIME@", str(lb.runtime_dir)
        )
    )
    reload(lb)
    wait_until(lambda: lb.events("handover"), 10, "the handover")  # by the worker that held it
    assert clients.ws_ping(tunnel)  # its listener and backend are gone; it is established
    tunnel.close()
    [line] = wait_until(
        lambda: [c for c in lb.conns() if c["listener"] == "leaving"], 10, "its line"
    )
    assert (line["backend"], line["server"], line["generation"]) == ("old", "echo1", 2)


def test_tunnels_a_new_worker_has_no_room_for_stay_served_in_the_old_one(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """The reload lowers maxconn below the open tunnels: the new worker takes what it has
    room for; the rest stay with the old worker, served, until its drain_timeout."""
    port = free_port()
    servers = [(b.name, b.address) for b in echo_pair]
    text = config(
        listener(f"127.0.0.1:{port}", "app"), backend("app", servers), workers=1, drain_timeout=4
    )
    lb = start_lb(text, workers=1)
    tunnels = [clients.ws_tunnel(port) for _ in range(60)]
    lb.config_path.write_text(
        text.replace("[global]\n", "[global]\nmaxconn = 40\n").replace(
            "@RUNTIME@", str(lb.runtime_dir)
        )
    )
    reloaded = reload(lb)
    [handover] = wait_until(lambda: lb.events("handover"), 10, "the handover")
    assert (handover["tunnels"], handover["kept"]) == (40, 20)
    assert all(clients.ws_ping(sock) for sock in tunnels)  # every one served, here or there
    assert adopted(lb) == 40
    wait_until(lambda: time.monotonic() - reloaded > 5, 10, "the old worker's drain_timeout")
    alive = sum(clients.ws_ping(sock) for sock in tunnels)
    assert alive == 40  # the 20 left behind were closed when the old worker's time ran out
    for sock in tunnels:
        sock.close()
