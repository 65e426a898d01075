"""TLS terminated on an http listener, with real clients and independent tools.

Certificates come from ``trustme`` (a CA made for the test, which the clients
trust).  Python's ``websockets``, ``curl``, ``sslscan`` and headless
Chromium talk to splicelb over TLS; behind it are the example echo backend
and a server that answers with the head it received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.clients import read_all
from tests.integration.harness import (
    EchoBackend,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    wait_until,
)
from tests.integration.tls_setup import Certs
from tests.test_tls import pair

pytestmark = pytest.mark.timeout(180)

SIZES = (64, 1 << 20, 16 << 20)


def tls_listener(
    port: int, default: str, certs: Certs, extra: str = "", tls_extra: str = ""
) -> str:
    return (
        f'[[listeners]]\nname = "wss"\nbind = "127.0.0.1:{port}"\n'
        f'default_backend = "{default}"\n{extra}\n'
        f'[listeners.tls]\ncert_file = "{certs.cert_file}"\nkey_file = "{certs.key_file}"\n'
        f"{tls_extra}\n"
    )


StartEcho = Callable[..., tuple[SpliceLB, int]]


@pytest.fixture
def echo_lb(start_lb: Callable[..., SpliceLB], echo: EchoBackend, certs: Certs) -> StartEcho:
    """Start splicelb with its tls listener (``tls_listener``) in front of the echo
    backend: the balancer and the listener's port."""

    def start(
        extra: str = "", tls_extra: str = "", workers: int = 1, drain_timeout: float = 5
    ) -> tuple[SpliceLB, int]:
        port = free_port()
        text = config(
            tls_listener(port, "echo", certs, extra, tls_extra),
            backend("echo", [("e1", echo.address)]),
            drain_timeout=drain_timeout,
        )
        return start_lb(text, workers=workers), port

    return start


def no_worker_errors(lb: SpliceLB) -> None:
    assert lb.events("worker_error") == []


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def peer_certificate(port: int, context: ssl.SSLContext, server_name: str | None) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def ws_echoes(url: str, context: ssl.SSLContext | None, messages: list[Any]) -> list[Any]:
    """What a WebSocket echoes of each message, sent one after the other.  websockets'
    asyncio client: its sync client reads in one
    thread while it writes in another, which OpenSSL does not allow on one connection
    (about one request in a hundred never reached the balancer)."""

    async def run() -> list[Any]:
        async with async_connect(url, ssl=context, max_size=None, open_timeout=10) as ws:
            got = []
            for message in messages:
                await ws.send(message)
                got.append(await asyncio.wait_for(ws.recv(), 60))
            return got

    return asyncio.run(run())


def ws_refused(url: str, context: ssl.SSLContext | None, **options: Any) -> int:
    """The status of a balancer's answer that refuses a WebSocket (asyncio client: see
    ``ws_echoes``)."""

    async def run() -> int:
        with pytest.raises(InvalidStatus) as refused:
            async with async_connect(url, ssl=context, open_timeout=10, **options):
                pass
        return refused.value.response.status_code

    return asyncio.run(run())


# -- the data path -------------------------------------------------------------------


