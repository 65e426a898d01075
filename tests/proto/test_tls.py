"""Tests of the ClientHello reader: real hellos, records and reads of every size, rejections,
the cap, fuzzing."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.proto.tls import (
    MAX_HELLO_BYTES,
    NEED_DATA,
    ClientHello,
    HelloReader,
    HelloReject,
    NeedData,
    normalize_server_name,
)

Result = ClientHello | HelloReject | NeedData

HELLOS = Path(__file__).resolve().parent / "hellos"
BIG_ALPN = tuple(f"{i:03d}" + "p" * 197 for i in range(40))

# file name -> (server name, ALPN protocols)
EXPECTED: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "python-3.11-sni-alpn.bin": ("a.example.com", ("h2", "http/1.1")),
    "python-3.11-no-sni.bin": (None, ()),
    "openssl-3.0-s_client-sni.bin": ("b.example", ()),
    "openssl-3.0-s_client-no-sni.bin": (None, ()),
    "openssl-3.0-s_client-tls1.2.bin": ("b.example", ()),
    "curl-7.88-sni.bin": ("a.example", ("h2", "http/1.1")),
    "python-3.11-8k-alpn.bin": ("big.example", BIG_ALPN),
}
TOO_BIG = "python-3.11-20k-alpn.bin"


def hello_bytes(name: str) -> bytes:
    return (HELLOS / name).read_bytes()


# -- building hellos -----------------------------------------------------------------


def vector(prefix: int, data: bytes) -> bytes:
    return len(data).to_bytes(prefix, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack("!H", kind) + vector(2, data)


def sni_extension(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + vector(2, name) for name in names)
    return extension(0, vector(2, entries))


def alpn_extension(*protocols: bytes) -> bytes:
    return extension(16, vector(2, b"".join(vector(1, p) for p in protocols)))


def body(extensions: bytes | None, suites: bytes = b"\x13\x01\x13\x02") -> bytes:
    fixed = b"\x03\x03" + bytes(32) + vector(1, bytes(32)) + vector(2, suites) + b"\x01\x00"
    return fixed if extensions is None else fixed + vector(2, extensions)


def message(hello_body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + len(hello_body).to_bytes(3, "big") + hello_body


def records(data: bytes, size: int = 16384, version: bytes = b"\x03\x01") -> bytes:
    """``data`` (handshake bytes) cut into handshake records of ``size`` bytes."""
    return b"".join(
        b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
        for chunk in (data[i : i + size] for i in range(0, len(data), size))
    )


def hello(*extensions: bytes, size: int = 16384) -> bytes:
    return records(message(body(b"".join(extensions))), size)


def refragment(data: bytes, size: int) -> bytes:
    """A captured hello's handshake message in records of ``size`` bytes."""
    handshake = b""
    at = 0
    while at < len(data):
        length = struct.unpack_from("!H", data, at + 3)[0]
        handshake += data[at + 5 : at + 5 + length]
        at += 5 + length
    return records(handshake, size)


def read(data: bytes) -> Result:
    return HelloReader().feed(data)


def feed_all(chunks: list[bytes]) -> tuple[Result, HelloReader]:
    reader = HelloReader()
    result: Result = NEED_DATA
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not NEED_DATA:
            break
    return result, reader


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def rejected(data: bytes) -> str:
    result = read(data)
    assert isinstance(result, HelloReject), result
    return result.reason


SYNTHETIC = [
    hello(sni_extension(b"sni.example"), alpn_extension(b"h2")),
    hello(sni_extension(b"Upper.Example."), size=7),
    records(message(body(None))),  # no extensions at all
    hello(extension(21, bytes(300)), sni_extension(b"x.y"), size=100),  # padding first
]
SEEDS = [hello_bytes(name) for name in sorted(EXPECTED)] + SYNTHETIC


# -- real clients ----------------------------------------------------------------------


