"""SNI routing by passthrough: a ``mode = "tls"`` listener routes on the ClientHello's server
name and splices the encrypted bytes, holding no key.

Backends are ``openssl s_server -www``, each with a certificate from a test CA
(``trustme``) for its own names only, so a client that verifies the certificate
against that CA has proof of which backend it reached.  Clients: Python's ``ssl``
(over a plain socket with memory BIOs where the test shapes the hello's bytes)
and curl.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from lb.proto.proxy import ProxyHeader, ProxyReader
from tests.integration.harness import (
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)
from tests.proto.test_tls import refragment

pytestmark = pytest.mark.timeout(120)

TLS_HEAD_TIMEOUT = 1.0
NAMES = {"a": ["a.example"], "b": ["x.b.example"], "dflt": ["default.example"]}
GET = b"GET / HTTP/1.0\r\n\r\n"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return path


class SServer(Proc):
    """``openssl s_server -www`` with a certificate for its names, on a free port."""

    def __init__(self, ca: trustme.CA, tmp: Path, name: str) -> None:
        self.port = free_port()
        pem = tmp / f"{name}.pem"
        ca.issue_cert(*NAMES[name]).private_key_and_cert_chain_pem.write_to_path(str(pem))
        super().__init__(
            [
                need("openssl"),
                "s_server",
                "-accept",
                f"127.0.0.1:{self.port}",
                "-cert",
                str(pem),
                "-key",
                str(pem),
                "-www",
            ]
        )
        wait_until(lambda: "ACCEPT" in self.lines, 15, f"openssl s_server {name}")


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return authority


@pytest.fixture
def passthrough(
    tmp_path: Path, ca: trustme.CA, procs: list[Proc]
) -> Callable[..., tuple[SpliceLB, int]]:
    """Start the three backends and splicelb, its tls listener routing to them."""

    def start(
        listener_extra: str = "",
        servers: dict[str, str] | None = None,
        backend_extra: dict[str, str] | None = None,
    ) -> tuple[SpliceLB, int]:
        addresses = dict(servers or {})
        for name in NAMES:
            if name not in addresses:
                server = SServer(ca, tmp_path, name)
                procs.append(server)
                addresses[name] = f"127.0.0.1:{server.port}"
        port = free_port()
        routes = (
            '[[listeners.routes]]\nsni = "A.Example."\nbackend = "a"\n'
            '[[listeners.routes]]\nsni = "*.b.example"\nbackend = "b"\n'
        )
        text = config(
            listener(
                f"127.0.0.1:{port}",
                "dflt",
                mode="tls",
                name="sni",
                extra=f"tls_head_timeout = {TLS_HEAD_TIMEOUT}\n{listener_extra}\n{routes}",
            ),
            "".join(
                backend(name, [(name + "1", address)], (backend_extra or {}).get(name, ""))
                for name, address in addresses.items()
            ),
            workers=1,
        )
        assert "key" not in text and ".pem" not in text  # splicelb holds no key
        lb = SpliceLB(tmp_path, text, workers=1)
        procs.append(lb)
        return lb, port

    return start


def client_context(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))


def names_in(cert: dict[str, Any]) -> list[str]:
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


class TLSOverSocket:
    """A TLS client over a plain socket through memory BIOs: the test sends the bytes."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, name: str | None) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)

    def hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
                continue
            self._flush()
            return

    def get(self) -> bytes:
        """Send a GET, read the answer up to the server's close."""
        self.tls.write(GET)
        self._flush()
        answer = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._receive(eof_ok=True):
                    return answer
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return answer
            if not chunk:  # the server's close_notify
                return answer
            answer += chunk

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _receive(self, eof_ok: bool = False) -> bool:
        data = self.sock.recv(65536)
        if not data:
            if eof_ok:
                return False
            raise ConnectionError("closed by the other end during the handshake")
        self.incoming.write(data)
        return True


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reach(
    tmp_path: Path, port: int, name: str | None, send_hello: Callable[[socket.socket, bytes], None]
) -> tuple[list[str], bytes]:
    """Handshake through the balancer, the hello sent by ``send_hello``: the certificate's
    names (verified against the test CA, for ``name``) and the answer to a GET."""
    context = client_context(tmp_path)
    if name is None:
        context.check_hostname = False
    with connect(port) as sock:
        client = TLSOverSocket(sock, context, name)
        send_hello(sock, client.hello())
        client.finish_handshake()
        cert = client.tls.getpeercert()
        assert cert
        return names_in(cert), client.get()


def whole(sock: socket.socket, hello: bytes) -> None:
    sock.sendall(hello)


def byte_by_byte(sock: socket.socket, hello: bytes) -> None:
    for i in range(len(hello)):
        sock.send(hello[i : i + 1])
        time.sleep(0.0005)  # a segment each, mostly


def in_records_of(size: int) -> Callable[[socket.socket, bytes], None]:
    """The hello's handshake message cut into TLS records of ``size`` bytes (as a client
    with a post-quantum key share, or one that fragments, sends it)."""

    def send(sock: socket.socket, hello: bytes) -> None:
        sock.sendall(refragment(hello, size))

    return send


