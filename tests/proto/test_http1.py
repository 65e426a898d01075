"""Tests of the request-head sniffer: real client heads, rejections, limits, fuzzing."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.proto import http1
from lb.proto.http1 import MAX_HEAD_BYTES, NEED_DATA, Head, HeadSniffer, NeedData, Reject

Result = Head | Reject | NeedData

FIXTURES = Path(
    os.environ.get("SPLICELB_FIXTURES")
    or Path(__file__).resolve().parent / "fixtures"  # a copy of shared/fixtures/requests
)
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"fixture directory {FIXTURES} is missing"
)

# file name -> (method, target, path, host, origin, websocket)
EXPECTED: dict[str, tuple[str, str, str, str, str | None, bool]] = {
    "aiohttp-3.14-post-with-body.http": (
        "POST",
        "/api/post",
        "/api/post",
        "127.0.0.1",
        None,
        False,
    ),
    "aiohttp-3.14-upgrade.http": (
        "GET",
        "/socket/aiohttp?token=abc",
        "/socket/aiohttp",
        "127.0.0.1",
        None,
        True,
    ),
    "chromium-156-page-get.http": ("GET", "/", "/", "127.0.0.1", None, False),
    "chromium-156-websocket-upgrade.http": (
        "GET",
        "/chat?room=1",
        "/chat",
        "127.0.0.1",
        "http://127.0.0.1:9777",
        True,
    ),
    "curl-7.88-get.http": ("GET", "/plain/curl", "/plain/curl", "127.0.0.1", None, False),
    "curl-7.88-upgrade.http": ("GET", "/curl/upgrade", "/curl/upgrade", "127.0.0.1", None, True),
    "node-ws-8-upgrade.http": (
        "GET",
        "/node/ws",
        "/node/ws",
        "127.0.0.1",
        "https://node.example",
        True,
    ),
    "python-websockets-17-upgrade-then-first-frame.bin": (
        "GET",
        "/ws/python-websockets",
        "/ws/python-websockets",
        "127.0.0.1",
        "https://app.example.com",
        True,
    ),
    "python-websockets-17-upgrade.http": (
        "GET",
        "/ws/python-websockets",
        "/ws/python-websockets",
        "127.0.0.1",
        "https://app.example.com",
        True,
    ),
}

# Valid heads that need no fixture files, so the fuzz tests always have seeds.
SYNTHETIC = [
    b"GET /ws HTTP/1.1\r\nHost: lb.example:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nOrigin: https://app.example\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET /a/./%62//c/../%c3%a9?q=/../%2F HTTP/1.1\r\nHost: A.example.\r\n\r\n",
    b"GET http://Admin.example.:81/x/%2e%2e/admin?q HTTP/1.1\r\nHost: b\r\nX: y\r\n\r\n",
]


def fixture_bytes() -> list[bytes]:
    if not FIXTURES.is_dir():
        return []
    return [(FIXTURES / name).read_bytes() for name in sorted(EXPECTED)]


SEEDS = SYNTHETIC + fixture_bytes()


def feed_chunks(chunks: list[bytes]) -> tuple[Result, HeadSniffer]:
    """Feed chunks until the sniffer decides (it refuses input after that)."""
    sniffer = HeadSniffer()
    result: Result = NEED_DATA
    for chunk in chunks:
        result = sniffer.feed(chunk)
        if result is not NEED_DATA:
            break
    return result, sniffer


def sniff(data: bytes) -> Result:
    return HeadSniffer().feed(data)


def head(data: bytes) -> Head:
    result = sniff(data)
    assert isinstance(result, Head), result
    return result


def status(data: bytes) -> int:
    result = sniff(data)
    assert isinstance(result, Reject), result
    return result.status


def request(*fields: bytes, line: bytes = b"GET /ws HTTP/1.1") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def outcome(result: Result) -> object:
    """What must not depend on how the bytes were split: the Head, or the status."""
    return result.status if isinstance(result, Reject) else result


def assert_sane(data: bytes, result: Result) -> None:
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
    if result is NEED_DATA:
        assert end < 0 and len(data) < MAX_HEAD_BYTES
    elif isinstance(result, Reject):
        assert result.status in (400, 431) and result.reason and "\n" not in result.reason
        if result.status == 431:
            assert end < 0 and len(data) >= MAX_HEAD_BYTES
    else:
        assert isinstance(result, Head)
        assert result.head_len == end + 4
        assert result.version in ("1.0", "1.1")


# ---------------------------------------------------------------- real clients


@needs_fixtures
def test_every_fixture_is_covered() -> None:
    on_disk = {p.name for p in FIXTURES.iterdir() if p.name != "README.md"}
    assert on_disk == set(EXPECTED)


@needs_fixtures
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses(name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    sniffer = HeadSniffer()
    result = sniffer.feed(data)
    assert isinstance(result, Head), result
    method, target, path, host, origin, websocket = EXPECTED[name]
    assert (result.method, result.target, result.path) == (method, target, path)
    assert (result.host, result.origin, result.websocket) == (host, origin, websocket)
    assert result.version == "1.1"
    assert result.head_len == data.index(b"\r\n\r\n") + 4
    assert sniffer.buffer == data
    assert sniffer.forward == data  # real clients send normal paths: nothing is rewritten
    assert sniffer.trailing == data[result.head_len :]


@needs_fixtures
def test_first_websocket_frame_is_kept() -> None:
    data = (FIXTURES / "python-websockets-17-upgrade-then-first-frame.bin").read_bytes()
    sniffer = HeadSniffer()
    result = sniffer.feed(data)
    assert isinstance(result, Head) and result.websocket
    assert sniffer.trailing == data.split(b"\r\n\r\n", 1)[1]
    assert sniffer.trailing[0] == 0x81  # FIN + text frame, masked by the client
    assert sniffer.buffer == data


@needs_fixtures
def test_post_body_is_kept() -> None:
    data = (FIXTURES / "aiohttp-3.14-post-with-body.http").read_bytes()
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(data), Head)
    assert sniffer.trailing == data.split(b"\r\n\r\n", 1)[1]
    assert len(sniffer.trailing) == 100
    assert sniffer.buffer == data


@pytest.mark.parametrize("data", SEEDS, ids=range(len(SEEDS)))
def test_byte_by_byte_equals_whole(data: bytes) -> None:
    whole = HeadSniffer()
    expected = whole.feed(data)
    assert isinstance(expected, Head)
    sniffer = HeadSniffer()
    for i in range(len(data)):
        result = sniffer.feed(data[i : i + 1])
        if result is not NEED_DATA:
            break
    assert i + 1 == expected.head_len
    assert result == expected
    # The bytes after the head had not arrived yet when the sniffer decided.
    assert sniffer.buffer == data[: expected.head_len]
    assert sniffer.trailing == b""


@settings(max_examples=200, deadline=None)
@given(data=st.sampled_from(SEEDS), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_random_splits_equal_whole(data: bytes, cuts: list[int]) -> None:
    expected = sniff(data)
    result, sniffer = feed_chunks(split(data, cuts))
    assert result == expected
    assert isinstance(result, Head)
    assert sniffer.buffer[: result.head_len] == data[: result.head_len]
    assert sniffer.buffer + data[len(sniffer.buffer) :] == data
    assert sniffer.trailing == sniffer.buffer[result.head_len :]


def test_llhttp_sees_each_head_byte_once() -> None:
    """Feeding one byte at a time stays O(n): nothing is re-parsed."""
    fed: list[int] = []
    sniffer = HeadSniffer()
    real = sniffer._parser

    class Counting:
        def feed_data(self, data: bytes) -> None:
            fed.append(len(data))
            real.feed_data(data)

    sniffer._parser = Counting()  # type: ignore[assignment]
    data = request(b"Host: a", b"X-Pad: " + b"p" * 8000) + b"body"
    result: Result = NEED_DATA
    for i in range(len(data)):
        result = sniffer.feed(data[i : i + 1])
        if result is not NEED_DATA:
            break
    assert isinstance(result, Head)
    assert sum(fed) == result.head_len == len(data) - 4


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET /ws\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"GET  /ws HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"GET /ws HTTP/1.1 \r\nHost: a\r\n\r\n", "malformed request line"),
        (b"\r\nGET /ws HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", "malformed request line"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "HTTP/2"),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", "version"),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", "version"),
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", "version"),
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "method"),
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", "method"),
        (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", "request-target"),
        (b"GET /#top HTTP/1.1\r\nHost: a\r\n\r\n", "request-target"),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", "asterisk"),
        (b"GET a.example:80 HTTP/1.1\r\nHost: a\r\n\r\n", "request-target"),
        (b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", "absolute-form"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", "CONNECT"),
        (request(b"Host: a", b"Host: b"), "duplicate Host header"),
        (request(b"Host: a", b"host: a"), "duplicate Host header"),
        (request(b"Origin: https://a", b"Host: a", b"Origin: https://b"), "duplicate Origin"),
        (request(b"Upgrade: websocket"), "missing Host header"),
        (request(b"Host: a b"), "invalid Host header"),
        (request(b"Host: [::1"), "invalid Host header"),
        (request(b"Host: a:https"), "invalid Host header"),
        (request(b"Host: a..example"), "invalid Host header"),
        (request(b"Host: a.example.."), "invalid Host header"),
        (request(b"Host: .a.example"), "invalid Host header"),
        (request(b"Host: %61.example"), "invalid Host header"),
        (request(b"Host: [::1::]"), "invalid Host header"),
        (request(b"Host: a", line=b"GET http://a..b/ HTTP/1.1"), "absolute-form"),
        (request(b"Host: a", line=b"GET http://%61/ HTTP/1.1"), "absolute-form"),
        (request(b"Host: a", line=b"GET http:///x HTTP/1.1"), "absolute-form"),
        (request(b"Host: a", line=b"GET /../admin HTTP/1.1"), "above the root"),
        (request(b"Host: a", line=b"GET /x/%2e%2e/%2e%2e/admin HTTP/1.1"), "above the root"),
        (request(b"Host: a", line=b"GET http://a/../x HTTP/1.1"), "above the root"),
        (request(b"Host: a", line=b"GET /a%zz HTTP/1.1"), "percent-escape"),
        (request(b"Host: a", line=b"GET /a%4 HTTP/1.1"), "percent-escape"),
        (request(b"Host: a", line=b"GET /a%00 HTTP/1.1"), "NUL"),
        (request(b"Host: a", line=b"GET /%2Fadmin HTTP/1.1"), "encoded '/'"),
        (request(b"Host: a", line=b"GET /%5cadmin HTTP/1.1"), "encoded '\\'"),
        (request(b"Host: a", line=b"GET /\\admin HTTP/1.1"), "'\\' in path"),
        (request(b"Host: a", line=b"GET /x/..;/admin HTTP/1.1"), "parameters on a '.' or '..'"),
        (request(b"Host : a"), "header"),
        (request(b"Host: a", b"X-A b: c"), "header"),
        (request(b"Host: a", b"X-\x00: c"), "header"),
        (request(b"Host: a", b"X-A: b\x00c"), "header"),
        (request(b"Host: a", b"X-A: b\x7fc"), "header"),
        (request(b"Host: a", b"X-A: b", b" folded"), "whitespace"),
        (request(b"Host: a", b"X-A: b", b"\tfolded"), "whitespace"),
        (request(b"Host: a", b"Content-Length: 3", b"Transfer-Encoding: chunked"), "Content"),
        (request(b"Host: a", b"Content-Length: 3", b"Content-Length: 4"), "Content-Length"),
        (request(b"Host: a", b"Content-Length: 3", b"Content-Length: 3"), "Content-Length"),
        (request(b"Host: a", b"Content-Length: 3, 4"), "Content-Length"),
        (request(b"Host: a", b"Transfer-Encoding: gzip"), "Transfer-Encoding"),
        (b"GET /ws HTTP/1.1\nHost: a\n\n", "malformed"),
        (b"GET /ws HTTP/1.1\r\nHost: a\n\r\n", "CR"),
        (b"GET /ws HTTP/1.1\r\nHost: a\rb\r\n\r\n", "LF"),
    ],
)
def test_malformed_is_400(data: bytes, reason: str) -> None:
    result = sniff(data)
    assert isinstance(result, Reject), result
    assert result.status == 400
    assert reason.lower() in result.reason.lower(), result.reason


@pytest.mark.parametrize(
    "partial",
    [
        b"G(",
        b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello on the plain port
        b"GET /\x00",
        b"GET  / HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"GET / HTTP/1.1\r\nHo st",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nX",
        b"GET / HTTP/1.1\nHost",
    ],
)
def test_garbage_is_rejected_before_the_head_ends(partial: bytes) -> None:
    assert b"\r\n\r\n" not in partial
    assert status(partial) == 400


def test_head_of_exactly_max_bytes_is_accepted() -> None:
    prefix = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    data = prefix + b"p" * (MAX_HEAD_BYTES - len(prefix) - 4) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD_BYTES
    assert head(data).head_len == MAX_HEAD_BYTES
    assert status(data[:2] + b"\r\n" + data[2:]) == 400  # same size, but malformed
    longer = prefix + b"p" * (MAX_HEAD_BYTES - len(prefix) - 3) + b"\r\n\r\n"
    assert status(longer) == 431


def test_431_without_terminator() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * MAX_HEAD_BYTES
    assert sniff(data[: MAX_HEAD_BYTES - 1]) is NEED_DATA
    # MAX bytes without the end of the head can no longer fit in MAX: decided at once.
    assert status(data[:MAX_HEAD_BYTES]) == 431
    result = sniff(data[: MAX_HEAD_BYTES + 1])
    assert isinstance(result, Reject)
    assert result == Reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
    result, _ = feed_chunks([data[:100], data[100 : MAX_HEAD_BYTES - 1], b"p", b"p"])
    assert isinstance(result, Reject) and result.status == 431


def test_huge_request_line_is_431_at_once() -> None:
    assert status(b"GET /" + b"a" * MAX_HEAD_BYTES) == 431


def test_feed_after_decision_raises() -> None:
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(request(b"Host: a")), Head)
    with pytest.raises(RuntimeError):
        sniffer.feed(b"more")
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(b"G(T"), Reject)
    assert sniffer.trailing == b""
    assert sniffer.buffer == b"G(T"
    with pytest.raises(RuntimeError):
        sniffer.feed(b"more")


def test_need_data_until_the_blank_line() -> None:
    sniffer = HeadSniffer()
    assert sniffer.feed(b"") is NEED_DATA
    assert sniffer.feed(b"GET / HTTP/1.1\r\nHost: a\r\n") is NEED_DATA
    assert sniffer.trailing == b""
    assert sniffer.feed(b"\r") is NEED_DATA
    assert isinstance(sniffer.feed(b"\nrest"), Head)
    assert sniffer.trailing == b"rest"
    assert sniffer.buffer == b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"


# ---------------------------------------------------------------- what routing sees


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"Example.COM", "example.com"),
        (b"Example.COM:8080", "example.com"),
        (b"10.0.0.1:80", "10.0.0.1"),
        (b"[::1]", "[::1]"),
        (b"[2001:DB8::1]:8443", "[2001:db8::1]"),
        (b"a.example:", "a.example"),
        (b"a.example  ", "a.example"),
        (b"", ""),
        (b"Internal.Example.com.", "internal.example.com"),  # fully qualified: the same host
        (b"internal.example.com.:8443", "internal.example.com"),
        (b"[0:0::1]:80", "[::1]"),
    ],
)
def test_host(host: bytes, expected: str) -> None:
    assert head(request(b"Host: " + host)).host == expected


def test_absolute_form_takes_host_and_path_from_the_target() -> None:
    got = head(request(b"Host: other", line=b"GET http://Example.com.:8080/ws?x=1 HTTP/1.1"))
    assert (got.host, got.path, got.target) == (
        "example.com",
        "/ws",
        "http://Example.com.:8080/ws?x=1",
    )
    got = head(request(b"Host: other", line=b"GET http://[::1]:9000 HTTP/1.1"))
    assert (got.host, got.path) == ("[::1]", "/")


def test_absolute_form_is_forwarded_in_origin_form_with_the_authority_as_host() -> None:
    """The server must read the request as it was routed: by the target's authority, not
    by the client's Host (RFC 9112 section 3.2.2)."""
    data = (
        b"GET http://Internal.example:8080/a/./%62?x=/../y HTTP/1.1\r\n"
        b"X-Before: 1\r\nhost: public.example\r\nX-After: 2\r\n\r\nbody"
    )
    sniffer = HeadSniffer()
    got = sniffer.feed(data)
    assert isinstance(got, Head)
    assert (got.host, got.path) == ("internal.example", "/a/b")
    assert sniffer.forward == (
        b"GET /a/b?x=/../y HTTP/1.1\r\nHost: Internal.example:8080\r\n"
        b"X-Before: 1\r\nX-After: 2\r\n\r\nbody"
    )
    assert sniffer.buffer == data  # what the client sent, as counted
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(b"GET http://a.example HTTP/1.0\r\n\r\n"), Head)
    assert sniffer.forward == b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n"
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(request(b"Host: b", line=b"OPTIONS http://a HTTP/1.1")), Head)
    assert sniffer.forward == b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"  # RFC 9112 3.2.4