def test_every_captured_hello_is_covered() -> None:
    on_disk = {p.name for p in HELLOS.iterdir() if p.suffix == ".bin"}
    assert on_disk == {*EXPECTED, TOO_BIG}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_captured_hello_is_read(name: str) -> None:
    data = hello_bytes(name)
    reader = HelloReader()
    result = reader.feed(data)
    assert result == ClientHello(*EXPECTED[name], length=len(data))
    assert reader.buffer == data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_byte_by_byte_equals_whole(name: str) -> None:
    data = hello_bytes(name)
    result, reader = feed_all([data[i : i + 1] for i in range(len(data))])
    assert result == read(data)
    assert reader.buffer == data  # decided on the last byte, not before


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_truncation_needs_more(name: str) -> None:
    data = hello_bytes(name)
    step = max(1, len(data) // 300)
    for end in range(0, len(data), step):
        assert read(data[:end]) is NEED_DATA


@pytest.mark.parametrize("size", [1, 2, 5, 100, 512, 1400])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hello_cut_into_records_reads_the_same(name: str, size: int) -> None:
    """A hello over many records (a post-quantum hello, a client that fragments)."""
    data = refragment(hello_bytes(name), size)
    if len(data) > MAX_HELLO_BYTES:  # 1-byte records of the 8 KiB hello: six times the bytes
        assert "larger than" in rejected(data)
        return
    result = read(data)
    assert result == ClientHello(*EXPECTED[name], length=len(data))


def test_the_20k_hello_is_refused_as_soon_as_its_first_record_is_announced() -> None:
    data = hello_bytes(TOO_BIG)
    assert data[3:5] == b"\x40\x00"  # OpenSSL cut it into two records, the first full
    assert read(data[:4]) is NEED_DATA
    assert read(data[:5]) == HelloReject(f"ClientHello larger than {MAX_HELLO_BYTES} bytes")


def test_records_after_the_hello_are_not_read() -> None:
    """TLS 1.3 early data may follow the hello at once: forwarded as it came, unjudged."""
    data = hello_bytes("curl-7.88-sni.bin")
    early = b"\x17\x03\x03\x00\x05hello" + b"\xff" * 20
    reader = HelloReader()
    result = reader.feed(data + early)
    assert isinstance(result, ClientHello) and result.length == len(data)
    assert reader.buffer == data + early


@settings(max_examples=300, deadline=None)
@given(data=st.sampled_from(SEEDS), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_random_splits_equal_whole(data: bytes, cuts: list[int]) -> None:
    result, reader = feed_all(split(data, cuts))
    assert result == read(data)
    assert isinstance(result, ClientHello)
    assert reader.buffer + data[len(reader.buffer) :] == data


# -- server names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "read_as"),
    [
        (b"a.example", "a.example"),
        (b"A.EXAMPLE.", "a.example"),  # RFC 6066 forbids the dot; taken all the same
        (b"_srv.x-y.example", "_srv.x-y.example"),
        (b"localhost", "localhost"),
        (b"a" * 63 + b".example", "a" * 63 + b".example".decode()),
    ],
)
def test_server_name_is_normalized(sent: bytes, read_as: str) -> None:
    result = read(hello(sni_extension(sent)))
    assert isinstance(result, ClientHello) and result.server_name == read_as
    assert normalize_server_name(sent) == read_as


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b".",
        b"a..b",
        b".a",
        b"a b",
        b"a/b",
        b"caf\xc3\xa9.example",
        b"-a.example",
        b"a-.example",
        b"a" * 64 + b".example",
        (b"a" * 60 + b".") * 5,
        b"a\x00b",
        b"*.example",
    ],
)
def test_server_name_that_is_no_host_name_is_refused(sent: bytes) -> None:
    assert "is not a DNS host name" in rejected(hello(sni_extension(sent)))


def test_other_name_types_are_ignored() -> None:
    result = read(hello(sni_extension(b"\x01\x02", name_type=7)))
    assert isinstance(result, ClientHello) and result.server_name is None


# -- rejections ----------------------------------------------------------------------------

GOOD = SYNTHETIC[0]
GOOD_BODY = body(sni_extension(b"sni.example"))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "not TLS: plain text (an HTTP request on a TLS port?)",
        ),
        (b"PRI * HTTP/2.0\r\n", "not TLS: plain text (an HTTP request on a TLS port?)"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not TLS: plain text (an HTTP request on a TLS port?)"),
        (bytes.fromhex("802e0103010015"), "not TLS 1.0 or later: an SSLv2-style record header"),
        (b"\x00", "not TLS: first byte 0x00 is not a handshake record"),
        (b"\x15\x03\x03\x00\x02\x02\x28", "not a TLS handshake: a alert record first"),
        (b"\x17\x03\x03", "not a TLS handshake: a application_data record first"),
        (b"\x16\x02\x00", "TLS record version 0x0200 is not 3.0 to 3.4"),
        (b"\x16\x03\x05", "TLS record version 0x0305 is not 3.0 to 3.4"),
        (b"\x16\x03\x01\x00\x00", "empty TLS handshake record"),
        (b"\x16\x03\x01\x40\x01", "TLS record of 16385 bytes, more than 16384"),
        (
            records(message(GOOD_BODY, kind=2)),
            "first TLS handshake message is of type 2, not ClientHello",
        ),
        (records(b"\x01\x00\x40\x00"), "ClientHello of 16388 bytes, larger than 16384 bytes"),
        (records(message(GOOD_BODY) + b"\x00"), "more data after the ClientHello in its record"),
        (
            SYNTHETIC[1][:12] + b"\x15\x03\x03\x00\x02\x02\x28",
            "a TLS alert record within the ClientHello",
        ),
    ],
)
def test_rejected_at_once(data: bytes, reason: str) -> None:
    assert rejected(data) == reason


