"""A reload with many open tunnels: how long it takes, and the longest pause a tunnel sees.

``python -m bench.reload --tunnels 10000`` runs splicelb as ``bench/run.py``
does, with one WebSocket listener in front of echo backends, opens
``--tunnels`` idle WebSocket tunnels and ``--probes`` more that each send a
64-byte message and wait for its echo, one after the other, all the time.
Then it reloads (``splicelb reload``, which returns once the new generation
serves) and measures:

- how long the reload command took, and how long until the old workers had
  handed every tunnel over and exited;
- the longest round trip any probe saw during the reload (every probe is
  handed over too), and during the old workers' handovers themselves (from
  their ``handover`` log lines), next to the longest before the reload;
- that every tunnel lives on: the new workers hold them all.

Writes ``bench/results/<time>-reload.{json,md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.clients import binary_frame, open_tunnel
from bench.figures import close_idle, open_idle
from bench.procs import BenchError, Proc, free_port, log, scratch_main, wait_until
from bench.servers import splicelb_argv, splicelb_workdir, wait_listening
from bench.tunnels import (
    PER_BACKEND_PROC,
    PER_CLIENT,
    PER_SERVER,
    config,
    save,
    start_echo,
    status,
)

CLIENTS_PER_SOURCE = 2
WARM = 2.0  # seconds of round trips before the reload: the "before" figures


class Probe(threading.Thread):
    """One tunnel's round trips, one after the other: (start, seconds) of each."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = open_tunnel(port)
        self.trips: list[tuple[float, float]] = []  # wall-clock start, seconds
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        frame = binary_frame(64)
        buf = bytearray(len(frame))
        try:
            while not self.stop.is_set():
                start, clock = time.time(), time.monotonic()
                self.sock.sendall(frame)
                got = 0
                while got < len(frame):
                    n = self.sock.recv_into(memoryview(buf)[got:])
                    if not n:
                        raise BenchError("a probe's tunnel closed")
                    got += n
                self.trips.append((start, time.monotonic() - clock))
        except BaseException as exc:
            self.error = exc

    def longest(self, since: float, until: float) -> float:
        """The longest round trip that began between two wall-clock times."""
        return max((rtt for start, rtt in self.trips if since <= start < until), default=0.0)


def wall_clock(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def run(tmp: Path, args: argparse.Namespace) -> str:
    total = args.tunnels + args.probes
    nservers = max(1, -(-total // PER_SERVER))
    per_server = -(-total // nservers)
    servers = [start_echo(-(-per_server // PER_BACKEND_PROC), tmp, i) for i in range(nservers)]
    workdir, runtime = splicelb_workdir(tmp, "splicelb")
    port = free_port()
    path = workdir / "splicelb.toml"
    path.write_text(config(runtime, args.workers, port, servers, total + 1000, "info"))
    lb = Proc("splicelb", splicelb_argv(path, workdir), workdir)
    wait_listening(lb, [port], "splicelb")
    wait_until(lambda: len(status(runtime)["workers"]) == args.workers or None, 60, "workers")
    sources = [f"127.0.0.{2 + i // CLIENTS_PER_SOURCE}" for i in range(64)]
    log(f"opening {args.tunnels} tunnels")
    clients = open_idle(port, args.tunnels, PER_CLIENT, sources)
    probes = [Probe(port) for _ in range(args.probes)]
    try:
        for probe in probes:
            probe.start()
        time.sleep(WARM)
        began, wall = time.monotonic(), time.time()
        done = subprocess.run(
            [sys.executable, "-m", "lb", "reload", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        served = time.monotonic()
        if done.returncode:
            raise BenchError(f"reload failed: {done.stdout}{done.stderr}")
        wait_until(
            lambda: {w["generation"] for w in status(runtime)["workers"]} == {2} or None,
            120,
            "the old workers to hand everything over and exit",
        )
        handed = time.monotonic()
        time.sleep(1.0)
        for probe in probes:
            probe.stop.set()
            probe.join(10)
            if probe.error is not None:
                raise BenchError(f"a probe failed: {probe.error!r}")
        held = sum(w["connections"] for w in status(runtime)["workers"])
        adopted = sum(w["adopted"] for w in status(runtime)["workers"])
    finally:
        close_idle(clients)
    handovers = [
        {**record, "at": wall_clock(record["timestamp"])}
        for record in map(json.loads, lb.log_path.read_text().splitlines())
        if record.get("event") == "handover"
    ]
    windows = [(h["at"] - h["duration_ms"] / 1000, h["at"]) for h in handovers]
    result = {
        "tunnels": args.tunnels,
        "probes": args.probes,
        "workers": args.workers,
        "reload_s": round(served - began, 3),
        "handed_over_s": round(handed - began, 3),
        "handover_ms": [h["duration_ms"] for h in handovers],
        "handed": sum(h["tunnels"] for h in handovers),
        "kept": sum(h["kept"] for h in handovers),
        "held_after": held,
        "adopted": adopted,
        "longest_before_ms": round(1000 * max(p.longest(wall - WARM, wall) for p in probes), 3),
        "longest_during_ms": round(
            1000 * max(p.longest(wall, wall + handed - began + 0.5) for p in probes), 3
        ),
        "longest_handover_ms": round(
            1000 * max(p.longest(start, end) for p in probes for start, end in windows), 3
        ),
    }
    if adopted < total:
        raise BenchError(f"only {adopted} of {total} tunnels reached the new workers: {result}")
    table = report(result)
    save("reload", result, table)
    return table


def report(r: dict[str, Any]) -> str:
    return (
        f"A reload with {r['tunnels']:,} idle tunnels and {r['probes']} busy ones,"
        f" {r['workers']} workers\n\n"
        "| figure | value |\n|---|---:|\n"
        f"| `splicelb reload` returned (the new generation serves) | {r['reload_s']} s |\n"
        f"| every tunnel handed over, the old workers gone | {r['handed_over_s']} s |\n"
        f"| each old worker's handover | {', '.join(f'{ms:g} ms' for ms in r['handover_ms'])} |\n"
        f"| tunnels handed over / kept by the old workers | {r['handed']:,} / {r['kept']} |\n"
        f"| longest round trip of a busy tunnel, before | {r['longest_before_ms']} ms |\n"
        f"| ... during the reload | {r['longest_during_ms']} ms |\n"
        f"| ... during the handovers themselves | {r['longest_handover_ms']} ms |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    return scratch_main("splicelb-reload-", lambda tmp: run(tmp, args))


if __name__ == "__main__":
    sys.exit(main())