@pytest.mark.parametrize(
    ("target", "path", "forwarded"),
    [
        (b"/%61dmin", "/admin", b"/admin"),
        (b"//admin", "/admin", b"/admin"),
        (b"/./admin", "/admin", b"/admin"),
        (b"/admin/../x?q=/admin/../", "/x", b"/x?q=/admin/../"),  # the query is not the path
        (b"/caf%c3%a9/", "/caf%C3%A9/", b"/caf%C3%A9/"),
        (b"/admin?%61", "/admin", b"/admin?%61"),
    ],
)
def test_the_path_is_routed_and_forwarded_in_normal_form(
    target: bytes, path: str, forwarded: bytes
) -> None:
    data = request(b"Host: a", b"Upgrade: websocket", line=b"GET " + target + b" HTTP/1.1")
    sniffer = HeadSniffer()
    got = sniffer.feed(data + b"\x81\x80")
    assert isinstance(got, Head)
    assert (got.path, got.target) == (path, target.decode())
    rewritten = data.replace(b" " + target + b" ", b" " + forwarded + b" ", 1)
    assert sniffer.forward == rewritten + b"\x81\x80"  # the bytes after the head follow
    assert sniffer.buffer == data + b"\x81\x80"


def test_a_normal_head_is_forwarded_as_it_came() -> None:
    data = request(b"Host: a", line=b"GET /a/b.c/~d?e=/../f HTTP/1.1") + b"rest"
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(data), Head)
    assert sniffer.forward is sniffer.buffer


