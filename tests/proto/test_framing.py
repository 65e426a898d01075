"""Tests of request framing: a head's body, keep-alive and upgrade, and a chunked body's end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.proto.http1 import CHUNKED, ChunkedBody, Head, HeadSniffer, Reject

NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def framing(data: bytes) -> tuple[int, bool, bool]:
    sniffer = HeadSniffer()
    assert isinstance(sniffer.feed(data), Head)
    return sniffer.body, sniffer.keep_alive, sniffer.upgrade


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", (0, True, False)),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (0, False, False)),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", (0, False, False)),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n", (0, True, False)),
        (b"GET / HTTP/1.0\r\n\r\n", (0, False, False)),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", (0, True, False)),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n", (10, True, False)),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", (0, True, False)),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            (CHUNKED, True, False),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            (CHUNKED, True, False),
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            (0, True, True),
        ),
        (  # any method: what llhttp, and servers built on it, switch protocols for
            b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            (0, True, True),
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", (0, True, False)),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n\r\n", (0, True, False)),
    ],
)
def test_a_head_says_how_its_body_is_framed(data: bytes, expected: tuple[int, bool, bool]) -> None:
    assert framing(data) == expected


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Content-Length: 3\r\nContent-Length: 3\r\n",
        b"Content-Length: -1\r\n",
    ],
)
def test_a_body_that_cannot_be_framed_is_rejected(fields: bytes) -> None:
    result = HeadSniffer().feed(b"POST / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert isinstance(result, Reject) and result.status == 400, result


def chunked_body(chunks: list[bytes], extensions: bool, trailers: bool) -> bytes:
    ext = b";name=value" if extensions else b""
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks if c)
    trailer = b"X-Checksum: 1\r\nX-More: 2\r\n" if trailers else b""
    return body + b"0" + ext + b"\r\n" + trailer + b"\r\n"


def body_end(pieces: list[bytes]) -> int | Reject:
    """Feed the pieces; the offset of the body's end in their concatenation."""
    body, offset = ChunkedBody(), 0
    for piece in pieces:
        end = body.feed(piece)
        if isinstance(end, Reject):
            return end
        if end >= 0:
            return offset + end
        offset += len(piece)
    return -1


ANNOYING = st.sampled_from([b"\r\n\r\n", b"\r\n", b"\r", b"\n", b"0\r\n\r\n", NEXT])
CHUNK = st.lists(st.one_of(st.binary(max_size=40), ANNOYING), max_size=4).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    chunks=st.lists(CHUNK, max_size=6),
    extensions=st.booleans(),
    trailers=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_a_chunked_body_ends_where_it_ends_however_it_arrives(
    chunks: list[bytes], extensions: bool, trailers: bool, cuts: list[int]
) -> None:
    """Its data may hold a CRLF CRLF, the last chunk's bytes, a whole request: the end is
    the end all the same, and the request after it is not taken for body."""
    body = chunked_body(chunks, extensions, trailers)
    data = body + NEXT
    points = sorted({c % len(data) for c in cuts} - {0})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert body_end(pieces) == len(body)


def test_a_body_that_is_not_chunked_is_rejected() -> None:
    end = body_end([b"3\r\nabc\r\n", b"zz\r\n"])
    assert isinstance(end, Reject) and end.status == 400
    assert end.reason.startswith("malformed chunked body: "), end.reason


def test_a_body_that_has_ended_takes_nothing_more() -> None:
    body = ChunkedBody()
    assert body.feed(b"0\r\n\r\n") == 5
    with pytest.raises(RuntimeError):
        body.feed(NEXT)
