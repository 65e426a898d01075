"""The client's address reaches the servers: PROXY protocol in and out, forwarded fields.

Independent implementations on both sides where there is one: HAProxy in
front (``send-proxy``, ``send-proxy-v2``), curl's ``--haproxy-protocol``, nginx
behind (``listen ... proxy_protocol``, logging ``$proxy_protocol_addr``), the
websockets library's server.  Clients bind 127.0.0.2 or 127.0.0.3, so that
their address differs from every proxy's (127.0.0.1).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import Server, ServerConnection
from websockets.sync.server import serve as ws_serve

from lb.proto.proxy import V2_SIGNATURE, ProxyHeader, ProxyReader
from tests.integration import clients
from tests.integration.harness import (
    Proc,
    SpliceLB,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)

CLIENT, OTHER = "127.0.0.2", "127.0.0.3"  # clients' addresses; the proxies are 127.0.0.1
GET = b"GET /who HTTP/1.1\r\nHost: app.example:8080\r\nConnection: close\r\n\r\n"
FORGED = b"GET /who HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n"


def need(binary: str, package: str) -> str:
    path = shutil.which(binary, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package})")
    return path


def exchange_from(source: str, port: int, data: bytes) -> bytes:
    """Send ``data`` from the address ``source``, read until the balancer closes."""
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        return clients.read_all(sock)


def body(reply: bytes) -> bytes:
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    return reply.split(b"\r\n\r\n", 1)[1]


class Mirror:
    """A backend that answers each connection with the bytes it received (a PROXY header,
    then a head: up to its blank line), as the body of a 200."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data.replace(V2_SIGNATURE, b""):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(data), data)
                )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    server = Mirror()
    yield server
    server.close()