def test_asterisk_form() -> None:
    got = head(request(b"Host: a", line=b"OPTIONS * HTTP/1.1"))
    assert (got.method, got.target, got.path) == ("OPTIONS", "*", "*")


def test_origin_is_stripped_and_optional() -> None:
    assert head(request(b"Host: a", b"Origin:   https://a.example  ")).origin == (
        "https://a.example"
    )
    # Only spaces and tabs are optional whitespace; a no-break space or NEL is content.
    assert head(request(b"Host: a", b"Origin: https://a.example\xa0")).origin == (
        "https://a.example\xa0"
    )
    assert head(request(b"Host: a", b"Origin: \x85https://a.example")).origin == (
        "\x85https://a.example"
    )
    assert head(request(b"Host: a", b"Origin: null")).origin == "null"
    assert head(request(b"Host: a")).origin is None


@pytest.mark.parametrize(
    ("fields", "line", "websocket"),
    [
        ((b"Upgrade: websocket", b"Connection: Upgrade"), b"GET /ws HTTP/1.1", True),
        ((b"Upgrade: WebSocket", b"Connection: keep-alive, Upgrade"), b"GET /ws HTTP/1.1", True),
        ((b"Upgrade: h2c, websocket", b"Connection: upgrade"), b"GET /ws HTTP/1.1", True),
        (
            (b"Upgrade: websocket", b"Connection: keep-alive", b"Connection: upgrade"),
            b"GET /ws HTTP/1.1",
            True,
        ),
        ((b"Upgrade: websocket",), b"GET /ws HTTP/1.1", False),
        ((b"Upgrade: websocket", b"Connection: keep-alive"), b"GET /ws HTTP/1.1", False),
        ((b"Connection: Upgrade",), b"GET /ws HTTP/1.1", False),
        ((b"Upgrade: websocketx", b"Connection: Upgrade"), b"GET /ws HTTP/1.1", False),
        ((b"Upgrade: h2c", b"Connection: Upgrade"), b"GET /ws HTTP/1.1", False),
        (
            (b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: 0"),
            b"POST /ws HTTP/1.1",
            False,
        ),
    ],
)
def test_websocket_detection(fields: tuple[bytes, ...], line: bytes, websocket: bool) -> None:
    assert head(request(b"Host: a", *fields, line=line)).websocket is websocket


@pytest.mark.parametrize(
    ("fields", "line", "upgrade"),
    [
        ((b"Upgrade: websocket", b"Connection: Upgrade"), b"GET /ws HTTP/1.1", True),
        ((b"Upgrade: websocket", b"Connection: Upgrade"), b"HEAD /ws HTTP/1.1", True),
        ((b"Upgrade: websocket", b"Connection: Upgrade"), b"OPTIONS /ws HTTP/1.1", True),
        ((b"Upgrade: websocket", b"Connection: Upgrade"), b"POST /ws HTTP/1.1", True),
        ((b"Upgrade: websocket",), b"GET /ws HTTP/1.1", True),  # lenient servers upgrade it
        ((b"Upgrade: h2c", b"Connection: Upgrade"), b"GET /ws HTTP/1.1", True),
        # Without Upgrade there is no protocol to switch to: no server can upgrade it.
        ((b"Connection: keep-alive, UPGRADE",), b"GET /ws HTTP/1.1", False),
        ((b"Connection: keep-alive",), b"GET /ws HTTP/1.1", False),
        ((), b"POST /ws HTTP/1.1", False),
    ],
)
def test_any_request_that_asks_to_upgrade(
    fields: tuple[bytes, ...], line: bytes, upgrade: bool
) -> None:
    assert head(request(b"Host: a", *fields, line=line)).upgrade is upgrade


def test_post_upgrade_keeps_its_body() -> None:
    data = (
        request(
            b"Host: a",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Content-Length: 3",
            line=b"POST /ws HTTP/1.1",
        )
        + b"abc"
    )
    sniffer = HeadSniffer()
    result = sniffer.feed(data)
    assert isinstance(result, Head) and not result.websocket
    assert sniffer.trailing == b"abc"


def test_http_1_0() -> None:
    got = head(b"GET /old HTTP/1.0\r\n\r\n")
    assert (got.version, got.host, got.path, got.websocket) == ("1.0", "", "/old", False)
    assert head(b"GET /old HTTP/1.0\r\nHost: A:1\r\n\r\n").host == "a"


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "big"]))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(
                st.sampled_from(
                    [
                        b"\r",
                        b"\n",
                        b"\x00",
                        b" ",
                        b"\t",
                        b"\r\n",
                        b":",
                        b"\r\n\r\n",
                        b"\x80",
                        b"Host: b\r\n",
                    ]
                )
            )
        elif kind == "big":
            size = draw(st.integers(min_value=MAX_HEAD_BYTES - 64, max_value=MAX_HEAD_BYTES + 64))
            data[at:at] = b"X-Big: " + b"b" * size + b"\r\n"
    return bytes(data)


