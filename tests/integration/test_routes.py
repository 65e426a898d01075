"""Routes that cannot be escaped: through a running balancer, to two servers that report
the head they were sent.

The route to ``admin`` (by path prefix and by host) is tried as an attacker
would: every spelling a server reads as under it reaches the admin server (in
the normal form the route saw) or gets 400; none reaches the other server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.integration import clients
from tests.integration.harness import (
    Proc,
    SpliceLB,
    ToolServer,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)

ROUTES = """allowed_origins = ["https://good.example"]
[[listeners.routes]]
path_prefix = "/admin"
backend = "admin"
[[listeners.routes]]
host = "internal.example"
backend = "admin"
"""


class Site:
    """A balancer in front of the servers ``admin`` and ``app`` (the default)."""

    def __init__(self, lb: SpliceLB, port: int, servers: dict[str, ToolServer]) -> None:
        self.lb = lb
        self.port = port
        self.servers = servers
        self.sent = 0  # requests that reached a server, so far

    def get(self, head: bytes) -> tuple[int, bytes]:
        """Send a request head; the status, and the body (a server's: the head it got)."""
        reply = clients.exchange(self.port, head)
        status = clients.status_of(reply)
        if status == 200:
            self.sent += 1
            wait_until(self._reported, 10, f"{self.sent} heads reported by the servers")
        return status, reply.split(b"\r\n\r\n", 1)[1]

    def _reported(self) -> bool:
        return sum(len(server.results()) for server in self.servers.values()) >= self.sent

    def heads(self, name: str) -> list[str]:
        """The request lines and Host fields the server ``name`` was sent."""
        return [result["head"].split("\r\n")[0] for result in self.servers[name].results()]


@pytest.fixture
def site(procs: list[Proc], start_lb: Callable[..., SpliceLB]) -> Iterator[Site]:
    servers = {name: ToolServer("head") for name in ("admin", "app")}
    procs.extend(servers.values())
    port = free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra=ROUTES),
            backend("app", [("app1", servers["app"].address)])
            + backend("admin", [("admin1", servers["admin"].address)]),
            workers=1,
        ),
        workers=1,
    )
    yield Site(lb, port, servers)


def get(path: bytes, host: bytes = b"public.example") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"


def test_a_path_that_reads_as_under_the_prefix_reaches_its_server_or_gets_400(
    site: Site,
) -> None:
    to_admin = {
        b"/%61dmin": "GET /admin HTTP/1.1",
        b"//admin": "GET /admin HTTP/1.1",
        b"/./admin": "GET /admin HTTP/1.1",
        b"/x/%2e%2e/admin/users?q=/../": "GET /admin/users?q=/../ HTTP/1.1",
        b"/admin;jsessionid=1": "GET /admin;jsessionid=1 HTTP/1.1",
    }
    to_app = {
        b"/administrator": "GET /administrator HTTP/1.1",
        b"/admin/../x": "GET /x HTTP/1.1",
    }
    refused = {
        b"/../admin": "path goes above the root ('..')",
        b"/%2Fadmin": "encoded '/' in path (%2F)",
        b"/x/..;/admin": "path parameters on a '.' or '..' segment",
        b"/%zzadmin": "invalid percent-escape in path",
    }
    for path, line in {**to_admin, **to_app}.items():
        status, body = site.get(get(path))
        assert status == 200, path
        assert body.startswith(line.encode() + b"\r\n"), (path, body)
    for path, reason in refused.items():
        status, body = site.get(get(path))
        assert (status, reason.encode() in body) == (400, True), (path, body)
    assert site.heads("admin") == list(to_admin.values())
    assert site.heads("app") == list(to_app.values())  # nothing under /admin reached it
    answered = [line for line in site.lb.wait_conns(11) if line["status"] == 400]
    assert len(answered) == len(refused)
    for line, reason in zip(answered, refused.values(), strict=True):
        assert line["reason"].startswith(reason)
    assert all(line["server"] is None for line in answered)


def test_the_host_route_holds_for_every_spelling_and_for_absolute_form(site: Site) -> None:
    for host in (b"internal.example.", b"INTERNAL.Example:8080"):
        status, body = site.get(get(b"/x", host))
        assert status == 200
        assert b"\r\nHost: " + host + b"\r\n" in body
    # An absolute-form target is routed by its authority, which the server gets as Host.
    status, body = site.get(get(b"http://internal.example/x", b"public.example"))
    assert status == 200
    assert body.startswith(b"GET /x HTTP/1.1\r\nHost: internal.example\r\n")
    assert b"public.example" not in body
    status, body = site.get(get(b"http://public.example/admin/../x", b"internal.example"))
    assert status == 200
    assert body.startswith(b"GET /x HTTP/1.1\r\nHost: public.example\r\n")
    assert b"internal.example" not in body
    status, body = site.get(get(b"/x", b"internal.example.."))
    assert (status, b"invalid Host header" in body) == (400, True)
    assert len(site.heads("admin")) == 3
    assert site.heads("app") == ["GET /x HTTP/1.1"]


def test_every_request_that_asks_to_upgrade_has_its_origin_checked(site: Site) -> None:
    upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    for method, origin in [
        (b"HEAD", b"https://evil.example"),
        (b"POST", b"https://evil.example"),
        (b"GET", b"https://good.example\xa0"),  # a no-break space is not whitespace here
        (b"GET", b"\x85https://good.example"),
    ]:
        head = (
            method
            + b" /ws HTTP/1.1\r\nHost: public.example\r\nContent-Length: 0\r\n"
            + upgrade
            + b"Origin: "
            + origin
            + b"\r\n\r\n"
        )
        status, body = site.get(head)
        assert (status, body) == (403, b"403 Forbidden: origin not allowed\n"), method
    assert site.heads("admin") == site.heads("app") == []
    lines = site.lb.wait_conns(4)
    assert [(line["status"], line["reason"]) for line in lines] == [(403, "origin not allowed")] * 4
    head = b"HEAD /ws HTTP/1.1\r\nHost: p\r\n" + upgrade + b"Origin: https://good.example\r\n\r\n"
    assert site.get(head)[0] == 200  # the listed Origin goes through, whatever the method
