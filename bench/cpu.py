"""CPU cost per request and per connection: where the request-rate gap lies.

``python -m bench.cpu`` starts the benchmark's backends, then for each
balancer (1 worker against ``nbthread 1``; ``--workers N``) runs ``wrk``
kept-alive and with ``Connection: close`` and reads the balancer's CPU time
(user and system, from psutil, over its whole process tree) before and
after.  It prints the microseconds of CPU per request, the TCP segments sent
per request by every socket on the machine (a balancer that sends fewer
leaves the kernel less to do on both ends of each), the whole machine's CPU
per request, user space and kernel (client, backends, balancer and the
kernel's own threads), and the share of the time the CPUs were idle.  With
``--strace``, the system calls per request of the balancer's busy process
(``strace -c -f``, a separate run: strace slows it down); with ``--perf``,
the profile of that process (``perf record -e cpu-clock``, another run): the
share of its CPU in the kernel and in each user-space binary (libpython,
libc, haproxy), and its hottest symbols.  The rate figures of
``bench/run.py`` divide the same cores between the client, the backends and
the balancer, so while nothing idles the rate follows the machine's CPU per
request, and a balancer that spends less serves more; this tells which part
of the CPU, user (Python) or system (the kernel), makes the difference.

``--balancers`` may name ``floor`` too: ``bench/floor.py``, a bare splice
forwarder with the same system calls as splicelb's worker and the least
Python around them (no routing, counters, timeouts or logs), the floor of
what Python costs per request before any feature.  ``--rounds N`` measures
the balancers N times, alternating their order, and reports the medians, and
with HAProxy among them each balancer's ``vs_haproxy``: the median of its
rate's ratio to HAProxy's in the same round (the machine's speed drifts by
several percent between rounds, which a ratio of medians would take in).
With five rounds or more, ``vs_haproxy_interval`` is where that median lies
with 90% confidence (``median_interval``): with two workers one round's ratio
moves by ±10% on this machine, so telling a 5% cost takes 16 rounds or more.

What a feature costs: ``--balancers`` may name splicelb's variants
(``bench.servers.VARIANTS``), which change its ``http`` listener only:
``splicelb-http`` reads the head (``mode = "http"``) without forwarded
fields, ``splicelb-address`` adds them and sends a PROXY v2 header to nginx
(which reads it: ``listen ... proxy_protocol``).  ``--baseline NAME`` makes
the within-round ratio one to that balancer (``vs_NAME``), e.g.
``--balancers splicelb-http,splicelb-address --baseline splicelb-http
--loads close --rounds 5``: the cost of telling the servers the client's
address, on new connections per second; ``splicelb-limits`` has client
limits set too high to refuse anyone (``--balancers splicelb,splicelb-limits
--baseline splicelb``: what counting clients costs).  ``NAME@REV`` runs a
variant with the code of an earlier commit: ``--balancers
splicelb-http-defaults@REV,splicelb-http-defaults --baseline
splicelb-http-defaults@REV --loads keepalive`` is a change's cost to kept-alive
requests through an http listener with its default keys.

TLS passthrough: ``--balancers splicelb-tls,haproxy-tls --baseline haproxy-tls
--loads close`` measures new TLS connections per second (ECDHE P-256 with nginx,
which does the handshakes) through a listener that routes on the server name,
``wrk`` asking for ``https://localhost:PORT/``.

The main mode: ``--loads l7keepalive,l7close,upgrades`` drives the front ports
where splicelb's http listener meets HAProxy's ``mode http`` (``wrk``, and
``bench/wsload.py``'s WebSocket upgrades: the rate is upgrades per second).
What logging costs: ``NAME+info`` runs a splicelb (or a variant) with
``log_level = "info"``, a ``conn`` line per connection: ``--balancers
splicelb,splicelb+info --baseline splicelb --loads l7close,upgrades``."""

from __future__ import annotations

import argparse
import json
import math
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.figures import WRK_TOTAL
from bench.procs import (
    HOST,
    BenchError,
    ensure_tools,
    install_debian,
    log,
    run_tool,
    scratch_main,
    tcp_segments_sent,
)
from bench.servers import TLS_BALANCERS, TLS_NAME, Target, start_backends, start_target

STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")
# A line of `perf report --sort dso,sym`: "  10.21%  [kernel.kallsyms]  [k] tcp_ack".
PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")
TRACER_PACKAGES = {"strace": "strace", "perf": "linux-perf"}  # Debian packages
PERF_TOP = 8  # hottest symbols listed, kernel and user space each
# a row's figures that several rounds give as medians
MEDIANS = (
    "rate",
    "user_us",
    "system_us",
    "segments",
    "machine_user_us",
    "machine_kernel_us",
    "idle_pct",
)