class Nginx(Proc):
    """nginx with ``listen ... proxy_protocol``: answers and logs the address it was told."""

    def __init__(self, binary: str, tmp: Path) -> None:
        prefix = tmp / "nginx"
        prefix.mkdir()
        self.port = free_port()
        self.access_log = prefix / "access.log"
        temp_paths = "".join(
            f"{kind}_temp_path {prefix}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = prefix / "nginx.conf"
        conf.write_text(
            textwrap.dedent(f"""\
            daemon off;
            master_process off;
            worker_processes 1;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log info;
            events {{ worker_connections 256; }}
            http {{
                log_format pp '$proxy_protocol_addr $remote_addr "$http_x_forwarded_for"';
                access_log {self.access_log} pp;
            """)
            + textwrap.indent(temp_paths, "    ")
            + textwrap.dedent(f"""\
                server {{
                    listen 127.0.0.1:{self.port} proxy_protocol;
                    location / {{
                        return 200 "$proxy_protocol_addr|$http_x_forwarded_for\\n";
                    }}
                }}
            }}
            """)
        )
        super().__init__([binary, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log"])
        wait_until(self._listening, 15, "nginx to listen")

    def _listening(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"nginx exited: {self.errors}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logged(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


class HAProxy(Proc):
    """HAProxy in tcp mode in front of the balancer, sending it a PROXY header."""

    def __init__(self, binary: str, tmp: Path, target: int, send: str) -> None:
        self.port = free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(
            textwrap.dedent(f"""\
            defaults
                mode tcp
                timeout connect 5s
                timeout client 30s
                timeout server 30s
            listen front
                bind 127.0.0.1:{self.port}
                server lb 127.0.0.1:{target} {send}
            """)
        )
        super().__init__([binary, "-db", "-f", str(cfg)])
        wait_until(self._listening, 15, "haproxy to listen")

    def _listening(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.errors}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0


def conn_of(lb: SpliceLB, count: int = 1) -> dict[str, Any]:
    return lb.wait_conns(count)[count - 1]


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    ("haproxy_sends", "mode", "splicelb_sends"),
    [
        ("send-proxy-v2 proxy-v2-options crc32c", "http", "v2"),  # a TLV to skip
        ("send-proxy", "http", "v1"),
        ("send-proxy-v2", "tcp", "v2"),
        ("send-proxy", "tcp", "v1"),
    ],
)
def test_haproxy_to_splicelb_to_nginx_the_clients_address_arrives(
    tmp_path: Path,
    procs: list[Proc],
    start_lb: Callable[..., SpliceLB],
    haproxy_sends: str,
    mode: str,
    splicelb_sends: str,
) -> None:
    haproxy, nginx = need("haproxy", "haproxy"), need("nginx", "nginx")
    server = Nginx(nginx, tmp_path)
    procs.append(server)
    port = free_port()
    lb = start_lb(
        config(
            listener(
                f"127.0.0.1:{port}",
                "app",
                mode=mode,
                extra='accept_proxy = true\ntrusted_proxies = ["127.0.0.1"]',
            ),
            backend("app", [("n1", server.address)], extra=f'send_proxy = "{splicelb_sends}"'),
        )
    )
    front = HAProxy(haproxy, tmp_path, port, haproxy_sends)
    procs.append(front)

    said = body(exchange_from(CLIENT, front.port, FORGED)).decode()

    # nginx read the client's address from splicelb's PROXY header; an http listener
    # also put it in X-Forwarded-For, instead of the client's forged one.
    assert said == (f"{CLIENT}|{CLIENT}\n" if mode == "http" else f"{CLIENT}|6.6.6.6\n")
    logged = wait_until(server.logged, 10, "nginx's access log line")
    assert logged[-1].startswith(f"{CLIENT} 127.0.0.1 ")
    (line,) = wait_until(
        lambda: [c for c in lb.conns() if c["client"].startswith(f"{CLIENT}:")],
        10,
        "the client's conn line",  # the others: connections of ours, to see HAProxy listen
    )
    assert (line["server"], line["status"]) == ("n1", None)


def test_curl_haproxy_protocol_v1(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], procs: list[Proc]
) -> None:
    curl = need("curl", "curl")
    port = free_port()
    lb = start_lb(
        config(
            listener(
                f"127.0.0.1:{port}",
                "app",
                extra=f'accept_proxy = true\ntrusted_proxies = ["{OTHER}"]',
            ),
            backend("app", [("m1", mirror.address)]),
        )
    )
    url = f"http://127.0.0.1:{port}/curl"
    done = subprocess.run(
        [curl, "-sS", "--max-time", "10", "--haproxy-protocol", "--interface", OTHER, url],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = done.stdout
    assert seen.startswith(b"GET /curl HTTP/1.1\r\n")
    assert b"PROXY" not in seen  # curl's header was read, not passed on
    assert f"\r\nX-Forwarded-For: {OTHER}\r\n".encode() in seen
    assert conn_of(lb)["client"].startswith(f"{OTHER}:")


# ---------------------------------------------------------------- what a server reads


def test_forwarded_head_and_proxy_line_as_the_server_reads_them(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [("m1", mirror.address)], extra='send_proxy = "v1"'),
        )
    )
    head = b"GET /who HTTP/1.1\r\nHost: app.example:8080\r\nx-forwarded-host: evil\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(CLIENT, 0)) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(head)
        seen = body(clients.read_all(sock))
    assert seen == (
        f"PROXY TCP4 {CLIENT} 127.0.0.1 {client_port} {port}\r\n".encode()
        + b"GET /who HTTP/1.1\r\nHost: app.example:8080\r\n"
        + f"X-Forwarded-For: {CLIENT}\r\nX-Forwarded-Proto: http\r\n".encode()
        + b"X-Forwarded-Host: app.example:8080\r\n"
        + f'Forwarded: for={CLIENT};proto=http;host="app.example:8080"\r\n\r\n'.encode()
    )


def test_forwarded_headers_off_forwards_the_head_unchanged(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra="forwarded_headers = false"),
            backend("app", [("m1", mirror.address)], extra='send_proxy = "v2"'),
        )
    )
    seen = body(exchange_from(CLIENT, port, FORGED))
    reader = ProxyReader()
    proxy = reader.feed(seen)
    assert isinstance(proxy, ProxyHeader) and proxy.source is not None
    assert proxy.source[0] == CLIENT and proxy.destination == ("127.0.0.1", port)
    assert reader.rest == FORGED


def test_a_trusted_proxys_forwarded_chain_is_extended(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra=f'trusted_proxies = ["{CLIENT}/32"]'),
            backend("app", [("m1", mirror.address)]),
        )
    )
    trusted = body(exchange_from(CLIENT, port, FORGED))
    assert f"\r\nX-Forwarded-For: 6.6.6.6, {CLIENT}\r\n".encode() in trusted
    untrusted = body(exchange_from(OTHER, port, FORGED))
    assert b"6.6.6.6" not in untrusted
    assert f"\r\nX-Forwarded-For: {OTHER}\r\n".encode() in untrusted


# ---------------------------------------------------------------- WebSocket


