"""What busy polling buys and costs: a worker's CPU and the round trip, message rate by rate.

``python -m bench.busypoll`` runs ``splicelb run`` (1 worker, one ``mode =
"tcp"`` listener in front of an echo backend) once for each ``busy_poll_us``
value (``--values 0,50``: off, and the default) and, over one connection,
sends 64-byte messages at a few paced rates (idle, then about 100, 1,000 and
5,000 a second; each waits for its echo).  For each rate it prints the
worker's CPU share (user + system, from ``/proc``) and the median round trip
as the client sees it.  Busy polling spends CPU when messages come a little
apart, and none when the worker is idle or saturated; this shows how much,
next to the round trip it saves.  Rates are paced with ``time.sleep``, so
the achieved rate is printed rather than assumed.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.instructions import backend, round_trips, worker_pid
from bench.procs import HOST, Proc, free_port, scratch_main, wait_until
from bench.servers import listening_ports, splicelb_toml

INTERVALS = (None, 0.01, 0.001, 0.0001)  # None: idle; else the pause between messages


def start(busy_poll_us: int, echo_port: int, tmp: Path) -> tuple[Proc, int, int]:
    """A 1-worker splicelb in front of ``echo_port``: its Proc, port and worker pid."""
    port, runtime = free_port(), tmp / f"run-{busy_poll_us}"
    config = tmp / f"splicelb-{busy_poll_us}.toml"
    listeners = [("echo", port, "tcp", echo_port)]
    config.write_text(splicelb_toml(runtime, 1, listeners, busy_poll_us=busy_poll_us))
    argv = [sys.executable, "-m", "lb", "run", "-c", str(config)]
    proc = Proc(f"splicelb-busy{busy_poll_us}", argv, tmp)

    def up() -> int | None:
        proc.check_alive()
        return worker_pid(runtime) if port in listening_ports() else None

    return proc, port, wait_until(up, 30, "splicelb to start")


def paced(
    sock: socket.socket, interval: float | None, seconds: float
) -> tuple[float, float | None]:
    """Messages every ``interval`` s for ``seconds``: (messages per second, p50 µs)."""
    times: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if interval is None:
            time.sleep(0.05)
            continue
        sent = time.perf_counter()
        round_trips(sock, 1)
        times.append(time.perf_counter() - sent)
        time.sleep(interval)
    rate = len(times) / (time.monotonic() - started)
    return rate, statistics.median(times) * 1e6 if times else None


def measure(values: list[int], seconds: float, tmp: Path) -> list[dict[str, object]]:
    echoer, echo_port = backend(echo=True)
    rows: list[dict[str, object]] = []
    try:
        for busy in values:
            proc, port, pid = start(busy, echo_port, tmp)
            worker = psutil.Process(pid)
            with socket.create_connection((HOST, port), timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                round_trips(sock, 200)  # warm up
                for interval in INTERVALS:
                    before, clock = sum(worker.cpu_times()[:2]), time.monotonic()
                    rate, p50 = paced(sock, interval, seconds)
                    cpu = sum(worker.cpu_times()[:2]) - before
                    rows.append(
                        {
                            "busy_poll_us": busy,
                            "rate": round(rate),
                            "cpu_percent": round(100 * cpu / (time.monotonic() - clock), 1),
                            "p50_us": None if p50 is None else round(p50, 1),
                        }
                    )
            proc.kill()
    finally:
        echoer.close()
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| busy_poll_us | messages/s | worker CPU | round trip p50 |", "|---:|---:|---:|---:|"]
    for r in rows:
        p50 = "—" if r["p50_us"] is None else f"{r['p50_us']} µs"
        lines.append(f"| {r['busy_poll_us']} | {r['rate']:,} | {r['cpu_percent']}% | {p50} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--values", default="0,50", help="busy_poll_us values to run (0,50)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per rate (4)")
    args = parser.parse_args(argv)
    values = [int(v) for v in args.values.split(",")]
    return scratch_main("splicelb-busypoll-", lambda tmp: table(measure(values, args.seconds, tmp)))


if __name__ == "__main__":
    sys.exit(main())
