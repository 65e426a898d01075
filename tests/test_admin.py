"""Tests for lb.admin: the headers of its answers.

``make_app`` is served on 127.0.0.1 port 0 and spoken to in raw HTTP.  The
pool readers are replaced by spies.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

import lb.admin
from lb.admin import make_app
from lb.errors import NotRunningError

EXCHANGE_TIMEOUT = 10.0


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


def serve(*requests: bytes) -> list[Answer]:
    """Serve make_app on 127.0.0.1 port 0 and send each of ``requests``, formatted
    with ``{port}``, on its own connection; their answers, parsed."""

    async def go() -> list[Answer]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            sock.setblocking(False)
            port = sock.getsockname()[1]
            runner = web.AppRunner(make_app("/nonexistent"), access_log=None)
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


def get(path: str, host: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def check_security_headers(headers: dict[str, str]) -> None:
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert (
        headers["content-security-policy"] == lb.admin.SECURITY_HEADERS["Content-Security-Policy"]
    )


def test_every_answer_carries_the_security_headers(spies: Spies) -> None:
    host = "localhost:{port}"
    answers = serve(
        get("/", host),
        get("/nope", host),
        get("/status", host, method="DELETE"),
    )
    spies.fail = NotRunningError("no instance is running in /nonexistent")
    answers += serve(get("/status", host))
    spies.fail = RuntimeError("a bug")
    answers += serve(get("/status", host))
    assert [status for status, _, _ in answers] == [200, 404, 405, 503, 500]
    for _, headers, _ in answers:
        check_security_headers(headers)
    assert answers[2][1]["allow"] == "GET,HEAD"
