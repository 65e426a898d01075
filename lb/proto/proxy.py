"""Sans-I/O PROXY protocol, versions 1 and 2 (HAProxy's ``doc/proxy-protocol.txt``).

A listener with ``accept_proxy`` reads the header a trusted proxy puts in
front of a connection with :class:`ProxyReader`; a backend with
``send_proxy`` puts one in front of what the balancer forwards with
:func:`header`, and its health checks with :func:`check_header`.

Theory of operation
-------------------
The worker feeds whatever ``recv`` returned to :meth:`ProxyReader.feed` and
gets ``NEED_DATA``, a :class:`ProxyHeader` (the bytes that came after it are
in :attr:`ProxyReader.rest`: a request head, or a tcp client's first bytes),
or a :class:`ProxyReject` (close the connection).  No socket, clock or loop
lives here; the timeout is the worker's.

It never guesses (the specification's rule: a receiver that guessed would
let anyone spoof an address): the first bytes must be ``PROXY `` (version 1)
or the 12-byte signature (version 2); as soon as the bytes fed can no longer
start either, the answer is a rejection, without waiting for more.

* Version 1 is one line of at most ``MAX_V1_BYTES`` bytes, CRLF included; no
  CRLF within them is a rejection, and so is a lone CR or LF before it.
  ``TCP4``/``TCP6`` lines must carry canonical addresses of their family and
  ports without leading zeros; ``UNKNOWN`` lines are taken whatever follows
  the keyword, and the connection keeps its real addresses.
* Version 2 is 16 bytes, then the length they announce (at most 65,535
  bytes): nothing is decoded before all of it has arrived.  ``LOCAL`` (the
  proxy's own connection, such as a health check) and families this side
  does not use (``UNSPEC``, UDP, unix sockets) keep the real addresses, as
  the specification allows; TCP over IPv4 or IPv6 gives the client's.  TLVs
  after the addresses are skipped, unread.

Each byte is looked at a bounded number of times: version 1 searches its
line end in the first ``MAX_V1_BYTES`` bytes, version 2 decodes once its
announced length is in.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any, Final

from lb.proto.events import NEED_DATA, NeedData

MAX_V1_BYTES: Final = 107  # "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n", the longest line
V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16  # signature, version and command, family, length
NOT_PROXY: Final = "not a PROXY header"  # a ProxyReject's reason when neither version starts

Address = tuple[str, int]  # (host, port), the host as the kernel formats it

_V2_HEAD = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21
# Families this side keeps the real addresses for: UNSPEC, UDP over IPv4/IPv6, unix sockets.
_OTHER_FAMILIES: Final = frozenset({0x00, 0x12, 0x22, 0x31, 0x32})
_V1_FAMILIES: Final = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid header.  ``source`` None: keep the connection's own addresses
    (``LOCAL``, ``UNKNOWN`` or a family not relayed)."""

    version: int
    length: int  # bytes the header took
    source: Address | None = None
    destination: Address | None = None


@dataclass(frozen=True, slots=True)
class ProxyReject:
    """The bytes are not a valid PROXY header: close the connection."""

    reason: str


class ProxyReader:
    """Feed bytes as they arrive; get NEED_DATA, a ProxyHeader, or a ProxyReject."""

    __slots__ = ("_buf", "_done", "_length")

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._length = 0
        self._done = False

    @property
    def buffer(self) -> bytes:
        """Every byte fed so far."""
        return bytes(self._buf)

    @property
    def rest(self) -> bytes:
        """The bytes after the header; b"" until it is complete."""
        return bytes(self._buf[self._length :]) if self._length else b""

    def feed(self, data: bytes) -> ProxyHeader | ProxyReject | NeedData:
        if self._done:
            raise RuntimeError("ProxyReader.feed() called after the header was judged")
        if not self._buf:
            self._buf = data  # the common case: the header (and more) in one recv, no copy
        else:
            if isinstance(self._buf, bytes):
                self._buf = bytearray(self._buf)
            self._buf += data
        buf = self._buf
        if buf[:1] == b"P":
            if buf[:6] != V1_PREFIX[: len(buf)]:
                return self._reject(NOT_PROXY)
            result = _v1(buf)
        else:
            if buf[:12] != V2_SIGNATURE[: len(buf)]:
                return self._reject(NOT_PROXY)
            result = _v2(buf)
        if isinstance(result, ProxyHeader):
            self._length = result.length
            self._done = True
        elif isinstance(result, ProxyReject):
            self._done = True
        return result

    def _reject(self, reason: str) -> ProxyReject:
        self._done = True
        return ProxyReject(reason)


def looks_like_proxy(data: bytes) -> bool:
    """Whether ``data`` starts as a PROXY header would (a peer not trusted to send one)."""
    return data.startswith((V1_PREFIX, V2_SIGNATURE))


