"""CPU cost per request and per connection: where the request-rate gap lies.

``python -m bench.cpu`` starts the benchmark's backends, then for each
balancer (1 worker, ``nbthread 1``) runs ``wrk`` kept-alive and with
``Connection: close`` and reads the balancer's CPU time (user and system,
from psutil, over its whole process tree) before and after.  It prints the
microseconds of CPU per request and, with ``--strace``, the system calls per
request of the balancer's busy process (``strace -c -f``, a separate run: strace
slows it down).  The rate figures of ``bench/run.py`` divide the same cores
between the client, the backends and the balancer, so a balancer that spends
less CPU per request serves more requests; this tells which part of the CPU,
user (Python) or system (the kernel), makes the difference.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.figures import WRK_TOTAL
from bench.procs import HOST, BenchError, Proc, ensure_tools, kill_all, log, run_tool
from bench.servers import Target, start_backends, start_target

STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


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


def wrk(tools: dict[str, str], port: int, seconds: int, close: bool) -> int:
    argv = [tools["wrk"], "-t2", "-c32", "-d", f"{seconds}s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = run_tool([*argv, f"http://{HOST}:{port}/"], seconds + 60, "wrk")
    total = WRK_TOTAL.search(out)
    if total is None:
        raise BenchError(f"wrk printed no total: {out}")
    return int(total.group(1))


def syscalls(
    pid: int, tools: dict[str, str], port: int, seconds: int, close: bool
) -> dict[str, float]:
    """System calls per request of ``pid`` under ``wrk`` (strace -c)."""
    strace = shutil.which("strace")
    if strace is None:
        raise BenchError("strace is not installed (Debian package strace)")
    out_file = Path(tempfile.mkstemp(prefix="strace-")[1])
    tracer = subprocess.Popen(
        [strace, "-c", "-f", "-o", str(out_file), "-p", str(pid)], stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        requests = wrk(tools, port, seconds, close)
    finally:
        tracer.terminate()
        tracer.wait(10)
    counts: dict[str, float] = {}
    for line in out_file.read_text().splitlines():
        m = STRACE_LINE.match(line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = round(int(m.group(1)) / max(requests, 1), 2)
    out_file.unlink()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def measure(
    name: str,
    tools: dict[str, str],
    backends: Any,
    tmp: Path,
    seconds: int,
    trace: bool,
    loads: list[str],
) -> dict[str, Any]:
    target = start_target(name, tools, 1, backends, tmp, f"cpu-{name}")
    result: dict[str, Any] = {}
    try:
        port = target.ports["http"]
        for label in loads:
            close = label == "close"
            wrk(tools, port, 1, close)  # warm up
            u0, s0 = target.cpu_seconds()
            requests = wrk(tools, port, seconds, close)
            u1, s1 = target.cpu_seconds()
            row: dict[str, Any] = {
                "rate": round(requests / seconds),
                "user_us": round((u1 - u0) / requests * 1e6, 1),
                "system_us": round((s1 - s0) / requests * 1e6, 1),
            }
            if trace:
                row["syscalls"] = syscalls(busiest_pid(target), tools, port, seconds, close)
                row["syscalls_total"] = round(sum(row["syscalls"].values()), 1)
            result[label] = row
            log(f"  {name:8} {label:9} {json.dumps(row)}")
    finally:
        target.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--strace", action="store_true", help="also count system calls")
    parser.add_argument(
        "--balancers", default="splicelb,haproxy", help="balancers to measure (splicelb,haproxy)"
    )
    parser.add_argument(
        "--loads", default="keepalive,close", help="wrk loads: keepalive, close or both (default)"
    )
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="splicelb-cpu-"))
    Proc.default_logdir = tmp
    try:
        tools = ensure_tools()
        backends = start_backends(tools, tmp, 2)
        loads = args.loads.split(",")
        result = {
            name: measure(name, tools, backends, tmp, args.seconds, args.strace, loads)
            for name in args.balancers.split(",")
        }
        print(json.dumps(result, indent=2))
        return 0
    except BenchError as exc:
        log(f"failed: {exc}")
        return 2
    finally:
        kill_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
