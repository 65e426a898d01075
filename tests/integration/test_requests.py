"""Every request on a kept-alive connection is routed and checked, not only the first.

An http listener routes ``Host: b.test`` to backend ``b`` and everything else
to ``a``; each backend is a recorder (tests/integration/recorder.py) that
reports every request it receives, with its body's length and SHA-256.  The
clients are raw sockets, so that requests can follow one another on one
connection, or go out together (pipelining).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration import clients
from tests.integration.harness import (
    Proc,
    Recorder,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)
from tests.integration.tools import pattern, pattern_sha

ROUTE_B = '[[listeners.routes]]\nhost = "b.test"\nbackend = "b"\n'
GOOD_ORIGIN = "https://good.example"


def get(path: str, host: str = "a.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, host: str = "a.test") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def chunked(path: str, chunks: list[bytes], host: str = "a.test") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return head.encode() + body + b"0\r\nX-Trailer: yes\r\n\r\n"


class Answers:
    """The answers on one client connection, read one at a time (Content-Length framed)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self) -> dict[str, Any] | None:
        """The next answer's JSON body (with its ``status``), or None at the end of file."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                assert not self.buffer, f"closed in the middle of an answer: {self.buffer!r}"
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        status = int(lines[0].split()[1])
        if status == 101:
            return {"status": 101}
        length = int(fields["content-length"])
        while len(self.buffer) < length:
            assert self._more(), "closed in the middle of an answer's body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return {"status": status, **json.loads(body)}

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)


@pytest.fixture
def recorders(procs: list[Proc]) -> tuple[Recorder, Recorder]:
    a, b = Recorder("a"), Recorder("b")
    procs += [a, b]
    return a, b


def start(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder], extra: str = ""
) -> tuple[SpliceLB, int]:
    a, b = recorders
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "a", extra=extra + "\n" + ROUTE_B),
            backend("a", [("a1", a.address)]) + backend("b", [("b1", b.address)]),
            workers=1,
        ),
        workers=1,
    )
    return lb, port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def ended(lb: SpliceLB, count: int = 1) -> list[dict[str, Any]]:
    """The conn lines, once ``count`` connections have ended."""
    return lb.wait_conns(count)


def test_a_later_request_for_another_backend_is_not_forwarded(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    lb, port = start(start_lb, recorders)
    a, b = recorders
    with connect(port) as sock:
        answers = Answers(sock)
        sock.sendall(get("/one"))
        first = answers.next()
        assert first is not None and (first["backend"], first["path"]) == ("a", "/one")
        sock.sendall(get("/two", host="b.test"))
        assert answers.next() is None  # closed after the first answer, the second unanswered
    [line] = ended(lb)
    assert line["reason"] == "request 2 not forwarded: routed to backend b", line
    assert [r["path"] for r in a.wait_requests(1)] == ["/one"]
    assert b.requests() == []
    with connect(port) as sock:  # the client's retry, on a new connection: routed afresh
        answers = Answers(sock)
        sock.sendall(get("/two", host="b.test"))
        again = answers.next()
        assert again is not None and (again["backend"], again["path"]) == ("b", "/two")


def test_requests_for_the_same_backend_are_answered_on_one_connection(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    lb, port = start(start_lb, recorders)
    a, _ = recorders
    with connect(port) as sock:
        answers = Answers(sock)
        for path in ("/1", "/2", "/2", "/3"):  # the same head twice: judged again all the same
            sock.sendall(get(path))
            answer = answers.next()
            assert answer is not None and (answer["backend"], answer["path"]) == ("a", path)
        sock.shutdown(socket.SHUT_WR)
        assert answers.next() is None
    [line] = ended(lb)
    assert line["status"] is None and line["server"] == "a1", line
    seen = a.wait_requests(4)
    assert [r["path"] for r in seen] == ["/1", "/2", "/2", "/3"]
    assert len({r["peer"] for r in seen}) == 1  # over one connection to the server


def test_a_chunked_body_is_framed_and_the_request_after_it_judged(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    """The body holds what looks like a request for b, and a CRLF CRLF: it is body all
    the same; the request after it is a request, judged."""
    lb, port = start(start_lb, recorders)
    a, b = recorders
    inner = b"\r\n\r\n" + get("/smuggled", host="b.test")
    chunks = [os.urandom(1000), inner, os.urandom(70000), b"\r\n\r\n", b"end"]
    body = b"".join(chunks)
    with connect(port) as sock:
        answers = Answers(sock)
        request = chunked("/upload", chunks)
        for at in range(0, len(request), 5000):  # in pieces, as a slow client sends it
            sock.sendall(request[at : at + 5000])
        first = answers.next()
        assert first is not None
        assert (first["path"], first["length"]) == ("/upload", len(body))
        assert first["sha256"] == hashlib.sha256(body).hexdigest()
        sock.sendall(post("/second", b"hello"))
        second = answers.next()
        assert second is not None and (second["path"], second["length"]) == ("/second", 5)
        sock.sendall(get("/third", host="b.test"))
        assert answers.next() is None
    [line] = ended(lb)
    assert line["reason"] == "request 3 not forwarded: routed to backend b", line
    assert [r["path"] for r in a.wait_requests(2)] == ["/upload", "/second"]
    assert b.requests() == []


def test_pipelined_requests_are_judged_in_turn(
    start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    """The answers owed before a refused request complete: with a server that answers
    what it has read before it sees the end of file (aiohttp drops them, and the client
    retries them: RFC 9112 section 9.3.2)."""
    a, b = Recorder("a", "--sequential"), Recorder("b", "--sequential")
    procs += [a, b]
    lb, port = start(start_lb, (a, b))
    pipeline = (
        get("/1")
        + post("/2", b"x" * 3000)
        + chunked("/3", [b"abc", b"\r\n\r\n"])
        + get("/4")
        + get("/5", host="b.test")
        + get("/6")
    )
    with connect(port) as sock:
        answers = Answers(sock)
        sock.sendall(pipeline)  # one write: the first read holds them all
        paths = []
        while (answer := answers.next()) is not None:
            paths.append((answer["backend"], answer["path"], answer["length"]))
    assert paths == [("a", "/1", 0), ("a", "/2", 3000), ("a", "/3", 7), ("a", "/4", 0)]
    [line] = ended(lb)
    assert line["reason"] == "request 5 not forwarded: routed to backend b", line
    assert [r["path"] for r in a.wait_requests(4)] == ["/1", "/2", "/3", "/4"]
    assert b.requests() == []


def test_an_upgrade_as_a_later_request_is_checked_against_allowed_origins(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    lb, port = start(start_lb, recorders, f'allowed_origins = ["{GOOD_ORIGIN}"]')
    a, _ = recorders
    with connect(port) as sock:
        answers = Answers(sock)
        sock.sendall(get("/page"))
        assert answers.next() is not None
        evil = clients.upgrade_request(host="a.test", extra="Origin: https://evil.example\r\n")
        sock.sendall(evil)
        assert answers.next() is None  # no 101: closed, the upgrade never forwarded
    [line] = ended(lb)
    assert line["reason"] == "request 2 not forwarded: origin not allowed (403)", line
    assert [(r["path"], r["upgrade"]) for r in a.wait_requests(1)] == [("/page", False)]
    with connect(port) as sock:  # from an allowed Origin: upgraded, and a WebSocket after
        answers = Answers(sock)
        sock.sendall(get("/page"))
        assert answers.next() is not None
        sock.sendall(clients.upgrade_request(host="a.test", extra=f"Origin: {GOOD_ORIGIN}\r\n"))
        assert answers.next() == {"status": 101}
        assert clients.ws_ping(sock, b"after the upgrade")
    assert [(r["path"], r["upgrade"]) for r in a.wait_requests(3)][1:] == [
        ("/page", False),
        ("/ws", True),
    ]
    [_, upgraded] = ended(lb, 2)
    assert upgraded["websocket"] is True, upgraded


def test_a_later_head_that_does_not_complete_in_time_is_not_forwarded(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    lb, port = start(start_lb, recorders, "head_timeout = 1")
    a, _ = recorders
    with connect(port) as sock:
        answers = Answers(sock)
        sock.sendall(get("/one"))
        assert answers.next() is not None
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n")  # and nothing more
        assert answers.next() is None
    [line] = ended(lb)
    assert line["reason"] == "request 2 not forwarded: request head not complete within 1 s"
    assert [r["path"] for r in a.wait_requests(1)] == ["/one"]


def test_a_large_upload_arrives_whole_and_the_connection_goes_on(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    size = 64 << 20
    lb, port = start(start_lb, recorders)
    with connect(port) as sock:
        answers = Answers(sock)
        head = f"PUT /big HTTP/1.1\r\nHost: a.test\r\nContent-Length: {size}\r\n\r\n"
        sock.sendall(head.encode())
        for piece in pattern(size):
            sock.sendall(piece)
        big = answers.next()
        assert big is not None
        assert (big["path"], big["length"], big["sha256"]) == ("/big", size, pattern_sha(size))
        sock.sendall(get("/after"))
        after = answers.next()
        assert after is not None and after["path"] == "/after"
    [line] = ended(lb)
    assert line["bytes_in"] > size, line


def test_after_a_request_without_keep_alive_nothing_more_is_forwarded(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    """What follows ``Connection: close`` is dropped: the server (aiohttp) answers the
    last request, where the bytes after it would have had it answer 400 instead."""
    lb, port = start(start_lb, recorders)
    a, _ = recorders
    with connect(port) as sock:
        answers = Answers(sock)
        sock.sendall(get("/last", extra="Connection: close\r\n") + get("/never"))
        last = answers.next()
        assert last is not None and (last["status"], last["path"]) == (200, "/last")
        assert answers.next() is None
    [line] = ended(lb)
    assert line["reason"] == "server closed", line
    assert [r["path"] for r in a.wait_requests(1)] == ["/last"]


def test_a_kept_alive_connection_handed_over_on_reload_still_has_its_requests_judged(
    start_lb: Callable[..., SpliceLB], recorders: tuple[Recorder, Recorder]
) -> None:
    """The new generation's worker takes the connection between two requests, over the
    same server connection, and judges the next ones as the old worker did."""
    lb, port = start(start_lb, recorders)
    a, b = recorders
    with connect(port) as sock:
        answers = Answers(sock)
        sock.sendall(get("/before"))
        assert answers.next() is not None
        done = cli("reload", "-c", str(lb.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        [handover] = wait_until(lambda: lb.events("handover"), 20, "the handover")
        assert handover["tunnels"] == 1, handover
        sock.sendall(get("/after"))
        after = answers.next()
        assert after is not None and after["path"] == "/after"
        sock.sendall(get("/elsewhere", host="b.test"))
        assert answers.next() is None
    [line] = ended(lb)
    assert line["generation"] == 2, line
    assert line["reason"] == "request 3 not forwarded: routed to backend b", line
    seen = a.wait_requests(2)
    assert [r["path"] for r in seen] == ["/before", "/after"]
    assert seen[0]["peer"] == seen[1]["peer"]
    assert b.requests() == []