def _v1(buf: bytes | bytearray) -> ProxyHeader | ProxyReject | NeedData:
    end = buf.find(b"\n", 0, MAX_V1_BYTES)
    if end < 0:
        if len(buf) >= MAX_V1_BYTES:
            return ProxyReject(f"PROXY v1 line longer than {MAX_V1_BYTES} bytes")
        if b"\r" in buf[:-1]:
            return ProxyReject("PROXY v1 line with a CR before its end")
        return NEED_DATA
    if end == 0 or buf[end - 1] != 0x0D:
        return ProxyReject("PROXY v1 line ends with LF, not CRLF")
    line = bytes(buf[6 : end - 1])
    if b"\r" in line:
        return ProxyReject("PROXY v1 line with a CR before its end")
    length = end + 1
    parts = line.split(b" ")
    if parts[0] == b"UNKNOWN":  # the rest of the line, if any, is ignored
        return ProxyHeader(1, length)
    family = _V1_FAMILIES.get(parts[0])
    if family is None:
        return ProxyReject("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 5:
        return ProxyReject("PROXY v1 line does not have 4 fields after the protocol")
    try:
        source_host = _address(family, parts[1])
        destination_host = _address(family, parts[2])
        source_port, destination_port = _port(parts[3]), _port(parts[4])
    except ValueError as exc:
        return ProxyReject(f"PROXY v1 {exc}")
    return ProxyHeader(1, length, (source_host, source_port), (destination_host, destination_port))


def _address(family: int, text: bytes) -> str:
    """The address in canonical form; IPv4 must be written canonically already."""
    try:
        packed = socket.inet_pton(family, text.decode("ascii"))
    except (OSError, UnicodeDecodeError):
        name = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ValueError(f"address is not {name}: {text[:40]!r}") from None
    canonical = socket.inet_ntop(family, packed)
    if family == socket.AF_INET and canonical != text.decode("ascii"):
        raise ValueError(f"IPv4 address is not canonical: {text!r}")
    return canonical


def _port(text: bytes) -> int:
    if not (text.isdigit() and (text == b"0" or text[:1] != b"0")) or int(text) > 65535:
        raise ValueError(f"port is not a number from 0 to 65535: {text[:40]!r}")
    return int(text)


def _v2(buf: bytes | bytearray) -> ProxyHeader | ProxyReject | NeedData:
    if len(buf) > 12 and buf[12] >> 4 != 2:
        return ProxyReject(f"PROXY v2 header of version {buf[12] >> 4}, not 2")
    if len(buf) < V2_FIXED:
        return NEED_DATA
    _, version_command, family, size = _V2_HEAD.unpack_from(buf)
    command = version_command & 0x0F
    if command not in (_LOCAL, _PROXY):
        return ProxyReject(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    if family not in (_TCP4, _TCP6) and family not in _OTHER_FAMILIES:
        return ProxyReject(f"PROXY v2 address family and protocol 0x{family:02x} is unknown")
    length = V2_FIXED + size
    if len(buf) < length:
        return NEED_DATA
    if command == _LOCAL or family in _OTHER_FAMILIES:
        return ProxyHeader(2, length)
    shape, kind = (_V2_INET, socket.AF_INET) if family == _TCP4 else (_V2_INET6, socket.AF_INET6)
    if size < shape.size:
        return ProxyReject(f"PROXY v2 address block of {size} bytes, {shape.size} needed")
    source, destination, source_port, destination_port = shape.unpack_from(buf, V2_FIXED)
    return ProxyHeader(
        2,
        length,
        (socket.inet_ntop(kind, source), source_port),
        (socket.inet_ntop(kind, destination), destination_port),
    )


# -- sending ---------------------------------------------------------------------

V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"
V2_LOCAL: Final = _V2_HEAD.pack(V2_SIGNATURE, 0x20 | _LOCAL, 0x00, 0)
V2_UNSPEC: Final = _V2_HEAD.pack(V2_SIGNATURE, 0x20 | _PROXY, 0x00, 0)
_V2_TCP4: Final = struct.Struct("!12sBBH4s4sHH")
_V2_TCP6: Final = struct.Struct("!12sBBH16s16sHH")
_MAPPED: Final = "::ffff:"  # an IPv4 client of a dual-stack socket, as the kernel writes it


def header(version: int, source: tuple[Any, ...], destination: tuple[Any, ...]) -> bytes:
    """The header a connection from ``source`` to ``destination`` is relayed with.

    ``source`` and ``destination`` are socket addresses: (host, port, ...).  Both ends
    IPv4 mapped into IPv6 (a dual-stack listener) are sent as IPv4.
    Ends of different families cannot be described: v1 says ``UNKNOWN``, v2
    ``UNSPEC``, and the server keeps the balancer's address.
    """
    src, src_port, dst, dst_port = source[0], source[1], destination[0], destination[1]
    if src.startswith(_MAPPED) and dst.startswith(_MAPPED) and "." in src and "." in dst:
        src, dst = src[7:], dst[7:]
    v6 = ":" in src
    if v6 != (":" in dst):
        return V1_UNKNOWN if version == 1 else V2_UNSPEC
    if version == 1:
        return f"PROXY TCP{6 if v6 else 4} {src} {dst} {src_port} {dst_port}\r\n".encode()
    kind = socket.AF_INET6 if v6 else socket.AF_INET
    shape = _V2_TCP6 if v6 else _V2_TCP4
    return shape.pack(
        V2_SIGNATURE,
        0x20 | _PROXY,
        _TCP6 if v6 else _TCP4,
        shape.size - V2_FIXED,
        socket.inet_pton(kind, src),
        socket.inet_pton(kind, dst),
        src_port,
        dst_port,
    )


def check_header(version: int) -> bytes:
    """What a health check sends first, as HAProxy does: v2 ``LOCAL`` (the balancer's own
    connection), v1 ``UNKNOWN`` (v1 has no way to say so)."""
    return V2_LOCAL if version == 2 else V1_UNKNOWN
