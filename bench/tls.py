"""TLS termination side by side: splicelb's ``[listeners.tls]`` and HAProxy's ``bind ... ssl crt``.

Both balancers get the same ECDSA P-256 certificate, TLS 1.2 and up, the same
TLS 1.2 suites (ECDHE with AES-GCM or ChaCha20), ALPN ``http/1.1``, and the
same backends: nginx (``return 200``) for plain requests and
``bench/echo_server.py`` (every byte echoed after a 101) under ``/ws``.
Figures:

- new TLS connections per second: ``wrk`` with ``Connection: close`` (each
  request a new connection: a full handshake, one request, one answer);
- bulk throughput of one ``wss://`` tunnel: one client sends ``--bulk-mib``
  MiB after the upgrade while it reads the echo back; MB/s of the echo.

Run: ``python bench/tls.py [--workers 1] [--seconds 5] [--bulk-mib 256]``; it
prints one JSON line per figure and balancer, then the ratios.  Short by
default: the machine may be shared.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.procs import HOST, REPO, Proc, free_port, wait_until
from bench.servers import Backends, _workers_running, start_backends, wait_listening

CHUNK = 256 * 1024


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost: (cert, key, both in one file)."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_file, key_file, both = (directory / n for n in ("cert.pem", "key.pem", "both.pem"))
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    both.write_bytes(cert_pem + key_pem)
    for path in (key_file, both):
        path.chmod(0o600)
    return cert_file, key_file, both


def start_splicelb(
    tmp: Path, workers: int, backends: Backends, cert: Path, key: Path
) -> tuple[Proc, int]:
    port = free_port()
    config = tmp / "splicelb.toml"
    config.write_text(
        textwrap.dedent(f"""\
        [global]
        workers = {workers}
        runtime_dir = "{tmp}/run"
        admin_bind = ""
        log_level = "warning"
        maxconn = 20000

        [[listeners]]
        name = "tls"
        bind = "{HOST}:{port}"
        default_backend = "http"
        forwarded_headers = false

          [[listeners.routes]]
          path_prefix = "/ws"
          backend = "ws"

          [listeners.tls]
          cert_file = "{cert}"
          key_file = "{key}"

        [[backends]]
        name = "http"
          [[backends.servers]]
          name = "nginx"
          address = "{HOST}:{backends.ports["http"]}"

        [[backends]]
        name = "ws"
          [[backends.servers]]
          name = "echo"
          address = "{HOST}:{backends.ports["ws"]}"
        """)
    )
    proc = Proc("splicelb", [sys.executable, "-m", "lb", "run", "-c", str(config)], tmp)
    wait_listening(proc, [port], "splicelb")
    running = lambda: _workers_running(proc, tmp / "run") == workers  # noqa: E731
    wait_until(running, 30, "splicelb's workers")
    return proc, port


def start_haproxy(tmp: Path, workers: int, backends: Backends, both: Path) -> tuple[Proc, int]:
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        textwrap.dedent(f"""\
        global
            nbthread {workers}
            maxconn 9500
            ssl-default-bind-ciphers ECDHE+AESGCM:ECDHE+CHACHA20
            ssl-default-bind-options ssl-min-ver TLSv1.2
        defaults
            mode http
            timeout connect 5s
            timeout client 1h
            timeout server 1h
            timeout tunnel 1h
        frontend tls
            bind {HOST}:{port} ssl crt {both} alpn http/1.1
            use_backend ws if {{ path_beg /ws }}
            default_backend http
        backend http
            server nginx {HOST}:{backends.ports["http"]}
        backend ws
            server echo {HOST}:{backends.ports["ws"]}
        """)
    )
    proc = Proc("haproxy", ["haproxy", "-db", "-f", str(cfg)], tmp)
    wait_listening(proc, [port], "haproxy")
    return proc, port


def cpu_seconds(proc: Proc) -> float:
    total = 0.0
    for p in proc.tree():
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def new_connections(port: int, seconds: float, proc: Proc) -> tuple[float, float]:
    """Requests per second of ``wrk`` with a new TLS connection per request, and the
    balancer's CPU milliseconds per connection (the figure to trust on a busy machine)."""
    before = cpu_seconds(proc)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c32",
            f"-d{seconds:g}s",
            "-H",
            "Connection: close",
            f"https://localhost:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    found = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if found is None or errors is not None:
        raise RuntimeError(f"wrk: {out}")
    done = re.search(r"(\d+) requests in", out)
    assert done is not None
    return float(found[1]), (cpu_seconds(proc) - before) * 1000 / int(done[1])


def bulk(port: int, mib: int, proc: Proc) -> tuple[float, float]:
    """MB/s of the echo through one wss:// tunnel, ``mib`` MiB sent while it is read back,
    and the balancer's CPU seconds per GB each way (the client, in Python, may well be
    what limits the rate: the CPU figure is the balancer's own)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((HOST, port), timeout=30)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    total = mib << 20
    chunk = os.urandom(CHUNK)
    # One thread: an SSL object may not be read and written by two threads at once.
    sock.setblocking(False)
    sent = got = 0
    view = bytearray(1 << 20)
    before = cpu_seconds(proc)
    started = time.monotonic()
    while got < total:
        want_write = sent < total
        readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 30)
        if not readable and not writable:
            raise RuntimeError(f"stalled after {got} bytes back")
        if writable:
            with contextlib.suppress(ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent += sock.send(chunk[: min(CHUNK, total - sent)])
        while True:  # what OpenSSL holds is not in the socket: read until it wants more
            try:
                n = sock.recv_into(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not n:
                raise RuntimeError(f"closed after {got} bytes")
            got += n
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(proc) - before
    sock.close()
    return total / elapsed / 1e6, cpu / (total / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--bulk-mib", type=int, default=256)
    args = parser.parse_args()
    os.chdir(REPO)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="splicelb-tls-bench-") as name:
        tmp = Path(name)
        cert, key, both = make_certificate(tmp)
        tools = {"iperf3": "iperf3", "nginx": "nginx"}
        backends = start_backends(tools, tmp, 1)
        try:
            for balancer in ("splicelb", "haproxy"):
                work = tmp / balancer
                work.mkdir()
                proc, port = (
                    start_splicelb(work, args.workers, backends, cert, key)
                    if balancer == "splicelb"
                    else start_haproxy(work, args.workers, backends, both)
                )
                try:
                    rate, cpu_ms = new_connections(port, args.seconds, proc)
                    rate_mbps, cpu_per_gb = bulk(port, args.bulk_mib, proc)
                    figures = {
                        "new_tls_connections_per_s": rate,
                        "cpu_ms_per_new_connection": cpu_ms,
                        "wss_bulk_MBps": rate_mbps,
                        "cpu_s_per_GB_echoed": cpu_per_gb,
                    }
                finally:
                    proc.kill()
                results[balancer] = figures
                print(json.dumps({"balancer": balancer, "workers": args.workers, **figures}))
        finally:
            backends.stop()
    ratios = {
        figure: round(results["splicelb"][figure] / results["haproxy"][figure], 2)
        for figure in results["splicelb"]
    }
    print(json.dumps({"splicelb/haproxy": ratios}))


if __name__ == "__main__":
    main()
