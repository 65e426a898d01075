"""The admin endpoint of a running instance answers only Host names that name it.

A page on a DNS-rebinding domain reaches the endpoint with its own name in
Host; it must get 421 and nothing else, on every path.  Requests are sent
with ``http.client`` so that the Host header is exactly the one given.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from email.message import Message

import pytest

from tests.integration.harness import (
    EchoBackend,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

SECURITY_HEADERS = ("Cache-Control", "X-Content-Type-Options", "X-Frame-Options")
REFUSED_BODY = b"misdirected request: this endpoint does not answer for that Host\n"


def ask(port: int, path: str, host: str, method: str = "GET") -> tuple[int, Message, bytes]:
    """One request to 127.0.0.1:``port`` with exactly ``host`` as its Host header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        conn.endheaders()
        reply = conn.getresponse()
        return reply.status, reply.headers, reply.read()
    finally:
        conn.close()


def start(
    start_lb: Callable[..., SpliceLB], echo: EchoBackend, admin: int, extra_global: str = ""
) -> SpliceLB:
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{free_port()}", "app"),
            backend("app", [("echo1", echo.address)]),
            admin_bind=f"127.0.0.1:{admin}",
            extra_global=extra_global,
        )
    )
    wait_until(lambda: lb.events("admin_start"), 10, "the admin endpoint")
    return lb


def check_security_headers(headers: Message) -> None:
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert "default-src 'self'" in headers["Content-Security-Policy"]


@pytest.mark.timeout(60)
def test_a_foreign_host_is_refused_and_the_endpoints_own_names_are_served(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    admin = free_port()
    start(start_lb, echo_pair[0], admin)

    for path in ("/", "/status", "/metrics"):
        for host in ("evil.example", f"evil.example:{admin}"):
            status, headers, body = ask(admin, path, host)
            assert (status, body) == (421, REFUSED_BODY), (path, host)
            assert headers["Content-Type"].startswith("text/plain")
            check_security_headers(headers)

    for host in (f"localhost:{admin}", "LocalHost", f"127.0.0.1:{admin}", "127.0.0.1"):
        status, _, body = ask(admin, "/status", host)
        assert status == 200, (host, body)
        assert b'"backends"' in body
    status, _, body = ask(admin, "/", f"localhost:{admin}")
    assert status == 200 and b"<title>splicelb</title>" in body
    status, _, body = ask(admin, "/metrics", f"127.0.0.1:{admin}")
    assert status == 200 and b"splicelb_generation" in body
    # The right name on another port names another endpoint.
    assert ask(admin, "/status", f"localhost:{admin + 1}")[0] == 421


@pytest.mark.timeout(60)
def test_names_listed_in_admin_hosts_are_served_and_a_reload_changes_them(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    admin = free_port()
    listed = 'admin_hosts = ["Dash.Example.test"]'
    lb = start(start_lb, echo_pair[0], admin, listed)
    assert "dash.example.test" in lb.events("admin_start")[0]["hosts"]

    for host in ("dash.example.test", f"DASH.example.test:{admin}"):
        status, _, body = ask(admin, "/status", host)
        assert status == 200, (host, body)
    assert ask(admin, "/status", "other.example.test")[0] == 421

    text = lb.config_path.read_text()
    lb.config_path.write_text(text.replace(listed, 'admin_hosts = ["other.example.test"]'))
    result = cli("reload", "-c", str(lb.config_path), timeout=30)
    assert result.returncode == 0, result.stderr
    # The old generation's admin process may take one more request as it stops.
    wait_until(
        lambda: ask(admin, "/status", "other.example.test")[0] == 200, 10, "the new name served"
    )
    wait_until(lambda: ask(admin, "/status", "dash.example.test")[0] == 421, 10, "the old refused")


@pytest.mark.timeout(60)
def test_every_answer_carries_the_security_headers(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    admin = free_port()
    start(start_lb, echo_pair[0], admin)
    host = f"localhost:{admin}"

    answers = {
        "200 /": ask(admin, "/", host),
        "200 /status": ask(admin, "/status", host),
        "200 /metrics": ask(admin, "/metrics", host),
        "404": ask(admin, "/nope", host),
        "405": ask(admin, "/status", host, method="POST"),
        "421": ask(admin, "/status", "evil.example", method="POST"),
    }
    for what, (_, headers, _) in answers.items():
        missing = [name for name in SECURITY_HEADERS if name not in headers]
        assert not missing, (what, missing)
        check_security_headers(headers)
    assert {what: status for what, (status, _, _) in answers.items()} == {
        "200 /": 200,
        "200 /status": 200,
        "200 /metrics": 200,
        "404": 404,
        "405": 405,
        "421": 421,  # the Host is checked first: a foreign one never learns what is allowed
    }
    assert answers["405"][1]["Allow"] == "GET,HEAD"
