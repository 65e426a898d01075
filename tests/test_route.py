"""Routing: first matching route wins, then the listener's default backend."""

from __future__ import annotations

import posixpath
import re
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config import parse_config
from lb.proto.http1 import Head, HeadSniffer, Reject
from lb.proto.tls import ClientHello, HelloReader
from lb.route import Router
from tests.proto.test_http1 import EXPECTED, FIXTURES, needs_fixtures
from tests.proto.test_tls import EXPECTED as EXPECTED_HELLOS
from tests.proto.test_tls import HELLOS


def router(routes: list[dict[str, object]], origins: list[str] | None = None) -> Router:
    config = parse_config(
        {
            "listeners": [
                {
                    "name": "l",
                    "bind": "127.0.0.1:1",
                    "default_backend": "app",
                    "routes": routes,
                    "allowed_origins": origins or [],
                }
            ],
            "backends": [
                {"name": n, "servers": [{"name": "s", "address": "127.0.0.1:2"}]}
                for n in ("app", "chat", "api")
            ],
        }
    )
    return Router(config.listeners[0])


def head(raw: bytes) -> Head:
    event = HeadSniffer().feed(raw)
    assert isinstance(event, Head)
    return event


UPGRADE = (
    b"GET /ws/room HTTP/1.1\r\nHost: Chat.Example.com:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n"
)


def test_first_match_wins_then_default() -> None:
    r = router(
        [
            {
                "websocket": True,
                "host": "chat.example.com",
                "path_prefix": "/ws",
                "backend": "chat",
            },
            {"path_prefix": "/api", "backend": "api"},
            {"websocket": True, "backend": "api"},
        ]
    )
    assert r.backend_for(head(UPGRADE + b"\r\n")) == "chat"
    assert r.backend_for(head(b"GET /api/v1 HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")) == "api"
    assert r.backend_for(head(b"GET /ws/room HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")) == "app"
    other_host = UPGRADE.replace(b"Chat.Example.com:8080", b"other.example") + b"\r\n"
    assert r.backend_for(head(other_host)) == "api"


def test_origin_allowlist_applies_to_upgrades_only() -> None:
    r = router([], origins=["https://good.example"])
    assert r.origin_allowed(head(UPGRADE + b"Origin: https://good.example\r\n\r\n"))
    assert r.origin_allowed(head(UPGRADE + b"Origin: HTTPS://Good.Example/\r\n\r\n"))
    assert not r.origin_allowed(head(UPGRADE + b"Origin: https://evil.example\r\n\r\n"))
    assert r.origin_allowed(head(UPGRADE + b"\r\n"))  # no Origin: not a browser page
    plain = b"GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n"
    assert r.origin_allowed(head(plain))
    assert router([]).origin_allowed(head(UPGRADE + b"Origin: https://evil.example\r\n\r\n"))


@needs_fixtures
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_captured_head_is_routed_by_its_host_and_path(name: str) -> None:
    """Heads real clients sent take the routes of their host and path, and a listed Origin."""
    _, _, path, host, origin, websocket = EXPECTED[name]
    sniffer = HeadSniffer()
    event = sniffer.feed((FIXTURES / name).read_bytes())
    assert isinstance(event, Head)
    by_path = router([{"path_prefix": path, "backend": "chat"}])
    assert by_path.backend_for(event) == "chat"
    by_host = router([{"host": host, "websocket": websocket, "backend": "api"}], [origin or "null"])
    assert by_host.backend_for(event) == "api"
    assert by_host.origin_allowed(event)
    assert sniffer.forward == sniffer.buffer  # forwarded as it came


# ---------------------------------------------------------------- routes that cannot be escaped

ADMIN = [
    {"path_prefix": "/admin", "backend": "chat"},
    {"host": "internal.example.com", "backend": "api"},
]


