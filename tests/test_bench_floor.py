"""bench/floor.py, the bare splice forwarder bench/cpu.py measures as Python's floor.

Its figures mean something only if it forwards like a balancer: every byte,
each end of file, and a loud stop (not a silent loss) when it cannot; in
either mode, ``splice`` or ``copy`` (read and write through the process).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from bench.procs import HOST, free_port, wait_until
from bench.servers import listening_ports
from tests.integration.clients import answer_and_close, segments_received

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0


def echo_until_eof(conn: socket.socket) -> None:
    """Echo everything back, then close once the client has half-closed."""
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@contextmanager
def echo_backend() -> Iterator[int]:
    listener = socket.create_server((HOST, 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=echo_until_eof, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept, which then ends
        listener.close()


@contextmanager
def floor(
    backend_port: int, workers: int = 2, mode: str = "splice"
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor", str(port), str(backend_port), str(workers)]
    proc = subprocess.Popen(
        argv + (["copy"] if mode == "copy" else []),
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    try:

        def listening() -> bool:  # without connecting: a connection would be forwarded
            assert proc.poll() is None, "bench/floor.py exited at start"
            return port in listening_ports()

        def forked() -> list[psutil.Process] | None:  # it listens first, then forks
            children = psutil.Process(proc.pid).children()
            return children if len(children) == workers else None

        wait_until(listening, TIMEOUT, "bench/floor.py to listen")
        workers_started = wait_until(forked, TIMEOUT, f"bench/floor.py's {workers} workers")
        yield port, proc
    finally:
        proc.kill()  # the parent only, outright: its workers must not outlive it
        proc.wait(TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()
    wait_until(
        lambda: all(map(ended, workers_started)), TIMEOUT, "bench/floor.py's workers to end with it"
    )


def ended(process: psutil.Process) -> bool:
    """Gone, or dead and waiting to be reaped by whoever adopted it."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


MODES = pytest.mark.parametrize("mode", ["splice", "copy"])


@MODES
def test_floor_forwards_every_byte_and_each_end_of_file(mode: str) -> None:
    with echo_backend() as backend, floor(backend, mode=mode) as (port, proc):
        for size in (1, 64, 16 * 1024):  # what fits the socket buffers: see the short-write rule
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)  # passed on: the backend ends its echo and closes
                got = b""
                while chunk := sock.recv(65536):
                    got += chunk
            assert got == payload, size
        assert proc.poll() is None


@MODES
def test_floor_stops_loudly_when_it_cannot_forward(mode: str) -> None:
    with floor(free_port(), workers=1, mode=mode) as (port, proc):  # no server there: refused
        with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
            sock.sendall(b"lost?")
            assert proc.wait(TIMEOUT) == 1
        assert proc.stderr is not None
        assert b"ConnectionRefusedError" in proc.stderr.read()


@MODES
def test_floor_sends_a_servers_last_bytes_with_its_fin_as_the_worker_does(mode: str) -> None:
    """The floor is compared with the worker: it must not send more segments per
    connection than the worker does (see "Last bytes and FIN", lb/worker/splice.py)."""
    server = socket.create_server((HOST, 0))
    server.settimeout(TIMEOUT)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
    thread = threading.Thread(target=answer_and_close, args=(server, answer, 2), daemon=True)
    thread.start()
    try:
        with floor(server.getsockname()[1], workers=1, mode=mode) as (port, _):
            direct = segments_received(server.getsockname()[1], b"GET / HTTP/1.1\r\n\r\n")
            through = segments_received(port, b"GET / HTTP/1.1\r\n\r\n")
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes an accept still waiting (a failed test)
        thread.join(TIMEOUT)
        server.close()
    assert direct[0] == through[0] == answer
    assert through[1] == direct[1]