def test_garbage_is_refused_on_its_first_byte() -> None:
    for first in range(256):
        if first != 0x16:
            assert isinstance(read(bytes([first])), HelloReject)
    assert read(b"\x16") is NEED_DATA


def test_hello_fragmented_past_the_cap_is_refused() -> None:
    """1-byte records: the records' headers count against the cap, so reading stops."""
    many = records(message(body(extension(21, bytes(5000)))), 1)
    result, reader = feed_all([many[i : i + 1000] for i in range(0, len(many), 1000)])
    assert result == HelloReject(f"ClientHello larger than {MAX_HELLO_BYTES} bytes")
    assert len(reader.buffer) < MAX_HELLO_BYTES + 1000


@pytest.mark.parametrize(
    ("hello_body", "reason"),
    [
        (b"\x03\x03" + bytes(20), "version and random runs past the end of the ClientHello"),
        (b"\x03\x03" + bytes(32) + b"\x21" + bytes(40), "session id longer than 32 bytes"),
        (b"\x03\x03" + bytes(32) + b"\x00\x00\x03\x13\x01\x00\x01\x00", "cipher suites of 3 bytes"),
        (b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x00", "no compression method"),
        (body(b"") + b"\x00", "1 bytes after the extensions"),
        (body(None) + b"\x00\x05\x00", "extensions runs past the end of the ClientHello"),
        (body(sni_extension(b"a") + sni_extension(b"b")), "extension 0 twice"),
        (body(sni_extension(b"a", b"b")), "two host names in server_name"),
        (
            body(extension(0, b"\x00\x05\x00\x00\x01a")),
            "server name list runs past the end of the server_name extension",
        ),
        (
            body(extension(0, vector(2, b"\x00\x00\x01a") + b"x")),
            "bytes after the server name list",
        ),
        (body(alpn_extension(b"")), "empty ALPN protocol name"),
        (
            body(extension(16, b"\x00\x03\x05ab")),
            "ALPN protocol runs past the end of the ALPN protocol list",
        ),
        (body(b"\x00"), "extension type runs past the end of the extensions"),
    ],
)
def test_malformed_body(hello_body: bytes, reason: str) -> None:
    assert rejected(records(message(hello_body))) == f"malformed ClientHello: {reason}"


def test_feed_after_decision_raises() -> None:
    reader = HelloReader()
    assert isinstance(reader.feed(GOOD), ClientHello)
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_empty_feed_needs_data() -> None:
    reader = HelloReader()
    assert reader.feed(b"") is NEED_DATA
    assert isinstance(reader.feed(GOOD), ClientHello)


# -- fuzzing ---------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if draw(st.booleans()):
        data = bytearray(refragment(bytes(data), draw(st.integers(min_value=1, max_value=600))))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x01, 0x16, 0x40, 0x80]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
    return bytes(data)


fuzz_inputs = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + b),
    mutated_hellos(),
)


def assert_sane(data: bytes, result: Result) -> None:
    if result is NEED_DATA:
        assert len(data) < MAX_HELLO_BYTES
    elif isinstance(result, HelloReject):
        assert result.reason and "\n" not in result.reason and len(result.reason) < 200
    else:
        assert isinstance(result, ClientHello)
        assert data[0] == 0x16 and 0 < result.length <= min(len(data), MAX_HELLO_BYTES)
        if result.server_name is not None:
            assert normalize_server_name(result.server_name.encode()) == result.server_name


@FUZZ
@given(data=fuzz_inputs)
def test_fuzz_never_raises_and_is_sane(data: bytes) -> None:
    reader = HelloReader()
    result = reader.feed(data)
    assert_sane(data, result)
    assert reader.buffer == data


@FUZZ
@given(data=fuzz_inputs, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_fuzz_split_gives_the_same_outcome(data: bytes, cuts: list[int]) -> None:
    whole = read(data)
    result, reader = feed_all(split(data, cuts))
    assert_sane(reader.buffer, result)
    assert result == whole  # the hello, or the same reason: judged the same way in any split