def routed(path: bytes, host: bytes = b"www.example.com") -> str | int:
    """Where a GET of ``path`` goes on the ADMIN routes, or the status it is refused with."""
    event = HeadSniffer().feed(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    if isinstance(event, Reject):
        return event.status
    assert isinstance(event, Head)
    return router(ADMIN).backend_for(event)


@pytest.mark.parametrize(
    "path",
    [
        b"/admin",
        b"/admin/",
        b"/admin/users",
        b"/admin?x=1",
        b"/%61dmin",
        b"/%61%64%6D%69%6E/users",
        b"//admin",
        b"///admin//users",
        b"/./admin",
        b"/x/../admin",
        b"/x/%2e%2E/admin",
        b"/admin;jsessionid=1",  # what Tomcat and Jetty read as /admin
        b"/admin;v=2/users",
        b"/;x/admin",
    ],
)
def test_a_path_a_server_reads_as_under_the_prefix_takes_the_route(path: bytes) -> None:
    assert routed(path) == "chat"


@pytest.mark.parametrize(
    "path",
    [
        b"/administrator",
        b"/admin-old",
        b"/admin.php",
        b"/admin/../x",
        b"/admin/..",
        b"/%2561dmin",  # "%61dmin" to a server, which decodes once
        b"/Admin",
        b"/x/admin",
        b"/?/admin",
    ],
)
def test_a_path_outside_the_prefix_does_not(path: bytes) -> None:
    assert routed(path) == "app"


@pytest.mark.parametrize(
    "path",
    [b"/../admin", b"/%2e%2e/admin", b"/x/..;/admin", b"/%2Fadmin", b"/\\admin", b"/%zzadmin"],
)
def test_a_path_servers_read_differently_is_refused(path: bytes) -> None:
    assert routed(path) == 400


def test_a_prefix_that_ends_in_a_slash_matches_what_starts_with_it() -> None:
    r = router([{"path_prefix": "/static/", "backend": "chat"}])
    assert r.backend_for(head(b"GET /static/a.css HTTP/1.1\r\nHost: a\r\n\r\n")) == "chat"
    assert r.backend_for(head(b"GET /static/ HTTP/1.1\r\nHost: a\r\n\r\n")) == "chat"
    assert r.backend_for(head(b"GET /static//a HTTP/1.1\r\nHost: a\r\n\r\n")) == "chat"
    assert r.backend_for(head(b"GET /static HTTP/1.1\r\nHost: a\r\n\r\n")) == "app"
    assert r.backend_for(head(b"GET /staticfiles HTTP/1.1\r\nHost: a\r\n\r\n")) == "app"


@pytest.mark.parametrize(
    "host",
    [
        b"internal.example.com",
        b"Internal.Example.COM",
        b"internal.example.com.",  # fully qualified: the same host to DNS and to servers
        b"INTERNAL.example.com.:8080",
    ],
)
def test_every_spelling_of_the_host_takes_its_route(host: bytes) -> None:
    assert routed(b"/", host) == "api"


@pytest.mark.parametrize("host", [b"internal.example.com..", b"%69nternal.example.com"])
def test_a_host_servers_read_differently_is_refused(host: bytes) -> None:
    assert routed(b"/", host) == 400


def test_an_absolute_form_target_is_routed_and_forwarded_by_its_authority() -> None:
    sniffer = HeadSniffer()
    event = sniffer.feed(
        b"GET http://internal.example.com/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
    )
    assert isinstance(event, Head)
    assert router(ADMIN).backend_for(event) == "api"
    assert sniffer.forward == b"GET /x HTTP/1.1\r\nHost: internal.example.com\r\n\r\n"
    sniffer = HeadSniffer()
    event = sniffer.feed(
        b"GET http://www.example.com/x HTTP/1.1\r\nHost: internal.example.com\r\n\r\n"
    )
    assert isinstance(event, Head)
    assert router(ADMIN).backend_for(event) == "app"
    assert sniffer.forward == b"GET /x HTTP/1.1\r\nHost: www.example.com\r\n\r\n"


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"OPTIONS", b"PUT"])
@pytest.mark.parametrize(
    "fields",
    [
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Upgrade: websocket\r\n",  # servers that do not look at Connection upgrade it
        b"Upgrade: WebSocket, h2c\r\nConnection: keep-alive, upgrade\r\n",
    ],
)
def test_every_request_that_asks_to_upgrade_is_checked(method: bytes, fields: bytes) -> None:
    r = router([], origins=["https://good.example"])
    data = method + b" /ws HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n" + fields
    assert not r.origin_allowed(head(data + b"Origin: https://evil.example\r\n\r\n"))
    assert r.origin_allowed(head(data + b"Origin: https://good.example\r\n\r\n"))


@pytest.mark.parametrize(
    "origin",
    [
        b"https://good.example\xa0",  # no-break space
        b"\xa0https://good.example",
        b"https://good.example\x85",  # NEL
        b"https://good.example:443",
        b"https://good.example.",
        b"https://good.example.evil.example",
    ],
)
def test_an_origin_is_compared_exactly(origin: bytes) -> None:
    r = router([], origins=["https://good.example"])
    event = HeadSniffer().feed(UPGRADE + b"Origin: " + origin + b"\r\n\r\n")
    assert not (isinstance(event, Head) and r.origin_allowed(event))


# ---------------------------------------------------------------- the router against servers

SEGMENTS = [
    "admin",
    "admin",
    "administrator",
    "x",
    "",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    ".%2e",
    "%61dmin",
    "%61%64min",
    "ad%6Din",
    "%41dmin",
    "%2561dmin",
    "admin;v=1",
    ";x",
    "..;",
    "%2e%2e;x",
    "a%2Fb",
    "%2F",
    "%5C",
    "%3B",
    "%25",
    "%zz",
    "%00",
    "caf%c3%a9",
    "\\",
]


def decode_all(raw: bytes) -> bytes | None:
    """Every escape decoded, as Go's net/http or nginx do; None if a server refuses it."""
    if re.search(rb"%(?![0-9A-Fa-f]{2})", raw):
        return None  # Go's url.Parse and nginx refuse a bad escape
    decoded = urllib.parse.unquote_to_bytes(raw)
    return None if b"\0" in decoded else decoded


