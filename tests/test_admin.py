"""Tests for lb.admin: which Host names the admin endpoint answers, and its headers.

``HostCheck`` is tested as a table; ``make_app`` is served on 127.0.0.1 port 0
and spoken to in raw HTTP, so that Host (or its absence) is exactly as sent.
The pool readers are replaced by spies, to see that a refused request never
reaches them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

import lb.admin
from lb.admin import HostCheck, make_app
from lb.config_table import Address
from lb.errors import NotRunningError

PORT = 9900
REFUSED_BODY = b"misdirected request: this endpoint does not answer for that Host\n"
EXCHANGE_TIMEOUT = 10.0


def address(host: str, literal: str, port: int = PORT) -> Address:
    """An Address as the config gives it, without resolving anything."""
    if ":" in literal:
        return Address(host, port, socket.AF_INET6, (literal, port, 0, 0))
    return Address(host, port, socket.AF_INET, (literal, port))


LOOPBACK = HostCheck.for_endpoint(address("127.0.0.1", "127.0.0.1"), ["dash.example.test"])


# --- the names of an endpoint ----------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "listed", "names"),
    [
        (address("127.0.0.1", "127.0.0.1"), [], {"127.0.0.1", "localhost", "[::1]"}),
        (address("::1", "::1"), [], {"127.0.0.1", "localhost", "[::1]"}),
        (address("localhost", "127.0.0.1"), [], {"127.0.0.1", "localhost", "[::1]"}),
        (address("127.0.0.2", "127.0.0.2"), [], {"127.0.0.2", "127.0.0.1", "localhost", "[::1]"}),
        (address("192.0.2.10", "192.0.2.10"), [], {"192.0.2.10"}),
        (address("2001:db8::0:10", "2001:db8::10"), [], {"[2001:db8::10]"}),
        (address("admin.internal", "192.0.2.10"), [], {"admin.internal", "192.0.2.10"}),
        (
            address("192.0.2.10", "192.0.2.10"),
            ["a.example", "[fd00::1]"],
            {"192.0.2.10", "a.example", "[fd00::1]"},
        ),
        # A wildcard bind names no address of its own; loopback reaches it.
        (address("0.0.0.0", "0.0.0.0"), [], {"127.0.0.1", "localhost", "[::1]"}),
        (address("::", "::"), ["a.example"], {"127.0.0.1", "localhost", "[::1]", "a.example"}),
    ],
)
def test_the_names_of_an_endpoint(bind: Address, listed: list[str], names: set[str]) -> None:
    assert HostCheck.for_endpoint(bind, listed) == HostCheck(frozenset(names), PORT)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:9900", True),
        ("LocalHost:9900", True),
        ("127.0.0.1", True),
        ("127.0.0.1:9900", True),
        ("[::1]", True),
        ("[::1]:9900", True),
        ("[0:0:0:0:0:0:0:1]:9900", True),
        ("dash.example.test", True),
        ("Dash.Example.Test:9900", True),
        ("evil.example", False),
        ("evil.example:9900", False),
        ("localhost:9901", False),  # the right name for another port's server
        ("localhost:", False),
        ("localhost:09900", False),
        ("localhost.", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("evil.example#localhost", False),
        ("::1", False),  # not a Host value: IPv6 literals come in brackets
        ("[::2]", False),
        ("[localhost]", False),
        ("", False),
    ],
)
def test_which_host_values_are_answered(host: str, allowed: bool) -> None:
    assert LOOPBACK.allows(host, (1, 1)) is allowed
    assert LOOPBACK.allows(host, (1, 0)) is allowed


def test_no_host_is_answered_only_in_http_1_0() -> None:
    assert LOOPBACK.allows(None, (1, 0))
    assert not LOOPBACK.allows(None, (1, 1))


# --- the app, served ---------------------------------------------------------------------


class Spies:
    """Stand-ins for the pool readers that count how often they are asked."""

    def __init__(self) -> None:
        self.status_reads = 0
        self.metrics_reads = 0
        self.fail: BaseException | None = None

    def read_status(self, _runtime_dir: str) -> dict[str, Any]:
        self.status_reads += 1
        if self.fail is not None:
            raise self.fail
        return {"backends": []}

    def collector(self, _runtime_dir: str) -> Any:
        spies = self

        class Collector:
            def collect(self) -> Iterator[Any]:
                spies.metrics_reads += 1
                return iter(())

        return Collector()


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> Spies:
    spies = Spies()
    monkeypatch.setattr(lb.admin, "read_status", spies.read_status)
    monkeypatch.setattr(lb.admin, "PoolCollector", spies.collector)
    return spies


Answer = tuple[int, dict[str, str], bytes]


def parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def serve(log: Log, *requests: bytes, listed: tuple[str, ...] = ()) -> list[Answer]:
    """Serve make_app on 127.0.0.1 port 0 and send each of ``requests``, formatted
    with ``{port}``, on its own connection; their answers, parsed."""

    async def go() -> list[Answer]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            sock.setblocking(False)
            port = sock.getsockname()[1]
            check = HostCheck.for_endpoint(address("127.0.0.1", "127.0.0.1", port), listed)
            runner = web.AppRunner(make_app("/nonexistent", check, log), access_log=None)
            await runner.setup()
            try:
                await web.SockSite(runner, sock).start()
                return [
                    await asyncio.wait_for(exchange(port, raw), EXCHANGE_TIMEOUT)
                    for raw in requests
                ]
            finally:
                await runner.cleanup()

    async def exchange(port: int, raw: bytes) -> Answer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw.replace(b"{port}", str(port).encode()))
            return parse(await reader.read())
        finally:
            writer.close()

    return asyncio.run(go())


def get(path: str, host: str | None, method: str = "GET") -> bytes:
    host_line = "" if host is None else f"Host: {host}\r\n"
    return f"{method} {path} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n".encode()


def check_security_headers(headers: dict[str, str]) -> None:
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert (
        headers["content-security-policy"] == lb.admin.SECURITY_HEADERS["Content-Security-Policy"]
    )


def test_a_foreign_host_is_refused_before_anything_is_read(spies: Spies) -> None:
    log = Log()
    answers = serve(
        log,
        *(get(path, "evil.example") for path in ("/", "/status", "/metrics", "/favicon.ico")),
        get("/status", "evil.example:{port}", method="HEAD"),
        get("/status", "evil.example", method="POST"),
        b"GET http://evil.example/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    for status, headers, _ in answers:
        assert status == 421
        assert headers["content-type"] == "text/plain; charset=utf-8"
        check_security_headers(headers)
    assert [body for _, _, body in answers] == [REFUSED_BODY] * 4 + [b""] + [REFUSED_BODY] * 2
    assert (spies.status_reads, spies.metrics_reads) == (0, 0)
    # Each refused name is logged once, for the operator who forgot an admin_hosts entry.
    assert [event for event, _ in log.lines] == ["admin_host_refused"] * 2
    first, second = (fields["host"] for _, fields in log.lines)
    assert first == "evil.example" and second.startswith("evil.example:")


def test_the_endpoints_names_are_served(spies: Spies) -> None:
    answers = serve(
        Log(),
        get("/status", "localhost:{port}"),
        get("/status", "127.0.0.1"),
        get("/status", "[::1]:{port}"),
        get("/metrics", "Dash.Example.Test"),
        get("/", "dash.example.test:{port}"),
        b"GET http://localhost:{port}/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        listed=("dash.example.test",),
    )
    assert [status for status, _, _ in answers] == [200] * 6
    assert answers[0][2] == b'{"backends": []}'
    assert b"<title>splicelb</title>" in answers[4][2]
    assert (spies.status_reads, spies.metrics_reads) == (4, 1)


def test_the_dashboard_has_an_icon(spies: Spies) -> None:
    """Browsers ask for /favicon.ico by themselves: it is an answer, not a 404."""
    ((status, headers, body), (head_status, _, head_body)) = serve(
        Log(), get("/favicon.ico", "localhost:{port}"), get("/favicon.ico", "localhost", "HEAD")
    )
    assert status == 200 and head_status == 200 and head_body == b""
    assert headers["content-type"] == "image/svg+xml"
    assert body.startswith(b"<svg ") and body.endswith(b"</svg>")
    check_security_headers(headers)
    assert (spies.status_reads, spies.metrics_reads) == (0, 0)


def test_without_host_only_http_1_0_is_answered(spies: Spies) -> None:
    old, new = serve(Log(), b"GET /status HTTP/1.0\r\n\r\n", get("/status", None))
    assert old[0] == 200
    assert new[0] in (400, 421)  # aiohttp's parser may refuse it (400) before the app does
    assert spies.status_reads == 1


def test_every_answer_carries_the_security_headers(spies: Spies) -> None:
    host = "localhost:{port}"
    answers = serve(
        Log(),
        get("/", host),
        get("/nope", host),
        get("/status", host, method="DELETE"),
        get("/status", "evil.example"),
    )
    spies.fail = NotRunningError("no instance is running in /nonexistent")
    answers += serve(Log(), get("/status", host))
    spies.fail = RuntimeError("a bug")
    answers += serve(Log(), get("/status", host))
    assert [status for status, _, _ in answers] == [200, 404, 405, 421, 503, 500]
    for _, headers, _ in answers:
        check_security_headers(headers)
    assert answers[2][1]["allow"] == "GET,HEAD"
