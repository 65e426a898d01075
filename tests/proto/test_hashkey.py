"""Reading the hashed key from a request head: the named header, cookie or query parameter,
or None (the address is hashed then)."""

from __future__ import annotations

import pytest

from lb.config import HashKey
from lb.proto.hashkey import KeyReader
from lb.proto.http1 import Head, HeadSniffer


def read(key: str, request: bytes) -> bytes | None:
    source, _, name = key.partition(":")
    sniffer = HeadSniffer()
    head = sniffer.feed(request)
    assert isinstance(head, Head), head
    return KeyReader(HashKey(source, name)).read(head, sniffer.buffer)


def get(target: str = "/", *headers: str, body: bytes = b"") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: example.com", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("request_", "value"),
    [
        (get("/", "Cookie: sid=abc"), b"abc"),
        (get("/", "cookie: theme=dark; sid=abc; lang=en"), b"abc"),
        (get("/", "Cookie: a=1", "X-Other: 2", "COOKIE: sid=abc"), b"abc"),  # any Cookie header
        (get("/", "Cookie:sid=abc  "), b"abc"),
        (get("/", 'Cookie: sid="q v"'), b'"q v"'),  # as sent, quotes and all
        (get("/", "Cookie: xsid=abc; sidx=1; SID=2"), None),  # names are exact, case too
        (get("/", "Cookie: sid="), None),  # empty: no session
        (get("/", "Cookie: sid"), None),
        (get("/", "X-Cookie: sid=abc"), None),
        (get("/?sid=abc"), None),
        (get("/", "Content-Length: 12", body=b"Cookie: sid=x"), None),  # the body is not read
    ],
)
def test_cookie(request_: bytes, value: bytes | None) -> None:
    assert read("cookie:sid", request_) == value


@pytest.mark.parametrize(
    ("request_", "value"),
    [
        (get("/", "X-Session-Id: 42"), b"42"),
        (get("/", "x-session-id:   Mixed Case 42 \t"), b"Mixed Case 42"),
        (get("/", "X-Session-Id: 1", "X-Session-Id: 2"), b"1"),  # the first
        (get("/", "X-Session-Id:", "X-Session-Id: 2"), b"2"),  # the first with a value
        (get("/", "X-Session-Id-2: 1"), None),
        (get("/", "X-Session: 1"), None),
        (get("/X-Session-Id:1"), None),  # the request line is not a header
    ],
)
def test_header(request_: bytes, value: bytes | None) -> None:
    assert read("header:X-Session-Id", request_) == value


@pytest.mark.parametrize(
    ("target", "value"),
    [
        ("/socket.io/?EIO=4&transport=polling&sid=abc", b"abc"),
        ("/?sid=abc", b"abc"),
        ("/?sid=a%20b&sid=2", b"a%20b"),  # the first, raw
        ("http://example.com/x?sid=abc", b"abc"),  # absolute-form
        ("/?xsid=abc&sidx=1&SID=2", None),
        ("/?sid=", None),
        ("/?sid", None),
        ("/sid=abc", None),
        ("/", None),
    ],
)
def test_query(target: str, value: bytes | None) -> None:
    assert read("query:sid", get(target, "Cookie: sid=other")) == value


def test_source_is_not_read_from_the_request() -> None:
    with pytest.raises(ValueError, match="source"):
        KeyReader(HashKey("source"))
