"""The request stream, byte by byte: what of a client's bytes goes to its server, and why not."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.proto.http1 import Head, HeadSniffer, Reject
from lb.worker.requests import CLOSE, HEAD, REFUSED, TUNNEL, RequestStream


@dataclass
class Judge:
    """Routes Host ``a`` to the connection's server, anything else elsewhere."""

    judged: list[str] = field(default_factory=list)
    forwarded: list[bytes] = field(default_factory=list)

    def next_request(self, event: Head | Reject, raw: bytes) -> str | None:
        if isinstance(event, Reject):
            return f"{event.reason} ({event.status})"
        self.judged.append(event.target)
        return None if event.host == "a" else f"routed to backend {event.host}"

    def forward_head(self, head: Head, raw: bytes) -> bytes:
        self.forwarded.append(raw)
        return raw

    def request_refused(self, reason: str) -> None:
        pass

    def request_upgraded(self, head: Head) -> None:
        pass


def get(path: str, host: str = "a", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra)


def post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        len(body),
        body,
    )


def chunked(path: str, chunks: list[bytes]) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" % path.encode()
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"


def stream_after(first: bytes, judge: Judge) -> RequestStream:
    """A stream that follows ``first``, judged and forwarded by the connection."""
    sniffer = HeadSniffer()
    head = sniffer.feed(first)
    assert isinstance(head, Head)
    stream = RequestStream(judge)
    raw = first[: head.head_len]
    stream.first(head, raw, (sniffer.body, sniffer.keep_alive, sniffer.upgrade), raw)
    return stream


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % len(data) for c in cuts} - {0}) if data else []
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def forward(stream: RequestStream, data: bytes, cuts: list[int] | None = None) -> bytes:
    """Feed ``data`` (cut at ``cuts``); what goes to the server."""
    outs = (stream.feed(piece) for piece in pieces(data, cuts or []))
    return b"".join(bytes(out) for out_list in outs for out in out_list)


BODY = st.lists(
    st.one_of(st.binary(max_size=30), st.sampled_from([b"\r\n\r\n", get("/inside", "b")])),
    max_size=4,
).map(b"".join)
REQUEST = st.one_of(
    st.builds(get, st.sampled_from(["/", "/x", "/y?q=1"])),
    st.builds(post, st.just("/p"), BODY),
    st.builds(chunked, st.just("/c"), st.lists(BODY, max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(REQUEST, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0), max_size=10),
)
def test_requests_for_the_server_all_go_as_they_came(
    requests: list[bytes], cuts: list[int]
) -> None:
    """However the bytes arrive (pipelined, or one at a time), each request is judged once
    and the server gets exactly what the client sent, request boundaries unmoved."""
    judge = Judge()
    stream = stream_after(get("/first"), judge)
    data = b"".join(requests)
    assert forward(stream, data, cuts) == data
    assert (stream.state, stream.sniffer, stream.requests) == (HEAD, None, 1 + len(requests))
    assert len(judge.judged) <= len(requests)  # a head that repeats is not judged again


def test_a_head_that_repeats_is_judged_and_made_once() -> None:
    judge = Judge()
    stream = stream_after(get("/same"), judge)
    assert forward(stream, get("/same") * 3 + get("/other") + get("/other")) == (
        get("/same") * 3 + get("/other") * 2
    )
    assert judge.judged == ["/other"]
    assert judge.forwarded == [get("/other")]


def test_a_request_for_elsewhere_stops_the_stream_there() -> None:
    stream = stream_after(get("/1"), Judge())
    data = post("/2", b"body") + get("/3", "b") + get("/4")
    assert forward(stream, data) == post("/2", b"body")
    assert stream.state == REFUSED
    assert stream.reason == "request 3 not forwarded: routed to backend b"
    assert forward(stream, get("/5")) == b""  # nothing more, ever


def test_a_malformed_head_is_not_forwarded() -> None:
    stream = stream_after(get("/1"), Judge())
    assert forward(stream, b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n\x16\x03\x01\r\n\r\n") == get("/2")
    assert stream.state == REFUSED
    assert stream.reason.startswith("request 3 not forwarded: ") and "(400)" in stream.reason


def test_a_malformed_chunked_body_cuts_its_request_short() -> None:
    stream = stream_after(get("/1"), Judge())
    head = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert forward(stream, head + b"3\r\nabc\r\n") == head + b"3\r\nabc\r\n"
    assert forward(stream, b"zz\r\n" + get("/after")) == b""
    assert stream.state == REFUSED
    assert stream.reason.startswith("request 2 cut short: malformed chunked body: ")


def test_after_an_upgrade_request_the_rest_is_not_parsed() -> None:
    stream = stream_after(get("/page"), Judge())
    upgrade = get("/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    frames = b"\x81\x85abcd" + get("/not-a-request", "b")
    assert forward(stream, upgrade + frames, [len(upgrade) + 3]) == upgrade + frames
    assert stream.state == TUNNEL


def test_a_first_request_that_closes_leaves_nothing_to_forward() -> None:
    stream = stream_after(get("/last", extra=b"Connection: close\r\n"), Judge())
    assert stream.state == CLOSE
    assert forward(stream, get("/never")) == b""


def test_after_a_request_that_closes_nothing_more_goes() -> None:
    stream = stream_after(get("/1"), Judge())
    last = post("/2", b"12345")[:-5].replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    assert forward(stream, last + b"12345" + get("/3")) == last + b"12345"
    assert stream.state == CLOSE


def test_a_head_in_pieces_is_held_until_whole() -> None:
    stream = stream_after(get("/1"), Judge())
    head = get("/2")
    assert forward(stream, head[:10]) == b""
    assert stream.sniffer is not None  # begun: the flow gives it head_timeout
    assert forward(stream, head[10:] + head[:5]) == head
    assert forward(stream, head[5:]) == head
    assert stream.sniffer is None and stream.requests == 3


def test_a_refusal_names_the_next_request() -> None:
    stream = stream_after(get("/1"), Judge())
    forward(stream, get("/2") + b"GET /3 HTTP")
    stream.refuse("request head not complete within 5 s")
    assert stream.reason == "request 3 not forwarded: request head not complete within 5 s"
    assert forward(stream, b"/1.1\r\nHost: a\r\n\r\n") == b""
