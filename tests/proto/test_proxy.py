"""Tests of the PROXY protocol reader and headers: the specification's examples, every
rejection it asks for, headers split anywhere, and fuzzing."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.proto.events import NEED_DATA, NeedData
from lb.proto.proxy import (
    MAX_V1_BYTES,
    NOT_PROXY,
    V1_UNKNOWN,
    V2_LOCAL,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyReader,
    ProxyReject,
    check_header,
    header,
    looks_like_proxy,
)

Result = ProxyHeader | ProxyReject | NeedData
REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def read(data: bytes) -> Result:
    return ProxyReader().feed(data)


def reason(data: bytes) -> str:
    result = read(data)
    assert isinstance(result, ProxyReject), result
    return result.reason


def v2(command: int, family: int, block: bytes, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, size) + block


def v2_tcp4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, block + tlvs)


def feed_all(chunks: list[bytes]) -> tuple[Result, ProxyReader]:
    reader = ProxyReader()
    result: Result = NEED_DATA
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not NEED_DATA:
            break
    return result, reader


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---------------------------------------------------------------- version 1


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",  # the specification's example
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            ("255.255.255.255", 65535),
            ("255.255.255.255", 65535),
        ),
        (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 80\r\n", ("0.0.0.0", 0), ("10.0.0.1", 80)),
        (
            b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 4000 8080\r\n",  # written canonically here
            ("2001:db8::1", 4000),
            ("::1", 8080),
        ),
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 104 bytes
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
    ],
)
def test_v1_addresses(line: bytes, source: tuple[str, int], destination: tuple[str, int]) -> None:
    reader = ProxyReader()
    result = reader.feed(line + REQUEST)
    assert result == ProxyHeader(1, len(line), source, destination)
    assert reader.rest == REQUEST


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
        b"PROXY UNKNOWN anything at all, ignored\r\n",
    ],
)
def test_v1_unknown_keeps_the_real_addresses(line: bytes) -> None:
    reader = ProxyReader()
    assert reader.feed(line + b"x") == ProxyHeader(1, len(line))
    assert reader.rest == b"x"


def test_v1_longest_line_is_accepted_one_byte_more_is_not() -> None:
    longest = b"PROXY UNKNOWN " + b"f" * (MAX_V1_BYTES - 16) + b"\r\n"
    assert len(longest) == MAX_V1_BYTES
    assert read(longest) == ProxyHeader(1, MAX_V1_BYTES)
    longer = b"PROXY UNKNOWN " + b"f" * (MAX_V1_BYTES - 15) + b"\r\n"
    assert "longer than 107 bytes" in reason(longer)
    # Decided as soon as 107 bytes without a line end are in, not at the line end.
    assert "longer than 107 bytes" in reason(longer[:MAX_V1_BYTES])
    assert read(longer[: MAX_V1_BYTES - 1]) is NEED_DATA


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 x\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 80 443\r\n", "4 fields"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 80 443\r\n", "not IPv4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.256 80 443\r\n", "not IPv4"),
        (b"PROXY TCP4 ::1 ::1 80 443\r\n", "not IPv4"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 80 443\r\n", "not IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 80 443\r\n", "not IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 443\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 +443\r\n", "port"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 80 443\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 80 443\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n", "LF, not CRLF"),
        (b"PROXY UNKNOWN\n", "LF, not CRLF"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 80 443\r\n", "CR before its end"),
        (b"PROXY TCP4 1.2.3.4\r", "CR"),  # undecided only if the CR is the last byte
    ],
)
def test_v1_malformed_is_rejected(data: bytes, why: str) -> None:
    if data.endswith(b"\r") and not data.endswith(b"\n"):
        assert read(data) is NEED_DATA
        assert why in reason(data + b"x")
    else:
        assert why in reason(data)


@pytest.mark.parametrize(
    "data",
    [
        REQUEST,
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"proxy TCP4 1.2.3.4 5.6.7.8 80 443\r\n",
        b"PROXY\r\n",
        b"PROXYTCP4",
        b"PX",
        b"\r\n\r\n\x00\r\nQUIT\r",
        b"\r\nGET",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_anything_else_is_rejected_at_once(data: bytes) -> None:
    """Never guessed: a connection that does not start with a header is refused, as soon
    as its bytes cannot be one (not after a timeout)."""
    assert reason(data) == NOT_PROXY
    first_wrong = next(
        i for i in range(1, len(data) + 1) if isinstance(read(data[:i]), ProxyReject)
    )
    assert first_wrong <= 12


# ---------------------------------------------------------------- version 2


def test_v2_tcp4_with_tlvs_skipped_and_the_rest_kept() -> None:
    tlvs = b"\x02\x00\x0bexample.com" + b"\x20\x00\x05\x01\x00\x00\x00\x00"  # authority, SSL
    data = v2_tcp4("203.0.113.9", "10.0.0.1", 51000, 443, tlvs)
    reader = ProxyReader()
    result = reader.feed(data + REQUEST)
    assert result == ProxyHeader(2, len(data), ("203.0.113.9", 51000), ("10.0.0.1", 443))
    assert reader.rest == REQUEST


def test_v2_tcp6() -> None:
    block = (
        socket.inet_pton(socket.AF_INET6, "2001:db8::7")
        + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        + struct.pack("!HH", 40000, 8443)
    )
    data = v2(1, 0x21, block)
    assert read(data) == ProxyHeader(2, 16 + 36, ("2001:db8::7", 40000), ("2001:db8::1", 8443))


@pytest.mark.parametrize(
    ("command", "family", "block"),
    [
        (0, 0x00, b""),  # LOCAL: a health check of the proxy's own
        (0, 0x11, b"\x01" * 12),  # LOCAL with addresses: ignored
        (1, 0x00, b""),  # UNSPEC
        (1, 0x12, b"\x01" * 12),  # UDP over IPv4
        (1, 0x22, b"\x01" * 36),  # UDP over IPv6
        (1, 0x31, b"\x00" * 216),  # unix stream
        (1, 0x32, b""),  # unix datagram, even without its addresses: not decoded
    ],
)
def test_v2_keeps_the_real_addresses_when_it_relays_none(
    command: int, family: int, block: bytes
) -> None:
    data = v2(command, family, block)
    reader = ProxyReader()
    assert reader.feed(data + b"after") == ProxyHeader(2, len(data))
    assert reader.rest == b"after"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1, not 2"),
        (V2_SIGNATURE + b"\x30", "version 3, not 2"),
        (v2(2, 0x11, b"\x00" * 12), "command 2"),
        (v2(0xF, 0x11, b"\x00" * 12), "command 15"),
        (v2(1, 0x41, b"\x00" * 12), "0x41 is unknown"),
        (v2(1, 0x13, b"\x00" * 12), "0x13 is unknown"),
        (v2(1, 0x01, b""), "0x01 is unknown"),
        (v2(1, 0x11, b"\x00" * 11), "11 bytes, 12 needed"),
        (v2(1, 0x21, b"\x00" * 12), "12 bytes, 36 needed"),
    ],
)
def test_v2_malformed_is_rejected(data: bytes, why: str) -> None:
    assert why in reason(data)


def test_v2_waits_for_its_whole_length() -> None:
    data = v2(1, 0x11, b"\x01" * 12 + b"\x04\xff\xf0" + b"\x00" * 0xFFF0)  # a large NOOP TLV
    assert len(data) == 16 + 12 + 3 + 0xFFF0
    assert read(data[:-1]) is NEED_DATA
    result, reader = feed_all([data[:16], data[16:5000], data[5000:] + b"more"])
    assert isinstance(result, ProxyHeader) and result.length == len(data)
    assert reader.rest == b"more"


# ---------------------------------------------------------------- split anywhere


SEEDS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    v2_tcp4("198.51.100.2", "10.1.1.1", 1234, 80, b"\x04\x00\x02xx"),
    V2_LOCAL,
]


@pytest.mark.parametrize("data", SEEDS, ids=range(len(SEEDS)))
def test_byte_by_byte_equals_whole(data: bytes) -> None:
    expected = read(data + REQUEST)
    assert isinstance(expected, ProxyHeader) and expected.length == len(data)
    result, reader = feed_all([bytes([b]) for b in data + REQUEST])
    assert result == expected
    assert reader.buffer == data  # decided on its last byte: nothing after it read
    assert reader.rest == b""


@settings(max_examples=300, deadline=None)
@given(
    data=st.sampled_from(SEEDS),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_random_splits_equal_whole(data: bytes, tail: bytes, cuts: list[int]) -> None:
    whole = data + tail
    expected = read(whole)
    result, reader = feed_all(split(whole, cuts))
    assert result == expected
    assert reader.buffer + whole[len(reader.buffer) :] == whole
    assert reader.buffer[len(data) :] == reader.rest


@settings(max_examples=500, deadline=None)
@given(
    prefix=st.sampled_from([b"PROXY ", V2_SIGNATURE, V2_SIGNATURE + b"\x21", b""]),
    junk=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_fuzz_never_raises_and_does_not_depend_on_the_split(
    prefix: bytes, junk: bytes, cuts: list[int]
) -> None:
    data = prefix + junk
    whole = read(data)
    result, reader = feed_all(split(data, cuts))
    if isinstance(whole, ProxyReject):  # may be decided earlier on a prefix, same verdict kind
        assert isinstance(result, ProxyReject)
    else:
        assert result == whole
    if isinstance(result, ProxyHeader):
        assert result.length <= len(data)
        assert reader.rest == reader.buffer[result.length :]
        assert result.version == (1 if data.startswith(b"P") else 2)
        for address in (result.source, result.destination):
            if address is not None:
                ipaddress.ip_address(address[0])
                assert 0 <= address[1] <= 65535
        if result.version == 1:
            assert result.length <= MAX_V1_BYTES and data[result.length - 2 : result.length] == (
                b"\r\n"
            )
    elif result is NEED_DATA:
        assert len(data) < MAX_V1_BYTES or data.startswith(V2_SIGNATURE)


def test_feed_after_decision_raises() -> None:
    reader = ProxyReader()
    assert isinstance(reader.feed(SEEDS[0]), ProxyHeader)
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# ---------------------------------------------------------------- sending


addresses4 = st.ip_addresses(v=4).map(str)
# IPv4-mapped ones are sent as the IPv4 address they are (see the test below)
addresses6 = (
    st.ip_addresses(v=6)
    .filter(lambda a: a.ipv4_mapped is None)
    .map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))
)
ports = st.integers(min_value=0, max_value=65535)


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([1, 2]),
    pair=st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)),
    source_port=ports,
    destination_port=ports,
)
def test_what_is_sent_reads_back(
    version: int, pair: tuple[str, str], source_port: int, destination_port: int
) -> None:
    source, destination = (pair[0], source_port), (pair[1], destination_port)
    sent = header(version, source, destination)
    if version == 1:
        assert len(sent) <= MAX_V1_BYTES
    assert read(sent + b"x") == ProxyHeader(version, len(sent), source, destination)


def test_v1_and_v2_bytes() -> None:
    assert header(1, ("192.0.2.1", 5000), ("10.0.0.1", 80)) == (
        b"PROXY TCP4 192.0.2.1 10.0.0.1 5000 80\r\n"
    )
    assert header(2, ("192.0.2.1", 5000), ("10.0.0.1", 80)) == (
        V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 10, 0, 0, 1]) + b"\x13\x88\x00P"
    )
    # Socket addresses as the kernel gives them: IPv6 with flow info and scope id.
    assert header(1, ("::1", 5, 0, 0), ("::2", 6, 0, 0)) == b"PROXY TCP6 ::1 ::2 5 6\r\n"


def test_ipv4_clients_of_a_dual_stack_listener_are_sent_as_ipv4() -> None:
    source, destination = ("::ffff:192.0.2.1", 5000, 0, 0), ("::ffff:10.0.0.1", 80, 0, 0)
    assert header(1, source, destination) == b"PROXY TCP4 192.0.2.1 10.0.0.1 5000 80\r\n"
    assert read(header(2, source, destination)) == ProxyHeader(
        2, 28, ("192.0.2.1", 5000), ("10.0.0.1", 80)
    )


def test_ends_of_different_families_cannot_be_described() -> None:
    assert header(1, ("192.0.2.1", 1), ("::1", 2)) == V1_UNKNOWN
    sent = header(2, ("192.0.2.1", 1), ("::1", 2))
    assert read(sent) == ProxyHeader(2, 16)  # PROXY command, UNSPEC: the real addresses


def test_health_checks_say_the_connection_is_the_balancers_own() -> None:
    assert check_header(2) == V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL, UNSPEC, no addresses
    assert check_header(1) == b"PROXY UNKNOWN\r\n"
    assert read(check_header(2)) == ProxyHeader(2, 16)
    assert read(check_header(1)) == ProxyHeader(1, 15)


def test_looks_like_proxy() -> None:
    assert looks_like_proxy(SEEDS[0]) and looks_like_proxy(SEEDS[3])
    assert not looks_like_proxy(REQUEST)
    assert not looks_like_proxy(b"PROXY")  # not yet: a method could start so
    assert not looks_like_proxy(V2_SIGNATURE[:11])


@pytest.mark.parametrize("version", [1, 2])
def test_an_ipv4_client_of_a_dual_stack_listener_is_sent_as_ipv4(version: int) -> None:
    source, destination = ("::ffff:192.0.2.7", 5000), ("::ffff:10.0.0.1", 80)
    sent = header(version, source, destination)
    assert read(sent + b"x") == ProxyHeader(
        version, len(sent), ("192.0.2.7", 5000), ("10.0.0.1", 80)
    )
