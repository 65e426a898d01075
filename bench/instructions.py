"""User-space instructions a worker spends per connection and per round trip (callgrind).

``python -m bench.instructions`` runs ``splicelb run`` (1 worker, two ``mode =
"tcp"`` listeners and two ``mode = "http"`` ones) under valgrind's callgrind
with instrumentation off, and turns it on in the worker only while a client
makes N sequential connections (each a ``Connection: close`` request
answered by a one-line backend), then N 64-byte round trips over one
kept-alive connection to an echo backend, then N small requests over
kept-alive connections through an http listener, to a backend that answers
each with a one-line keep-alive response (every request is read, routed and
forwarded by the worker; the answers are spliced), then N connections as
the first but through an http listener (the head sniffed and routed).  It
prints the instructions per connection, per round trip, per kept-alive
request and per http connection, and the C functions that take most of
them.

Instruction counts, unlike times, do not depend on what else the machine is
doing: the same code gives the same count, so a change to the hot path can be
judged to a percent in a minute.  They count Python's share only (the
interpreter, uvloop, libc); the kernel's share is in ``bench/cpu.py``.  One
client at a time means one event per loop turn, the worst case for the loop's
own overhead; under load, turns carry several events each: ``--concurrency
K`` has K clients connect at once, each making its share of the N
connections, so that turns carry several connections' events as under
``wrk`` (the worker under valgrind is the slowest party, so its batches
fill).  Work done once per loop turn (the wait, the counters' publication)
then counts for a fraction of a connection, as it does under load.  ``--mode
http`` makes the connections' listener an http one (the head is read, routed
and forwarded with its forwarded fields), to count what that path costs.  With
``--limits`` the listeners have client limits (set too high to refuse anyone):
the difference is what the limits cost per connection; with ``--no-forwarded``
the http listeners add no forwarded fields (with and without: what they cost).
``--code REV`` counts the worker of an earlier commit (``git archive``), to
measure a change against the code before it.
``--log-level info`` has the worker write a ``conn`` line per connection (to
a file): what logging costs in user space.
The
kept-alive requests are made the same way: K connections at once, each
sending its share of the N requests one after the other (``wrk -cK``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import (
    HOST,
    REPO,
    BenchError,
    Proc,
    free_ports,
    install_debian,
    log,
    scratch_main,
    wait_until,
)
from bench.servers import CLIENT_LIMITS, checkout, listening_ports, splicelb_toml

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
KEEPALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # what wrk sends
KEEPALIVE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
MESSAGE = b"x" * 64
BOOT_TIMEOUT = 180.0  # the interpreter's start-up under valgrind is slow
ANNOTATED = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$")


def serve(listener: socket.socket, kind: str) -> None:
    """A blocking backend (a thread per connection): see :func:`answer`."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # closed: the run is over
        threading.Thread(target=answer, args=(conn, kind), daemon=True).start()