fuzz_inputs = st.one_of(st.binary(max_size=300), mutated_heads())


@FUZZ
@given(data=fuzz_inputs)
def test_fuzz_never_raises_and_is_sane(data: bytes) -> None:
    assert_sane(data, sniff(data))


@FUZZ
@given(data=fuzz_inputs)
def test_fuzz_what_is_forwarded_reads_as_what_was_routed(data: bytes) -> None:
    """The server reads the forwarded head as routing did (same path, host, upgrade), and
    the forwarded head is in normal form: sniffing it again changes nothing."""
    sniffer = HeadSniffer()
    routed = sniffer.feed(data)
    if not isinstance(routed, Head):
        return
    again = HeadSniffer()
    seen = again.feed(sniffer.forward)
    assert isinstance(seen, Head), seen
    assert (seen.path, seen.host, seen.websocket, seen.upgrade, seen.origin) == (
        routed.path,
        routed.host,
        routed.websocket,
        routed.upgrade,
        routed.origin,
    )
    assert again.forward == sniffer.forward


@FUZZ
@given(data=fuzz_inputs, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_fuzz_split_gives_the_same_outcome(data: bytes, cuts: list[int]) -> None:
    """Reasons may name a different first problem; the status and the Head may not differ."""
    whole = sniff(data)
    result, sniffer = feed_chunks(split(data, cuts))
    assert_sane(sniffer.buffer, result)
    assert outcome(result) == outcome(whole)


def test_a_head_cannot_change_once_judged() -> None:
    """A kept-alive connection reuses the judgement of a head that repeats byte for byte
    (lb.worker.requests): nothing may change a Head after the sniffer made it."""
    event = HeadSniffer().feed(b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert isinstance(event, Head)
    with pytest.raises(AttributeError):
        event.path = "/b"  # type: ignore[misc]
    assert (event.method, event.path, event.host, event.head_len) == (
        "GET",
        "/a",
        "example.com",
        38,
    )


def test_a_host_seen_before_routes_as_the_first_time_and_the_kept_hosts_stay_bounded() -> None:
    def host_of(value: bytes) -> str | Reject:
        event = HeadSniffer().feed(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
        assert isinstance(event, (Head, Reject))
        return event.host if isinstance(event, Head) else event

    http1._HOSTS.clear()
    for value in (b"Example.COM:8080", b"[::1]:80", b"10.0.0.1", b"a..b", b"a%41"):
        first, again = host_of(value), host_of(value)
        assert first == again, value  # the kept answer is the answer
    assert host_of(b"Example.COM:8080") == "example.com"
    assert isinstance(host_of(b"a..b"), Reject)
    assert b"a..b" not in http1._HOSTS and b"a%41" not in http1._HOSTS  # only valid ones kept
    for i in range(3 * http1.MAX_HOSTS_KEPT):
        assert host_of(b"h%d.example" % i) == f"h{i}.example"
    assert 0 < len(http1._HOSTS) <= http1.MAX_HOSTS_KEPT
