"""A TLS-terminated tunnel on real sockets: records are never split, bytes arrive in order,
and the ends of file pass as close_notify and half-closes."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import socket
import ssl
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from lb.proto.http1 import Head
from lb.tls import CertPair, ListenerTLS, server_context
from lb.worker.deadlines import Deadlines
from lb.worker.loop import Loop
from lb.worker.pipes import PipePool
from lb.worker.splice import Pump
from lb.worker.tls import MAX_RECORD, TlsSocket, TlsTunnel, wrap
from tests.test_tls import pair
from tests.worker.test_splice import FakeConnection, read_to_eof, tcp_pair

IDLE = 3600.0


class NoRequests:
    """The tunnel's request owner: a first request that upgraded leaves nothing to judge."""

    def next_request(self, event: object, raw: bytes) -> str | None:
        raise AssertionError("no request is judged here")

    def forward_head(self, head: Head, raw: bytes) -> bytes:
        raise AssertionError("no request is judged here")

    def request_refused(self, reason: str) -> None:
        raise AssertionError(reason)

    def request_upgraded(self, head: Head) -> None:
        raise AssertionError("no request is judged here")


@dataclass
class Setup:
    tunnel: TlsTunnel
    client: ssl.SSLSocket  # blocking, the test's
    server: socket.socket  # plain, the test's
    conn: FakeConnection


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    ca = trustme.CA()
    cert, key = pair(ca, tmp_path, "localhost", "localhost")
    context = server_context(ListenerTLS((CertPair(str(cert), str(key), "tls"),)))
    raw_client, lb_client = tcp_pair()
    lb_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2 << 20)  # room to queue records
    lb_server, server = tcp_pair()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client = client_context.wrap_socket(
        raw_client, server_hostname="localhost", do_handshake_on_connect=False
    )
    shaking = threading.Thread(target=client.do_handshake)
    shaking.start()
    lb_client.setblocking(False)
    tls = wrap(context, lb_client.detach(), socket.AF_INET)
    handshake(tls)
    shaking.join(10)
    lb_server.setblocking(False)
    loop = Loop(on_error=lambda exc: pytest.fail(repr(exc)))
    pipes = PipePool()
    pump = Pump(loop, pipes, Deadlines(loop, 0.05, lambda exc: pytest.fail(repr(exc))))
    conn = FakeConnection()
    tunnel = TlsTunnel(
        pump, conn, tls.fileno(), tls, lb_server.detach(), None, IDLE, None, NoRequests(), 5.0
    )
    yield Setup(tunnel, client, server, conn)
    client.close()
    server.close()
    tunnel.close("test over")
    loop.shutdown()
    pipes.close()


def handshake(tls: TlsSocket) -> None:
    """The balancer's side of a handshake, as the worker drives it (non-blocking)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            tls.ssl.do_handshake()
            return
        except ssl.SSLWantReadError:
            select.select([tls.fileno()], [], [], deadline - time.monotonic())
        except ssl.SSLWantWriteError:
            select.select([], [tls.fileno()], [], deadline - time.monotonic())
        assert time.monotonic() < deadline, "handshake not done in 10 s"


def queued(fd: int) -> int:
    """Bytes in a socket's receive queue."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_no_record_is_left_half_read_in_openssl(setup: Setup) -> None:
    """Records that do not line up with the copy buffer (a short one first) are read
    whole: nothing stays decrypted in OpenSSL where no readiness would tell of it."""
    t = setup.tunnel
    setup.client.sendall(b"x" * 100)  # one short record, then full ones
    body = os.urandom(300 * 1024)
    sender = threading.Thread(target=setup.client.sendall, args=(body,))
    sender.start()
    wait_for(lambda: queued(t.up.src) >= len(body), "the records to arrive")
    sender.join(10)
    got = b""
    while len(got) < len(body) + 100:
        t.up.on_readable()
        assert t.client_tls.ssl.pending() == 0  # every record read whole
        setup.server.settimeout(5)
        got += setup.server.recv(1 << 20)
    assert got == b"x" * 100 + body


def test_the_server_is_not_read_while_the_client_is_full(setup: Setup) -> None:
    """Backpressure down: what the client does not take waits, and the server's socket is
    not read meanwhile; then every byte arrives in order."""
    t = setup.tunnel
    data = os.urandom(8 << 20)
    sender = threading.Thread(target=setup.server.sendall, args=(data,))
    sender.start()
    deadline = time.monotonic() + 10
    while not t.down.pending:  # type: ignore[attr-defined]  # the client reads nothing: full
        assert time.monotonic() < deadline, "the client's side never filled"
        wait_for(lambda: queued(t.down.src) > 0, "the server's bytes")
        t.down.on_readable()
    assert t.loop.masks[t.down.src] & select.EPOLLIN == 0  # watched for failure only
    got = bytearray()
    setup.client.setblocking(False)  # this thread also drives the tunnel: never wait
    while len(got) < len(data):
        assert time.monotonic() < deadline + 20, f"{len(got)} of {len(data)} bytes arrived"
        if t.down.pending:  # type: ignore[attr-defined]
            t.down.on_writable()
        elif queued(t.down.src):
            t.down.on_readable()
        if setup.client.pending() or select.select([setup.client], [], [], 0.01)[0]:
            with contextlib.suppress(ssl.SSLWantReadError):  # a record not whole yet
                got += setup.client.recv(1 << 20)
    sender.join(10)
    assert bytes(got) == data


def test_ends_of_file_pass_both_ways(setup: Setup) -> None:
    """The server's end of file reaches the client as close_notify; the client's end of
    file half-closes the server; the tunnel then closes, once."""
    t = setup.tunnel
    setup.server.sendall(b"last words")
    setup.server.shutdown(socket.SHUT_WR)
    wait_for(lambda: queued(t.down.src) >= 10, "the server's bytes")
    t.down.on_readable()
    t.down.on_readable()  # the end of file
    assert t.down.ended
    setup.client.settimeout(5)
    assert setup.client.recv(100) == b"last words"
    assert setup.client.recv(100) == b""  # close_notify: a clean end
    setup.client.sendall(b"after")
    setup.client.unwrap()  # our close_notify, then the client's
    while not t.closed:  # as the loop does while the client's socket is readable
        wait_for(lambda: queued(t.up.src) > 0, "the client's bytes")
        t.up.on_readable()
    assert read_to_eof(setup.server) == b"after"
    assert setup.conn.closed == ["server closed"]
    assert setup.conn.bytes_in == 5 and setup.conn.bytes_out == 10
    assert MAX_RECORD == 16384
