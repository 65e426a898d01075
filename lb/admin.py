"""The admin HTTP endpoint, its own process: metrics, the status JSON and the dashboard
(with its icon).

Read-only by construction: it only reads the pool files of the runtime dir
(as ``splicelb status`` does) and serves GET requests.  The supervisor binds
its socket (``global.admin_bind``, loopback by default) and hands it over.

Theory of operation, Host names: a page on a DNS-rebinding domain gets the
browser to connect here under the page's own name, and the browser then lets
the page read the answers, as same-origin.  What it cannot change is the Host
header: that names the page's domain.  So the first middleware answers 421
to any request whose Host is not one of the endpoint's names (:class:`HostCheck`)
before any handler runs: nothing is read from the pool for it.  A request
without Host is answered only in HTTP/1.0, where Host is optional; browsers
always send one, so DNS rebinding never gets there.

Every answer the app makes, the 404, 405, 421, 500 and 503 included, gets
``SECURITY_HEADERS`` as it is sent (``on_response_prepare``).  The one kind
it does not make: aiohttp's own 400 to a request it cannot parse.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import uvloop
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from lb.config import GlobalConfig
from lb.config_table import Address
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
# The dashboard's icon (the page links it; browsers also ask for it by this path
# on their own): two paths splitting from one, in the header's colours.
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="6" fill="#24292f"/>'
    b'<path d="M5 16h8l8-8h6M13 16l8 8h6" fill="none" stroke="#3fb950" stroke-width="3.5"'
    b' stroke-linecap="round" stroke-linejoin="round"/></svg>'
)
# Names of the endpoint when it listens on loopback (or on every address).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# 421: the request names another server, which is what a foreign Host says; a 403
# would say that someone else (with other credentials) may have this answer.
MISDIRECTED = 421
MISDIRECTED_TEXT = "misdirected request: this endpoint does not answer for that Host\n"
MAX_LOGGED_HOSTS = 16  # refused Host values logged (each once) per admin process
MAX_LOGGED_HOST_CHARS = 100


def normal_name(name: str) -> str:
    """A host name as compared: lowercased, an IPv6 literal in its shortest form."""
    name = name.lower()
    if name.startswith("[") and name.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            return name
    return name


def _literal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


@dataclass(frozen=True, slots=True)
class HostCheck:
    """The Host values the endpoint answers: one of ``names``, bare or with ``:port``."""

    names: frozenset[str]  # as normal_name gives them; IPv6 literals in brackets
    port: int

    @classmethod
    def for_endpoint(cls, bind: Address, listed: Iterable[str]) -> HostCheck:
        """The names of an endpoint bound at ``bind``, and the ``listed`` ones
        (``global.admin_hosts``).

        The bind address names it (its host as written, and the address it
        resolved to) unless it is a wildcard, which names every address of the
        machine and so none of them; the loopback names do when it listens on
        loopback, or on every address.
        """
        address = ipaddress.ip_address(bind.sockaddr[0])
        names = set(listed)
        if not address.is_unspecified:
            names.add(f"[{bind.host}]" if ":" in bind.host else bind.host)
            names.add(_literal(address))
        if address.is_loopback or address.is_unspecified:
            names.update(LOOPBACK_NAMES)
        return cls(frozenset(normal_name(name) for name in names), bind.port)

    def allows(self, host: str | None, version: tuple[int, int]) -> bool:
        """Whether a request with this Host value (None: no Host) is for this endpoint."""
        if host is None:
            return version < (1, 1)
        if host.endswith("]") or ":" not in host:
            name = host
        else:
            name, _, port = host.rpartition(":")
            if port != str(self.port):
                return False
        return normal_name(name) in self.names


def named_host(request: web.BaseRequest) -> str | None:
    """The host[:port] a request is for: an absolute-form target's authority (sent to
    proxies; Host is then to be ignored, RFC 9112 3.2.2), else Host; None: neither."""
    if request.raw_path.startswith("/"):
        return request.headers.get(hdrs.HOST)
    return request.url.raw_authority


def make_app(runtime_dir: str, check: HostCheck, log: Any) -> web.Application:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(runtime_dir))
    page = resources.files("lb").joinpath("dashboard.html").read_bytes()
    logged: set[str] = set()

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(read_status(runtime_dir))

    async def dashboard(_request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def favicon(_request: web.Request) -> web.Response:
        return web.Response(body=FAVICON, content_type="image/svg+xml")

    def refuse(request: web.Request, host: str | None) -> web.Response:
        shown = "" if host is None else host[:MAX_LOGGED_HOST_CHARS]
        if shown not in logged and len(logged) < MAX_LOGGED_HOSTS:
            logged.add(shown)  # an operator sees a new name once; a page looping is not logged
            log.warning("admin_host_refused", host=shown, remote=request.remote)
        return web.Response(status=MISDIRECTED, text=MISDIRECTED_TEXT)

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        host = named_host(request)
        if not check.allows(host, request.version):
            return refuse(request, host)
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
    app.router.add_get("/favicon.ico", favicon)
    return app


class Admin:
    """The admin process: one aiohttp server on the socket the supervisor bound."""

    def __init__(self, config: GlobalConfig, sock: socket.socket, log: Any) -> None:
        assert config.admin_bind is not None  # the supervisor starts none without it
        self.runtime_dir = config.runtime_dir
        self.sock = sock
        self.log = log
        self.loop = uvloop.new_event_loop()
        self.check = HostCheck.for_endpoint(config.admin_bind, config.admin_hosts)
        # builds the page and registry: a failure is a boot error
        self.app = make_app(self.runtime_dir, self.check, log)

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
        self.log.info("admin_start", url=f"http://{host}:{port}/", hosts=sorted(self.check.names))
        await stop.wait()
        await runner.cleanup()
