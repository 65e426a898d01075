"""The figures: what is measured, how, and which way is better.

Each measure function takes a running target and the settings and returns the
numbers of one run, plus raw extras (tool errors, counts) kept in the JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.procs import (
    HOST,
    BenchError,
    Proc,
    listen_overflows,
    log,
    run_tool,
    tcp_segments_sent,
)
from bench.servers import Target


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    short: str  # for the chart
    unit: str
    higher_is_better: bool
    goal: float | None  # the splicelb/haproxy ratio to reach (None: a figure that explains)
    direct: bool = True  # False: no direct (balancer-less) figure makes sense

    def met(self, ratio: float) -> bool | None:
        if self.goal is None:
            return None
        return ratio >= self.goal if self.higher_is_better else ratio <= self.goal

    @property
    def goal_text(self) -> str:
        if self.goal is None:
            return "—"
        return f"{'≥' if self.higher_is_better else '≤'} {self.goal:g}"


FIGURES = [
    Figure(
        "bulk_gbps",
        "Bulk throughput, 1 TCP stream (iperf3)",
        "bulk\n1 TCP stream",
        "Gbit/s",
        True,
        1.4,
    ),
    Figure(
        "rtt64_p50_us",
        "WebSocket round trip, 64 B, p50",
        "WS round trip\n64 B p50",
        "µs",
        False,
        0.9,
    ),
    Figure(
        "rtt64_p99_us",
        "WebSocket round trip, 64 B, p99",
        "WS round trip\n64 B p99",
        "µs",
        False,
        1.0,
    ),
    Figure(
        "rtt16k_p50_us",
        "WebSocket round trip, 16 KiB, p50",
        "WS round trip\n16 KiB p50",
        "µs",
        False,
        0.9,
    ),
    Figure(
        "rtt16k_p99_us",
        "WebSocket round trip, 16 KiB, p99",
        "WS round trip\n16 KiB p99",
        "µs",
        False,
        1.0,
    ),
    Figure(
        "http_keepalive_rps",
        "Small HTTP requests/s, keep-alive (wrk)",
        "HTTP req/s\nkeep-alive",
        "req/s",
        True,
        1.0,
    ),
    Figure(
        "http_close_cps",
        "New connections/s, Connection: close (wrk)",
        "new conn/s\n(Connection: close)",
        "conn/s",
        True,
        1.0,
    ),
    Figure(
        "rtt64_1cpu_p50_us",
        "WebSocket round trip, 64 B, p50, client, balancer and backend on one CPU",
        "WS round trip\n64 B p50\none CPU",
        "µs",
        False,
        None,
    ),
    Figure(
        "http_keepalive_cpu_user_us",
        "Balancer CPU per kept-alive request, user space (Python; HAProxy's C)",
        "CPU per\nkept-alive request\nuser",
        "µs",
        False,
        None,
        direct=False,
    ),
    Figure(
        "http_keepalive_cpu_system_us",
        "Balancer CPU per kept-alive request, kernel",
        "CPU per\nkept-alive request\nsystem",
        "µs",
        False,
        None,
        direct=False,
    ),
    Figure(
        "http_close_cpu_user_us",
        "Balancer CPU per new connection, user space (Python; HAProxy's C)",
        "CPU per\nnew connection\nuser",
        "µs",
        False,
        None,
        direct=False,
    ),
    Figure(
        "http_close_cpu_system_us",
        "Balancer CPU per new connection, kernel",
        "CPU per\nnew connection\nsystem",
        "µs",
        False,
        None,
        direct=False,
    ),
    Figure(
        "http_close_segments",
        "TCP segments per new connection, all sockets (client, balancer, backend)",
        "TCP segments\nper new\nconnection",
        "segments",
        False,
        None,
    ),
    Figure(
        "idle_tunnel_bytes",
        "Resident memory per idle WebSocket tunnel",
        "RSS per idle\nWS tunnel",
        "bytes",
        False,
        1.0,
        direct=False,
    ),
    Figure(
        "l7_keepalive_rps",
        "Small HTTP requests/s, keep-alive, through the http listener (HAProxy `mode http`)",
        "HTTP req/s\nkeep-alive\nhttp listener",
        "req/s",
        True,
        1.0,
    ),
    Figure(
        "l7_close_cps",
        "New connections/s through the http listener, Connection: close (HAProxy `mode http`)",
        "new conn/s\nhttp listener",
        "conn/s",
        True,
        1.0,
    ),
    Figure(
        "ws_upgrades_ps",
        "WebSocket upgrades/s: connect, upgrade, one 64 B message, close",
        "WS upgrades/s",
        "upgrades/s",
        True,
        1.0,
    ),
    Figure(
        "storm_all_ms",
        "Reconnect storm: time until every client is upgraded again",
        "storm: all\nreconnected",
        "ms",
        False,
        1.0,
    ),
    Figure(
        "storm_p99_ms",
        "Reconnect storm: p99 of a client's reconnect time",
        "storm: reconnect\np99",
        "ms",
        False,
        1.0,
    ),
    Figure(
        "l7_close_cpu_user_us",
        "Balancer CPU per new connection through the http listener, user space",
        "CPU per new\nconnection, http\nlistener, user",
        "µs",
        False,
        None,
        direct=False,
    ),
    Figure(
        "l7_close_cpu_system_us",
        "Balancer CPU per new connection through the http listener, kernel",
        "CPU per new\nconnection, http\nlistener, system",
        "µs",
        False,
        None,
        direct=False,
    ),
]
BY_KEY = {f.key: f for f in FIGURES}


@dataclass(frozen=True)
class Settings:
    duration: int  # seconds, iperf3 and wrk
    rtt_sizes: tuple[tuple[int, int], ...]  # (message size, count)
    rtt_warmup: int
    idle_tunnels: int
    storm_clients: int
    tunnels_per_client: int = 3000
    upgrade_concurrency: int = 32  # clients at once of the upgrade rate, as wrk's -c32


Result = tuple[dict[str, float], dict[str, object]]


def measure_bulk(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    argv = [
        tools["iperf3"],
        "-c",
        HOST,
        "-p",
        str(target.ports["bulk"]),
        "-t",
        str(s.duration),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    for attempt in range(3):
        try:
            out = run_tool(argv, s.duration + 30, "iperf3 -c")
            break
        except BenchError as exc:  # e.g. "the server is busy running a test"
            if attempt == 2:
                raise
            log(f"  iperf3 failed, again in 2 s: {str(exc)[:200]}")
            time.sleep(2)
    report = json.loads(out)
    end = report["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    extra = {
        "sent_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits"),
    }
    return {"bulk_gbps": gbps}, extra


def _rtt_client(target: Target, sizes: str, warmup: int, timeout: float, prefix: list[str]) -> Any:
    argv = [sys.executable, "-m", "bench.clients", "rtt", "--port", str(target.ports["ws"])]
    argv += ["--sizes", sizes, "--warmup", str(warmup)]
    return json.loads(run_tool([*prefix, *argv], timeout, "the round-trip client"))


def measure_rtt(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    sizes = ",".join(f"{size}:{count}" for size, count in s.rtt_sizes)
    timeout = 60 + sum(count for _, count in s.rtt_sizes) / 200
    report = _rtt_client(target, sizes, s.rtt_warmup, timeout, [])
    names = {64: "rtt64", 16384: "rtt16k"}
    values: dict[str, float] = {}
    for size, _count in s.rtt_sizes:
        prefix = names[size]
        values[f"{prefix}_p50_us"] = report[str(size)]["p50_us"]
        values[f"{prefix}_p99_us"] = report[str(size)]["p99_us"]
    # Again with every process on CPU 0: no wake-up crosses CPUs, so what is left is
    # the work each hop does (the unpinned figure is mostly cross-CPU wake-ups).
    count = dict(s.rtt_sizes)[64]
    with target.pinned(0, backend="echo-backend"):
        one_cpu = _rtt_client(target, f"64:{count}", s.rtt_warmup, timeout, ["taskset", "-c", "0"])
    values["rtt64_1cpu_p50_us"] = one_cpu["64"]["p50_us"]
    return values, {"rtt": report, "rtt_one_cpu": one_cpu}


WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_TOTAL = re.compile(r"(\d+) requests in")


def _wrk(
    target: Target, s: Settings, tools: dict[str, str], close: bool, port: str = "http"
) -> dict[str, Any]:
    argv = [tools["wrk"], "-t2", "-c32", "-d", f"{s.duration}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{target.ports[port]}/")
    user, system = target.cpu_seconds()
    segments = tcp_segments_sent()
    out = run_tool(argv, s.duration + 60, "wrk")
    segments = tcp_segments_sent() - segments
    user, system = (a - b for a, b in zip(target.cpu_seconds(), (user, system), strict=True))
    rps = WRK_RPS.search(out)
    if rps is None:
        raise BenchError(f"wrk printed no Requests/sec: {out}")
    errors = WRK_ERRORS.search(out)
    non2xx = WRK_NON2XX.search(out)
    total = WRK_TOTAL.search(out)
    requests = int(total.group(1)) if total else 0
    return {
        "rate": float(rps.group(1)),
        "requests": requests,
        "cpu_user_us": user / requests * 1e6 if requests else None,
        "cpu_system_us": system / requests * 1e6 if requests else None,
        "segments": segments / requests if requests else None,
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {},
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "latency": [line.strip() for line in out.splitlines() if "%" in line][:4],
    }


def _wrk_result(target: Target, extra: dict[str, Any], rate: str, cpu: str) -> Result:
    values = {rate: float(extra.pop("rate"))}
    if target.proc is not None and extra["requests"]:  # a balancer: its CPU per request
        values[f"{cpu}_user_us"] = extra.pop("cpu_user_us")
        values[f"{cpu}_system_us"] = extra.pop("cpu_system_us")
    return values, extra


def measure_keepalive(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    extra = _wrk(target, s, tools, close=False)
    return _wrk_result(target, extra, "http_keepalive_rps", "http_keepalive_cpu")


def measure_close(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    extra = _wrk(target, s, tools, close=True)
    segments = extra.pop("segments")
    values, rest = _wrk_result(target, extra, "http_close_cps", "http_close_cpu")
    if segments is not None:
        values["http_close_segments"] = segments
    return values, rest


def measure_l7_keepalive(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    extra = _wrk(target, s, tools, close=False, port="http7")
    values, rest = _wrk_result(target, extra, "l7_keepalive_rps", "l7_keepalive_cpu")
    for part in ("user", "system"):  # no figure: kept in the JSON
        rest[f"cpu_{part}_us"] = values.pop(f"l7_keepalive_cpu_{part}_us", None)
    return values, rest


def measure_l7_close(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    extra = _wrk(target, s, tools, close=True, port="http7")
    return _wrk_result(target, extra, "l7_close_cps", "l7_close_cpu")


def _wsload(argv: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.wsload", *argv]
    return dict(json.loads(run_tool(command, timeout, "bench.wsload")))


def measure_upgrades(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    """Upgrades per second, closed loop (``bench/wsload.py upgrades``); any error fails
    the run: the figure is the rate sustained without errors."""
    port = str(target.ports["ws7"])
    argv = ["upgrades", "--port", port, "--concurrency", str(s.upgrade_concurrency)]
    argv += ["--seconds", str(s.duration)]
    user, system = target.cpu_seconds()
    report = _wsload(argv, s.duration + 60)
    user, system = (a - b for a, b in zip(target.cpu_seconds(), (user, system), strict=True))
    if report["errors"]:
        raise BenchError(f"upgrades with errors: {report['errors']}")
    if report["completed"] and target.proc is not None:
        report["cpu_user_us"] = user / report["completed"] * 1e6
        report["cpu_system_us"] = system / report["completed"] * 1e6
    return {"ws_upgrades_ps": report.pop("rate")}, report


def measure_storm(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    """The reconnect storm (``bench/wsload.py storm``): ``storm_clients`` tunnels, which
    the echo backend closes at once (SIGUSR1), reconnect and upgrade again."""
    assert target.backends is not None
    echo = next(p for p in target.backends.procs if p.name == "echo-backend")
    argv = ["storm", "--port", str(target.ports["ws7"]), "--count", str(s.storm_clients)]
    argv += ["--per-proc", str(s.tunnels_per_client), "--trigger-pid", str(echo.pid)]
    overflows = listen_overflows()
    report = _wsload(argv, 180 + s.storm_clients / 50)
    # the whole machine's: the storm's, unless something else overflowed a queue meanwhile
    report["listen_overflows"] = listen_overflows() - overflows
    if report["back"] != s.storm_clients:
        raise BenchError(f"not every client reconnected: {report}")
    values = {"storm_all_ms": report.pop("all_back_ms"), "storm_p99_ms": report.pop("p99_ms")}
    return values, report


def open_idle(
    port: int, count: int, per_client: int, sources: list[str] | None = None
) -> list[Proc]:
    """Start client processes holding ``count`` tunnels in all; wait until all are open.
    Client i connects from ``sources[i % len(sources)]`` (default: the kernel's choice)."""
    clients: list[Proc] = []
    n_clients = max(1, math.ceil(count / per_client))
    try:
        for i in range(n_clients):
            share = count // n_clients + (1 if i < count % n_clients else 0)
            argv = [
                sys.executable,
                "-m",
                "bench.clients",
                "idle",
                "--port",
                str(port),
                "--count",
                str(share),
            ]
            if sources:
                argv += ["--source", sources[i % len(sources)]]
            clients.append(
                Proc(
                    f"idle-client-{i}",
                    argv,
                    Proc.default_logdir,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + 60 + count / 100
        for proc in clients:
            assert proc.popen.stdout is not None
            wait = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.popen.stdout], [], [], wait)
            line = proc.popen.stdout.readline().decode() if ready else ""
            if not line.startswith("ready "):
                proc.check_alive()
                raise BenchError(f"{proc.name} did not open its tunnels in time ({line!r})")
    except BaseException:
        close_idle(clients)
        raise
    return clients


def close_idle(clients: list[Proc]) -> None:
    """Close the clients' stdin (they close their tunnels and exit); kill what lingers."""
    for proc in clients:
        if proc.popen.stdin is not None:
            with contextlib.suppress(OSError):
                proc.popen.stdin.close()
    for proc in clients:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(30)
        proc.kill()


def measure_idle(target: Target, s: Settings, tools: dict[str, str]) -> Result:
    if target.proc is None:
        raise BenchError("the idle-tunnel figure needs a balancer")
    port = target.ports["ws"]
    close_idle(open_idle(port, 20, s.tunnels_per_client))  # warm-up: first-connection costs
    time.sleep(1.0)
    before = target.rss()
    clients = open_idle(port, s.idle_tunnels, s.tunnels_per_client)
    try:
        time.sleep(1.0)
        after = target.rss()
        processes = target.pids()
    finally:
        close_idle(clients)
    per_tunnel = (after - before) / s.idle_tunnels
    return {"idle_tunnel_bytes": per_tunnel}, {
        "rss_before": before,
        "rss_after": after,
        "tunnels": s.idle_tunnels,
        "processes": processes,
        "client_processes": len(clients),
    }


Measure = Callable[[Target, Settings, dict[str, str]], Result]
# run kind -> (measure function, figures it yields)
KINDS: dict[str, tuple[Measure, list[str]]] = {
    "bulk": (measure_bulk, ["bulk_gbps"]),
    "rtt": (
        measure_rtt,
        ["rtt64_p50_us", "rtt64_p99_us", "rtt16k_p50_us", "rtt16k_p99_us", "rtt64_1cpu_p50_us"],
    ),
    "keepalive": (
        measure_keepalive,
        ["http_keepalive_rps", "http_keepalive_cpu_user_us", "http_keepalive_cpu_system_us"],
    ),
    "close": (
        measure_close,
        [
            "http_close_cps",
            "http_close_cpu_user_us",
            "http_close_cpu_system_us",
            "http_close_segments",
        ],
    ),
    "idle": (measure_idle, ["idle_tunnel_bytes"]),
    "l7keepalive": (measure_l7_keepalive, ["l7_keepalive_rps"]),
    "l7close": (
        measure_l7_close,
        ["l7_close_cps", "l7_close_cpu_user_us", "l7_close_cpu_system_us"],
    ),
    "upgrades": (measure_upgrades, ["ws_upgrades_ps"]),
    "storm": (measure_storm, ["storm_all_ms", "storm_p99_ms"]),
}


def direct_applies(kind: str) -> bool:
    return any(BY_KEY[key].direct for key in KINDS[kind][1])
