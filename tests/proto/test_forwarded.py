"""Tests of the forwarded head: what a server behind the balancer reads about its client.

Heads are read back with the standard library's header parser (not llhttp,
which the sniffer uses), and fuzzed with fields the client forges in any case.
"""

from __future__ import annotations

import io
from http.client import parse_headers

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.proto.forwarded import forwarded_head
from lb.proto.http1 import Head, HeadSniffer
from lb.trusted import TrustedProxies

NOBODY = TrustedProxies(())
PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])
OURS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded")


def fields(head: bytes) -> list[tuple[str, str]]:
    """The head's fields, in order, as the standard library reads them."""
    message = parse_headers(io.BytesIO(head.split(b"\r\n", 1)[1]))
    return [(name, value) for name, value in message.items()]


def named(head: bytes, name: str) -> list[str]:
    return [value for key, value in fields(head) if key.lower() == name]


def forward(head: bytes, client: str, trusted: TrustedProxies) -> bytes:
    """The forwarded head as a worker makes it: the Host given is the one the sniffer read."""
    sniffed = HeadSniffer().feed(head)
    assert isinstance(sniffed, Head), sniffed
    return forwarded_head(head, client, sniffed.host_field, trusted)


def request(*lines: bytes, line: bytes = b"GET /ws HTTP/1.1") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in lines) + b"\r\n"


def test_the_client_address_scheme_and_host_are_added_before_the_blank_line() -> None:
    head = request(b"Host: chat.example.com", b"Upgrade: websocket", b"Connection: Upgrade")
    assert forward(head, "192.0.2.7", NOBODY) == head[:-2] + (
        b"X-Forwarded-For: 192.0.2.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: chat.example.com\r\n"
        b'Forwarded: for=192.0.2.7;proto=http;host="chat.example.com"\r\n\r\n'
    )


def test_ipv6_is_quoted_in_brackets_and_a_host_with_a_port_quoted() -> None:
    head = forward(request(b"Host: [2001:db8::1]:8443"), "2001:db8::7", NOBODY)
    assert named(head, "x-forwarded-for") == ["2001:db8::7"]
    assert named(head, "x-forwarded-host") == ["[2001:db8::1]:8443"]
    assert named(head, "forwarded") == ['for="[2001:db8::7]";proto=http;host="[2001:db8::1]:8443"']
    head = forward(request(b"Host: a.example  "), "192.0.2.7", NOBODY)  # whitespace llhttp kept
    assert named(head, "forwarded") == ['for=192.0.2.7;proto=http;host="a.example"']


def test_without_host_there_is_no_host_to_forward() -> None:
    head = forward(b"GET / HTTP/1.0\r\n\r\n", "192.0.2.7", NOBODY)
    assert fields(head) == [
        ("X-Forwarded-For", "192.0.2.7"),
        ("X-Forwarded-Proto", "http"),
        ("Forwarded", "for=192.0.2.7;proto=http"),
    ]


def test_the_host_given_is_forwarded_not_the_heads() -> None:
    head = forwarded_head(request(b"Host: other"), "192.0.2.7", b" routed.example ", NOBODY)
    assert named(head, "x-forwarded-host") == ["routed.example"]
    assert named(head, "host") == ["other"]  # the field itself is not the rewrite's business
    empty = forwarded_head(request(b"Host: other"), "192.0.2.7", b"", NOBODY)
    assert named(empty, "x-forwarded-host") == []


FORGED = (
    b"X-Forwarded-For: 6.6.6.6",
    b"x-forwarded-for: 7.7.7.7, 8.8.8.8",
    b"X-FORWARDED-PROTO: https",
    b"X-Forwarded-Host: evil.example",
    b"forwarded: for=6.6.6.6",
)


def test_an_untrusted_clients_copies_are_removed_everything_else_kept_byte_for_byte() -> None:
    head = request(
        b"Host: app.example",
        FORGED[0],
        b"X-Forwarded-Forx: kept, not ours",
        b"Cookie: forwarded=yes",
        *FORGED[1:],
        b"x-custom:   spaced value  ",
    )
    out = forward(head, "192.0.2.7", NOBODY)
    assert out == request(
        b"Host: app.example",
        b"X-Forwarded-Forx: kept, not ours",
        b"Cookie: forwarded=yes",
        b"x-custom:   spaced value  ",
        b"X-Forwarded-For: 192.0.2.7",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: app.example",
        b'Forwarded: for=192.0.2.7;proto=http;host="app.example"',
    )


def test_a_trusted_proxys_chain_is_extended() -> None:
    head = request(b"Host: app.example", *FORGED)
    out = forward(head, "10.1.2.3", PROXIES)
    assert named(out, "x-forwarded-for") == ["6.6.6.6", "7.7.7.7, 8.8.8.8, 10.1.2.3"]
    assert named(out, "forwarded") == ['for=6.6.6.6, for=10.1.2.3;proto=http;host="app.example"']
    # What the proxy saw of the original request stays as it said.
    assert named(out, "x-forwarded-proto") == ["https"]
    assert named(out, "x-forwarded-host") == ["evil.example"]