def busiest_pid(target: Target) -> int:
    """The process of the tree with the most CPU time: the worker (or HAProxy itself)."""
    assert target.proc is not None
    best, pid = -1.0, target.proc.pid
    for p in target.proc.tree():
        try:
            t = p.cpu_times()
        except Exception:
            continue
        if t.user + t.system > best:
            best, pid = t.user + t.system, p.pid
    return pid


def wrk(tools: dict[str, str], port: int, seconds: int, close: bool, tls: bool = False) -> int:
    """Requests ``wrk`` made in ``seconds``; ``tls``: over TLS, to the name ``TLS_NAME``."""
    argv = [tools["wrk"], "-t2", "-c32", "-d", f"{seconds}s"]
    if close:
        argv += ["-H", "Connection: close"]
    url = f"https://{TLS_NAME}:{port}/" if tls else f"http://{HOST}:{port}/"
    out = run_tool([*argv, url], seconds + 60, "wrk")
    total = WRK_TOTAL.search(out)
    if total is None:
        raise BenchError(f"wrk printed no total: {out}")
    return int(total.group(1))


def tracer(tool: str) -> str:
    """The path of ``tool`` (strace or perf); ``main`` installs them when asked for."""
    binary = shutil.which(tool)
    if binary is None:
        raise BenchError(f"{tool} is not installed (Debian package {TRACER_PACKAGES[tool]})")
    return binary


def upgrades(port: int, seconds: int) -> int:
    """Upgrades completed in ``seconds`` by ``bench/wsload.py`` (32 clients at once)."""
    argv = [sys.executable, "-m", "bench.wsload", "upgrades", "--port", str(port)]
    argv += ["--seconds", str(seconds), "--warmup", "0"]
    report = json.loads(run_tool(argv, seconds + 60, "bench.wsload"))
    if report["errors"]:
        raise BenchError(f"upgrades with errors: {report['errors']}")
    return int(report["completed"])


# load -> the target's port it drives, and what drives it (wrk, or the upgrade generator)
LOADS = {
    "keepalive": ("http", "wrk"),
    "close": ("http", "wrk close"),
    "l7keepalive": ("http7", "wrk"),
    "l7close": ("http7", "wrk close"),
    "upgrades": ("ws7", "wsload"),
}


def drive(load: str, tools: dict[str, str], target: Target, seconds: int, tls: bool = False) -> int:
    """Run ``load`` against ``target`` for ``seconds``: the requests (or connections,
    or upgrades) it made; ``tls``: wrk over TLS (the tls balancers)."""
    port_name, tool = LOADS[load]
    port = target.ports[port_name]
    if tool == "wsload":
        return upgrades(port, seconds)
    return wrk(tools, port, seconds, close=tool == "wrk close", tls=tls)


def traced_wrk(
    binary: str,
    options: list[str],
    pid: int,
    tools: dict[str, str],
    target: Target,
    seconds: int,
    load: str,
    tls: bool = False,
) -> tuple[int, Path]:
    """Run ``load`` while the tracer ``binary`` records ``pid``: (requests, its output file)."""
    tool = Path(binary).name
    out_file = Path(tempfile.mkstemp(prefix=f"{tool}-")[1])
    argv = [binary, *options, "-o", str(out_file), "-p", str(pid)]
    traces = tool == "strace"  # says when it has attached; perf records from its start
    stderr = subprocess.PIPE if traces else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        if proc.stderr is not None:
            attached(proc.stderr, pid)
        else:
            time.sleep(0.5)
        return drive(load, tools, target, seconds, tls), out_file
    finally:
        proc.send_signal(signal.SIGINT)  # strace and perf both write their output on it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError(f"{tool} did not stop") from None


