"""The admin HTTP endpoint, its own process: metrics, the status JSON and the dashboard.

Read-only by construction: it only reads the pool files of the runtime dir
(as ``splicelb status`` does) and serves GET requests.  The supervisor binds
its socket (``global.admin_bind``, loopback by default) and hands it over.

Every answer the app makes, the 404, 405, 500 and 503 included, gets
``SECURITY_HEADERS`` as it is sent (``on_response_prepare``).  The one kind
it does not make: aiohttp's own 400 to a request it cannot parse.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from importlib import resources
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from lb.errors import NotRunningError
from lb.metrics import PoolCollector
from lb.status import read_status

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'",
}


def make_app(runtime_dir: str) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(runtime_dir))
    page = resources.files("lb").joinpath("dashboard.html").read_bytes()

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(read_status(runtime_dir))

    async def dashboard(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        try:
            response: web.StreamResponse = await handler(request)
        except NotRunningError as exc:  # the instance is stopping under us
            response = web.Response(status=503, text=f"{exc}\n")
        return response

    async def secure(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    app = web.Application(middlewares=[guard])
    app.on_response_prepare.append(secure)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_get("/", dashboard)
    return app


class Admin:
    """The admin process: one aiohttp server on the socket the supervisor bound."""

    def __init__(self, runtime_dir: str, sock: socket.socket, log: Any) -> None:
        self.runtime_dir = runtime_dir
        self.sock = sock
        self.log = log
        self.loop = uvloop.new_event_loop()
        self.app = make_app(runtime_dir)  # builds the page and registry: a failure is a boot error

    def run(self) -> int:
        asyncio.set_event_loop(self.loop)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            self.loop.add_signal_handler(sig, stop.set)
        self.loop.run_until_complete(self._serve(stop))
        self.loop.close()
        return 0

    async def _serve(self, stop: asyncio.Event) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, self.sock).start()
        host, port = self.sock.getsockname()[:2]
        self.log.info("admin_start", url=f"http://{host}:{port}/")
        await stop.wait()
        await runner.cleanup()
