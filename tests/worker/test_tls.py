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

from lb.proto.events import NEED_DATA
from lb.proto.http1 import Head
from lb.proto.proxy import V2_SIGNATURE, ProxyHeader, ProxyReader, ProxyReject
from lb.tls import CertPair, ListenerTLS, server_context
from lb.worker.deadlines import Deadlines
from lb.worker.loop import Loop
from lb.worker.pipes import PipePool
from lb.worker.splice import Pump
from lb.worker.tls import (
    MAX_RECORD,
    PEEK_BYTES,
    TlsSocket,
    TlsTunnel,
    take_proxy_header,
    wrap,
)
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


# -- a PROXY header before TLS ---------------------------------------------------------

HELLO = b"\x16\x03\x01\x00\x05hello"  # what follows the header: OpenSSL's, never taken
V1 = b"PROXY TCP4 203.0.113.9 198.51.100.1 51000 443\r\n"


@pytest.fixture
def peer() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the proxy's end, the balancer's end: non-blocking)."""
    near, far = tcp_pair()
    far.setblocking(False)
    yield near, far
    near.close()
    far.close()


def queued_bytes(sock: socket.socket) -> bytes:
    """What is left in the socket, once what was sent has arrived (a peek: left there)."""
    wait_for(lambda: queued(sock.fileno()) > 0, "bytes to arrive")
    return sock.recv(65536, socket.MSG_PEEK)


def test_a_header_sent_with_the_hello_is_taken_and_the_hello_left(
    peer: tuple[socket.socket, socket.socket],
) -> None:
    near, far = peer
    near.sendall(V1 + HELLO)
    wait_for(lambda: queued(far.fileno()) == len(V1 + HELLO), "the segment")
    reader = ProxyReader()
    event = take_proxy_header(far.fileno(), reader)
    assert isinstance(event, ProxyHeader) and event.source == ("203.0.113.9", 51000)
    assert queued_bytes(far) == HELLO


def test_a_header_in_pieces_is_taken_piece_by_piece(
    peer: tuple[socket.socket, socket.socket],
) -> None:
    near, far = peer
    reader = ProxyReader()
    with pytest.raises(BlockingIOError):  # nothing yet
        take_proxy_header(far.fileno(), reader)
    near.sendall(V1[:10])
    wait_for(lambda: queued(far.fileno()) == 10, "the first piece")
    assert take_proxy_header(far.fileno(), reader) is NEED_DATA
    assert queued(far.fileno()) == 0  # taken: the socket is not readable for it again
    near.sendall(V1[10:] + HELLO)
    wait_for(lambda: queued(far.fileno()) > 0, "the rest")
    assert isinstance(take_proxy_header(far.fileno(), reader), ProxyHeader)
    assert queued_bytes(far) == HELLO


def test_a_v2_header_longer_than_one_peek_is_taken_whole(
    peer: tuple[socket.socket, socket.socket],
) -> None:
    near, far = peer
    tlv = b"\xee" + (PEEK_BYTES + 100).to_bytes(2, "big") + bytes(PEEK_BYTES + 100)
    addresses = bytes([203, 0, 113, 9, 198, 51, 100, 1]) + b"\xc7\x38\x01\xbb"
    body = addresses + tlv
    header = V2_SIGNATURE + b"\x21\x11" + len(body).to_bytes(2, "big") + body
    near.sendall(header + HELLO)
    wait_for(lambda: queued(far.fileno()) == len(header + HELLO), "the header")
    reader = ProxyReader()
    events = [take_proxy_header(far.fileno(), reader) for _ in range(2)]
    assert events[0] is NEED_DATA
    assert isinstance(events[1], ProxyHeader) and events[1].source == ("203.0.113.9", 51000)
    assert queued_bytes(far) == HELLO


def test_a_hello_without_a_header_is_rejected_and_nothing_taken(
    peer: tuple[socket.socket, socket.socket],
) -> None:
    near, far = peer
    near.sendall(HELLO)
    wait_for(lambda: queued(far.fileno()) == len(HELLO), "the hello")
    event = take_proxy_header(far.fileno(), ProxyReader())
    assert isinstance(event, ProxyReject) and event.reason == "not a PROXY header"
    near.close()
    assert far.recv(100) == HELLO  # left: the connection is closed by its owner


def test_the_end_of_file_before_a_header_is_none(
    peer: tuple[socket.socket, socket.socket],
) -> None:
    near, far = peer
    near.shutdown(socket.SHUT_WR)
    wait_for(lambda: select.select([far], [], [], 0)[0] != [], "the end of file")
    assert take_proxy_header(far.fileno(), ProxyReader()) is None
