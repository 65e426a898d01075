"""WebSocket load generator: upgrades per second, and a reconnect storm.

``python -m bench.wsload upgrades --port P --procs 2 --concurrency 16 --seconds 10``
forks ``--procs`` processes, each a uvloop event loop keeping ``--concurrency``
clients busy, one after the other: connect, send the HTTP/1.1 upgrade, check
the ``101`` and its ``Sec-WebSocket-Accept``, send one masked 64-byte binary
frame, read its echo back (the echo backend returns the same bytes), close.
A closed loop, as ``wrk -c``: the rate is the most the target sustains at that
concurrency.  It prints one JSON object: upgrades completed per second over
the timed seconds (after ``--warmup`` untimed ones), the errors by kind (an
upgrade refused, a bad answer or echo, a reset, a timeout), and the p50/p99
of one client's whole exchange.

``python -m bench.wsload storm --port P --count N --trigger-pid PID`` forks
processes of at most ``--per-proc`` tunnels each, opens ``N`` tunnels in all,
then sends ``SIGUSR1`` to ``PID`` (the echo backend, which then closes every
tunnel it holds: ``bench/echo_server.py``).  Every client reconnects as soon
as it reads the end of file, at once, and upgrades again; an attempt that
fails (a balancer's 503, a reset) is retried at once.  It prints one JSON
object: the time from the signal until the last client was upgraded again,
the p50/p99/longest of each client's reconnect time (from its end of file to
its new ``101``), and the retries.

Both print ``--procs``/processes' results summed; ``CLOCK_MONOTONIC`` is the
machine's, so times taken in different processes compare.  The generator
must not be what is measured: run it against the backend directly for its
own rate (``bench/run.py`` does, as the ``direct`` figure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import math
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import uvloop

from bench.procs import HOST, die_with_parent

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MESSAGE = 64  # bytes of payload each client sends and reads back
CONNECT_TIMEOUT = 10.0  # seconds for a whole exchange of the upgrade rate
OPEN_AT_ONCE = 100  # tunnels a storm process opens concurrently before the storm
MAX_ATTEMPTS = 1000  # a storm client gives up after this many failed reconnects


def request(port: int, key: bytes) -> bytes:
    return (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: http://127.0.0.1\r\n\r\n" % (port, key)
    )


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def masked_frame(size: int) -> bytes:
    """A final binary frame of ``size`` (< 126) bytes as a client sends it: masked."""
    mask = os.urandom(4)
    payload = os.urandom(size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | size) + mask + masked


def check_upgrade(head: bytes, want_accept: bytes) -> str | None:
    """None when ``head`` is a 101 with the right accept key; otherwise what is wrong."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101 "):
        return "refused"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            return None if value.strip() == want_accept else "bad_accept"
    return "bad_accept"


class Exchange(asyncio.Protocol):
    """One client of the upgrade rate: upgrade, one message and its echo, close.
    ``done`` gets None, or the kind of error."""

    def __init__(self, port: int, frame: bytes, done: Callable[[str | None], None]) -> None:
        self.port = port
        self.frame = frame
        self.done = done
        self.key = base64.b64encode(os.urandom(16))
        self.buf = b""
        self.upgraded = False
        self.outcome: str | None = "closed"  # what connection_lost reports if nothing else
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(request(self.port, self.key))
        # a timer, not asyncio.wait_for: that costs a task and a future more per exchange
        self.timer = asyncio.get_running_loop().call_later(CONNECT_TIMEOUT, self.expire)

    def expire(self) -> None:
        self.outcome = "timeout"
        assert self.transport is not None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            wrong = check_upgrade(self.buf[:end], accept_for(self.key))
            if wrong is not None:
                self.finish(wrong)
                return
            self.upgraded = True
            self.buf = self.buf[end + 4 :]
            self.transport.write(self.frame)
        if len(self.buf) >= len(self.frame):
            self.finish(None if self.buf == self.frame else "bad_echo")

    def finish(self, outcome: str | None) -> None:
        self.outcome = outcome
        assert self.transport is not None
        self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        outcome = self.outcome
        if exc is not None and outcome == "closed":
            outcome = "reset"
        self.done(outcome)


