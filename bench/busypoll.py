"""What busy polling buys and costs: a worker's CPU and the round trip, message rate by rate.

``python -m bench.busypoll`` runs ``splicelb run`` (1 worker, ``mode =
"tcp"`` listeners in front of an echo backend and a push backend) once for
each ``busy_poll_us`` value (``--values 0,50``: off, and the default).  Over
one connection it then sends 64-byte messages at a few paced rates (idle,
then about 100, 1,000 and 5,000 a second), each waiting for its echo; and
over another the push backend sends 64-byte messages one way, about 1,000
and 4,000 a second, with nothing answered.  For each it prints the worker's
CPU share (user + system, from ``/proc``) and, for round trips, the median
as the client sees it.  Busy polling pays where an answer comes soon after
what the worker passed on, and costs most where nothing answers soon, as
with pushes: each message is followed by a whole window of polls.  Rates
are paced with ``time.sleep``, so the achieved rate is printed rather than
assumed.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.instructions import MESSAGE, backend, round_trips, worker_pid
from bench.procs import HOST, BenchError, Proc, free_ports, scratch_main, wait_until
from bench.servers import listening_ports, splicelb_argv, splicelb_toml, splicelb_workdir

INTERVALS = (None, 0.01, 0.001, 0.0001)  # None: idle; else the pause between messages
PUSH_INTERVALS = (0.001, 0.0002)
END = b"!"  # the push backend's last byte: its messages are all b"x"


def push_backend() -> tuple[socket.socket, int]:
    """Per connection: read "INTERVAL SECONDS", push MESSAGE every INTERVAL for SECONDS, END."""
    listener = socket.create_server((HOST, 0))

    def push(conn: socket.socket) -> None:
        with conn:
            interval, seconds = map(float, conn.recv(100).split())
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                conn.sendall(MESSAGE)
                time.sleep(interval)
            conn.sendall(END)
            conn.recv(1)  # until the client closes

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the run is over
            threading.Thread(target=push, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, int(listener.getsockname()[1])


def start(
    busy_poll_us: int, echo_port: int, push_port: int, tmp: Path
) -> tuple[Proc, int, int, int]:
    """A 1-worker splicelb in front of the echo and push backends: its Proc, its two
    ports and its worker's pid."""
    port, push = free_ports(2)
    workdir, runtime = splicelb_workdir(tmp, f"splicelb-busy{busy_poll_us}")
    config = workdir / "splicelb.toml"
    listeners = [("echo", port, "tcp", echo_port), ("push", push, "tcp", push_port)]
    config.write_text(splicelb_toml(runtime, 1, listeners, busy_poll_us=busy_poll_us))
    proc = Proc(f"splicelb-busy{busy_poll_us}", splicelb_argv(config, workdir), tmp)

    def up() -> int | None:
        proc.check_alive()
        return worker_pid(runtime) if {port, push} <= listening_ports() else None

    return proc, port, push, wait_until(up, 30, "splicelb to start")


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


def pushed(port: int, interval: float, seconds: float) -> float:
    """Messages pushed every ``interval`` s for ``seconds``, read to the end: per second."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(f"{interval} {seconds}".encode())
        received, last = 0, b""
        while last != END:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("the push tunnel closed before its end")
            received, last = received + len(chunk), chunk[-1:]
    return (received - len(END)) / len(MESSAGE) / seconds


def cpu_clock(worker: psutil.Process) -> tuple[float, float]:
    """The worker's CPU seconds (user + system) and the clock, to measure a share from."""
    return float(sum(worker.cpu_times()[:2])), time.monotonic()


def cpu_share(worker: psutil.Process, since: tuple[float, float]) -> float:
    """The worker's CPU use since ``since`` (from :func:`cpu_clock`), in percent of a CPU."""
    cpu, clock = cpu_clock(worker)
    return 100 * (cpu - since[0]) / (clock - since[1])


def measure(values: list[int], seconds: float, tmp: Path) -> list[dict[str, object]]:
    echoer, echo_port = backend("echo")
    pusher, push_port = push_backend()
    rows: list[dict[str, object]] = []

    def row(busy: int, pattern: str, rate: float, cpu: float, p50: float | None) -> None:
        rows.append(
            {
                "busy_poll_us": busy,
                "pattern": pattern,
                "rate": round(rate),
                "cpu_percent": round(cpu, 1),
                "p50_us": None if p50 is None else round(p50, 1),
            }
        )

    try:
        for busy in values:
            proc, port, push, pid = start(busy, echo_port, push_port, tmp)
            worker = psutil.Process(pid)
            with socket.create_connection((HOST, port), timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                round_trips(sock, 200)  # warm up
                for interval in INTERVALS:
                    before = cpu_clock(worker)
                    rate, p50 = paced(sock, interval, seconds)
                    row(busy, "round trips", rate, cpu_share(worker, before), p50)
            for interval in PUSH_INTERVALS:
                before = cpu_clock(worker)
                rate = pushed(push, interval, seconds)
                row(busy, "pushes", rate, cpu_share(worker, before), None)
            proc.kill()
    finally:
        echoer.close()
        pusher.close()
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| busy_poll_us | messages | per second | worker CPU | round trip p50 |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        p50 = "—" if r["p50_us"] is None else f"{r['p50_us']} µs"
        lines.append(
            f"| {r['busy_poll_us']} | {r['pattern']} | {r['rate']:,} | {r['cpu_percent']}% "
            f"| {p50} |"
        )
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
