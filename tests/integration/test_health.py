"""Health checks end to end: servers leave and rejoin rotation within the documented bounds.

Bounds, with the test's settings: out of rotation within fall x interval +
timeout (plus jitter), back within rise x interval (plus jitter). Meanwhile a
client keeps sending requests through the balancer: none may fail while at
least one server is up.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.integration.harness import (
    FlakyBackend,
    Proc,
    SpliceLB,
    backend,
    blackhole,
    config,
    free_port,
    listener,
    wait_until,
)

INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.3, 2, 3
JITTER = 1.1
SLACK = 0.6  # seeing the log line: pipe, reader thread, polling
DOWN_BOUND = FALL * INTERVAL * JITTER + TIMEOUT + SLACK
UP_BOUND = RISE * INTERVAL * JITTER + TIMEOUT + SLACK
HEALTH = (
    f'[backends.health]\ntype = "http"\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\n'
    f'rise = {RISE}\nfall = {FALL}\nexpect_body = "ok"\n'
)


class Traffic:
    """A client sending one request at a time through the balancer, in a thread."""

    def __init__(self, fetch: Callable[[], str], pause: float = 0.03) -> None:
        self.fetch = fetch
        self.pause = pause
        self.answers: list[str] = []
        self.errors: list[str] = []
        self.failed: list[tuple[float, float]] = []  # (start, end) of each failed request
        self.durations: list[tuple[float, float]] = []  # (start, seconds) of every request
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.answers.append(self.fetch())
            except Exception as exc:  # every failure counts, whatever its kind
                self.errors.append(repr(exc))
                self.failed.append((start, time.monotonic()))
            self.durations.append((start, time.monotonic() - start))
            time.sleep(self.pause)

    def since(self, mark: int) -> set[str]:
        return set(self.answers[mark:])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def whoami(port: int) -> Callable[[], str]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/whoami", timeout=5) as reply:
            return str(reply.read().decode())

    return fetch


def state_change(lb: SpliceLB, server: str, to: str, after: int = 0) -> dict[str, Any] | None:
    for line in lb.events("server_state")[after:]:
        if line["server"] == server and line["to"] == to:
            return line
    return None


def wait_state(lb: SpliceLB, server: str, to: str, after: int, bound: float) -> dict[str, Any]:
    """Wait for ``server`` to turn ``to``; return its log line and how long it took."""
    began = time.monotonic()
    line = wait_until(lambda: state_change(lb, server, to, after), bound + 5, f"{server} {to}")
    took = time.monotonic() - began
    assert took <= bound, f"{server} took {took:.2f} s to turn {to} (bound {bound:.2f} s)"
    return dict(line)


def start_pair(
    procs: list[Proc], start_lb: Callable[..., SpliceLB], **flaky: Any
) -> tuple[SpliceLB, FlakyBackend, FlakyBackend, int]:
    a = FlakyBackend("A", **flaky)
    procs.append(a)
    b = FlakyBackend("B")
    procs.append(b)
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app"),
            backend(
                "app",
                [("A", a.address), ("B", b.address)],
                extra="connect_timeout = 0.5\n" + HEALTH,
            ),
        )
    )
    for name in ("A", "B"):
        wait_until(lambda n=name: state_change(lb, n, "up"), 5, f"{name} up")  # type: ignore[misc]
    return lb, a, b, port


def break_and_fix(
    lb: SpliceLB,
    traffic: Traffic,
    breaks: Callable[[], None],
    fixes: Callable[[], None],
    reason: str,
) -> float:
    """Break A, see it leave in time and get no traffic; fix it, see it return in time.
    Returns when A was broken."""
    mark = len(lb.events("server_state"))
    breaks()
    broken_at = time.monotonic()
    down = wait_state(lb, "A", "down", mark, DOWN_BOUND)
    assert reason in down["reason"], down
    assert down["from"] == "up"
    time.sleep(0.3)
    seen = len(traffic.answers)
    # Twenty requests after that (about 0.7 s): no new connection reaches a down server.
    wait_until(lambda: len(traffic.answers) >= seen + 20, 10, "20 answers with A down")
    slowest = sorted(traffic.durations, key=lambda d: d[1])[-3:]
    assert traffic.since(seen) == {"B"}, (traffic.errors[-5:], slowest)
    mark = len(lb.events("server_state"))
    fixes()
    wait_state(lb, "A", "up", mark, UP_BOUND)
    seen = len(traffic.answers)
    wait_until(lambda: "A" in traffic.since(seen), 5, "traffic to reach A again")
    return broken_at


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("500", "HTTP 500"), ("hang", f"timeout after {TIMEOUT:g} s"), ("body", "without 'ok'")],
    ids=["answers-500", "hangs-past-timeout", "wrong-body"],
)
def test_failing_server_leaves_and_returns(
    mode: str, reason: str, procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, a, _, port = start_pair(procs, start_lb)
    traffic = Traffic(whoami(port))
    try:
        break_and_fix(lb, traffic, lambda: a.set_mode(mode), lambda: a.set_mode("ok"), reason)
    finally:
        traffic.stop()
    assert traffic.errors == []
    assert len(traffic.answers) > 50


def test_killed_server_leaves_and_returns_and_clients_never_notice(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, a, _, port = start_pair(procs, start_lb)
    traffic = Traffic(whoami(port))
    killed_at = 0.0

    def kill() -> None:
        nonlocal killed_at
        killed_at = time.monotonic()
        a.kill()

    def restart() -> None:
        procs.append(FlakyBackend("A", port=a.port))

    try:
        break_and_fix(lb, traffic, kill, restart, "connection refused")
    finally:
        traffic.stop()
    # Only a request already on its way to A when A was killed can fail (no balancer
    # can save a response its server never sent); every later one is retried.
    in_flight = [(s, e) for s, e in traffic.failed if s <= killed_at + 0.01 and e >= killed_at]
    assert len(traffic.failed) == len(in_flight) <= 1, (traffic.errors, killed_at)
    # The passive signal: each worker paid at most one refused connect before the
    # prober confirmed the server down; no client saw it.
    failed = [line for line in lb.events("connect_failed") if line["server"] == "A"]
    assert len(failed) <= 2, failed


def test_every_server_down_gives_503_at_once_and_open_tunnels_stay(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, a, b, port = start_pair(procs, start_lb)
    tunnel = socket.create_connection(("127.0.0.1", port), timeout=10)
    tunnel.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tunnel.recv(1000).startswith(b"HTTP/1.1 200")
    mark = len(lb.events("server_state"))
    a.set_mode("500")
    b.set_mode("500")
    wait_state(lb, "A", "down", mark, DOWN_BOUND)
    wait_state(lb, "B", "down", mark, DOWN_BOUND)
    began = time.monotonic()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/whoami", timeout=5)
        raise AssertionError("expected 503")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
    assert time.monotonic() - began < 0.5  # at once: no connect attempt to a down server
    # The kept-alive connection opened before is a tunnel: health changes don't touch it.
    tunnel.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    assert tunnel.recv(1000).startswith(b"HTTP/1.1 200")
    tunnel.close()


def test_prober_restart_keeps_the_published_pool(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, a, _, port = start_pair(procs, start_lb)
    mark = len(lb.events("server_state"))
    a.set_mode("500")
    wait_state(lb, "A", "down", mark, DOWN_BOUND)
    [prober] = lb.events("prober_start")[-1:]
    os.kill(prober["pid"], signal.SIGKILL)
    wait_until(lambda: len(lb.events("prober_start")) >= 2, 10, "a new prober")
    # Workers keep the last published pool while the prober is away and after.
    answers = {whoami(port)() for _ in range(20)}
    assert answers == {"B"}
    mark = len(lb.events("server_state"))
    a.set_mode("ok")
    wait_state(lb, "A", "up", mark, UP_BOUND + 1)
    assert state_change(lb, "A", "up", mark)["from"] == "down"  # type: ignore[index]


def test_blackholed_server_leaves_and_returns(
    namespace: tuple[str, str, str], procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    name, here, there = namespace
    prefix = ("ip", "netns", "exec", name)
    lb, _, _, port = start_pair(procs, start_lb, host=there, prefix=prefix)
    traffic = Traffic(whoami(port))
    try:
        broken_at = break_and_fix(
            lb,
            traffic,
            lambda: blackhole(name, here, True),
            lambda: blackhole(name, here, False),
            f"timeout after {TIMEOUT:g} s",
        )
    finally:
        traffic.stop()
    # A request already forwarded to A when its network went silent gets no answer (the
    # client's own timeout ends it); every request started after that is served.
    assert [f for f in traffic.failed if f[0] >= broken_at] == [], traffic.errors
    assert len(traffic.errors) <= 1, traffic.errors


def make_certs(tmp: Path) -> dict[str, str]:
    """Two CAs: the one the balancer trusts (via ca_file), and one it does not."""
    files = {}
    for label in ("trusted", "untrusted"):
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        files[f"{label}_ca"] = str(tmp / f"{label}-ca.pem")
        ca.cert_pem.write_to_path(files[f"{label}_ca"])
        files[f"{label}_cert"] = str(tmp / f"{label}-cert.pem")
        cert.cert_chain_pems[0].write_to_path(files[f"{label}_cert"])
        files[f"{label}_key"] = str(tmp / f"{label}-key.pem")
        cert.private_key_pem.write_to_path(files[f"{label}_key"])
    return files


def test_https_checks_trust_ca_file_and_reject_untrusted_certificates(
    procs: list[Proc], start_lb: Callable[..., SpliceLB], tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    good = FlakyBackend("A", extra=("--tls", certs["trusted_cert"], certs["trusted_key"]))
    procs.append(good)
    bad = FlakyBackend("B", extra=("--tls", certs["untrusted_cert"], certs["untrusted_key"]))
    procs.append(bad)
    port = free_port()
    https = HEALTH.replace('type = "http"', 'type = "https"')
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "tls", mode="tcp"),
            backend(
                "tls",
                [("A", good.address), ("B", bad.address)],
                extra=https + f'ca_file = "{certs["trusted_ca"]}"\n',
            )
            + backend("lax", [("B", bad.address)], extra=https + "verify = false\n"),
        )
    )
    wait_until(lambda: state_change(lb, "A", "up"), 5, "A up")
    down = wait_until(lambda: state_change(lb, "B", "down"), 5, "B down")
    assert down["backend"] == "tls"
    assert "TLS: certificate verify failed" in down["reason"], down
    # verify = false is allowed, with a warning at start; there B passes.
    [warning] = lb.events("tls_verify_off")
    assert warning["backend"] == "lax" and warning["level"] == "warning"
    lax = wait_until(
        lambda: [r for r in lb.events("server_state") if r["backend"] == "lax"], 5, "lax B"
    )
    assert lax[0]["to"] == "up"
    # Clients speak TLS through the tcp listener (passthrough) and only reach A.
    context = ssl.create_default_context(cafile=certs["trusted_ca"])

    def fetch() -> str:
        url = f"https://127.0.0.1:{port}/whoami"
        with urllib.request.urlopen(url, timeout=5, context=context) as reply:
            return str(reply.read().decode())

    traffic = Traffic(fetch)
    try:
        wait_until(lambda: len(traffic.answers) >= 20, 10, "20 answers")
        assert traffic.since(0) == {"A"}, traffic.errors[-5:]
        # B gets a certificate from the trusted CA: back within the rise bound.
        mark = len(lb.events("server_state"))
        bad.kill()
        procs.append(
            FlakyBackend(
                "B", port=bad.port, extra=("--tls", certs["trusted_cert"], certs["trusted_key"])
            )
        )
        wait_state(lb, "B", "up", mark, UP_BOUND + 1)
        seen = len(traffic.answers)
        wait_until(lambda: "B" in traffic.since(seen), 5, "traffic to reach B")
    finally:
        traffic.stop()
    assert traffic.errors == []
