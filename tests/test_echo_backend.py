"""Tests for the example echo backend (examples/echo_backend.py).

In-process tests serve ``make_app`` on 127.0.0.1 port 0; one test runs the
script as a real process and stops it with a signal, as the demo does.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from examples.echo_backend import make_app

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "echo_backend.py"
STARTUP_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0
SIZES = [1, 64 * 1024, 4 * 1024 * 1024]


@asynccontextmanager
async def serving(name: str) -> AsyncIterator[str]:
    """Serve make_app(name) on 127.0.0.1 port 0 and yield ``host:port``."""
    runner = web.AppRunner(make_app(name))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


def run_served(name: str, check: Callable[[str], Awaitable[None]]) -> None:
    async def go() -> None:
        async with serving(name) as addr:
            await asyncio.wait_for(check(addr), timeout=30)

    asyncio.run(go())


def text_payload(size: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return (alphabet * (size // len(alphabet) + 1))[:size]


def binary_payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize("size", SIZES)
def test_text_echo(size: int) -> None:
    payload = text_payload(size)

    async def check(addr: str) -> None:
        async with connect(f"ws://{addr}/ws", max_size=None) as ws:
            await ws.send(payload)
            reply = await ws.recv()
        assert isinstance(reply, str)
        assert reply == payload

    run_served("echo1", check)


@pytest.mark.parametrize("size", SIZES)
def test_binary_echo(size: int) -> None:
    payload = binary_payload(size)

    async def check(addr: str) -> None:
        async with connect(f"ws://{addr}/ws", max_size=None) as ws:
            await ws.send(payload)
            reply = await ws.recv()
        assert isinstance(reply, bytes)
        assert reply == payload

    run_served("echo1", check)


def test_echo_keeps_order_and_type() -> None:
    messages: list[str | bytes] = [f"m{i}" if i % 2 else f"m{i}".encode() for i in range(50)]

    async def check(addr: str) -> None:
        async with connect(f"ws://{addr}/ws", max_size=None) as ws:
            for message in messages:
                await ws.send(message)
            replies = [await ws.recv() for _ in messages]
        assert replies == messages
        assert [type(r) for r in replies] == [type(m) for m in messages]

    run_served("echo1", check)


def test_websocket_is_not_compressed() -> None:
    async def check(addr: str) -> None:
        async with connect(f"ws://{addr}/ws") as ws:
            assert ws.response is not None
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            assert ws.response.headers["X-Backend"] == "echo1"

    run_served("echo1", check)


async def fetch(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def test_healthz() -> None:
    async def check(addr: str) -> None:
        status, headers, body = await fetch(f"http://{addr}/healthz")
        assert status == 200
        assert body == "ok echo7"
        assert headers["X-Backend"] == "echo7"

    run_served("echo7", check)


def test_whoami() -> None:
    async def check(addr: str) -> None:
        status, headers, body = await fetch(f"http://{addr}/whoami")
        assert status == 200
        assert body == "echo7"
        assert headers["X-Backend"] == "echo7"

    run_served("echo7", check)


def test_index_page_names_backend_and_is_self_contained() -> None:
    async def check(addr: str) -> None:
        status, headers, body = await fetch(f"http://{addr}/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert headers["X-Backend"] == "echo7"
        assert "<title>" in body and "echo7" in body.split("</title>")[0]
        assert "Served by" in body or "served by" in body
        assert "<script>" in body
        assert "/ws" in body
        assert "http://" not in body and "https://" not in body  # no external resources

    run_served("echo7", check)


def test_index_page_escapes_name() -> None:
    async def check(addr: str) -> None:
        _, _, body = await fetch(f"http://{addr}/")
        assert "<b>x</b>" not in body
        assert "&lt;b&gt;x&lt;/b&gt;" in body

    run_served("<b>x</b>", check)


def test_errors_name_the_backend() -> None:
    async def check(addr: str) -> None:
        status, headers, body = await fetch(f"http://{addr}/nope")
        assert status == 404
        assert headers["X-Backend"] == "echo7"
        assert "echo7" in body

        # A plain GET on the WebSocket route is a bad upgrade, not an echo.
        status, headers, body = await fetch(f"http://{addr}/ws")
        assert status == 400
        assert headers["X-Backend"] == "echo7"
        assert "echo7" in body

    run_served("echo7", check)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_script_serves_and_stops_cleanly_on_signal(signum: signal.Signals) -> None:
    port = free_port()

    async def go() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--name",
            "t",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
            assert line.decode() == f"echo backend t listening on http://127.0.0.1:{port}\n"

            status, headers, body = await fetch(f"http://127.0.0.1:{port}/healthz")
            assert (status, body, headers["X-Backend"]) == (200, "ok t", "t")

            # An open WebSocket must not hold up shutdown: the client is told
            # the server is going away (1001) and the process still exits 0.
            async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
                proc.send_signal(signum)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), EXIT_TIMEOUT)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1001

            assert await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT) == 0
            stderr = await proc.stderr.read()
            assert b"Traceback" not in stderr, stderr.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(go())