async def upgrades_loop(port: int, concurrency: int, warmup: float, seconds: float) -> Any:
    loop = asyncio.get_running_loop()
    frame = masked_frame(MESSAGE)
    start = time.monotonic() + warmup
    stop = start + seconds
    errors: dict[str, int] = {}
    times: list[float] = []
    completed = 0
    finished = loop.create_future()
    running = 0

    async def client() -> None:
        nonlocal completed, running
        running += 1
        try:
            while time.monotonic() < stop:
                began = time.monotonic()
                result = loop.create_future()
                try:
                    await loop.create_connection(
                        functools.partial(Exchange, port, frame, result.set_result), HOST, port
                    )
                    outcome = await result
                except OSError as exc:
                    outcome = type(exc).__name__
                ended = time.monotonic()
                if start <= began and ended <= stop:
                    if outcome is None:
                        completed += 1
                        times.append(ended - began)
                    else:
                        errors[outcome] = errors.get(outcome, 0) + 1
        finally:
            running -= 1
            if running == 0 and not finished.done():
                finished.set_result(None)

    tasks = [loop.create_task(client()) for _ in range(concurrency)]
    await finished
    await asyncio.gather(*tasks)
    return {"completed": completed, "errors": errors, "times": times}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


class Held(asyncio.Protocol):
    """One client of the storm: a tunnel held open; on its end of file (or a failed
    attempt) it calls ``lost``, once."""

    def __init__(self, port: int, upgraded: Callable[[Held], None], lost: Callable[[Held], None]):
        self.port = port
        self.on_upgraded = upgraded
        self.on_lost = lost
        self.key = base64.b64encode(os.urandom(16))
        self.buf = b""
        self.up = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(request(self.port, self.key))

    def data_received(self, data: bytes) -> None:
        if self.up:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        assert self.transport is not None
        if check_upgrade(self.buf[:end], accept_for(self.key)) is None:
            self.up = True
            self.buf = b""
            self.on_upgraded(self)
        else:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self)


class StormClient:
    """A client that keeps one tunnel: reconnects as soon as it loses it."""

    def __init__(self, port: int, ready: Callable[[], None]) -> None:
        self.port = port
        self.ready = ready
        self.lost_at: float | None = None  # end of file of the tunnel the storm closed
        self.back_at: float | None = None  # its new tunnel upgraded
        self.attempts = 0  # failed reconnects
        self.held: Held | None = None
        self.failed = False
        self.task: asyncio.Task[None] | None = None  # the attempt under way

    def connect(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:  # no asyncio.wait_for (a task more per attempt): the storm's timeout bounds it
            await loop.create_connection(
                lambda: Held(self.port, self._upgraded, self._lost), HOST, self.port
            )
        except OSError:
            self._retry()

    def _upgraded(self, held: Held) -> None:
        self.held = held
        if self.lost_at is not None:
            if self.back_at is not None:
                return  # lost and back again: counted once, when first back
            self.back_at = time.monotonic()
        self.ready()

    def _lost(self, held: Held) -> None:
        if held.up:  # the storm: the backend closed the tunnel
            if self.lost_at is None:
                self.lost_at = time.monotonic()
            self.connect()
        else:
            self._retry()

    def _retry(self) -> None:
        self.attempts += 1
        if self.attempts >= MAX_ATTEMPTS:
            self.failed = True
            self.ready()
            return
        self.connect()


async def storm_loop(port: int, count: int, report: Callable[[], None], timeout: float) -> Any:
    """Open ``count`` tunnels, say so (``report``), then wait until each was lost and
    upgraded again (or failed, or ``timeout`` passed)."""
    loop = asyncio.get_running_loop()
    remaining = count  # tunnels to open, then tunnels to see upgraded again
    everyone_back = loop.create_future()
    storm_started = False

    def ready() -> None:
        nonlocal remaining
        remaining -= 1
        if not storm_started and waiting:
            waiting.pop().connect()
        if remaining == 0:
            (everyone_back if storm_started else first_round).set_result(None)

    first_round = loop.create_future()
    clients = [StormClient(port, ready) for _ in range(count)]
    waiting = list(clients)
    for _ in range(min(OPEN_AT_ONCE, count)):
        waiting.pop().connect()
    await asyncio.wait_for(first_round, 60 + count / 100)
    if any(c.failed for c in clients):
        raise RuntimeError("some tunnels could not be opened before the storm")
    storm_started = True
    remaining = count
    report()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everyone_back, timeout)
    back = [c for c in clients if c.back_at is not None and c.lost_at is not None]
    return {
        "clients": count,
        "back": len(back),
        "failed": sum(c.failed for c in clients),
        "retries": sum(c.attempts for c in clients),
        "lost_at": [c.lost_at for c in back],
        "back_at": [c.back_at for c in back],
    }


def fork_children(procs: int, body: Callable[[int, int], Any]) -> list[tuple[int, int]]:
    """Fork ``procs`` children; child i runs ``body(i, write_fd)`` (writes JSON lines to
    it) and exits.  Returns (pid, read_fd) per child."""
    children = []
    for index in range(procs):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_fd)
                die_with_parent()
                body(index, write_fd)
            except BaseException as exc:  # said on the pipe, then exit
                with contextlib.suppress(OSError):
                    os.write(write_fd, json.dumps({"error": repr(exc)}).encode() + b"\n")
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
    return children


