"""Many idle tunnels: does a worker's timer work grow with the tunnels it holds?

``python -m bench.tunnels --tunnels 100000`` runs splicelb as ``bench/run.py``
does (as an unprivileged user, ``log_level = "warning"``) with one WebSocket
listener in front of echo backends, and measures twice: with ``BASELINE``
idle WebSocket tunnels open, then with ``--tunnels``:

- 64-byte round trips over one more tunnel, one message at a time
  (``bench.clients rtt``: p50, p99, p99.9, the longest, and the median over
  the run's seconds of each second's longest: a stall the worker makes once a
  second, such as a sweep of its tunnels, shows there, one of the machine's
  only in the longest).  The probe goes through a listener and an echo
  server of its own, which hold no idle tunnel (through the same worker
  process when there is one worker), and the same round trips to that
  echo server directly, before the balancer starts, are what the machine
  itself does;
- the workers' CPU while nothing moves, over ``--idle-seconds`` (each
  worker's share of one core; the busiest worker's is the figure), then,
  over as long again, each worker's longest loop turn (``strace -T`` of its
  ``epoll_wait``: from one returning to the next starting), the stall its
  own periodic work makes however many tunnels it holds;
- the balancer's resident memory (all its processes), and from the two
  measurements the memory each idle tunnel costs.

The sizes follow from this machine's limits.  A process may hold 20,000
descriptors: a worker holds at most ``PER_WORKER`` tunnels (two sockets
each, and its pipes), an echo backend process ``PER_BACKEND_PROC``
connections and a client process ``PER_CLIENT`` tunnels.  A source address
has about 28,000 local ports toward one destination address: the balancer
reaches one backend address per ``PER_SERVER`` tunnels, and each client
connects from one of several loopback addresses (127.0.0.2, ...).

Writes ``bench/results/<time>-tunnels.{json,md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.figures import close_idle, open_idle
from bench.procs import (
    HOST,
    REPO,
    BenchError,
    Proc,
    free_ports,
    log,
    scratch_main,
    wait_until,
)
from bench.servers import splicelb_argv, splicelb_workdir, wait_listening

BASELINE = 100
PER_WORKER = 8000  # 16,000 descriptors in sockets, and room for pipes and listening sockets
PER_BACKEND_PROC = 12500
PER_SERVER = 25000
PER_CLIENT = 12500
CLIENTS_PER_SOURCE = 2  # 25,000 tunnels from one source address
SETTLE = 3.0  # seconds after the last tunnel opened: its keepalive deadline has come and gone
RESULTS = REPO / "bench" / "results"


def start_echo(procs: int, tmp: Path, index: int) -> int:
    """One echo backend of ``procs`` processes on a port of its own; its port."""
    echo = Proc(
        f"echo-{index}",
        [sys.executable, str(REPO / "bench" / "echo_server.py"), "--procs", str(procs)],
        tmp,
        stdout=subprocess.PIPE,
    )
    assert echo.popen.stdout is not None
    line = echo.popen.stdout.readline().decode()
    echo.check_alive()
    if not line.startswith("listening "):
        raise BenchError(f"echo backend said {line!r}")
    port = int(line.split()[1])
    wait_listening(echo, [port], f"echo backend {index}")
    return port


def config(
    runtime: Path,
    workers: int,
    port: int,
    servers: list[int],
    maxconn: int,
    log_level: str = "warning",
    probe: tuple[int, int] | None = None,
) -> str:
    """``probe``: (front port, echo port) of a listener and backend of their own for the
    round-trip probe, so that its server holds no idle tunnel (its stalls are not the
    balancer's)."""
    text = textwrap.dedent(f"""\
        [global]
        workers = {workers}
        runtime_dir = "{runtime}"
        admin_bind = ""
        log_level = "{log_level}"
        maxconn = {maxconn}
        drain_timeout = 1

        [[listeners]]
        name = "ws"
        bind = "{HOST}:{port}"
        default_backend = "echo"

        [[backends]]
        name = "echo"
        """)
    for index, server in enumerate(servers):
        text += f'\n[[backends.servers]]\nname = "e{index}"\naddress = "{HOST}:{server}"\n'
    if probe is not None:
        front, echo = probe
        text += textwrap.dedent(f"""
            [[listeners]]
            name = "probe"
            bind = "{HOST}:{front}"
            default_backend = "probe"

            [[backends]]
            name = "probe"

            [[backends.servers]]
            name = "p0"
            address = "{HOST}:{echo}"
            """)
    return text


def status(runtime: Path) -> dict[str, Any]:
    """``splicelb status --json`` of the instance in ``runtime`` (empty if it does not answer)."""
    done = subprocess.run(
        [sys.executable, "-m", "lb", "status", "--runtime-dir", str(runtime), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode:
        return {"workers": []}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def worker_pids(runtime: Path) -> list[int]:
    return [w["pid"] for w in status(runtime)["workers"] if w["state"] == "running"]


def save(kind: str, result: dict[str, Any], table: str) -> None:
    """``bench/results/<time>-<kind>.{json,md}``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stamp}-{kind}.md").write_text(table)


def cpu_shares(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU over ``seconds``, as a share of one core (percent)."""
    procs = [psutil.Process(pid) for pid in pids]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    time.sleep(seconds)
    after = [sum(p.cpu_times()[:2]) for p in procs]
    return [round(100 * (a - b) / seconds, 3) for a, b in zip(after, before, strict=True)]


EPOLL_WAIT = re.compile(r"(\d+\.\d+) epoll_wait\(.*<(\d+\.\d+)>$")


def longest_turns(pids: list[int], seconds: float, tmp: Path) -> list[float] | None:
    """Each worker's longest loop turn over ``seconds`` (ms): the time from one
    ``epoll_wait`` returning to the next one starting, from ``strace -ttt -T`` (which
    slows the turn's system calls, so this is an upper bound).  None without strace."""
    if shutil.which("strace") is None:
        return None
    outs = [tmp / f"turns-{pid}.txt" for pid in pids]
    tracers = [
        subprocess.Popen(
            ["strace", "-ttt", "-T", "-e", "trace=epoll_wait", "-p", str(pid), "-o", str(out)],
            stderr=subprocess.DEVNULL,
        )
        for pid, out in zip(pids, outs, strict=True)
    ]
    time.sleep(seconds)
    longest = []
    for tracer, out in zip(tracers, outs, strict=True):
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        waits = [m for line in out.read_text().splitlines() if (m := EPOLL_WAIT.match(line))]
        ends = [(float(m[1]), float(m[1]) + float(m[2])) for m in waits]
        gaps = [start - end for (_, end), (start, _) in itertools.pairwise(ends)]
        longest.append(round(max(gaps, default=0.0) * 1000, 3))
    return longest


def round_trips(port: int, count: int) -> dict[str, float]:
    argv = ["-m", "bench.clients", "rtt", "--port", str(port), "--sizes", f"64:{count}"]
    done = subprocess.run(
        [sys.executable, *argv, "--warmup", "200"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    if done.returncode:
        raise BenchError(f"round trips failed: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout)["64"]
    return result


def measure(
    probe: int, runtime: Path, lb: Proc, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """The workers' idle CPU and longest idle turn, the balancer's memory, and round trips
    through ``probe``."""
    time.sleep(SETTLE)
    pids = worker_pids(runtime)
    cpu = cpu_shares(pids, args.idle_seconds)
    turns = longest_turns(pids, args.idle_seconds, tmp)
    rss = sum(p.memory_info().rss for p in lb.tree())
    rtt = round_trips(probe, args.round_trips)
    return {
        "workers_cpu_pct": cpu,
        "busiest_worker_cpu_pct": max(cpu),
        "longest_idle_turn_ms": max(turns) if turns else None,
        "rss": rss,
        "rtt64": rtt,
    }


def run(tmp: Path, args: argparse.Namespace) -> str:
    total = args.tunnels + BASELINE + 1
    workers = args.workers or max(2, math.ceil(total / args.per_worker))
    nservers = max(1, math.ceil(total / PER_SERVER))
    per_server = math.ceil(total / nservers)
    servers = [
        start_echo(math.ceil(per_server / PER_BACKEND_PROC), tmp, i) for i in range(nservers)
    ]
    probe_echo = start_echo(1, tmp, nservers)  # the probe's server: no idle tunnel on it
    log("round trips to the probe's echo backend itself: the machine's own stalls")
    direct = round_trips(probe_echo, args.round_trips)
    workdir, runtime = splicelb_workdir(tmp, "splicelb")
    port, probe = free_ports(2)
    path = workdir / "splicelb.toml"
    path.write_text(
        config(runtime, workers, port, servers, total + 1000, probe=(probe, probe_echo))
    )
    lb = Proc("splicelb", splicelb_argv(path, workdir), workdir)
    wait_listening(lb, [port, probe], "splicelb")
    wait_until(lambda: len(worker_pids(runtime)) == workers or None, 60, "the workers")
    log(f"{workers} workers, {nservers} echo servers; {BASELINE} tunnels")
    clients = open_idle(port, BASELINE, PER_CLIENT)
    result: dict[str, Any] = {"workers": workers, "servers": nservers, "direct": direct}
    try:
        result["baseline"] = {"tunnels": BASELINE, **measure(probe, runtime, lb, args, tmp)}
        log(f"opening {args.tunnels} more")
        sources = [f"127.0.0.{2 + i // CLIENTS_PER_SOURCE}" for i in range(64)]
        started = time.monotonic()
        clients += open_idle(port, args.tunnels, PER_CLIENT, sources)
        result["open_s"] = round(time.monotonic() - started, 1)
        tunnels = BASELINE + args.tunnels
        result["loaded"] = {"tunnels": tunnels, **measure(probe, runtime, lb, args, tmp)}
    finally:
        close_idle(clients)
    base, loaded = result["baseline"], result["loaded"]
    result["p99_ratio"] = round(loaded["rtt64"]["p99_us"] / base["rtt64"]["p99_us"], 2)
    result["p50_ratio"] = round(loaded["rtt64"]["p50_us"] / base["rtt64"]["p50_us"], 2)
    result["bytes_per_tunnel"] = round((loaded["rss"] - base["rss"]) / args.tunnels)
    table = report(result)
    save("tunnels", result, table)
    return table


def report(result: dict[str, Any]) -> str:
    rows = [
        "| open tunnels | 64 B round trip p50 | p99 | p99.9 | max | a second's longest (median)"
        " | busiest worker's idle CPU | its longest idle turn |"
    ]
    rows.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    points = ("p50_us", "p99_us", "p999_us", "max_us", "second_max_p50_us")
    if "direct" in result:  # the echo backend without the balancer
        times = " | ".join(f"{result['direct'][p]:.1f} µs" for p in points)
        rows.append(f"| none (the echo backend directly) | {times} | | |")
    for key in ("baseline", "loaded"):
        r, rtt = result[key], result[key]["rtt64"]
        times = " | ".join(f"{rtt[p]:.1f} µs" for p in points)
        turn = r.get("longest_idle_turn_ms")
        turn_text = "" if turn is None else f"{turn:.3f} ms"
        rows.append(
            f"| {r['tunnels']:,} | {times} | {r['busiest_worker_cpu_pct']:.2f}% | {turn_text} |"
        )
    return (
        f"{result['workers']} workers, {result['servers']} echo servers;"
        f" p99 ratio {result['p99_ratio']}, p50 ratio {result['p50_ratio']};"
        f" {result['bytes_per_tunnel']:,} bytes of the balancer's memory per idle tunnel\n\n"
        + "\n".join(rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=0, help="default: what the tunnels need")
    parser.add_argument(
        "--per-worker", type=int, default=PER_WORKER, help="tunnels a worker holds at most"
    )
    parser.add_argument("--round-trips", type=int, default=30000, help="about 10 s of them")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    return scratch_main("splicelb-tunnels-", lambda tmp: run(tmp, args))


if __name__ == "__main__":
    sys.exit(main())