def test_wss_echoes_64_bytes_to_16_mib_byte_for_byte(echo_lb: StartEcho, certs: Certs) -> None:
    lb, port = echo_lb()
    tls_path = lb.events("tls_path")
    assert [(e["listener"], e["path"]) for e in tls_path] == [("wss", "copy")]
    assert "kernel TLS" in tls_path[0]["reason"]
    messages = [os.urandom(size) for size in SIZES] + ["é" * 1000]
    assert ws_echoes(f"wss://localhost:{port}/ws", certs.client_context(), messages) == messages
    sent = sum(SIZES)
    (conn,) = lb.wait_conns(1)
    assert conn["websocket"] is True
    assert conn["status"] is None
    assert conn["bytes_in"] > sent and conn["bytes_out"] > sent
    no_worker_errors(lb)
    status = cli("status", "--runtime-dir", str(lb.runtime_dir), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["listeners"][0]["tls"] == "copy"
    table = cli("status", "--runtime-dir", str(lb.runtime_dir))
    assert "http+tls (copy)" in table.stdout


def test_many_wss_tunnels_at_once_each_echo_their_own_bytes(
    echo_lb: StartEcho, certs: Certs
) -> None:
    """Backpressure both ways: 20 tunnels send 2 MiB each at once, none loses a byte."""
    lb, port = echo_lb()
    context = certs.client_context()

    async def one(i: int) -> bool:
        data = os.urandom(2 << 20) + bytes([i])
        async with async_connect(
            f"wss://localhost:{port}/ws", ssl=context, max_size=None, open_timeout=20
        ) as ws:
            await ws.send(data)
            return await asyncio.wait_for(ws.recv(), 60) == data

    async def all_of_them() -> list[bool]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert asyncio.run(all_of_them()) == [True] * 20
    lb.wait_conns(20, timeout=20)
    no_worker_errors(lb)


def test_an_idle_wss_tunnel_is_closed_at_its_tunnel_timeout(
    echo_lb: StartEcho, certs: Certs
) -> None:
    lb, port = echo_lb(extra="tunnel_timeout = 1\n")

    async def idle() -> float:
        url, context = f"wss://localhost:{port}/ws", certs.client_context()
        async with async_connect(url, ssl=context, open_timeout=10) as ws:
            await ws.send("once")
            assert await asyncio.wait_for(ws.recv(), 10) == "once"
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):  # the balancer closes it
                await asyncio.wait_for(ws.recv(), 10)
            return time.monotonic() - started

    assert 1 <= asyncio.run(idle()) < 5
    (conn,) = lb.wait_conns(1, timeout=10)
    assert conn["reason"] == "tunnel idle timeout"
    assert conn["bytes_in"] > 4 and conn["bytes_out"] > 4
    no_worker_errors(lb)