def read_line(fd: int, deadline: float) -> dict[str, Any]:
    """One JSON line from a child's pipe, or an error when it ends or time runs out."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {"error": "timed out"}
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return {"error": "exited without a result"}
        data += chunk
    return cast(dict[str, Any], json.loads(data))


def write_line(fd: int, obj: Any) -> None:
    data = json.dumps(obj).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


def upgrades_main(args: argparse.Namespace) -> dict[str, Any]:
    def body(index: int, fd: int) -> None:
        share = args.concurrency // args.procs + (index < args.concurrency % args.procs)
        result = uvloop.run(upgrades_loop(args.port, share, args.warmup, args.seconds))
        write_line(fd, result)

    children = fork_children(args.procs, body)
    deadline = time.monotonic() + args.warmup + args.seconds + 2 * CONNECT_TIMEOUT + 10
    results = [read_line(fd, deadline) for _, fd in children]
    reap(children)
    failures = [r["error"] for r in results if "error" in r]
    if failures:
        raise SystemExit(f"wsload: a client process failed: {failures}")
    errors: dict[str, int] = {}
    for r in results:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    times = [t for r in results for t in r["times"]]
    completed = sum(r["completed"] for r in results)
    return {
        "rate": completed / args.seconds,
        "completed": completed,
        "errors": errors,
        "p50_ms": percentile(times, 50) * 1e3,
        "p99_ms": percentile(times, 99) * 1e3,
        "procs": args.procs,
        "concurrency": args.concurrency,
    }


def storm_main(args: argparse.Namespace) -> dict[str, Any]:
    procs = max(1, math.ceil(args.count / args.per_proc))
    go_read, go_write = os.pipe()  # the children wait on it after their result

    def body(index: int, fd: int) -> None:
        os.close(go_write)
        share = args.count // procs + (index < args.count % procs)
        result = uvloop.run(
            storm_loop(args.port, share, lambda: write_line(fd, {"ready": share}), args.timeout)
        )
        write_line(fd, result)
        os.read(go_read, 1)  # hold the tunnels until the parent is done (EOF)

    children = fork_children(procs, body)
    os.close(go_read)
    try:
        deadline = time.monotonic() + 60 + args.count / 100
        for _, fd in children:
            line = read_line(fd, deadline)
            if "ready" not in line:
                raise SystemExit(f"wsload: tunnels not opened: {line}")
        signalled = time.monotonic()  # before: the first loss may come before kill returns
        os.kill(args.trigger_pid, signal.SIGUSR1)
        deadline = signalled + args.timeout + 30
        results = [read_line(fd, deadline) for _, fd in children]
    finally:
        os.close(go_write)
        reap(children)
    failures = [r["error"] for r in results if "error" in r]
    if failures:
        raise SystemExit(f"wsload: a client process failed: {failures}")
    lost = [t for r in results for t in r["lost_at"]]
    back = [t for r in results for t in r["back_at"]]
    durations = [b - a for a, b in zip(lost, back, strict=True)]
    return {
        "clients": args.count,
        "back": len(back),
        "failed": sum(r["failed"] for r in results),
        "retries": sum(r["retries"] for r in results),
        "all_back_ms": (max(back) - signalled) * 1e3 if back else None,
        "first_lost_ms": (min(lost) - signalled) * 1e3 if lost else None,
        "last_lost_ms": (max(lost) - signalled) * 1e3 if lost else None,
        "p50_ms": percentile(durations, 50) * 1e3,
        "p99_ms": percentile(durations, 99) * 1e3,
        "max_ms": max(durations, default=0.0) * 1e3,
        "procs": procs,
    }


def reap(children: list[tuple[int, int]]) -> None:
    for pid, fd in children:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrades", help="upgrades per second, closed loop")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--procs", type=int, default=2, help="client processes (2)")
    up.add_argument("--concurrency", type=int, default=32, help="clients at once, in all (32)")
    up.add_argument("--seconds", type=float, default=10.0, help="timed seconds (10)")
    up.add_argument("--warmup", type=float, default=1.0, help="untimed seconds first (1)")
    storm = sub.add_parser("storm", help="reconnect storm")
    storm.add_argument("--port", type=int, required=True)
    storm.add_argument("--count", type=int, required=True, help="tunnels, in all")
    storm.add_argument("--per-proc", type=int, default=3000, help="tunnels per process (3000)")
    storm.add_argument("--trigger-pid", type=int, required=True, help="who gets SIGUSR1")
    storm.add_argument("--timeout", type=float, default=60.0, help="seconds to reconnect (60)")
    args = parser.parse_args(argv)
    result = upgrades_main(args) if args.command == "upgrades" else storm_main(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