def answer(conn: socket.socket, kind: str) -> None:
    """``close``: answer once and close; ``echo``: send back what comes; ``keepalive``:
    answer every request head that comes, keeping the connection."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == "close":
            conn.recv(65536)
            conn.sendall(RESPONSE)
            return
        while data := conn.recv(65536):
            conn.sendall(data if kind == "echo" else KEEPALIVE_RESPONSE * data.count(b"\r\n\r\n"))


def backend(kind: str) -> tuple[socket.socket, int]:
    listener = socket.create_server((HOST, 0))
    threading.Thread(target=serve, args=(listener, kind), daemon=True).start()
    return listener, int(listener.getsockname()[1])


def at_once(count: int, concurrency: int, client: Callable[[int], None]) -> None:
    """``client(share)`` in ``concurrency`` threads at once, the shares of ``count`` each;
    the first error any of them met is raised."""
    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    errors: list[BaseException] = []

    def run(share: int) -> None:
        try:
            client(share)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"a client failed: {errors[0]!r}")


def connections(port: int, count: int, concurrency: int = 1) -> None:
    """``count`` connections, each a request read to its end, ``concurrency`` at a time."""
    if concurrency > 1:
        at_once(count, concurrency, lambda share: connections(port, share))
        return
    for _ in range(count):
        with socket.create_connection((HOST, port), timeout=30) as sock:
            sock.sendall(REQUEST)
            while sock.recv(65536):
                pass


def kept_alive_requests(port: int, count: int, concurrency: int = 1) -> None:
    """``count`` requests, each answered before the next, over ``concurrency`` kept-alive
    connections at once."""

    def client(share: int) -> None:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(share):
                sock.sendall(KEEPALIVE_REQUEST)
                got = b""
                while len(got) < len(KEEPALIVE_RESPONSE):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise BenchError("the kept-alive connection closed")
                    got += chunk

    at_once(count, concurrency, client)


def round_trips(sock: socket.socket, count: int) -> None:
    for _ in range(count):
        sock.sendall(MESSAGE)
        got = 0
        while got < len(MESSAGE):
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("the echo tunnel closed")
            got += len(chunk)


def worker_pid(runtime: Path) -> int | None:
    result = subprocess.run(
        [sys.executable, "-m", "lb", "status", "--runtime-dir", str(runtime), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        return None
    workers = json.loads(result.stdout)["workers"]
    return int(workers[0]["pid"]) if workers else None


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, timeout=60, check=True)


def part(path: Path, top: int) -> dict[str, Any]:
    """Total instructions of one callgrind dump, and its costliest functions (self cost)."""
    totals = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
    if totals is None:
        raise BenchError(f"{path}: no totals line")
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    functions = []
    for line in out.split("file:function", 1)[-1].splitlines():
        m = ANNOTATED.match(line)
        if m:
            name = re.sub(r"\s*\[.*\]$", "", m.group(2)).rsplit("/", 1)[-1]
            functions.append((name, int(m.group(1).replace(",", ""))))
        if len(functions) == top:
            break
    return {"total": int(totals.group(1)), "top": functions}


def measure(
    count: int,
    top: int,
    tmp: Path,
    concurrency: int = 1,
    mode: str = "tcp",
    limits: bool = False,
    forwarded: bool = True,
    code: str = "",
    log_level: str = "warning",
) -> dict[str, Any]:
    closer, close_port = backend("close")
    echoer, echo_port = backend("echo")
    answerer, answer_port = backend("keepalive")
    port, echo_front, http_front, http_port = free_ports(4)
    runtime = tmp / "run"
    config = tmp / "splicelb.toml"
    listeners = [
        ("close", port, mode, close_port),
        ("echo", echo_front, "tcp", echo_port),
        ("keepalive", http_front, "http", answer_port),
        ("closehttp", http_port, "http", close_port),
    ]
    # busy_poll_us = 0: count each connection's work, not the polls between clients
    keys = [CLIENT_LIMITS] if limits else []
    http_keys = keys if forwarded else [*keys, "forwarded_headers = false"]
    extra = {
        name: ("\n".join(http_keys if kind == "http" else keys), "")
        for name, _, kind, _ in listeners
    }
    config.write_text(
        splicelb_toml(runtime, 1, listeners, extra, busy_poll_us=0, log_level=f'"{log_level}"')
    )
    out = tmp / "callgrind"
    out.mkdir()
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--trace-children=yes",
        f"--callgrind-out-file={out}/cg.%p",
    ]
    lb = Proc(
        "splicelb-callgrind",
        [*valgrind, sys.executable, "-m", "lb", "run", "-c", str(config)],
        tmp,
        code=checkout(code, tmp) if code else REPO,
    )
    try:

        def up() -> int | None:
            lb.check_alive()
            if not {port, echo_front, http_front, http_port} <= listening_ports():
                return None
            return worker_pid(runtime)

        pid = wait_until(up, BOOT_TIMEOUT, "splicelb to start under valgrind")
        connections(port, 20)  # warm up: imports, caches, the pipe pool
        connections(http_port, 20)
        with socket.create_connection((HOST, echo_front), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            round_trips(sock, 50)
            kept_alive_requests(http_front, 50, concurrency)
            log(
                f"worker {pid}: {count} connections, {concurrency} at a time, then round trips, "
                "then kept-alive requests, then http connections"
            )
            callgrind_control("--instr=on", str(pid))
            started = time.monotonic()
            connections(port, count, concurrency)
            callgrind_control("--dump=connections", str(pid))
            round_trips(sock, count)
            callgrind_control("--dump=round trips", str(pid))
            kept_alive_requests(http_front, count, concurrency)
            callgrind_control("--dump=kept-alive requests", str(pid))
            connections(http_port, count, concurrency)
            callgrind_control("--dump=http connections", str(pid))
            callgrind_control("--instr=off", str(pid))
            log(f"measured in {time.monotonic() - started:.1f} s")
    finally:
        lb.kill()
        closer.close()
        echoer.close()
        answerer.close()
    dumps = sorted(out.glob(f"cg.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    if len(dumps) < 4:
        raise BenchError(f"expected four callgrind dumps of worker {pid}, found {dumps}")
    conns, trips, requests, http_conns = (part(dump, top) for dump in dumps[:4])
    return {
        "count": count,
        "concurrency": concurrency,
        "mode": mode,
        "client_limits": limits,
        "forwarded_headers": forwarded,
        "code": code or "this tree",
        "log_level": log_level,
        "per_connection": round(conns["total"] / count),
        "per_round_trip": round(trips["total"] / count),
        "per_kept_alive_request": round(requests["total"] / count),
        "per_http_connection": round(http_conns["total"] / count),
        "top_per_connection": [(f, round(n / count)) for f, n in conns["top"]],
        "top_per_round_trip": [(f, round(n / count)) for f, n in trips["top"]],
        "top_per_kept_alive_request": [(f, round(n / count)) for f, n in requests["top"]],
        "top_per_http_connection": [(f, round(n / count)) for f, n in http_conns["top"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-n",
        "--count",
        type=int,
        default=2000,
        help="connections, round trips and kept-alive requests to count (2000)",
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=1,
        help="clients connecting at once, as under load (1: one connection at a time)",
    )
    parser.add_argument(
        "--mode",
        choices=("tcp", "http"),
        default="tcp",
        help="the connections' listener: tcp (spliced at once, default) or http (head read)",
    )
    parser.add_argument("--top", type=int, default=15, help="costliest C functions to list (15)")
    parser.add_argument(
        "--limits",
        action="store_true",
        help="with client limits on the listeners (set too high to refuse): what they cost",
    )
    parser.add_argument(
        "--no-forwarded",
        dest="forwarded",
        action="store_false",
        help="http listeners without forwarded fields: with and without is what they cost",
    )
    parser.add_argument(
        "--code", default="", help="count the worker of commit CODE (git archive) instead"
    )
    parser.add_argument(
        "--log-level",
        choices=("warning", "info"),
        default="warning",
        help="the worker's log_level: warning (no conn lines, default) or info (one a connection)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    def body(tmp: Path) -> str:
        if shutil.which("valgrind") is None:
            install_debian(["valgrind"])
        result = measure(
            args.count,
            args.top,
            tmp,
            args.concurrency,
            args.mode,
            args.limits,
            args.forwarded,
            args.code,
            args.log_level,
        )
        return json.dumps(result, indent=2)

    return scratch_main("splicelb-instr-", body)


if __name__ == "__main__":
    sys.exit(main())