@pytest.fixture
def ws_server() -> Iterator[tuple[Server, list[dict[str, str]]]]:
    """A websockets server: each connection's first message is the request's headers (as
    JSON), then every message comes back."""
    heads: list[dict[str, str]] = []

    def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        headers = {name.lower(): value for name, value in ws.request.headers.raw_items()}
        heads.append(headers)
        ws.send(json.dumps(headers))
        for message in ws:
            ws.send(message)

    server = ws_serve(handler, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, heads
    server.shutdown()
    thread.join(10)


def test_websocket_server_sees_the_client_never_a_forged_address(
    ws_server: tuple[Server, list[dict[str, str]]], start_lb: Callable[..., SpliceLB]
) -> None:
    server, _ = ws_server
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "ws"),
            backend("ws", [("w1", f"127.0.0.1:{server.socket.getsockname()[1]}")]),
        )
    )
    with ws_connect(
        f"ws://127.0.0.1:{port}/chat",
        additional_headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6"},
        source_address=(CLIENT, 0),
        open_timeout=10,
    ) as ws:
        headers = json.loads(ws.recv(10))
        ws.send("after the rewrite")
        assert ws.recv(10) == "after the rewrite"
    assert headers["x-forwarded-for"] == CLIENT
    assert headers["forwarded"] == f'for={CLIENT};proto=http;host="127.0.0.1:{port}"'
    assert headers["x-forwarded-proto"] == "http"
    assert conn_of(lb)["websocket"] is True


def test_first_frame_sent_with_the_head_arrives_unchanged(
    ws_server: tuple[Server, list[dict[str, str]]], start_lb: Callable[..., SpliceLB]
) -> None:
    server, heads = ws_server
    port = free_port()
    start_lb(
        config(
            listener(f"127.0.0.1:{port}", "ws"),
            backend("ws", [("w1", f"127.0.0.1:{server.socket.getsockname()[1]}")]),
        )
    )
    payload = b"first frame, in the head's segment"
    mask = b"\x01\x02\x03\x04"
    frame = bytes([0x81, 0x80 | len(payload)]) + mask
    frame += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(CLIENT, 0)) as sock:
        sock.sendall(clients.upgrade_request(extra="X-Forwarded-For: 6.6.6.6\r\n") + frame)
        got = b""
        while payload not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
    assert got.startswith(b"HTTP/1.1 101")
    assert heads[-1]["x-forwarded-for"] == CLIENT


# ---------------------------------------------------------------- accept_proxy


def accepting(
    start_lb: Callable[..., SpliceLB], target: str, mode: str = "http"
) -> tuple[SpliceLB, int]:
    port = free_port()
    lb = start_lb(
        config(
            listener(
                f"127.0.0.1:{port}",
                "app",
                mode=mode,
                extra=f'accept_proxy = true\ntrusted_proxies = ["{OTHER}"]\nhead_timeout = 1',
            ),
            backend("app", [("m1", target)]),
            workers=1,
        ),
        workers=1,
    )
    return lb, port


SPOOFS = [
    b"PROXY TCP4 203.0.113.9 127.0.0.1 5000 80\r\n",
    V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 9, 127, 0, 0, 1]) + b"\x13\x88\x00P",
]


@pytest.mark.parametrize("spoof", SPOOFS, ids=["v1", "v2"])
def test_untrusted_peer_sending_proxy_is_closed_and_logged(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], spoof: bytes
) -> None:
    lb, port = accepting(start_lb, mirror.address)
    assert exchange_from(CLIENT, port, spoof + GET) == b""  # closed, no answer
    line = conn_of(lb)
    assert line["reason"] == "PROXY header from a peer not in trusted_proxies"
    assert line["client"].startswith(f"{CLIENT}:") and line["server"] is None
    # The same peer without a header is served, as a client.
    assert f"X-Forwarded-For: {CLIENT}".encode() in body(exchange_from(CLIENT, port, GET))
    assert len(mirror.received) == 1 and b"203.0.113.9" not in mirror.received[0]