def test_curl_gets_https_and_a_websocket_upgrade_with_alpn_http11(
    echo_lb: StartEcho, certs: Certs
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs it)")
    lb, port = echo_lb()
    base = ["curl", "-sS", "-v", "--cacert", str(certs.ca_file), "--max-time", "10"]
    got = subprocess.run(
        [*base, f"https://localhost:{port}/whoami"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout == "echo1"
    assert "ALPN: server accepted http/1.1" in got.stderr
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = subprocess.run(
        [
            *base,
            "--http1.1",
            "-o",
            "/dev/null",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            f"Sec-WebSocket-Key: {key}",
            "--max-time",
            "2",
            f"https://localhost:{port}/ws",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )
    accept = base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    ).decode()
    assert "< HTTP/1.1 101 Switching Protocols" in upgrade.stderr
    assert f"< sec-websocket-accept: {accept}".lower() in upgrade.stderr.lower()
    conns = lb.wait_conns(2)
    assert [c["websocket"] for c in conns] == [False, True]
    no_worker_errors(lb)


class _HeadEcho(BaseHTTPRequestHandler):
    """Answers every request with the header fields it received, as JSON."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def head_echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeadEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def https_get(
    port: int, context: ssl.SSLContext, requests: list[bytes], server_name: str = "localhost"
) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(b"".join(requests))
        return read_all(tls)


def test_requests_are_routed_with_https_forwarded_fields_kept_alive_too(
    start_lb: Callable[..., SpliceLB], head_echo: str, certs: Certs
) -> None:
    port = free_port()
    lb = start_lb(
        config(tls_listener(port, "heads", certs), backend("heads", [("h1", head_echo)])),
        workers=1,
    )
    request = b"GET /a HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Proto: http\r\n\r\n"
    last = b"GET /b HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    reply = https_get(port, certs.client_context(), [request, last])
    answers = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in _responses(reply)]
    assert len(answers) == 2
    for headers in answers:
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["forwarded"] == 'for=127.0.0.1;proto=https;host="localhost"'
    (conn,) = lb.wait_conns(1)
    assert conn["status"] is None and conn["websocket"] is False
    no_worker_errors(lb)


def _responses(reply: bytes) -> list[bytes]:
    """Split kept-alive responses with Content-Length bodies."""
    out = []
    while reply:
        head, _, rest = reply.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append(head + b"\r\n\r\n" + rest[:length])
        reply = rest[length:]
    return out


def test_a_later_request_for_another_backend_is_not_forwarded(
    start_lb: Callable[..., SpliceLB], head_echo: str, echo: EchoBackend, certs: Certs
) -> None:
    """Kept-alive requests over TLS are judged one by one, as on a plain listener."""
    port = free_port()
    route = '[[listeners.routes]]\npath_prefix = "/ws"\nbackend = "echo"\n'
    lb = start_lb(
        config(
            tls_listener(port, "heads", certs, extra=route),
            backend("heads", [("h1", head_echo)]) + backend("echo", [("e1", echo.address)]),
        ),
        workers=1,
    )
    first = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n"
    second = b"GET /ws/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reply = https_get(port, certs.client_context(), [first, second])
    assert len(_responses(reply)) == 1
    (conn,) = lb.wait_conns(1)
    assert conn["reason"] == "request 2 not forwarded: routed to backend echo"
    no_worker_errors(lb)


def test_a_later_head_that_does_not_complete_in_time_is_not_forwarded_over_tls(
    start_lb: Callable[..., SpliceLB], head_echo: str, certs: Certs
) -> None:
    """A kept-alive client that begins a second head and stalls is held to head_timeout, as
    on a plain listener, not to the tunnel's idle timeout (a byte now and then)."""
    port = free_port()
    lb = start_lb(
        config(
            tls_listener(port, "heads", certs, extra="head_timeout = 1\ntunnel_timeout = 60\n"),
            backend("heads", [("h1", head_echo)]),
        ),
        workers=1,
    )
    first = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n"
    stalled = b"GET /slow HTTP/1.1\r\nHost: loc"  # and nothing more
    started = time.monotonic()
    reply = https_get(port, certs.client_context(), [first, stalled])
    assert len(_responses(reply)) == 1  # the first answered; then the end, not a 60 s wait
    assert time.monotonic() - started < 10
    (conn,) = lb.wait_conns(1)
    assert conn["reason"] == "request 2 not forwarded: request head not complete within 1 s"
    no_worker_errors(lb)


def test_a_session_resumes_on_whichever_worker_the_next_connection_reaches(
    start_lb: Callable[..., SpliceLB], head_echo: str, certs: Certs
) -> None:
    """The workers of a generation share their session ticket keys: a client's next
    connections resume its TLS session (no full handshake) on either worker."""
    port = free_port()
    lb = start_lb(
        config(tls_listener(port, "heads", certs), backend("heads", [("h1", head_echo)])),
        workers=2,
    )
    context = certs.client_context()
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"

    def get(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            tls.sendall(request)
            assert read_all(tls).startswith(b"HTTP/1.1 200 ")
            return tls.session, tls.session_reused  # the ticket came with the answer

    session, reused = get(None)
    assert session is not None and not reused
    resumed = [get(session)[1] for _ in range(20)]
    conns = lb.wait_conns(21)
    assert len({c["pid"] for c in conns}) == 2  # both workers served (20 connections)
    assert all(resumed), resumed
    no_worker_errors(lb)


# -- the balancer's own answers, and clients that fail --------------------------------


def test_the_balancers_answers_go_over_tls(
    start_lb: Callable[..., SpliceLB], echo: EchoBackend, certs: Certs
) -> None:
    port, dead = free_port(), free_port()
    origins = 'allowed_origins = ["https://good.test"]\n'
    route = '[[listeners.routes]]\npath_prefix = "/down"\nbackend = "down"\n'
    lb = start_lb(
        config(
            tls_listener(port, "echo", certs, extra=origins + route),
            backend("echo", [("e1", echo.address)])
            + backend("down", [("d1", f"127.0.0.1:{dead}")], "retries = 0\n"),
        ),
        workers=1,
    )
    context = certs.client_context()
    url = f"wss://localhost:{port}/ws"
    assert ws_refused(url, context, origin="https://evil.test") == 403
    bad = https_get(port, context, [b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"])
    assert bad.startswith(b"HTTP/1.1 400 ")
    down = https_get(port, context, [b"GET /down HTTP/1.1\r\nHost: localhost\r\n\r\n"])
    assert down.startswith(b"HTTP/1.1 503 ")
    statuses = sorted(c["status"] for c in lb.wait_conns(3))
    assert statuses == [400, 403, 503]
    no_worker_errors(lb)


def _client_hello(server_name: str = "localhost") -> bytes:
    """The bytes of a real ClientHello (from an in-memory TLS client)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_stalled_handshakes_plain_text_and_garbage_are_closed_with_a_reason(
    echo_lb: StartEcho, certs: Certs
) -> None:
    lb, port = echo_lb(extra="head_timeout = 1\n")
    hello = _client_hello()
    cases = {
        "silent": b"",
        "half a hello": hello[: len(hello) // 2],
        "plain http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "garbage": b"\x16\x03\x01\x00\x05garbage and more garbage",
    }
    sockets = {}
    started = time.monotonic()
    for name, data in cases.items():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(data)
        sockets[name] = sock
    for name, sock in sockets.items():
        with sock:
            reply = read_all(sock)
            assert reply == b"" or reply.startswith(b"\x15\x03"), (name, reply)  # a TLS alert
    assert time.monotonic() - started < 5
    reasons = sorted(c["reason"] for c in lb.wait_conns(4))
    assert reasons.count("TLS handshake not complete within 1 s") == 2
    failed = [r for r in reasons if r.startswith("TLS handshake failed: ")]
    assert len(failed) == 2, reasons
    assert "TLS handshake failed: http request" in failed
    assert all(c["status"] is None for c in lb.conns())
    no_worker_errors(lb)


def test_a_client_that_stops_after_the_handshake_gets_408_over_tls(
    echo_lb: StartEcho, certs: Certs
) -> None:
    lb, port = echo_lb(extra="head_timeout = 1\n")
    reply = https_get(port, certs.client_context(), [b"GET / HTTP/1.1\r\nHost: loc"])
    assert reply.startswith(b"HTTP/1.1 408 ")
    (conn,) = lb.wait_conns(1)
    assert conn["status"] == 408
    no_worker_errors(lb)


# -- certificates and protocol versions ----------------------------------------------


def test_sni_chooses_the_certificate_and_min_version_is_enforced(
    echo_lb: StartEcho, certs: Certs
) -> None:
    extra_pair = (
        f'min_version = "1.3"\n[[listeners.tls.certificates]]\n'
        f'cert_file = "{certs.other_cert}"\nkey_file = "{certs.other_key}"\n'
    )
    lb, port = echo_lb(tls_extra=extra_pair)
    context = certs.client_context()
    other = peer_certificate(port, context, "OTHER.test")
    default = peer_certificate(port, context, "localhost")
    unknown = peer_certificate(port, certs.client_context(check_hostname=False), "nope.test")
    assert (
        serial_of(other)
        == x509.load_pem_x509_certificate(certs.other_cert.read_bytes()).serial_number
    )
    assert serial_of(default) == serial_of(unknown) != serial_of(other)
    old = certs.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        peer_certificate(port, old, "localhost")
    lb.wait_conns(4)
    no_worker_errors(lb)


def test_sslscan_finds_nothing_weak(echo_lb: StartEcho, certs: Certs) -> None:
    if shutil.which("sslscan") is None:
        pytest.skip("sslscan is not installed (.ci/run installs it)")
    _, port = echo_lb()
    scan = subprocess.run(
        ["sslscan", "--no-colour", f"127.0.0.1:{port}"],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    out = scan.stdout
    assert scan.returncode == 0, scan.stderr
    for old in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"):
        assert f"{old}     disabled" in out or f"{old}   disabled" in out, out
    assert "TLSv1.2   enabled" in out and "TLSv1.3   enabled" in out, out
    assert "Compression enabled" not in out, out  # (Debian's sslscan cannot test it)
    assert "Insecure session renegotiation" not in out, out
    accepted = [line for line in out.splitlines() if line.startswith(("Preferred", "Accepted"))]
    assert accepted, out
    for line in accepted:
        assert "GCM" in line or "CHACHA20" in line, line  # AEAD only
        assert "ECDHE" in line or "TLSv1.3" in line, line  # forward secrecy
        assert "bits" in line and int(line.split("bits")[0].split()[-1]) >= 128, line


# -- reload ----------------------------------------------------------------------------


def test_reload_serves_a_new_certificate_and_keeps_100_open_wss_tunnels(
    echo_lb: StartEcho, certs: Certs
) -> None:
    lb, port = echo_lb(workers=2, drain_timeout=60)
    context = certs.client_context()
    before = serial_of(peer_certificate(port, context, "localhost"))

    async def scenario() -> list[bool]:
        sockets = [
            await async_connect(f"wss://localhost:{port}/ws", ssl=context, open_timeout=30)
            for _ in range(100)
        ]
        for i, ws in enumerate(sockets):
            await ws.send(f"before {i}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"before {i}"
        pair(certs.ca, certs.dir, "default", "localhost", "127.0.0.1")  # in place
        reload = await asyncio.to_thread(
            cli, "reload", "--runtime-dir", str(lb.runtime_dir), timeout=60
        )
        assert reload.returncode == 0, reload.stderr + reload.stdout
        after = await asyncio.to_thread(peer_certificate, port, context, "localhost")
        assert serial_of(after) != before
        ok = []
        for i, ws in enumerate(sockets):
            await ws.send(f"after {i}" * 100)
            ok.append(await asyncio.wait_for(ws.recv(), 10) == f"after {i}" * 100)
        for ws in sockets:
            await ws.close()
        return ok

    assert asyncio.run(scenario()) == [True] * 100
    conns = lb.wait_conns(102, timeout=30)
    tunnels = [c for c in conns if c["websocket"]]
    assert len(tunnels) == 100
    assert all(c["generation"] == 1 for c in tunnels)  # they stayed where their TLS is
    reasons = {c["reason"] for c in tunnels}
    assert reasons <= {"client closed", "server closed"}, reasons
    handovers = lb.events("handover")
    assert handovers and sum(h["tunnels"] for h in handovers) == 0
    assert sum(h["kept"] for h in handovers) == 100
    no_worker_errors(lb)


# -- a browser -------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def test_chromium_opens_wss_through_splicelb(echo_lb: StartEcho, certs: Certs) -> None:
    """Headless Chromium trusts the test CA's certificate by its public key (the SPKI
    pin flag Chromium has for test CAs) and echoes 64 B to 16 MiB from a page served
    over https through splicelb."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415
    except ImportError:
        pytest.skip("playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (.ci/run installs it)")
    lb, port = echo_lb()
    leaf = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-quic",
        f"--ignore-certificate-errors-spki-list={pin}",
    ]
    script = """async (sizes) => {
        const ws = new WebSocket(location.origin.replace('https', 'wss') + '/ws');
        ws.binaryType = 'arraybuffer';
        await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
        const results = [];
        for (const size of sizes) {
            const data = new Uint8Array(size);
            for (let i = 0; i < size; i++) data[i] = (i * 7 + size) & 255;
            const echoed = new Promise((ok) => { ws.onmessage = (e) => ok(e.data); });
            ws.send(data);
            const got = new Uint8Array(await echoed);
            results.push(got.length === size && got.every((b, i) => b === data[i]));
        }
        ws.close();
        return results;
    }"""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=args, headless=True, timeout=30_000
        )
        try:
            page = browser.new_page()
            response = page.goto(f"https://localhost:{port}/", timeout=30_000)
            assert response is not None and response.ok
            assert page.evaluate("window.isSecureContext") is True
            assert page.evaluate(script, list(SIZES)) == [True, True, True]
        finally:
            browser.close()
    wait_until(lambda: any(c["websocket"] for c in lb.conns()), 10, "the tunnel's conn line")
    no_worker_errors(lb)


# -- backends over TLS (re-encryption) ----------------------------------------------


@pytest.fixture
def tls_echo(certs: Certs) -> Iterator[str]:
    """A WebSocket echo server over TLS (its certificate from the test CA), websockets'
    asyncio one in a thread of its own (see ``ws_echoes`` for why not the sync one)."""
    from websockets.asyncio.server import ServerConnection, serve  # noqa: PLC0415

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    port = free_port()
    started, stop = threading.Event(), threading.Event()

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port, ssl=context, max_size=None, compression=None):
            started.set()
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{port}"
    stop.set()
    thread.join(10)


def test_wss_is_re_encrypted_to_a_tls_backend(
    start_lb: Callable[..., SpliceLB], tls_echo: str, certs: Certs
) -> None:
    """wss:// in, TLS to the server (trusting the test CA by ca_file, its name by sni), and
    ws:// in on a plain listener to the same server: every byte echoed."""
    port, plain = free_port(), free_port()
    server_tls = f'tls = true\nca_file = "{certs.ca_file}"\nsni = "localhost"\n'
    lb = start_lb(
        config(
            tls_listener(port, "secure", certs)
            + f'[[listeners]]\nname = "plain"\nbind = "127.0.0.1:{plain}"\n'
            'default_backend = "secure"\n',
            backend("secure", [("s1", tls_echo)], server_tls),
        ),
        workers=1,
    )
    for url, context in (
        (f"wss://localhost:{port}/ws", certs.client_context()),
        (f"ws://127.0.0.1:{plain}/ws", None),
    ):
        messages = [os.urandom(size) for size in SIZES]
        assert ws_echoes(url, context, messages) == messages
    conns = lb.wait_conns(2)
    assert [c["websocket"] for c in conns] == [True, True]
    assert all(c["bytes_in"] > sum(SIZES) for c in conns)
    assert lb.events("connect_failed") == []
    no_worker_errors(lb)


def test_a_tls_backend_whose_certificate_fails_is_not_used(
    start_lb: Callable[..., SpliceLB], tls_echo: str, certs: Certs
) -> None:
    """Without the test CA its certificate fails: the connect fails, naming why, and the
    client gets 503; with verify = false it is used (and a warning says so at start)."""
    port, lax = free_port(), free_port()
    lb = start_lb(
        config(
            tls_listener(port, "strict", certs)
            + f'[[listeners]]\nname = "lax"\nbind = "127.0.0.1:{lax}"\ndefault_backend = "lax"\n',
            backend("strict", [("s1", tls_echo)], "tls = true\nretries = 0\n")
            + backend("lax", [("l1", tls_echo)], "tls = true\nverify = false\n"),
        ),
        workers=1,
    )
    assert [e["backend"] for e in lb.events("tls_verify_off")] == ["lax"]
    assert ws_refused(f"wss://localhost:{port}/ws", certs.client_context()) == 503
    (failed,) = wait_until(lambda: lb.events("connect_failed"), 10, "the connect_failed line")
    assert failed["reason"].startswith("TLS: certificate verify failed: "), failed
    assert ws_echoes(f"ws://127.0.0.1:{lax}/ws", None, ["through"]) == ["through"]
    no_worker_errors(lb)
