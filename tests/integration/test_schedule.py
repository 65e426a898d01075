"""Checks stay on schedule with 1, 2 and 64 servers per backend, and the pool holds them all."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable

from tests.integration.harness import (
    FlakyBackend,
    Proc,
    SpliceLB,
    backend,
    config,
    free_port,
    listener,
)

INTERVAL = 0.5
COUNTS = {"one": 1, "two": 2, "many": 64}
RUN_FOR = 5.0


def test_checks_keep_their_interval_for_1_2_and_64_servers(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    ports = [free_port() for _ in range(sum(COUNTS.values()))]
    server = FlakyBackend(
        "multi", port=ports[0], extra=("--ports", ",".join(map(str, ports[1:])), "--log-checks")
    )
    procs.append(server)
    health = f'[backends.health]\ntype = "http"\ninterval = {INTERVAL}\ntimeout = 0.4\n'
    backends, index = "", 0
    for name, count in COUNTS.items():
        servers = [(f"{name}{i}", f"127.0.0.1:{ports[index + i]}") for i in range(count)]
        index += count
        backends += backend(name, servers, extra=health)
    port = free_port()
    lb = start_lb(config(listener(f"127.0.0.1:{port}", "one"), backends))
    time.sleep(RUN_FOR)

    arrivals: dict[int, list[float]] = defaultdict(list)
    for line in server.lines[1:]:
        record = json.loads(line)
        arrivals[record["port"]].append(record["t"])
    assert set(arrivals) == set(ports)  # every server of every backend is checked
    gaps = [b - a for times in arrivals.values() for a, b in itertools.pairwise(times)]
    counts = [len(times) for times in arrivals.values()]
    spread = max(abs(g - INTERVAL) for g in gaps)
    print(
        f"checks per server: {min(counts)}..{max(counts)}; gap median "
        f"{statistics.median(gaps):.3f} s, min {min(gaps):.3f}, max {max(gaps):.3f}, "
        f"largest deviation {spread * 1000:.0f} ms"
    )
    assert min(counts) >= RUN_FOR / (INTERVAL * 1.1) - 2
    assert abs(statistics.median(gaps) - INTERVAL) < 0.02
    # ±10% jitter by design, plus a little scheduling delay on a busy 2-core machine.
    assert all(INTERVAL * 0.9 - 0.05 <= g <= INTERVAL * 1.1 + 0.1 for g in gaps), sorted(gaps)

    status = subprocess.run(
        [sys.executable, "-m", "lb", "status", "--runtime-dir", str(lb.runtime_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    state = json.loads(status.stdout)
    servers = {b["name"]: b["servers"] for b in state["backends"]}
    assert {name: len(s) for name, s in servers.items()} == COUNTS
    assert all(s["health"] == "up" for group in servers.values() for s in group)
    assert all(s["check"]["checks"] >= 5 for group in servers.values() for s in group)