def test_proxy_header_on_a_listener_without_accept_proxy_is_closed_and_logged(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(
        config(listener(f"127.0.0.1:{port}", "app"), backend("app", [("m1", mirror.address)]))
    )
    assert exchange_from(CLIENT, port, SPOOFS[0] + GET) == b""
    assert conn_of(lb)["reason"] == "PROXY header on a listener without accept_proxy"
    assert mirror.received == []


def test_trusted_peer_without_proxy_header_is_closed_and_logged(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = accepting(start_lb, mirror.address)
    assert exchange_from(OTHER, port, GET) == b""
    line = conn_of(lb)
    assert line["reason"] == "accept_proxy: a peer in trusted_proxies sent no PROXY header"
    assert line["client"].startswith(f"{OTHER}:")
    assert mirror.received == []


def test_trusted_peer_that_sends_nothing_is_closed_at_head_timeout(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = accepting(start_lb, mirror.address, mode="tcp")
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(OTHER, 0)) as sock:
        assert clients.read_all(sock) == b""
    assert conn_of(lb)["reason"] == "accept_proxy: no PROXY header within 1 s"


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_trusted_peers_header_gives_the_client_everywhere(
    mirror: Mirror, start_lb: Callable[..., SpliceLB], mode: str
) -> None:
    lb, port = accepting(start_lb, mirror.address, mode=mode)
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(OTHER, 0)) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 198.51.100.1 51000 443\r\nGET /who HTTP/1.1\r\n")
        sock.sendall(b"Host: a\r\nConnection: close\r\n\r\n")  # the head in a later segment
        seen = body(clients.read_all(sock))
    assert conn_of(lb)["client"] == "203.0.113.9:51000"
    assert seen.startswith(b"GET /who HTTP/1.1\r\nHost: a\r\n")  # the header is not passed on
    if mode == "http":
        assert b"\r\nX-Forwarded-For: 203.0.113.9\r\n" in seen


def test_v2_local_keeps_the_peers_address(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port = accepting(start_lb, mirror.address)
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    seen = body(exchange_from(OTHER, port, local + GET))
    assert f"X-Forwarded-For: {OTHER}\r\n".encode() in seen
    assert conn_of(lb)["client"].startswith(f"{OTHER}:")


# ---------------------------------------------------------------- health checks


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_health_checks_reach_a_server_that_requires_proxy(
    tmp_path: Path, procs: list[Proc], start_lb: Callable[..., SpliceLB], version: str
) -> None:
    server = Nginx(need("nginx", "nginx"), tmp_path)
    procs.append(server)
    health = '[backends.health]\ntype = "{}"\npath = "/"\ninterval = 0.2\ntimeout = 1\n'
    port, tcp_port = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "pp")
            + listener(f"127.0.0.1:{tcp_port}", "pp_tcp", name="raw", mode="tcp"),
            backend("pp", [("n1", server.address)], extra=f'send_proxy = "{version}"')
            + health.format("http")
            + backend("pp_tcp", [("n1", server.address)], extra=f'send_proxy = "{version}"')
            + health.format("tcp")
            + backend("plain", [("n1", server.address)])
            + health.format("http"),
        )
    )

    def states() -> dict[str, str] | None:
        seen = {e["backend"]: e["to"] for e in lb.events("server_state")}
        return seen if len(seen) == 3 else None

    assert wait_until(states, 15, "a first check of every server") == {
        "pp": "up",
        "pp_tcp": "up",
        "plain": "down",  # the same server, checked without the header: it does need it
    }
    # nginx took the checks' header (LOCAL, UNKNOWN: no address to log) and answered them.
    assert wait_until(server.logged, 10, "nginx's access log")[0] == '- 127.0.0.1 "-"'


def test_client_limits_count_the_client_a_proxy_names_not_the_proxy(
    mirror: Mirror, start_lb: Callable[..., SpliceLB]
) -> None:
    """Behind an L4 balancer every connection comes from its address: the limit must hold
    each client named in the PROXY headers, not the balancer."""
    port = free_port()
    extra = f'accept_proxy = true\ntrusted_proxies = ["{OTHER}"]\nclient_maxconn = 1'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra=extra),
            backend("app", [("m1", mirror.address)]),
            workers=1,
        ),
        workers=1,
    )

    def held_by(client: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(OTHER, 0))
        sock.sendall(f"PROXY TCP4 {client} 198.51.100.1 51000 443\r\n".encode())
        sock.sendall(b"GET /who HTTP/1.1\r\nHost: a\r\n\r\n")  # kept alive: the tunnel stays
        return sock

    first, second = held_by("203.0.113.9"), held_by("203.0.113.10")  # one each: both served
    try:
        assert body(first.recv(65536)).startswith(b"GET /who")
        assert body(second.recv(65536)).startswith(b"GET /who")
        with held_by("203.0.113.9") as third:  # the first client's second: over its limit
            assert clients.status_of(clients.read_all(third)) == 429
    finally:
        first.close()
        second.close()
    [refused] = wait_until(
        lambda: [c for c in lb.conns() if c["status"] == 429], 5, "the refused conn line"
    )
    assert refused["client"] == "203.0.113.9:51000"
