"""CI smoke runs of bench/run.py --smoke and bench/cpu.py: the benchmark tools run end to end.

It installs what it needs (haproxy, iperf3, wrk, nginx, matplotlib) if missing,
measures every figure once through splicelb, HAProxy and directly, with short
durations, and writes its JSON, Markdown and PNG. Nothing here asserts a timing
or a ratio: a shared two-core CI machine says nothing about performance; this
only proves the benchmark still works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("haproxy", "iperf3", "wrk", "nginx")
WRK_CONNECTIONS = 32  # bench/cpu.py's wrk -c
SBIN = os.pathsep.join(("/usr/sbin", "/sbin", os.environ.get("PATH", "")))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = run_bench(["bench/run.py", "--smoke", "--workers", "1", "--out", str(out)], 540)

    written = sorted(out.iterdir())
    names = {p.suffix for p in written}
    assert names == {".json", ".md", ".png"}, written
    assert not (out / "latest.json").exists()  # a smoke run never replaces the real results
    result = json.loads(next(p for p in written if p.suffix == ".json").read_text())

    meta = result["meta"]
    assert meta["smoke"] is True
    assert meta["machine"]["nproc"] >= 1
    assert meta["versions"]["haproxy"].startswith("2.")
    figures = result["summary"]["1"]
    assert len(figures) == 21
    for key, fig in figures.items():
        targets = ["splicelb", "haproxy"] + (["direct"] if fig["direct_applicable"] else [])
        for target in targets:
            values = fig["values"][target]
            assert len(values) == 1, (key, target, values)
            assert values[0] > 0, (key, target, values)
            assert fig["medians"][target] > 0, (key, target)
        assert isinstance(fig["ratio"], float), key
        assert fig["ratio"] > 0, key
        if fig["goal"] == "—":  # a figure that explains the others: no goal to meet
            assert fig["met"] is None, key
        else:
            assert fig["met"] in (True, False), key
    assert all(run["error"] is None for run in result["runs"])
    for kind in ("keepalive", "close"):  # a balancer spends CPU on every request
        for part in ("user", "system"):
            cpu = figures[f"http_{kind}_cpu_{part}_us"]["medians"]
            assert cpu["splicelb"] > 0 and cpu["haproxy"] > 0, (kind, part, cpu)
    # a connection takes at least 6 segments (handshake, request, answer, the ends of
    # file), and a balancer's client makes two connections of each
    segments = figures["http_close_segments"]["medians"]
    assert segments["direct"] >= 6, segments
    assert segments["splicelb"] >= 1.5 * segments["direct"], segments
    assert segments["haproxy"] >= 1.5 * segments["direct"], segments

    # the http listener's figures: every storm client back, through each balancer and direct
    storms = [run for run in result["runs"] if run["kind"] == "storm"]
    assert {run["target"] for run in storms} == {"splicelb", "haproxy", "direct"}
    for run in storms:
        assert run["extra"]["back"] == run["extra"]["clients"] == 200, run
        assert run["values"]["storm_all_ms"] >= run["values"]["storm_p99_ms"], run
    upgrades = [run for run in result["runs"] if run["kind"] == "upgrades"]
    assert all(run["extra"]["errors"] == {} for run in upgrades), upgrades

    table = next(p for p in written if p.suffix == ".md").read_text()
    assert "| figure | direct | HAProxy | splicelb |" in table
    assert table in done.stdout  # the table is printed at the end


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_profile_smoke() -> None:
    """bench/cpu.py (CPU, system calls and profile per request) runs and counts what it claims."""
    result, _ = run_cpu(["--seconds", "1", "--strace", "--perf"], ("strace", "perf"))
    assert set(result) == {"splicelb", "haproxy"}
    for name, loads in result.items():
        assert set(loads) == {"keepalive", "close"}, name
        for load, row in loads.items():
            assert row["rate"] > 0, (name, load)
            assert row["user_us"] + row["system_us"] > 0, (name, load)
            # through a balancer, a request and its answer cross two connections
            assert row["segments"] >= (3 if load == "keepalive" else 12), (name, load, row)
            # the machine's CPU takes in the balancer's, the client's and the backend's
            machine = row["machine_user_us"] + row["machine_kernel_us"]
            assert machine > row["user_us"] + row["system_us"], (name, load, row)
            assert 0 <= row["idle_pct"] < 100, (name, load, row)
            # every request or connection goes through the balancer's busy process
            assert row["syscalls_total"] >= 2, (name, load, row)
            percent = row["profile"]["percent"]
            # perf rounds each symbol's share: hundreds of them add up to a point or so
            assert 98 <= sum(percent.values()) <= 102, (name, load, percent)
            assert percent.get("kernel", 0) > 10, (name, load, percent)  # it makes system calls
            assert row["profile"]["top_kernel"] and row["profile"]["top_user"], (name, load)
    for load in ("keepalive", "close"):  # one round: the ratio of the two rates
        splicelb, haproxy = result["splicelb"][load], result["haproxy"][load]
        assert haproxy["vs_haproxy"] == 1.0
        assert splicelb["vs_haproxy"] == round(splicelb["rate"] / haproxy["rate"], 3)
    # the profile tells the interpreter's user-space share from HAProxy's own
    assert any(b.startswith("libpython") for b in result["splicelb"]["close"]["profile"]["percent"])
    assert "haproxy" in result["haproxy"]["close"]["profile"]["percent"]
    # a new connection is accepted once and spliced, never copied through Python
    close = result["splicelb"]["close"]["syscalls"]
    failed = result["splicelb"]["close"]["syscall_errors"]  # an accept4 that found none
    # (wrk stops with up to 32 connections accepted that made no request: on a slow run,
    # a few hundred requests under strace, they count)
    requests = result["splicelb"]["close"]["syscall_requests"]
    accepted = close["accept4"] - failed.get("accept4", 0)
    assert 0.9 <= accepted <= 1.1 + WRK_CONNECTIONS / requests, (close, failed, requests)
    assert close["splice"] >= 2, close
    assert "recvfrom" not in close and "sendto" not in close, close


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_instruction_count_smoke() -> None:
    """bench/instructions.py counts the worker's instructions for what it claims to count."""
    result = run_counter(["bench.instructions", "-n", "100", "-c", "4", "--top", "5"], 380)
    assert (result["count"], result["concurrency"]) == (100, 4)
    # A new connection (accept, connect, two tunnels' worth of events, close) costs
    # the worker more than forwarding one small message each way.
    assert result["per_connection"] > result["per_round_trip"] > 0
    assert len(result["top_per_connection"]) == 5
    assert all(n > 0 for _, n in result["top_per_round_trip"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_busy_poll_table_smoke() -> None:
    """bench/busypoll.py runs splicelb with busy polling off and on, paces round trips and
    has messages pushed, and reports each."""
    done = run_bench(["-m", "bench.busypoll", "--values", "0,50", "--seconds", "0.5"], 100)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()]
    rows = rows[2:]  # after the header and its rule
    patterns = ["round trips"] * 4 + ["pushes"] * 2
    assert [(int(r[0]), r[1]) for r in rows] == [(b, p) for b in (0, 50) for p in patterns], rows
    for _, pattern, rate, cpu, p50 in rows:
        messages = int(rate.replace(",", ""))
        if pattern == "pushes" or messages == 0:  # nothing timed: no round trip
            assert p50 == "—", rows
        else:
            assert float(p50.split()[0]) > 0, rows
        assert messages > 0 or pattern == "round trips", rows  # only the idle row has none
        # A share of one CPU (the worker has one thread), read in 10 ms clock ticks.
        assert 0 <= float(cpu.rstrip("%")) <= 110, rows
    assert sum(int(r[2].replace(",", "")) == 0 for r in rows) == 2, rows  # one idle row each


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_rounds_with_the_floors_and_two_workers() -> None:
    """bench/cpu.py measures Python's floor (bench/floor.py, splicing and copying) next to
    splicelb and HAProxy run as two processes, in rounds."""
    names = ["floor", "floor-copy", "splicelb", "haproxy-procs"]
    options = ["--balancers", ",".join(names), "--workers", "2", "--rounds", "2"]
    result, log = run_cpu([*options, "--loads", "close", "--seconds", "1"])
    assert set(result) == set(names)
    for name, loads in result.items():
        row = loads["close"]
        assert row["rounds"] == 2, name
        assert row["rate"] > 0 and row["user_us"] + row["system_us"] > 0, (name, row)
    for name in names:
        assert log.count(f"starting {name} (2 workers)") == 2, name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tls_termination_figures_smoke() -> None:
    """bench/tls.py: new TLS connections and a wss:// tunnel's bulk echo through both
    balancers, each figure measured and its ratio printed."""
    done = run_bench(["-m", "bench.tls", "--seconds", "1", "--bulk-mib", "8"], 240)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rows = {line["balancer"]: line for line in lines if "balancer" in line}
    assert set(rows) == {"splicelb", "haproxy"}, done.stdout
    figures = ("new_tls_connections_per_s", "cpu_ms_per_new_connection", "wss_bulk_MBps")
    for name, row in rows.items():
        assert all(row[figure] > 0 for figure in figures), (name, row)
    [ratios] = [line["splicelb/haproxy"] for line in lines if "splicelb/haproxy" in line]
    assert all(ratios[figure] > 0 for figure in figures), ratios


def run_cpu(options: list[str], tracers: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """``python -m bench.cpu`` with ``options``: its JSON result and its log (stderr)."""
    done = run_bench(["-m", "bench.cpu", *options], 240, tracers)
    return json.loads(done.stdout), done.stderr


def run_bench(
    argv: list[str], timeout: float, tracers: tuple[str, ...] = (), tools: tuple[str, ...] = TOOLS
) -> subprocess.CompletedProcess[str]:
    """Run a benchmark tool with Python to success (skipped without its tools and root)."""
    missing = [t for t in (*tools, *tracers) if shutil.which(t, path=SBIN) is None]
    if missing and os.geteuid() != 0:
        pytest.skip(f"{', '.join(missing)} missing and not root to install them")
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_conn_line_instruction_count_smoke() -> None:
    """bench/logline.py counts what one conn line costs, batched and written alone."""
    result = run_counter(["bench.logline", "--lines", "100", "--per-turn", "4"], 280)
    assert (result["code"], result["per_turn"]) == ("this tree", 4)
    # a line costs thousands of instructions, not millions (the interpreter's start-up
    # is out of the difference) and not nothing (the lines were made)
    assert 2_000 < result["batched"] < 200_000, result
    assert 2_000 < result["alone"] < 200_000, result


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_head_instruction_count_smoke() -> None:
    """bench/heads.py counts what sniffing each real client's head costs."""
    result = run_counter(["bench.heads", "--times", "20"], 380)
    fixtures = {p.stem for p in (REPO / "tests" / "proto" / "fixtures").glob("*.http")}
    assert set(result["feed"]) == {"wrk"} | fixtures
    assert result["new_sniffer"] > 0
    # a browser's handshake, with its dozen fields, costs more than wrk's three-line head
    feed = result["feed"]
    assert feed["chromium-156-websocket-upgrade"] > feed["wrk"] > 0, feed


def run_counter(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run an instruction counter (``python -m bench.X``, under valgrind) to success; its
    JSON result."""
    done = run_bench(["-m", *argv], timeout, tracers=("valgrind",), tools=())
    result: dict[str, Any] = json.loads(done.stdout)
    return result