def test_a_trusted_proxy_without_fields_gets_ours_and_an_empty_field_its_first_element() -> None:
    out = forward(request(b"Host: a", b"X-Forwarded-For:  "), "2001:db8::5", PROXIES)
    assert named(out, "x-forwarded-for") == ["2001:db8::5"]
    assert named(out, "forwarded") == ['for="[2001:db8::5]";proto=http;host="a"']
    assert named(out, "x-forwarded-proto") == ["http"]


def test_a_dual_stack_listeners_ipv4_client_is_matched_as_ipv4() -> None:
    out = forward(request(b"Host: a", FORGED[0]), "::ffff:10.0.0.9", PROXIES)
    assert named(out, "x-forwarded-for") == ["6.6.6.6, ::ffff:10.0.0.9"]


# ---------------------------------------------------------------- fuzzing

field_names = st.sampled_from(
    [
        "X-Forwarded-For",
        "x-forwarded-for",
        "X-FORWARDED-PROTO",
        "x-Forwarded-Host",
        "Forwarded",
        "FORWARDED",
        "X-Forwarded",
        "Forwarded-For",
        "X-Real-IP",
        "Cookie",
        "Accept",
    ]
)
field_values = st.text(alphabet="abcXYZ019 .,;=:/[]\"'-", max_size=20).map(str.strip)
hosts = st.sampled_from(["", "a.example", "a.example:8080", "[::1]:80", "10.0.0.1", "x_y.z"])
clients = st.sampled_from(["192.0.2.7", "10.9.9.9", "2001:db8::1", "::1", "::ffff:10.0.0.1"])


@settings(max_examples=400, deadline=None)
@given(
    extra=st.lists(st.tuples(field_names, field_values), max_size=8),
    host=hosts,
    client=clients,
    trusted=st.booleans(),
    method=st.sampled_from(["GET", "POST", "HEAD"]),
)
def test_fuzz_the_forwarded_head_says_who_the_client_is(
    extra: list[tuple[str, str]], host: str, client: str, trusted: bool, method: str
) -> None:
    lines = [f"Host: {host}".encode()] + [f"{n}: {v}".encode() for n, v in extra]
    head = request(*lines, line=f"{method} /p?q=1 HTTP/1.1".encode())
    before = HeadSniffer().feed(head)
    assert isinstance(before, Head)
    out = forward(head, client, PROXIES if trusted else NOBODY)

    after = HeadSniffer().feed(out + b"first frame")
    assert isinstance(after, Head)  # still a valid head, and it ends where it should
    assert after.head_len == len(out)
    assert (after.method, after.target, after.host) == (before.method, before.target, before.host)
    got, sent = fields(out), [(n, v) for n, v in fields(head)]
    keep = trusted and client in PROXIES
    # Every field that is not ours, in its order, as it was.
    assert [f for f in got if f[0].lower() not in OURS] == [
        f for f in sent if f[0].lower() not in OURS
    ]
    xff = named(out, "x-forwarded-for")
    element = client if ":" not in client else f'"[{client}]"'
    if keep:
        forged = [v for n, v in sent if n.lower() == "x-forwarded-for"]
        assert xff[-1].endswith(client) and xff[:-1] == forged[:-1]
        assert named(out, "forwarded")[-1].split(", ")[-1].startswith(f"for={element};")
    else:
        assert xff == [client]
        assert named(out, "forwarded") == [
            f"for={element};proto=http" + (f';host="{host}"' if host else "")
        ]
        assert named(out, "x-forwarded-proto") == ["http"]
        assert named(out, "x-forwarded-host") == ([host] if host else [])


def test_the_fast_and_the_slow_way_agree() -> None:
    """A head that says "forwarded" only in a value takes the line-by-line way, with
    nothing to remove: the result is the same as the one-copy way's."""
    plain = request(b"Host: a.example:1", b"Accept: */*")
    mention = request(b"Host: a.example:1", b"Accept: */*", b"Referer: /forwarded")
    fast = forward(plain, "192.0.2.7", NOBODY)
    slow = forward(mention, "192.0.2.7", NOBODY)
    assert slow == fast.replace(b"Accept: */*\r\n", b"Accept: */*\r\nReferer: /forwarded\r\n")


@pytest.mark.parametrize("client", ["192.0.2.7", "10.0.0.1"])
def test_case_of_names_does_not_matter(client: str) -> None:
    out = forward(request(b"Host: a", b"X-fOrWaRdEd-FoR: 1.1.1.1"), client, NOBODY)
    assert named(out, "x-forwarded-for") == [client]
