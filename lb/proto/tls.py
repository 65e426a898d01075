"""Sans-I/O reader of a TLS ClientHello: the server name (SNI) a passthrough listener routes on.

Theory of operation
-------------------
A ``mode = "tls"`` listener routes a connection without decrypting it: the
worker feeds whatever ``recv`` returned to :meth:`HelloReader.feed` and gets
``NEED_DATA``, a :class:`ClientHello` (route on its ``server_name``, then
send :attr:`HelloReader.buffer`, every byte read, unchanged, to the server
first), or a :class:`HelloReject` (close the connection: nothing read from it
is ever forwarded).  No socket, clock or loop lives here; the timeout is the
worker's.

The bytes are TLS records (RFC 8446 section 5.1): a 5-byte header (content
type 22, handshake; version 3.x; length) and a fragment.  The ClientHello is
the first handshake message: a 4-byte header (type 1, 24-bit length) and its
body, which may be cut across any number of records (post-quantum key shares
make hellos of several kilobytes; a client may fragment at will), and those
records across any number of reads.  The reader:

* judges each record header once, as soon as its 5 bytes are in, and appends
  each complete record's fragment once to the handshake bytes, so every byte
  is looked at a bounded number of times whatever the split;
* rejects as early as the bytes allow: a first byte that is not 22 (plain
  HTTP, SSLv2's 2-byte header, anything else) at once, a message type or an
  announced length that cannot be a ClientHello within the cap as soon as
  the 4-byte handshake header is in;
* holds at most ``MAX_HELLO_BYTES`` (records' headers included): a hello
  that needs more is rejected, never read further;
* parses the body once it is all in, strictly: every length must fit in its
  parent exactly, no extension twice, at most one ``host_name`` and a valid
  DNS name in it.  A record that holds bytes after the ClientHello is
  rejected (nothing may follow it before the server's answer), but complete
  records after the hello's last one (TLS 1.3 early data) are not read: they
  are forwarded as they came.

The server name is returned in lower case without a trailing dot (RFC 6066
forbids the dot; clients that keep it from a URL are taken all the same).
``alpn`` lists the protocols offered, in the client's order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from lb.proto.events import NEED_DATA, NeedData

MAX_HELLO_BYTES: Final = 16384
"""What the reader holds at most: the records that carry the ClientHello, headers included."""

RECORD_HEADER: Final = 5
HANDSHAKE_HEADER: Final = 4
MAX_RECORD: Final = 1 << 14  # a TLSPlaintext fragment's limit (RFC 8446 section 5.1)

_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_SERVER_NAME: Final = 0  # extension types (IANA "TLS ExtensionType Values")
_ALPN: Final = 16
_HOST_NAME: Final = 0  # the only NameType of server_name
_CONTENT_TYPES: Final = {20: "change_cipher_spec", 21: "alert", 23: "application_data"}
# A DNS name: LDH labels (underscores tolerated, as certificates for them exist), dots between.
_NAME_RE: Final = re.compile(
    rb"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    rb"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
MAX_NAME: Final = 253


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A complete, well-formed ClientHello: what routing needs.

    ``server_name``: the SNI host name, lower case, without a trailing dot; None
    when the client sent none.  ``length``: the bytes of the records that carry it.
    """

    server_name: str | None
    alpn: tuple[str, ...]
    length: int


@dataclass(frozen=True, slots=True)
class HelloReject:
    """The bytes are not a ClientHello this side takes: close the connection."""

    reason: str


class _Malformed(Exception):
    """A length or value inside the ClientHello body is wrong (the message says which)."""


