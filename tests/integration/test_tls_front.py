"""A TLS listener's front: client limits answered over TLS, a PROXY header before TLS.

Certificates come from ``trustme`` (as in ``test_tls.py``).  Clients bind
127.0.0.2 or 127.0.0.3, so that their address differs from the proxies'
(127.0.0.1).  In front, HAProxy in tcp mode with ``send-proxy-v2`` (TLS
passes through it) and curl's ``--haproxy-protocol``; and a client of ours that
sends a PROXY header and its ClientHello in one segment, the case where the
header's reader must leave the hello's bytes in the socket for OpenSSL.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    backend,
    config,
    free_port,
    wait_until,
)
from tests.integration.test_client_address import HAProxy, Mirror, need
from tests.integration.test_tls import tls_listener
from tests.integration.tls_setup import Certs

pytestmark = pytest.mark.timeout(120)

CLIENT, OTHER = "127.0.0.2", "127.0.0.3"  # clients' addresses; the proxies are 127.0.0.1
GET = b"GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    server = Mirror()
    yield server
    server.close()


def start(
    start_lb: Callable[..., SpliceLB], certs: Certs, target: str, extra: str
) -> tuple[SpliceLB, int]:
    port = free_port()
    lb = start_lb(
        config(tls_listener(port, "app", certs, extra), backend("app", [("s1", target)])),
        workers=1,
    )
    return lb, port


def tls_connect(port: int, certs: Certs, source: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0))
    return certs.client_context().wrap_socket(raw, server_hostname="localhost")


def upgrade(sock: socket.socket) -> bytes:
    """Ask the echo backend for a WebSocket: its head (101), or what came instead, to the
    end (the balancer's answer)."""
    sock.sendall(clients.upgrade_request())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return head if head.startswith(b"HTTP/1.1 101") else head + read_to_end(sock)


def read_to_end(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            return out
        if not chunk:
            return out
        out += chunk


def wss_tunnel(port: int, certs: Certs) -> ssl.SSLSocket:
    sock = tls_connect(port, certs)
    head = upgrade(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def refusals(lb: SpliceLB) -> list[dict[str, Any]]:
    return [c for c in lb.conns() if c["status"] == 429]


# ---------------------------------------------------------------- client limits over TLS


def test_a_tls_client_over_client_maxconn_gets_429_over_tls_and_is_not_counted(
    echo: EchoBackend,
    start_lb: Callable[..., SpliceLB],
    certs: Certs,
    held: list[socket.socket],
) -> None:
    lb, port = start(start_lb, certs, echo.address, "client_maxconn = 2")
    held += [wss_tunnel(port, certs), wss_tunnel(port, certs)]

    with tls_connect(port, certs) as third:  # the handshake is done: then the answer
        reply = upgrade(third)
    assert clients.status_of(reply) == 429, reply
    assert b"\r\nRetry-After: 1\r\n" in reply
    assert b"client limit: 2 open connections" in reply
    [line] = wait_until(lambda: refusals(lb), 10, "a conn line of 429")
    assert line["client"].startswith("127.0.0.1:")
    assert (line["reason"], line["server"]) == ("client limit: 2 open connections", None)
    assert line["bytes_out"] == len(reply)
    assert all(clients.ws_ping(sock) for sock in held)  # the first two are still open

    held.pop().close()  # one of the two ends: the refused one held no count, one more fits
    wait_until(lambda: len(lb.conns()) == 2, 10, "the tunnel's conn line")
    held.append(wss_tunnel(port, certs))
    assert clients.ws_ping(held[-1])


def test_a_tls_client_over_client_rate_gets_429_with_retry_after(
    echo: EchoBackend, start_lb: Callable[..., SpliceLB], certs: Certs
) -> None:
    curl = need("curl", "curl")
    lb, port = start(start_lb, certs, echo.address, "client_rate = 0.2\nclient_burst = 1")
    command = [curl, "-sS", "-i", "--cacert", str(certs.ca_file), "--max-time", "10"]
    url = f"https://localhost:{port}/whoami"
    first = subprocess.run([*command, url], capture_output=True, timeout=30, check=False)
    assert first.stdout.startswith(b"HTTP/1.1 200"), first.stdout + first.stderr
    second = subprocess.run([*command, url], capture_output=True, timeout=30, check=False)
    assert second.returncode == 0, second.stderr  # an HTTPS answer, not a failed handshake
    assert second.stdout.startswith(b"HTTP/1.1 429"), second.stdout
    retry_after = int(second.stdout.split(b"\r\nRetry-After: ")[1].split(b"\r\n")[0])
    assert 1 <= retry_after <= 5
    [line] = wait_until(lambda: refusals(lb), 10, "a conn line of 429")
    assert line["reason"] == "client rate: 0.2/s"


def test_a_refused_tls_client_that_never_completes_its_handshake_is_closed_at_head_timeout(
    echo: EchoBackend,
    start_lb: Callable[..., SpliceLB],
    certs: Certs,
    held: list[socket.socket],
) -> None:
    lb, port = start(start_lb, certs, echo.address, "client_maxconn = 1\nhead_timeout = 1")
    held.append(wss_tunnel(port, certs))
    with socket.create_connection(("127.0.0.1", port), 10) as silent:
        assert clients.read_all(silent) == b""
    [line] = wait_until(lambda: refusals(lb), 10, "a conn line of 429")
    assert line["reason"] == (
        "client limit: 1 open connection (TLS handshake not complete within 1 s)"
    )
    assert clients.ws_ping(held[0])


# ---------------------------------------------------------------- a PROXY header, then TLS


def proxied(
    start_lb: Callable[..., SpliceLB],
    certs: Certs,
    target: str,
    trusted: str,
    extra: str = "head_timeout = 10",
) -> tuple[SpliceLB, int]:
    return start(
        start_lb, certs, target, f'accept_proxy = true\ntrusted_proxies = ["{trusted}"]\n{extra}'
    )


def https_after(port: int, certs: Certs, source: str, prefix: bytes, request: bytes) -> bytes:
    """Send ``prefix`` (a PROXY header) and the ClientHello in one ``send``, finish the
    handshake, send ``request``: the reply, read until the balancer closes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = certs.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(prefix + outgoing.read())  # one segment: the header and the hello
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(request)
        sock.sendall(outgoing.read())
        reply = b""
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:  # close_notify
                    return reply
                reply += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return reply
            data = sock.recv(65536)
            if not data:
                return reply
            incoming.write(data)


def body(reply: bytes) -> bytes:
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    return reply.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 203.0.113.9 198.51.100.1 51000 443\r\n",
        # v2, TCP over IPv4, with a TLV after the addresses (as AWS NLB sends)
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x13"
        + bytes([203, 0, 113, 9, 198, 51, 100, 1])
        + (51000).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
        + b"\xea\x00\x04vpce",
    ],
    ids=["v1", "v2"],
)
def test_a_proxy_header_and_the_clienthello_in_one_segment(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], certs: Certs, header: bytes
) -> None:
    lb, port = proxied(start_lb, certs, mirror.address, OTHER)
    seen = body(https_after(port, certs, OTHER, header, GET))
    assert seen.startswith(b"GET /who HTTP/1.1\r\n")
    assert b"PROXY" not in seen and b"QUIT" not in seen  # read, not passed on
    assert b"\r\nX-Forwarded-For: 203.0.113.9\r\n" in seen
    assert b"\r\nX-Forwarded-Proto: https\r\n" in seen
    [line] = lb.wait_conns(1)
    assert (line["client"], line["server"], line["status"]) == ("203.0.113.9:51000", "s1", None)


def test_curl_haproxy_protocol_over_https(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], certs: Certs
) -> None:
    curl = need("curl", "curl")
    lb, port = proxied(start_lb, certs, mirror.address, OTHER)
    done = subprocess.run(
        [
            *(curl, "-sS", "--max-time", "10", "--cacert", str(certs.ca_file)),
            *("--haproxy-protocol", "--interface", OTHER, f"https://localhost:{port}/curl"),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"GET /curl HTTP/1.1\r\n"), done.stdout
    assert f"\r\nX-Forwarded-For: {OTHER}\r\n".encode() in done.stdout
    assert lb.wait_conns(1)[0]["client"].startswith(f"{OTHER}:")


def test_haproxy_send_proxy_v2_in_front_of_a_tls_listener(
    tmp_path: Path,
    procs: list[Proc],
    mirror: Mirror,
    start_lb: Callable[..., SpliceLB],
    certs: Certs,
) -> None:
    lb, port = proxied(start_lb, certs, mirror.address, "127.0.0.1")
    front = HAProxy(need("haproxy", "haproxy"), tmp_path, port, "send-proxy-v2")
    procs.append(front)

    try:
        with tls_connect(front.port, certs, CLIENT) as sock:  # TLS through HAProxy's tcp mode
            sock.sendall(GET)
            seen = body(read_to_end(sock))
    except (OSError, AssertionError) as exc:  # what the balancer saw, to tell why
        raise AssertionError(f"{exc!r}; conn lines: {lb.conns()}; {front.errors}") from exc
    assert f"\r\nX-Forwarded-For: {CLIENT}\r\n".encode() in seen
    [line] = wait_until(
        lambda: [c for c in lb.conns() if c["client"].startswith(f"{CLIENT}:")],
        10,
        "the client's conn line",  # the others: HAProxy's start, seen by no one
    )
    assert (line["server"], line["status"]) == ("s1", None)


def test_a_trusted_peer_that_starts_tls_without_a_proxy_header_is_closed_and_logged(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], certs: Certs
) -> None:
    lb, port = proxied(start_lb, certs, mirror.address, OTHER)
    with pytest.raises(OSError):  # ssl.SSLError, or a reset: no handshake
        tls_connect(port, certs, OTHER).close()
    [line] = lb.wait_conns(1)
    assert line["reason"] == "accept_proxy: a peer in trusted_proxies sent no PROXY header"
    assert line["client"].startswith(f"{OTHER}:")
    assert mirror.received == []
    # A peer not in trusted_proxies is a client: served over TLS without a header.
    with tls_connect(port, certs, CLIENT) as sock:
        sock.sendall(GET)
        assert f"\r\nX-Forwarded-For: {CLIENT}\r\n".encode() in body(read_to_end(sock))


def test_a_trusted_peer_that_sends_half_a_proxy_header_is_closed_at_head_timeout(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], certs: Certs
) -> None:
    lb, port = proxied(start_lb, certs, mirror.address, OTHER, "head_timeout = 2")
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(OTHER, 0)) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 ")
        assert clients.read_all(sock) == b""
    [line] = lb.wait_conns(1)
    assert line["reason"] == "accept_proxy: no PROXY header within 2 s"


def test_client_limits_count_the_client_the_proxy_header_names_over_tls(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], certs: Certs
) -> None:
    lb, port = proxied(start_lb, certs, mirror.address, OTHER, "client_rate = 0.1")
    header = b"PROXY TCP4 203.0.113.9 198.51.100.1 51000 443\r\n"
    assert body(https_after(port, certs, OTHER, header, GET)).startswith(b"GET /who")
    reply = https_after(port, certs, OTHER, header, GET)  # the same client again: too soon
    assert clients.status_of(reply) == 429, reply
    assert b"\r\nRetry-After: " in reply
    other = b"PROXY TCP4 203.0.113.10 198.51.100.1 51000 443\r\n"  # another client: served
    assert body(https_after(port, certs, OTHER, other, GET)).startswith(b"GET /who")
    [line] = wait_until(lambda: refusals(lb), 10, "a conn line of 429")
    assert (line["client"], line["reason"]) == ("203.0.113.9:51000", "client rate: 0.1/s")