def assert_closed_soon(sock: socket.socket, within: float) -> float:
    """The balancer closes the connection (EOF or reset) within ``within`` seconds: how long
    it took."""
    sock.settimeout(within)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def conn_of(lb: SpliceLB, reason_part: str) -> dict[str, Any]:
    found = wait_until(
        lambda: [c for c in lb.conns() if reason_part in c["reason"]],
        10,
        f"a conn line whose reason has {reason_part!r}",
    )
    return dict(found[-1])


def no_worker_error(lb: SpliceLB) -> None:
    assert not lb.events("worker_error"), lb.events("worker_error")


# -- routing ------------------------------------------------------------------------------


def test_clients_reach_the_backend_of_their_server_name(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    lb, port = passthrough()
    for name, expected in [
        ("a.example", "a.example"),
        ("x.b.example", "x.b.example"),
        (None, "default.example"),  # no SNI: the default backend
        ("other.example", "default.example"),  # no route: the default backend
    ]:
        context = client_context(tmp_path)
        if name is None or name == "other.example":
            context.check_hostname = False
        with connect(port) as raw, context.wrap_socket(raw, server_hostname=name) as tls:
            cert = tls.getpeercert()
            assert cert and names_in(cert) == [expected], (name, cert)
            tls.sendall(GET)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.0 200 ok"), answer[:100]
    lines = lb.wait_conns(4)
    assert [(c["backend"], c["server"], c["sni"]) for c in lines] == [
        ("a", "a1", "a.example"),
        ("b", "b1", "x.b.example"),
        ("dflt", "dflt1", None),
        ("dflt", "dflt1", "other.example"),
    ]
    assert all(c["bytes_in"] > 300 and c["bytes_out"] > 1000 for c in lines)
    no_worker_error(lb)


def test_curl_reaches_each_host_by_its_name(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    curl = need("curl")
    lb, port = passthrough()
    for host in ("a.example", "x.b.example", "X.B.Example"):
        done = subprocess.run(
            [
                curl,
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                str(tmp_path / "ca.pem"),
                "--resolve",
                f"{host}:{port}:127.0.0.1",
                f"https://{host}:{port}/",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr  # the certificate verified for that host
        assert b"<pre>\n\ns_server -accept 127.0.0.1:" in done.stdout  # its status page
    lines = lb.wait_conns(3)
    assert [(c["backend"], c["sni"]) for c in lines] == [
        ("a", "a.example"),
        ("b", "x.b.example"),
        ("b", "x.b.example"),  # sent as the URL has it; compared in lower case
    ]
    no_worker_error(lb)


@pytest.mark.parametrize(
    "send_hello",
    [byte_by_byte, in_records_of(1), in_records_of(100)],
    ids=["1-byte writes", "1-byte records", "100-byte records"],
)
def test_hello_in_pieces_reaches_its_backend_unchanged(
    tmp_path: Path,
    passthrough: Callable[..., tuple[SpliceLB, int]],
    send_hello: Callable[[socket.socket, bytes], None],
) -> None:
    lb, port = passthrough()
    names, answer = reach(tmp_path, port, "x.b.example", send_hello)
    assert names == ["x.b.example"]  # OpenSSL took the hello as it was sent
    assert answer.startswith(b"HTTP/1.0 200 ok")
    assert lb.wait_conns(1)[0]["backend"] == "b"
    no_worker_error(lb)


# -- what is refused, and how -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01garbage\r\n" * 10, "not TLS: first byte 0x00 is not a handshake record"),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "not TLS: plain text"),
        (bytes.fromhex("802e0103010015"), "SSLv2-style record header"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "is of type 2, not ClientHello"),
        (
            b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n",
            "PROXY header on a listener without accept_proxy",
        ),
    ],
    ids=["garbage", "plain http", "sslv2", "server hello", "proxy header"],
)
def test_what_is_not_a_client_hello_is_closed_at_once(
    passthrough: Callable[..., tuple[SpliceLB, int]], data: bytes, reason: str
) -> None:
    lb, port = passthrough()
    with connect(port) as sock:
        sock.sendall(data)
        assert assert_closed_soon(sock, 5) < TLS_HEAD_TIMEOUT
    line = conn_of(lb, reason)
    assert (line["backend"], line["server"], line["status"]) == (None, None, None)
    assert line["bytes_in"] == len(data) and line["bytes_out"] == 0
    assert "sni" in line and line["sni"] is None
    no_worker_error(lb)


def test_a_20k_hello_is_refused_and_nothing_is_forwarded(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    recorder = Recording()
    with recorder:
        lb, port = passthrough(servers={"a": recorder.address, "b": recorder.address})
        context = client_context(tmp_path)
        context.set_alpn_protocols([f"{i:03d}" + "p" * 197 for i in range(100)])
        with connect(port) as raw, pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(raw, server_hostname="a.example")
        line = conn_of(lb, "larger than 16384 bytes")
    assert line["backend"] is None
    assert recorder.received == []  # no server saw a byte of it
    no_worker_error(lb)


def test_a_truncated_hello_is_closed_when_the_client_ends(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    lb, port = passthrough()
    with connect(port) as sock:
        hello = TLSOverSocket(sock, client_context(tmp_path), "a.example").hello()
        sock.sendall(hello[:200])
        sock.shutdown(socket.SHUT_WR)
        assert assert_closed_soon(sock, 5) < TLS_HEAD_TIMEOUT
    line = conn_of(lb, "client closed before the TLS ClientHello")
    assert line["bytes_in"] == 200 and line["backend"] is None
    no_worker_error(lb)


def test_a_client_that_stops_mid_hello_is_closed_at_tls_head_timeout(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    lb, port = passthrough()
    with connect(port) as sock:
        hello = TLSOverSocket(sock, client_context(tmp_path), "a.example").hello()
        sock.sendall(hello[:100])
        took = assert_closed_soon(sock, 5)
    assert TLS_HEAD_TIMEOUT * 0.9 < took < TLS_HEAD_TIMEOUT + 1.5
    line = conn_of(lb, f"no complete TLS ClientHello within {TLS_HEAD_TIMEOUT:g} s")
    assert line["bytes_in"] == 100 and line["backend"] is None
    no_worker_error(lb)


# -- PROXY protocol in and out; a reload mid-hello -------------------------------------------


class Recording:
    """A plain TCP server in a thread: keeps what each connection sent (until it stalls
    for 0.3 s or closes), then closes it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.settimeout(0.1)
        self.received: list[bytes] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Recording:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            data = b""
            conn.settimeout(0.3)
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:
                pass
            conn.close()
            self.received.append(data)


def test_proxy_header_in_and_out_around_the_unchanged_hello(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    """A trusted peer's PROXY header names the client; the server gets a PROXY v2 header
    naming it, then the hello exactly as the client sent it."""
    with Recording() as recorder:
        lb, port = passthrough(
            listener_extra='accept_proxy = true\ntrusted_proxies = ["127.0.0.1/32"]',
            servers={"a": recorder.address},
            backend_extra={"a": 'send_proxy = "v2"'},
        )
        with connect(port) as sock:
            hello = TLSOverSocket(sock, client_context(tmp_path), "a.example").hello()
            sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n" + hello)
            wait_until(lambda: recorder.received, 10, "the server to get the hello")
        sent = recorder.received[0]
        reader = ProxyReader()
        header = reader.feed(sent)
        assert isinstance(header, ProxyHeader) and header.version == 2
        assert header.source == ("192.0.2.7", 40000)
        assert reader.rest == hello  # byte for byte
        line = conn_of(lb, "closed")
        assert (line["client"], line["backend"], line["sni"]) == (
            "192.0.2.7:40000",
            "a",
            "a.example",
        )
    no_worker_error(lb)


def test_a_hello_in_progress_at_reload_is_served(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    lb, port = passthrough()
    with connect(port) as sock:
        client = TLSOverSocket(sock, client_context(tmp_path), "a.example")
        hello = client.hello()
        sock.sendall(hello[:150])
        done = cli("reload", "-c", str(lb.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        sock.sendall(hello[150:])
        client.finish_handshake()
        cert = client.tls.getpeercert()
        assert cert and names_in(cert) == ["a.example"]
        assert client.get().startswith(b"HTTP/1.0 200 ok")
    line = conn_of(lb, "closed")
    assert (line["backend"], line["sni"]) == ("a", "a.example")
    no_worker_error(lb)


def test_status_names_the_tls_listener(passthrough: Callable[..., tuple[SpliceLB, int]]) -> None:
    lb, _ = passthrough()
    done = cli("status", "--runtime-dir", str(lb.runtime_dir))
    assert done.returncode == 0, done.stderr
    assert "tls" in done.stdout
    lb.signal(signal.SIGTERM)
    assert lb.wait(30) == 0


def test_a_client_over_client_maxconn_is_closed_before_its_hello_is_read(
    tmp_path: Path, passthrough: Callable[..., tuple[SpliceLB, int]]
) -> None:
    lb, port = passthrough(listener_extra="client_maxconn = 1")
    with connect(port) as first:
        client = TLSOverSocket(first, client_context(tmp_path), "a.example")
        hello = client.hello()
        first.sendall(hello[:100])  # counted from its accept, hello or not
        with connect(port) as second:
            second.sendall(hello)
            assert assert_closed_soon(second, 5) < TLS_HEAD_TIMEOUT
        line = conn_of(lb, "client limit: 1 open connection")
        assert (line["status"], line["backend"], line["bytes_out"]) == (429, None, 0)
        first.sendall(hello[100:])  # the first is served all the same
        client.finish_handshake()
        assert client.get().startswith(b"HTTP/1.0 200 ok")
    no_worker_error(lb)
