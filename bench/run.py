"""Benchmark splicelb against HAProxy 2.6, side by side: ``python bench/run.py``.

Installs what is missing (haproxy, iperf3, wrk, nginx with apt; matplotlib with
pip), starts the backends on free 127.0.0.1 ports, then for each worker count
runs every figure through splicelb and HAProxy alternately (plus one direct
run per figure, the physical limit), and writes ``bench/results/<stamp>.json``,
``.md`` and ``.png`` (copied to ``latest.*``). ``--smoke`` is a seconds-long
version for CI. Every process it starts is killed at the end, whatever happens.

splicelb runs as systemd/splicelb.service runs it: as an unprivileged user
(a uid of its own) without capabilities, so that the kernel's per-user pipe
budget (``fs.pipe-user-pages-soft``) sizes its pipes as in production; run as
root it would be exempt, and its figures would not be the deployed ones.  The
unit's ``LimitNOFILE=65536`` is not copied: splicelb keeps the benchmark's
open-files limit, as HAProxy does, so both have the same descriptors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.figures import KINDS, Settings, direct_applies
from bench.procs import (
    REPO,
    BenchError,
    Proc,
    check_unprivileged,
    ensure_tools,
    kill_all,
    log,
)
from bench.servers import (
    HAPROXY_MAXCONN,
    HAPROXY_MAXPIPES,
    start_backends,
    start_target,
)
from lb.config import DEFAULT_BUSY_POLL_US

FULL = Settings(
    duration=10,
    rtt_sizes=((64, 20000), (16384, 5000)),
    rtt_warmup=500,
    idle_tunnels=9000,
    storm_clients=9000,
)
SMOKE = Settings(
    duration=2,
    rtt_sizes=((64, 500), (16384, 500)),
    rtt_warmup=50,
    idle_tunnels=200,
    storm_clients=200,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark splicelb against HAProxy.")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long CI version: 1 run, 2 s tools, few messages/tunnels",
    )
    parser.add_argument(
        "--runs", type=int, help="runs per balancer and figure (default 5, smoke 1)"
    )
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2 (default)")
    parser.add_argument("--duration", type=int, help="seconds per iperf3/wrk run (10, smoke 2)")
    parser.add_argument("--idle-tunnels", type=int, help="idle tunnels (9000, smoke 200)")
    parser.add_argument(
        "--storm-clients", type=int, help="clients of the reconnect storm (9000, smoke 200)"
    )
    parser.add_argument(
        "--splicelb",
        default="splicelb",
        help="what runs as splicelb: splicelb, a variant of bench.servers.VARIANTS, "
        'NAME+info (log_level = "info": a conn line per connection), NAME@REV',
    )
    parser.add_argument(
        "--against",
        default="haproxy",
        help="what splicelb is compared with (default haproxy); e.g. splicelb, to measure "
        "--splicelb splicelb+info against it (what logging costs)",
    )
    parser.add_argument(
        "--only",
        default=",".join(KINDS),
        help=f"run kinds to measure (default all: {','.join(KINDS)})",
    )
    parser.add_argument(
        "--haproxy-busy-polling",
        action="store_true",
        help="give HAProxy its global busy-polling (never sleeps), to compare with "
        "splicelb's busy_poll_us; off by default, as the issue sets HAProxy up",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results",
        help="results directory (default bench/results)",
    )
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    args.settings = Settings(
        duration=args.duration or base.duration,
        rtt_sizes=base.rtt_sizes,
        rtt_warmup=base.rtt_warmup,
        idle_tunnels=args.idle_tunnels or base.idle_tunnels,
        storm_clients=args.storm_clients or base.storm_clients,
    )
    args.runs = args.runs or (1 if args.smoke else 5)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.only = [k for k in args.only.split(",") if k]
    unknown = set(args.only) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    return args


def order(runs: int, with_direct: bool) -> list[str]:
    """splicelb, haproxy, [direct once, after the first pair], splicelb, haproxy, ..."""
    seq = []
    for i in range(runs):
        seq += ["splicelb", "haproxy"]
        if i == 0 and with_direct:
            seq.append("direct")
    return seq


def one_run(
    kind: str,
    target_name: str,
    workers: int,
    args: argparse.Namespace,
    tools: dict[str, str],
    backends: Any,
    tmp: Path,
    run_id: str,
) -> dict[str, Any]:
    measure = KINDS[kind][0]
    record: dict[str, Any] = {
        "workers": workers,
        "kind": kind,
        "target": target_name,  # its column: splicelb, haproxy (see --against) or direct
        "balancer": {"splicelb": args.splicelb, "haproxy": args.against}.get(
            target_name, target_name
        ),
        "run_id": run_id,
        "values": {},
        "extra": {},
        "loadavg_before": os.getloadavg()[0],
    }
    started = time.monotonic()
    balancer = record["balancer"]
    for attempt in range(2):
        target = None
        try:
            target = start_target(
                balancer,
                tools,
                workers,
                backends,
                tmp,
                f"{run_id}-{attempt}",
                args.haproxy_busy_polling,
            )
            values, extra = measure(target, args.settings, tools)
            if target.proc is not None:
                target.proc.check_alive()  # it must have survived the run
            record.update(values=values, extra=extra, error=None)
            break
        except BenchError as exc:
            log(f"  {target_name} {kind} failed (attempt {attempt + 1}): {exc}")
            record["error"] = str(exc)
        finally:
            if target is not None:
                target.stop()
    record["seconds"] = round(time.monotonic() - started, 2)
    record["loadavg_after"] = os.getloadavg()[0]
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record["values"].items())
    log(f"  {balancer:8} W={workers} {kind:9} {shown or 'FAILED'}")
    return record


def machine_info(tools: dict[str, str]) -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    haproxy = first_line([tools["haproxy"], "-v"])
    return {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        },
        "versions": {
            "haproxy": haproxy.split()[2] if haproxy.startswith("HAProxy") else haproxy,
            "haproxy_full": haproxy,
            "nginx": first_line([tools["nginx"], "-v"]),
            "iperf3": first_line([tools["iperf3"], "--version"]),
            "wrk": first_line([tools["wrk"], "-v"]),
        },
        "splicelb_commit": first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "splicelb_runs_as": check_unprivileged(),  # "UID INTERPRETER"
        "pipe_sysctls": {
            name: read_sysctl(name)
            for name in ("fs.pipe-user-pages-soft", "fs.pipe-user-pages-hard", "fs.pipe-max-size")
        },
    }


def read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "?"


def notes(args: argparse.Namespace) -> list[str]:
    s = args.settings
    return [
        "Ratio = the median over the rounds of splicelb / HAProxy, each round a splicelb "
        "run and a HAProxy run back to back (the JSON also has the ratio of the medians); "
        "for round trips and memory lower is better.",
        'splicelb: `log_level = "warning"` (per-connection `conn` lines are info level, so '
        'they were off), `admin_bind = ""`, no health checks; `mode = "tcp"` listeners for '
        'iperf3 and wrk, `mode = "http"` for the WebSocket tunnel (it sniffs the upgrade); '
        "run as the systemd unit runs it: an unprivileged user without capabilities, its "
        "pipes sized within that user's budget (`fs.pipe-user-pages-soft`), the open-files "
        "limit HAProxy has (not the unit's `LimitNOFILE`); "
        f"`busy_poll_us` at its default ({DEFAULT_BUSY_POLL_US}): after work, a worker polls "
        f"on for {DEFAULT_BUSY_POLL_US} µs, "
        "yielding the CPU between polls, before it sleeps.",
        "HAProxy: `mode tcp`, `option splice-auto`, `nbthread W`, "
        + ("`busy-polling` (its threads never sleep), " if args.haproxy_busy_polling else "")
        + "no logging, "
        f"`maxconn {HAPROXY_MAXCONN}`, `maxpipes {HAPROXY_MAXPIPES}` (its default, maxconn/4, "
        "would need more descriptors than the 20,000 allowed per process).",
        f"Bulk: `iperf3 -c -t {s.duration} -J`, one TCP stream, received Gbit/s. "
        f"HTTP: `wrk -t2 -c32 -d{s.duration}s --latency` to nginx (1 worker, "
        '`return 200 "ok\\n"`), new connections with `-H "Connection: close"`.',
        "Round trips: one upgraded tunnel, blocking client, one masked binary frame at a time, "
        "echoed byte for byte by a uvloop backend; "
        + ", ".join(f"{n:,} x {size} B" for size, n in s.rtt_sizes)
        + f" after {s.rtt_warmup} untimed. The one-CPU round trip repeats the 64 B run with "
        "the client, the balancer's processes and the echo backend all on CPU 0 (`taskset`, "
        "`sched_setaffinity`): no wake-up crosses CPUs, so what remains is each hop's own work; "
        "unpinned, the figure is mostly the cost of waking a process on the other CPU.",
        "CPU per request or connection: the balancer's whole process tree, user and system "
        "time (psutil) over the wrk run divided by the requests it served. Figures without a "
        "goal explain the others.",
        f"Idle tunnels: {s.idle_tunnels:,} upgraded tunnels held by client processes of at "
        f"most 3,000 each; (RSS of the balancer's process tree after - before) / "
        f"{s.idle_tunnels:,}, measured 1 s after they are all open, after 20 warm-up tunnels. "
        "Not 10,000: HAProxy (one process) and splicelb with 1 worker hold 2 descriptors per "
        "tunnel, and 10,000 tunnels do not fit the 20,000 open files allowed per process. "
        "No direct figure: there is no balancer to measure.",
        'Through the http listener (`http7`, `ws7`): splicelb\'s `mode = "http"` listener '
        "with its default keys (forwarded fields on) against HAProxy `mode http` with `option "
        "forwardfor` and `timeout tunnel 1h`, the same nginx and echo backend; wrk as above.",
        f"Upgrades: `bench/wsload.py upgrades`, {s.upgrade_concurrency} clients at once in 2 "
        "uvloop processes, each client in turn connecting, upgrading (the 101 and its accept "
        "key checked), sending one masked 64-byte frame, reading its echo, closing; "
        f"upgrades completed per second over {s.duration} s after 1 s untimed, a run with any "
        "error fails. Direct: the generator against the echo backend, its own ceiling.",
        f"Reconnect storm: `bench/wsload.py storm`, {s.storm_clients:,} tunnels held by client "
        f"processes of at most {s.tunnels_per_client:,} each; the echo backend closes them all "
        "at once (SIGUSR1) and every client reconnects and upgrades as soon as it reads the "
        "end of file, a failed attempt retried at once: the time from the signal until the "
        "last client is upgraded again, and the p99 of each client's end of file to its new "
        "101. Not 10,000, as for idle tunnels: 2 descriptors per tunnel in one process.",
        "Every balancer is started fresh for each run and killed after it; the backends "
        "(iperf3 -s, nginx, the echo backend) stay up for the whole benchmark. "
        "Everything, clients included, shares the same cores.",
    ]


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGHUP, on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="splicelb-bench-"))
    Proc.default_logdir = tmp
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "")
    stamp += "-haproxy-busy-polling" if args.haproxy_busy_polling else ""
    if (args.splicelb, args.against) != ("splicelb", "haproxy"):
        stamp += f"-{args.splicelb}-vs-{args.against}".replace("/", "_")
    ok = False
    try:
        tools = ensure_tools()
        meta = machine_info(tools)
        most = max(args.settings.idle_tunnels, args.settings.storm_clients)
        echo_procs = max(2, -(-most // 3000))
        backends = start_backends(tools, tmp, echo_procs)
        log(f"backends up: {backends.ports}; logs in {tmp}")
        runs: list[dict[str, Any]] = []
        for workers in args.workers:
            for kind in args.only:
                log(f"W={workers} {kind}")
                for i, target in enumerate(order(args.runs, direct_applies(kind))):
                    runs.append(
                        one_run(
                            kind,
                            target,
                            workers,
                            args,
                            tools,
                            backends,
                            tmp,
                            f"{workers}-{kind}-{i}",
                        )
                    )
                    time.sleep(0.5)
        backends.stop()
        result = {
            "meta": {
                **meta,
                "started": started,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "smoke": args.smoke,
                "runs": args.runs,
                "workers": args.workers,
                "settings": dataclasses.asdict(args.settings),
                "notes": notes(args),
                "balancers": {"splicelb": args.splicelb, "haproxy": args.against},
            },
            "summary": report.summarize(runs, args.workers),
            "runs": runs,
        }
        latest = not (args.smoke or args.haproxy_busy_polling)  # latest: the setup
        latest = latest and (args.splicelb, args.against) == ("splicelb", "haproxy")
        latest = latest and set(args.only) == set(KINDS)  # a full run: the README cites it
        paths = report.write(result, args.out, stamp, latest=latest)
        print(report.markdown(result))
        log(f"wrote {', '.join(str(p) for p in paths.values())}")
        ok = all(r.get("error") is None for r in runs)
        return 0 if ok else 1
    except BenchError as exc:
        log(f"failed: {exc}")
        traceback.print_exc()
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        kill_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"process logs kept in {tmp}")


if __name__ == "__main__":
    sys.exit(main())
