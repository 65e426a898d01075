"""One health check of one server: HTTP, HTTPS or a bare TCP connect.

A check returns a :class:`CheckResult` and never raises: every failure
becomes a short text an operator can read in ``server_state`` log lines and
in ``splicelb status`` ("HTTP 500", "timeout after 1.0 s", "connection
refused", "TLS: certificate verify failed: ...").

A backend with ``send_proxy``: its servers expect a PROXY header first.
aiohttp opens its connections itself and puts nothing before its request
(nor before a TLS handshake), so such checks open the connection with
asyncio streams, send the header, then (http, https) one ``Connection:
close`` request, whose answer httptools' response parser (llhttp, as in the
worker's sniffer) reads.  The header says that the connection is the
balancer's own, as HAProxy's checks do: version 2's ``LOCAL`` command,
version 1's ``UNKNOWN``.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from dataclasses import dataclass

import aiohttp
from httptools import HttpParserError, HttpResponseParser

from lb.config import HealthCheck
from lb.config_table import Address
from lb.proto.proxy import check_header

MAX_BODY = 64 * 1024  # bytes of a response body read for expect_body
READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    text: str
    latency: float  # seconds


def ssl_context(health: HealthCheck) -> ssl.SSLContext:
    """System CAs plus ``ca_file``; ``verify = false`` turns verification off."""
    context = ssl.create_default_context()
    if health.ca_file:
        context.load_verify_locations(health.ca_file)
    if not health.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def status_ok(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= status <= high for low, high in ranges)


class Checker:
    """Runs the checks of one backend; holds its TLS context (built once, at boot)."""

    def __init__(self, health: HealthCheck, send_proxy: int = 0) -> None:
        self.health = health
        self.send_proxy = send_proxy  # the PROXY protocol version its servers expect; 0: none
        self.ssl = ssl_context(health) if health.type == "https" else None

    async def check(self, session: aiohttp.ClientSession, address: Address) -> CheckResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.health.timeout):
                ok, text = await self._check(session, address)
        except TimeoutError:
            ok, text = False, f"timeout after {self.health.timeout:g} s"
        except (OSError, aiohttp.ClientError, ssl.SSLError) as exc:
            ok, text = False, describe_error(exc)
        return CheckResult(ok, text, time.monotonic() - started)

    async def _check(self, session: aiohttp.ClientSession, address: Address) -> tuple[bool, str]:
        if self.send_proxy:
            return await self._behind_proxy_header(address)
        if self.health.type == "tcp":
            _, writer = await asyncio.open_connection(address.sockaddr[0], address.port)
            writer.close()
            return True, "connected"
        return await self._http(session, address)

    async def _http(self, session: aiohttp.ClientSession, address: Address) -> tuple[bool, str]:
        health = self.health
        scheme = "https" if health.type == "https" else "http"
        url = f"{scheme}://{address}{health.path}"
        headers = {"Host": health.host or str(address), "User-Agent": "splicelb-check"}
        kwargs: dict[str, object] = {}
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
            if health.sni:
                kwargs["server_hostname"] = health.sni
        async with session.request(
            health.method,
            url,
            headers=headers,
            allow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        ) as response:
            status = response.status
            if not status_ok(status, health.expect_status):
                return False, f"HTTP {status}"
            if health.expect_body:
                body = await response.content.read(MAX_BODY)
                if health.expect_body.encode() not in body:
                    return False, f"HTTP {status} without {health.expect_body!r} in the body"
            return True, f"HTTP {status}"

    async def _behind_proxy_header(self, address: Address) -> tuple[bool, str]:
        """The check after a PROXY header, over asyncio streams (see the module's docstring)."""
        health = self.health
        reader, writer = await asyncio.open_connection(address.sockaddr[0], address.port)
        try:
            writer.write(check_header(self.send_proxy))
            if health.type == "tcp":
                await writer.drain()
                return True, "connected"
            if self.ssl is not None:
                await writer.start_tls(self.ssl, server_hostname=health.sni or address.host)
            writer.write(
                f"{health.method} {health.path} HTTP/1.1\r\nHost: {health.host or address}\r\n"
                "User-Agent: splicelb-check\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            return await read_answer(reader, health)
        finally:
            writer.close()


class _Answer:
    """llhttp callback target: the end of the head, the body up to MAX_BODY, the end."""

    __slots__ = ("body", "complete", "head_complete")

    def __init__(self) -> None:
        self.head_complete = False
        self.complete = False
        self.body = bytearray()

    def on_headers_complete(self) -> None:
        self.head_complete = True

    def on_body(self, body: bytes) -> None:
        self.body += body[: MAX_BODY - len(self.body)]

    def on_message_complete(self) -> None:
        self.complete = True


async def read_answer(reader: asyncio.StreamReader, health: HealthCheck) -> tuple[bool, str]:
    """Read an HTTP answer until its status (and, for expect_body, its body) is judged."""
    answer = _Answer()
    parser = HttpResponseParser(answer)
    wanted = health.expect_body.encode()
    while not answer.head_complete or (
        wanted and not answer.complete and len(answer.body) < MAX_BODY and wanted not in answer.body
    ):
        data = await reader.read(READ_SIZE)
        if not data:
            if answer.head_complete:
                break  # the end of a body that runs to the end of the connection
            return False, "server closed the connection"
        try:
            parser.feed_data(data)
        except HttpParserError as exc:
            return False, f"bad HTTP response: {exc}"
    status = int(parser.get_status_code())
    if not status_ok(status, health.expect_status):
        return False, f"HTTP {status}"
    if wanted and wanted not in answer.body:
        return False, f"HTTP {status} without {health.expect_body!r} in the body"
    return True, f"HTTP {status}"


def describe_error(exc: BaseException) -> str:
    """A short, stable text for a failed check."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        detail = getattr(cause, "verify_message", None) or str(cause)
        return f"TLS: certificate verify failed: {detail}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, (aiohttp.ClientConnectorSSLError, ssl.SSLError)):
        return f"TLS: {getattr(exc, 'reason', None) or exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return describe_error(exc.os_error)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "host unreachable"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"bad HTTP response: {exc.message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}"