class HelloReader:
    """Feed bytes as they arrive; get NEED_DATA, a ClientHello, or a HelloReject."""

    __slots__ = ("_buf", "_done", "_handshake", "_read")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._read = 0  # bytes of _buf taken into _handshake: whole records only
        self._handshake = bytearray()  # the fragments of the records read so far
        self._done = False

    @property
    def buffer(self) -> bytes:
        """Every byte fed so far: what the server gets first, once a ClientHello is read."""
        return self._buf if isinstance(self._buf, bytes) else bytes(self._buf)

    def feed(self, data: bytes) -> ClientHello | HelloReject | NeedData:
        """Take the next bytes received; see the module's docstring for the contract."""
        if self._done:
            raise RuntimeError("HelloReader.feed() called after the hello was judged")
        if not self._buf:
            self._buf = data  # the usual case: the whole hello in one recv, no copy
        else:
            if isinstance(self._buf, bytes):
                self._buf = bytearray(self._buf)
            self._buf += data
        if not self._buf:
            return NEED_DATA
        result = self._records()
        if result is not NEED_DATA:
            self._done = True
        return result

    def _records(self) -> ClientHello | HelloReject | NeedData:
        buf, handshake = self._buf, self._handshake
        while True:
            at = self._read
            if not at and (problem := _first_bytes(buf)):
                return HelloReject(problem)
            header = buf[at : at + RECORD_HEADER]
            if len(header) >= 3 and (problem := _record_problem(header)):
                return HelloReject(problem)
            if len(header) < RECORD_HEADER:
                break
            size = header[3] << 8 | header[4]
            if size == 0:
                return HelloReject("empty TLS handshake record")
            if size > MAX_RECORD:
                return HelloReject(f"TLS record of {size} bytes, more than {MAX_RECORD}")
            end = at + RECORD_HEADER + size
            if end > MAX_HELLO_BYTES:
                return HelloReject(f"ClientHello larger than {MAX_HELLO_BYTES} bytes")
            if end > len(buf):
                break
            handshake += buf[at + RECORD_HEADER : end]
            self._read = end
            if len(handshake) >= HANDSHAKE_HEADER:  # the message's header: judged at once
                if problem := _message_problem(handshake):
                    return HelloReject(problem)
                length = HANDSHAKE_HEADER + int.from_bytes(handshake[1:4], "big")
                if len(handshake) > length:
                    return HelloReject("more data after the ClientHello in its record")
                if len(handshake) == length:
                    return _parse(bytes(handshake), end)
        if len(buf) >= MAX_HELLO_BYTES:
            return HelloReject(f"ClientHello larger than {MAX_HELLO_BYTES} bytes")
        return NEED_DATA


def _first_bytes(buf: bytes | bytearray) -> str | None:
    """Why the connection's first byte cannot start a TLS handshake, if it cannot (judged
    on that byte alone, so that the reason does not depend on how the bytes came)."""
    first = buf[0]
    if first == _HANDSHAKE:
        return None
    if first & 0x80:
        return "not TLS 1.0 or later: an SSLv2-style record header"
    if 0x41 <= first <= 0x5A:  # A-Z: GET, POST, PRI (HTTP/2's preface), ...
        return "not TLS: plain text (an HTTP request on a TLS port?)"
    name = _CONTENT_TYPES.get(first)
    if name is not None:
        return f"not a TLS handshake: a {name} record first"
    return f"not TLS: first byte 0x{first:02x} is not a handshake record"


def _record_problem(header: bytes | bytearray) -> str | None:
    """Why a record header (its first 3 bytes at least) cannot carry the ClientHello."""
    if header[0] != _HANDSHAKE:
        name = _CONTENT_TYPES.get(header[0], f"type {header[0]}")
        return f"a TLS {name} record within the ClientHello"
    if header[1] != 3 or header[2] > 4:
        return f"TLS record version 0x{header[1]:02x}{header[2]:02x} is not 3.0 to 3.4"
    return None


