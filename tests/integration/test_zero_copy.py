"""The tunnel's bytes never pass through Python: counted at the system-call boundary.

strace watches the one worker while a TCP tunnel moves 64 MiB each way and a
WebSocket tunnel echoes a 16 MiB message, or while a 64 MiB upload goes
through an http listener whose requests the worker reads.  Every byte the
worker copies into or out of user space goes through read/recv/write/send-
family calls; every byte it moves kernel-to-kernel goes through splice.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    Recorder,
    SpliceLB,
    ToolServer,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)
from tests.integration.tools import drain, pattern, pattern_sha

MiB = 1 << 20
COPYING = ("read", "write", "recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev")
_CALL = re.compile(r"^(?:\d+ +)?(?:<\.\.\. (\w+) resumed>|(\w+)\().*\) += (\d+)", re.M)


def traced_bytes(trace: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for resumed, name, result in _CALL.findall(trace):
        call = resumed or name
        totals[call] = totals.get(call, 0) + int(result)
    return totals


def tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def strace_worker(worker: int, out: Path) -> subprocess.Popen[bytes]:
    """strace on the worker, counting the copying calls and splice, once attached."""
    strace = subprocess.Popen(
        [
            "strace",
            "-f",
            "-qq",
            "-p",
            str(worker),
            "-o",
            str(out),
            "-e",
            "trace=" + ",".join((*COPYING, "splice")),
        ],
        stdin=subprocess.DEVNULL,
    )
    wait_until(lambda: tracer_pid(worker) == strace.pid, 10, "strace to attach")
    return strace


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_tunnel_bytes_move_by_splice_not_through_python(
    tmp_path: Path,
    procs: list[Proc],
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
) -> None:
    far = ToolServer("sha", "--send", str(64 * MiB))
    procs.append(far)
    tcp_port, http_port = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{tcp_port}", "bulk", mode="tcp", name="raw")
            + listener(f"127.0.0.1:{http_port}", "app"),
            backend("bulk", [("far", far.address)])
            + backend("app", [("echo1", echo_pair[0].address)]),
            workers=1,
        ),
        workers=1,
    )
    [worker] = lb.worker_pids()
    out = tmp_path / "strace.txt"
    strace = strace_worker(worker, out)
    try:
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=60) as sock:

            def send() -> None:
                for chunk in pattern(64 * MiB):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)

            thread = threading.Thread(target=send)
            thread.start()
            received, _ = drain(sock)
            thread.join(60)
        assert received == 64 * MiB
        message = bytes(16 * MiB)
        assert clients.run(clients.ws_echo(f"ws://127.0.0.1:{http_port}/ws", [message])) == [
            message
        ]
        lb.wait_conns(2)
    finally:
        strace.terminate()
        strace.wait(10)
    totals = traced_bytes(out.read_text())
    print("bytes by system call:", totals)
    copied = sum(totals.get(name, 0) for name in COPYING)
    spliced = totals.get("splice", 0)
    # 64 MiB each way plus 16 MiB each way, each byte spliced in and out of a pipe.
    assert spliced >= 2 * (2 * 64 * MiB + 2 * 16 * MiB)
    # What Python copies: the request head, the log lines, the loop's wakeups.
    assert copied < 64 * 1024, totals


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_an_upload_on_a_kept_alive_http_connection_moves_by_splice(
    tmp_path: Path, procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    """The worker reads each request's head, and splices the Content-Length body after
    it by count: the upload's bytes do not pass through Python, its answer neither."""
    recorder = Recorder("up")
    procs.append(recorder)
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "up"),
            backend("up", [("up1", recorder.address)]),
            workers=1,
        ),
        workers=1,
    )
    [worker] = lb.worker_pids()
    out = tmp_path / "strace.txt"
    strace = strace_worker(worker, out)
    size = 64 * MiB
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for path in ("/first", "/upload"):
                head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
                sock.sendall(head.encode())
                for chunk in pattern(size):
                    sock.sendall(chunk)
                answer = b""
                while not answer.endswith(b"}"):  # the recorder's JSON, one per request
                    answer += sock.recv(65536)
                assert pattern_sha(size).encode() in answer, answer
        lb.wait_conns(1)
    finally:
        strace.terminate()
        strace.wait(10)
    totals = traced_bytes(out.read_text())
    print("bytes by system call:", totals)
    copied = sum(totals.get(name, 0) for name in COPYING)
    # Each body spliced in and out of a pipe, but for what came with its head in one read
    # (at most 16 KiB with the first head, 64 KiB with a later one).
    assert totals.get("splice", 0) >= 2 * (2 * size - 80 * 1024)
    assert copied < 256 * 1024, totals