def clean(path: bytes) -> bytes:
    """``path`` as a server that cleans paths resolves it (dot segments, repeated "/"), with
    ``..`` above the root clamped to the root, as Go's ``path.Clean`` does."""
    return posixpath.normpath(b"/" + path.lstrip(b"/"))


def go_like(raw: bytes) -> bytes | None:
    """A server that decodes, then cleans: Go's ServeMux, Python's http.server, nginx."""
    decoded = decode_all(raw)
    return None if decoded is None else clean(decoded)


def tomcat_like(raw: bytes) -> bytes | None:
    """A server that strips path parameters, then decodes, then cleans: Tomcat, Jetty."""
    stripped = b"/".join(segment.split(b";", 1)[0] for segment in raw.split(b"/"))
    decoded = decode_all(stripped)
    return None if decoded is None else clean(decoded)


def backslash_like(raw: bytes) -> bytes | None:
    """A server that reads "\\" as "/" (URL parsers after WHATWG, IIS), then as go_like."""
    return go_like(raw.replace(b"\\", b"/").replace(b"%5C", b"/").replace(b"%5c", b"/"))


SERVERS = (go_like, tomcat_like, backslash_like)


def under_admin(path: bytes) -> bool:
    return path == b"/admin" or path.startswith(b"/admin/")


@settings(max_examples=600, deadline=None)
@given(
    segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6),
    query=st.sampled_from(["", "?a=/admin", "?/../admin"]),
    absolute=st.booleans(),
)
def test_fuzz_the_router_reads_paths_as_servers_do(
    segments: list[str], query: str, absolute: bool
) -> None:
    """Whenever a server would read the path as under /admin, the route to admin takes it
    (or the balancer refuses it), and the route takes only what some server reads so; the
    path forwarded reads to each server as the client's did."""
    raw = ("/" + "/".join(segments)).encode()
    target = (b"http://www.example.com" if absolute else b"") + raw + query.encode()
    sniffer = HeadSniffer()
    event = sniffer.feed(b"GET " + target + b" HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    if isinstance(event, Reject):
        assert event.status == 400
        return
    assert isinstance(event, Head)
    views = [server(raw) for server in SERVERS]
    routed_to = router(ADMIN).backend_for(event)
    if any(view is not None and under_admin(view) for view in views):
        assert routed_to == "chat", views
    if routed_to == "chat":
        assert any(view is not None and under_admin(view) for view in views), views
    forwarded = sniffer.forward.split(b" ", 2)[1].split(b"?", 1)[0]
    assert [server(forwarded) for server in SERVERS] == views


# -- server names (mode = "tls") ---------------------------------------------------------


def sni_router(routes: list[dict[str, object]]) -> Router:
    config = parse_config(
        {
            "listeners": [
                {
                    "name": "l",
                    "bind": "127.0.0.1:1",
                    "mode": "tls",
                    "default_backend": "app",
                    "routes": routes,
                }
            ],
            "backends": [
                {"name": n, "servers": [{"name": "s", "address": "127.0.0.1:2"}]}
                for n in ("app", "chat", "api")
            ],
        }
    )
    return Router(config.listeners[0])


def server_name_of(hello: bytes) -> str | None:
    result = HelloReader().feed(hello)
    assert isinstance(result, ClientHello)
    return result.server_name


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("chat.example.com", "chat"),  # exact, before the wildcard that also matches
        ("a.example.com", "api"),
        ("x-1.example.com", "api"),
        ("example.com", "app"),  # the wildcard needs one more label
        ("a.b.example.com", "app"),  # ... exactly one
        ("aexample.com", "app"),
        ("chat.example.com.evil", "app"),
        (None, "app"),  # no SNI: the default
    ],
)
def test_sni_exact_then_wildcard_then_default(name: str | None, backend: str) -> None:
    r = sni_router(
        [
            {"sni": "Chat.Example.COM.", "backend": "chat"},
            {"sni": "*.example.com", "backend": "api"},
        ]
    )
    assert r.backend_for_sni(name) == backend


def test_sni_route_without_a_name_takes_every_hello() -> None:
    r = sni_router([{"sni": "a.example", "backend": "chat"}, {"backend": "api"}])
    assert r.backend_for_sni("a.example") == "chat"
    assert r.backend_for_sni("b.example") == "api"
    assert r.backend_for_sni(None) == "api"


def test_every_captured_hello_is_routed_by_its_server_name() -> None:
    r = sni_router(
        [{"sni": "a.example", "backend": "chat"}, {"sni": "*.example", "backend": "api"}]
    )
    routed = {
        name: r.backend_for_sni(server_name_of((HELLOS / name).read_bytes()))
        for name in EXPECTED_HELLOS
    }
    assert routed == {
        "python-3.11-sni-alpn.bin": "app",  # a.example.com: one label too many
        "python-3.11-no-sni.bin": "app",
        "openssl-3.0-s_client-sni.bin": "api",  # b.example
        "openssl-3.0-s_client-no-sni.bin": "app",
        "openssl-3.0-s_client-tls1.2.bin": "api",
        "curl-7.88-sni.bin": "chat",
        "python-3.11-8k-alpn.bin": "api",  # big.example
    }