def _message_problem(handshake: bytes | bytearray) -> str | None:
    """Why the first handshake message (its 4-byte header in) is no ClientHello we take."""
    if handshake[0] != _CLIENT_HELLO:
        return f"first TLS handshake message is of type {handshake[0]}, not ClientHello"
    length = HANDSHAKE_HEADER + int.from_bytes(handshake[1:4], "big")
    # at least one record header in front of it, more if it needs more records
    records = -(-length // MAX_RECORD)
    if length + RECORD_HEADER * records > MAX_HELLO_BYTES:
        return f"ClientHello of {length} bytes, larger than {MAX_HELLO_BYTES} bytes"
    return None


def _parse(message: bytes, records_end: int) -> ClientHello | HelloReject:
    """The ClientHello in ``message`` (its handshake header included), complete."""
    if problem := _message_problem(message):
        return HelloReject(problem)
    try:
        server_name, alpn = _body(message)
    except _Malformed as exc:
        return HelloReject(f"malformed ClientHello: {exc}")
    return ClientHello(server_name, alpn, records_end)


def _vector(data: bytes, at: int, end: int, prefix: int, what: str, parent: str) -> int:
    """Where the vector at ``at`` (its length in ``prefix`` bytes, then its bytes) ends,
    checked to end by ``end``, the end of ``parent``."""
    if at + prefix > end:
        raise _Malformed(f"{what}'s length runs past the end of the {parent}")
    size = data[at] if prefix == 1 else data[at] << 8 | data[at + 1]
    stop = at + prefix + size
    if stop > end:
        raise _Malformed(f"{what} runs past the end of the {parent}")
    return stop


def _body(data: bytes) -> tuple[str | None, tuple[str, ...]]:
    """The server name and ALPN protocols of a ClientHello message (``data``, its handshake
    header included).  Offsets, not slices: one pass, no copy but of the name."""
    end = len(data)
    at = HANDSHAKE_HEADER + 2 + 32  # legacy_version, random
    if at > end:
        raise _Malformed("version and random runs past the end of the ClientHello")
    stop = _vector(data, at, end, 1, "session id", "ClientHello")
    if stop - at - 1 > 32:
        raise _Malformed("session id longer than 32 bytes")
    at, stop = stop, _vector(data, stop, end, 2, "cipher suites", "ClientHello")
    suites = stop - at - 2
    if not suites or suites % 2:
        raise _Malformed(f"cipher suites of {suites} bytes")
    at, stop = stop, _vector(data, stop, end, 1, "compression methods", "ClientHello")
    if stop - at == 1:
        raise _Malformed("no compression method")
    if stop == end:  # no extensions at all: an old client, and no SNI
        return None, ()
    at, stop = stop + 2, _vector(data, stop, end, 2, "extensions", "ClientHello")
    if stop != end:
        raise _Malformed(f"{end - stop} bytes after the extensions")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while at < end:
        if at + 4 > end:
            what = "extension type" if at + 2 > end else "extension's length"
            raise _Malformed(f"{what} runs past the end of the extensions")
        kind = data[at] << 8 | data[at + 1]
        stop = at + 4 + (data[at + 2] << 8 | data[at + 3])
        if stop > end:
            raise _Malformed(f"extension {kind} runs past the end of the extensions")
        if kind in seen:
            raise _Malformed(f"extension {kind} twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            server_name = _server_name(data, at + 4, stop)
        elif kind == _ALPN:
            alpn = _alpn(data, at + 4, stop)
        at = stop
    return server_name, alpn


def _server_name(data: bytes, at: int, end: int) -> str | None:
    """The host_name of a server_name extension (RFC 6066 section 3) in ``data[at:end]``."""
    stop = _vector(data, at, end, 2, "server name list", "server_name extension")
    if stop != end:
        raise _Malformed("bytes after the server name list")
    at += 2
    host: str | None = None
    while at < stop:
        kind = data[at]
        name_end = _vector(data, at + 1, stop, 2, "server name", "server name list")
        if kind == _HOST_NAME:  # no other type is defined; the RFC says to ignore others
            if host is not None:
                raise _Malformed("two host names in server_name")
            name = data[at + 3 : name_end]
            host = normalize_server_name(name)
            if host is None:
                raise _Malformed(f"server name {name[:64]!r} is not a DNS host name")
        at = name_end
    return host


def _alpn(data: bytes, at: int, end: int) -> tuple[str, ...]:
    """The protocols of an application_layer_protocol_negotiation extension (RFC 7301)."""
    stop = _vector(data, at, end, 2, "ALPN protocol list", "ALPN extension")
    if stop != end:
        raise _Malformed("bytes after the ALPN protocol list")
    at += 2
    found = []
    while at < stop:
        name_end = _vector(data, at, stop, 1, "ALPN protocol", "ALPN protocol list")
        if name_end == at + 1:
            raise _Malformed("empty ALPN protocol name")
        found.append(data[at + 1 : name_end].decode("latin-1"))
        at = name_end
    return tuple(found)


def normalize_server_name(name: bytes) -> str | None:
    """A host name in the form routes compare: lower case, without a trailing dot; None
    when it is not a DNS name (empty, too long, a character outside letters, digits,
    '-', '_' and '.', an empty label)."""
    name = name.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME or not _NAME_RE.fullmatch(name):
        return None
    return name.decode("ascii")