def attached(stderr: IO[bytes], pid: int, timeout: float = 20.0) -> None:
    """Wait until strace says it has attached to ``pid`` (a loaded machine can take
    seconds), then leave its other lines to a thread that drains them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([stderr], [], [], max(deadline - time.monotonic(), 0))[0]:
            break
        line = stderr.readline()
        if not line:
            break
        if b"attached" in line:
            threading.Thread(target=stderr.read, daemon=True).start()
            return
    raise BenchError(f"strace did not attach to {pid} within {timeout:g} s")


def syscalls(
    pid: int, tools: dict[str, str], target: Target, seconds: int, load: str, tls: bool = False
) -> tuple[dict[str, float], dict[str, float], int]:
    """System calls per request of ``pid`` under ``wrk`` (strace -c), of those the ones
    that failed (``accept4`` that finds the queue empty, say), and the requests made."""
    strace = tracer("strace")
    requests, out_file = traced_wrk(strace, ["-c", "-f"], pid, tools, target, seconds, load, tls)
    counts: dict[str, float] = {}
    errors: dict[str, float] = {}
    for line in out_file.read_text().splitlines():
        m = STRACE_LINE.match(line)
        if m and m.group(3) != "total":
            counts[m.group(3)] = round(int(m.group(1)) / max(requests, 1), 2)
            if m.group(2):
                errors[m.group(3)] = round(int(m.group(2)) / max(requests, 1), 2)
    out_file.unlink()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])), errors, requests


def profile(
    pid: int, tools: dict[str, str], target: Target, seconds: int, load: str, tls: bool = False
) -> dict[str, Any]:
    """Where ``pid``'s CPU goes under ``wrk``: perf's cpu-clock samples by binary and symbol."""
    options = ["record", "-q", "-e", "cpu-clock", "-F", "2000"]
    perf = tracer("perf")
    _, data = traced_wrk(perf, options, pid, tools, target, seconds, load, tls)
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--stdio", "-q", "--sort", "dso,sym"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    data.unlink()
    if report.returncode != 0:
        raise BenchError(f"perf report failed: {report.stderr[-2000:]}")
    return parse_perf_report(report.stdout)


def parse_perf_report(text: str) -> dict[str, Any]:
    """Percent of samples in the kernel and per user-space binary, and the top symbols.

    A Python extension module (``_socket.cpython-311-...so``) counts as
    ``python modules``; every binary of the interpreter's own counts as itself.
    """
    binaries: dict[str, float] = {}
    kernel_symbols: list[tuple[str, float]] = []
    user_symbols: list[tuple[str, float]] = []
    for line in text.splitlines():
        m = PERF_LINE.match(line)
        if m is None:
            continue
        share, dso, level, symbol = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if level == "k":
            dso = "kernel"
            kernel_symbols.append((symbol, share))
        else:
            if ".cpython-" in dso:
                dso = "python modules"
            user_symbols.append((f"{symbol} ({dso})", share))
        binaries[dso] = binaries.get(dso, 0.0) + share
    if not binaries:
        raise BenchError(f"perf recorded no samples: {text[-2000:]}")

    def top(symbols: list[tuple[str, float]]) -> list[list[Any]]:
        ranked = sorted(symbols, key=lambda kv: -kv[1])[:PERF_TOP]
        return [[name, round(share, 2)] for name, share in ranked]

    return {
        "percent": {k: round(v, 2) for k, v in sorted(binaries.items(), key=lambda kv: -kv[1])},
        "top_kernel": top(kernel_symbols),
        "top_user": top(user_symbols),
    }


def machine_split(before: Any, after: Any) -> dict[str, float]:
    """CPU seconds of the whole machine between two ``psutil.cpu_times()``: user
    space (``nice`` included), kernel (system calls, and the interrupts and
    softirqs where loopback's TCP runs), idle, and all."""
    d = {field: getattr(after, field) - getattr(before, field) for field in after._fields}
    user = d["user"] + d["nice"]  # guest time is counted in user already
    kernel = d["system"] + d["irq"] + d["softirq"]
    idle = d["idle"] + d["iowait"]
    return {
        "user": user,
        "kernel": kernel,
        "idle": idle,
        "total": user + kernel + idle + d["steal"],
    }


def measure(
    name: str,
    tools: dict[str, str],
    backends: Any,
    tmp: Path,
    seconds: int,
    loads: list[str],
    tracers: list[str],
    workers: int = 1,
    run_id: str = "",
) -> dict[str, Any]:
    target = start_target(name, tools, workers, backends, tmp, f"cpu-{name}{run_id}")
    result: dict[str, Any] = {}
    tls = re.split("[@+]", name)[0] in TLS_BALANCERS
    try:
        for label in loads:
            drive(label, tools, target, 1, tls)  # warm up
            u0, s0, g0, m0 = *target.cpu_seconds(), tcp_segments_sent(), psutil.cpu_times()
            requests = drive(label, tools, target, seconds, tls)
            u1, s1, g1, m1 = *target.cpu_seconds(), tcp_segments_sent(), psutil.cpu_times()
            machine = machine_split(m0, m1)
            row: dict[str, Any] = {
                "rate": round(requests / seconds),
                "user_us": round((u1 - u0) / requests * 1e6, 1),
                "system_us": round((s1 - s0) / requests * 1e6, 1),
                "segments": round((g1 - g0) / requests, 2),
                "machine_user_us": round(machine["user"] / requests * 1e6, 1),
                "machine_kernel_us": round(machine["kernel"] / requests * 1e6, 1),
                "idle_pct": round(machine["idle"] / machine["total"] * 100, 1),
            }
            if "strace" in tracers:
                row["syscalls"], row["syscall_errors"], row["syscall_requests"] = syscalls(
                    busiest_pid(target), tools, target, seconds, label, tls
                )
                row["syscalls_total"] = round(sum(row["syscalls"].values()), 1)
            if "perf" in tracers:
                row["profile"] = profile(busiest_pid(target), tools, target, seconds, label, tls)
            result[label] = row
            log(f"  {name:8} {label:9} {json.dumps(row)}")
    finally:
        target.stop()
    return result


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds' rows: the median rate and CPU, the first trace."""
    merged = dict(rows[0])
    for key in MEDIANS:
        merged[key] = statistics.median(row[key] for row in rows)
    if len(rows) > 1:
        merged["rounds"] = len(rows)
    return merged


def round_ratios(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[float]:
    """A balancer's rate over ``baseline``'s rate in the same round, for each round."""
    return [r["rate"] / b["rate"] for r, b in zip(runs, baseline, strict=True)]


def versus(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> float:
    """The median, over the rounds, of a balancer's rate over ``baseline``'s rate in the
    same round."""
    return round(statistics.median(round_ratios(runs, baseline)), 3)


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float] | None:
    """A distribution-free interval that holds the true median with at least
    ``confidence``: from the k-th smallest value to the k-th largest, k the largest for
    which fewer than k of n values fall below the median with probability at most
    (1 - confidence) / 2 (the binomial with p = 1/2).  None when n is too small for one
    (n < 5 for 0.9).  A round's ratio on this machine spreads by ±10% (an A/A run gives
    0.85 to 1.17 with two workers), so the median of a few rounds alone says little."""
    n = len(values)
    tail, below, k = (1 - confidence) / 2, 0.0, 0
    while True:
        below += math.comb(n, k) / 2**n  # P(at most k values below the median)
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--strace", action="store_true", help="also count system calls")
    parser.add_argument("--perf", action="store_true", help="also profile with perf")
    parser.add_argument("--workers", type=int, default=1, help="workers; HAProxy's nbthread (1)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds in alternating order, medians reported (1)"
    )
    parser.add_argument(
        "--balancers",
        default="splicelb,haproxy",
        help="balancers: splicelb, haproxy, haproxy-procs, floor, floor-copy, splicelb-http,"
        " splicelb-http-defaults, splicelb-address, splicelb-limits, splicelb-tls, haproxy-tls"
        " (TLS passthrough by SNI; compare the two); NAME@REV: splicelb or a variant with the"
        " code of commit REV; NAME+info: with log_level = 'info' (default: splicelb,haproxy)",
    )
    parser.add_argument(
        "--loads",
        default="keepalive,close",
        help="loads: keepalive, close (wrk through a tcp listener; both by default), "
        "l7keepalive, l7close (wrk through the http listener, HAProxy mode http), upgrades "
        "(bench/wsload.py through the http listener)",
    )
    parser.add_argument(
        "--baseline",
        default="haproxy",
        help="the balancer every other one's rate is compared with, round by round (haproxy)",
    )
    args = parser.parse_args(argv)

    def body(tmp: Path) -> str:
        tools = ensure_tools()
        tracers = [t for t in ("strace", "perf") if getattr(args, t)]
        missing = [TRACER_PACKAGES[t] for t in tracers if shutil.which(t) is None]
        if missing:
            install_debian(missing)
        backends = start_backends(tools, tmp, 2)
        loads = args.loads.split(",")
        names = args.balancers.split(",")
        rows: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                traced = tracers if r == 0 else []  # traces in the first round only
                got = measure(
                    name, tools, backends, tmp, args.seconds, loads, traced, args.workers, f"-{r}"
                )
                for load, row in got.items():
                    rows[name].setdefault(load, []).append(row)
        result = {
            name: {load: medians(runs) for load, runs in by_load.items()}
            for name, by_load in rows.items()
        }
        base = args.baseline
        if base in rows:  # the machine's speed drifts between rounds: compare within each
            for name, by_load in rows.items():
                for load, runs in by_load.items():
                    result[name][load][f"vs_{base}"] = versus(runs, rows[base][load])
                    interval = median_interval(round_ratios(runs, rows[base][load]))
                    if interval is not None and name != base:
                        result[name][load][f"vs_{base}_interval"] = [round(x, 3) for x in interval]
        return json.dumps(result, indent=2)

    return scratch_main("splicelb-cpu-", body)


if __name__ == "__main__":
    sys.exit(main())
