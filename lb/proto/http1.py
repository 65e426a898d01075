"""Sans-I/O sniffer for HTTP/1.x request heads, and where their bodies end.

Theory of operation
-------------------
The worker feeds whatever ``recv`` returned to :meth:`HeadSniffer.feed` and
gets one of three answers: ``NEED_DATA``, a :class:`Head` (route it and forward
``forward``), or a :class:`Reject` (answer its status and close).
No sockets, clock or loop live here; the 408 timeout is the worker's.  A
sniffer judges one head: the worker takes a new one for each request of a
kept-alive connection.  After a Head it also says how the request's body is
framed (``body``: a Content-Length, ``CHUNKED`` or none), whether the
connection stays open after it (``keep_alive``) and whether it asks to
switch protocols (``upgrade``); a chunked body's end is found by
:class:`ChunkedBody`.

Invariants that make it correct and O(total bytes):

* The head ends at the first CRLF CRLF.  A valid head cannot contain that
  sequence earlier (CR is illegal inside a request line or a field), so one
  ``bytes.find``, resumed 3 bytes before each new chunk and bounded by
  ``MAX_HEAD_BYTES``, finds the end.  No terminator within the first
  ``MAX_HEAD_BYTES`` bytes means 431, whatever follows.
* Validation is llhttp's (``httptools``, strict mode: no leniency flags), fed
  each byte of the head exactly once and nothing past it, so the body or a
  first WebSocket frame is never parsed.  Being a streaming parser, it rejects
  at the first byte that cannot start a valid request, so garbage gets its 400
  without waiting for the terminator or the timeout.
* On top of llhttp, Python checks only what llhttp does not: the request line
  once its CRLF is in (single spaces, HTTP/1.0 or 1.1 only), duplicate
  Host/Origin, Host present in 1.1, Host syntax, target form.  These run once.
* Routes see the path and host in normal form (:mod:`lb.proto.uri`), and the
  server gets the head they saw: ``forward`` is ``buffer`` except when the
  target was not in normal form, rare enough that only then is a head built:
  the request line carries the normal path, and an absolute-form target
  becomes origin-form with its authority as the one Host field (RFC 9112
  section 3.2.2: the authority overrides Host, so routing used it).

Decisions, stricter than RFC 9112 allows but never than real clients need:
CRLF only (a bare LF or CR is a 400); no empty lines before the request line;
llhttp's method table (an unknown token method is a 400, like a non-token);
any duplicate Content-Length, even an equal one, is a 400; so are CONNECT, a
fragment in the target, ``*`` with any method but OPTIONS, and userinfo in an
absolute-form target.  After ``feed`` has returned a Head or a Reject, calling
it again raises RuntimeError: the sniffer is done with that head.

Framing follows llhttp (strict): it rejects a request with both
Content-Length and Transfer-Encoding, or with a Transfer-Encoding whose last
coding is not chunked, so a valid head with Transfer-Encoding has a chunked
body.  ``upgrade`` is llhttp's own verdict (``Connection: upgrade`` and an
``Upgrade`` header): what a server built on it switches protocols for.
``keep_alive`` is RFC 9112 section 9.3's: HTTP/1.1 unless ``Connection:
close``, HTTP/1.0 only with ``Connection: keep-alive``.

A chunked body ends right after a CRLF CRLF (the empty line that ends its
trailer section; a chunk's data may hold the same bytes).
:class:`ChunkedBody` has llhttp parse the body and feeds it up to each CRLF
CRLF in turn, so that when llhttp reports the message complete, the end of
what it was fed is the end of the body: the position llhttp does not give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, NamedTuple

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from httptools.parser.errors import HttpParserInvalidMethodError, HttpParserInvalidURLError

from lb.errors import ProtocolError
from lb.proto.events import NEED_DATA, NeedData
from lb.proto.uri import HOST_PATTERN, ip_literal, normalize_path

MAX_HEAD_BYTES: Final = 16384
"""A head (request line + headers + blank line) larger than this is a 431."""

CHUNKED: Final = -1
"""``HeadSniffer.body`` of a request whose body is chunked."""

_TERMINATOR: Final = b"\r\n\r\n"
_VERSIONS: Final = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}

# A host (lb.proto.uri), optional port, and the trailing whitespace llhttp leaves in a value.
_HOST_RE: Final = re.compile(HOST_PATTERN.encode() + rb"?(?::[0-9]*)?[ \t]*")
MAX_HOSTS_KEPT: Final = 1024
"""Host values whose normal form a process keeps (``_host_value``); then it starts over."""
_HOSTS: dict[bytes, str] = {}  # a valid Host value as sent -> the host routes see
_ABSOLUTE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/?]*)(/[^?]*)?(\?.*)?", re.S)


class Head(NamedTuple):
    """A complete, valid request head: what routing needs.

    Immutable, as a frozen dataclass would be, but a NamedTuple built with
    positional arguments: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, and building one took about 17,000
    instructions of a new http connection's 200,000, the tuple about 4,000.

    ``target`` is as the client sent it; ``path`` (without the query) and
    ``host`` (without the port) are in the normal form of :mod:`lb.proto.uri`,
    taken from an absolute-form target when there is one.  ``websocket``: a
    WebSocket handshake (GET with ``Upgrade: websocket`` and ``Connection:
    upgrade``); ``upgrade``: the request has an ``Upgrade`` field, whatever
    its method and ``Connection``: servers that check less than a handshake
    needs upgrade it all the same (without the field no server can: it names
    the protocol to switch to).
    """

    method: str
    target: str
    path: str
    host: str
    origin: str | None
    websocket: bool
    upgrade: bool
    version: str
    head_len: int
    host_field: bytes | None = None  # the Host field's value as sent (the forwarded head's)
    routed: bytes | None = None  # the head as routed, where that is not as sent (a target
    # rewritten: see the module's docstring); what servers get in place of the client's


@dataclass(frozen=True, slots=True)
class Reject:
    """The client's bytes cannot be a valid request; answer ``status`` and close."""

    status: int
    reason: str


# The fields _Fields keeps.
_READ: Final = frozenset(
    (b"host", b"origin", b"upgrade", b"connection", b"content-length", b"transfer-encoding")
)


class _Fields:
    """llhttp callback target: keeps the few header fields routing needs.

    Kept apart from the sniffer so that parser and sniffer form no reference
    cycle (the parser holds bound methods of its protocol object).
    """

    __slots__ = (
        "complete",
        "connection",
        "content_length",
        "host",
        "origin",
        "problem",
        "transfer_encoding",
        "upgrade",
    )

    def __init__(self) -> None:
        self.host: bytes | None = None
        self.origin: bytes | None = None
        self.upgrade: bytes | None = None
        self.connection: bytes | None = None
        self.content_length: bytes | None = None  # llhttp rejects a second one
        self.transfer_encoding: bytes | None = None
        self.problem: str | None = None
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key not in _READ:  # most of a browser's fields: one lookup, not six comparisons
            return
        if key == b"host":
            if self.host is not None:
                self._fail("duplicate Host header")
            self.host = value
        elif key == b"origin":
            if self.origin is not None:
                self._fail("duplicate Origin header")
            self.origin = value
        elif key == b"upgrade":
            self.upgrade = value if self.upgrade is None else self.upgrade + b"," + value
        elif key == b"connection":
            self.connection = value if self.connection is None else self.connection + b"," + value
        elif key == b"content-length":
            self.content_length = value
        elif key == b"transfer-encoding":
            self.transfer_encoding = value

    def on_headers_complete(self) -> None:
        self.complete = True

    def _fail(self, reason: str) -> None:
        # Raising aborts llhttp at once; feed() reads the reason back from here.
        self.problem = reason
        raise ValueError(reason)


class HeadSniffer:
    """Feed bytes as they arrive; get NEED_DATA, a Head, or a Reject.

    After a Head: ``body`` is the request's Content-Length (0 without one) or
    ``CHUNKED``, ``keep_alive`` whether the client may send another request
    after it, ``upgrade`` whether it asks to switch protocols.
    """

    __slots__ = (
        "_buf",
        "_done",
        "_fields",
        "_head_len",
        "_line",
        "_parser",
        "_rewritten",
        "body",
        "keep_alive",
        "upgrade",
    )

    def __init__(self) -> None:
        self._buf: bytes | bytearray = b""
        self._fields = _Fields()
        self._parser = HttpRequestParser(self._fields)
        self._line: list[bytes] | None = None  # method, target, version once checked
        self._head_len = 0
        self._done = False
        self._rewritten: bytes | None = None  # the head as routed, if not the client's
        self.body = 0
        self.keep_alive = False
        self.upgrade = False

    @property
    def buffer(self) -> bytes:
        """Every byte fed so far."""
        return self._buf if isinstance(self._buf, bytes) else bytes(self._buf)

    @property
    def forward(self) -> bytes:
        """What the server gets: ``buffer``, with the head as it was routed (see the module's
        docstring) once a Head is returned."""
        buf = self._buf
        if self._rewritten is not None:
            return self._rewritten + buf[self._head_len :]
        return buf if isinstance(buf, bytes) else bytes(buf)

    @property
    def trailing(self) -> bytes:
        """Bytes after the head (a first frame, a body); b"" until the head is complete."""
        return bytes(self._buf[self._head_len :]) if self._head_len else b""

    def feed(self, data: bytes) -> Head | Reject | NeedData:
        """Take the next bytes received; see the module docstring for the contract."""
        if self._done:
            raise RuntimeError("HeadSniffer.feed() called after the head was judged")
        start = len(self._buf)
        buf: bytes | bytearray
        if not start:
            self._buf = buf = data  # the common case: the whole head in one recv, no copy
        else:
            if isinstance(self._buf, bytes):
                self._buf = bytearray(self._buf)
            self._buf += data
            buf = self._buf
        end = buf.find(_TERMINATOR, start - 3 if start > 3 else 0, MAX_HEAD_BYTES)
        head_len = end + 4 if end >= 0 else min(len(buf), MAX_HEAD_BYTES)

        if self._line is None:
            line_end = buf.find(b"\r\n", start - 1 if start else 0, head_len)
            if line_end >= 0:
                line = _split_request_line(bytes(buf[:line_end]))
                if isinstance(line, str):
                    return self._reject(400, line)
                self._line = line

        if head_len > start:
            try:
                self._parser.feed_data(data if head_len >= len(buf) else data[: head_len - start])
            except HttpParserUpgrade:
                self.upgrade = True  # llhttp stops at the end of an upgrade head: all we fed it
            except HttpParserError as exc:
                return self._reject(400, self._fields.problem or _describe(exc))

        if end < 0:
            if len(buf) >= MAX_HEAD_BYTES:
                return self._reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return NEED_DATA
        return self._finish(head_len)

    def _reject(self, status: int, reason: str) -> Reject:
        self._done = True
        return Reject(status, reason)

    def _finish(self, head_len: int) -> Head | Reject:
        fields, line = self._fields, self._line
        if line is None or not fields.complete:  # defensive: llhttp and we disagree on the end
            return self._reject(400, "malformed request head")
        method, target, version = line
        host = fields.host
        if host is None and version == b"HTTP/1.1":
            return self._reject(400, "missing Host header")
        if method == b"CONNECT":
            return self._reject(400, "CONNECT is not supported")
        if not target.isascii():
            return self._reject(400, "invalid request-target")
        text = target.decode("ascii")
        if "#" in text:  # on str: ``in`` on bytes first tries the bytes as an int
            return self._reject(400, "invalid request-target")

        hostname = ""
        if host is not None:
            known = _HOSTS.get(host)  # most connections name a host seen before
            if known is None:
                known = _host_value(host)
                if known is None:
                    return self._reject(400, "invalid Host header")
            hostname = known

        # The usual case inline: origin-form, the path in normal form (see normalize_path).
        query = text.find("?")
        path = text if query < 0 else text[:query]
        if text[0] != "/" or "%" in path or "\\" in path or "//" in path or "/." in path:
            routed = self._unusual_target(method, text, path, version, head_len)
            if isinstance(routed, Reject):
                return routed
            path, hostname = routed[0], routed[1] or hostname
        origin = fields.origin
        self._head_len = head_len
        self._done = True
        if fields.transfer_encoding is not None:  # chunked: llhttp rejects any other
            self.body = CHUNKED
        elif fields.content_length is not None:
            self.body = int(fields.content_length)  # digits (llhttp), maybe trailing blanks
        if version == b"HTTP/1.1":
            self.keep_alive = not _has_token(fields.connection, b"close")
        else:
            self.keep_alive = _has_token(fields.connection, b"keep-alive")
        return Head(  # positional, in the fields' order: keywords cost more
            method.decode("ascii"),  # method
            text,  # target
            path,
            hostname,  # host
            None if origin is None else origin.strip(b" \t").decode("latin-1"),  # origin
            (  # websocket
                method == b"GET"
                and _has_token(fields.upgrade, b"websocket")
                and _has_token(fields.connection, b"upgrade")
            ),
            fields.upgrade is not None,  # upgrade
            _VERSIONS[version],  # version
            head_len,
            host,  # host_field
            self._rewritten,  # routed
        )

    def _unusual_target(
        self, method: bytes, target: str, path: str, version: bytes, head_len: int
    ) -> tuple[str, str | None] | Reject:
        """For a target not in the usual form, given its ``path`` (before any query): the path
        routes see, and the host of an absolute-form target (None for the others).  The head
        to forward is rebuilt if the target it carries changes."""
        try:
            path, forward_target, authority = _normal_target(method, target, path)
        except ProtocolError as exc:
            return self._reject(exc.status, exc.reason)
        hostname = None
        if authority is not None:  # absolute-form: its authority replaces Host (RFC 9112 3.2.2)
            hostname = _hostname(authority)
            if not hostname:
                return self._reject(400, "invalid absolute-form request-target")
        if forward_target is not target:
            request_line = b" ".join((method, forward_target.encode("ascii"), version))
            self._rewritten = _rewrite_head(bytes(self._buf[:head_len]), request_line, authority)
        return path, hostname


def _normal_target(method: bytes, target: str, path: str) -> tuple[str, str, bytes | None]:
    """The path routes see, the target to forward (``target`` itself if unchanged) and, for
    an absolute-form target, its authority (else None), given ``path``: the target without
    its query.  Raises ProtocolError if the target is refused."""
    if target[0] == "/":
        normal = normalize_path(path)
        return normal, target if normal is path else normal + target[len(path) :], None
    if target == "*":
        if method != b"OPTIONS":
            raise ProtocolError(400, "asterisk-form target without OPTIONS")
        return target, target, None
    url = _ABSOLUTE_RE.fullmatch(target)
    if url is None:
        raise ProtocolError(400, "invalid absolute-form request-target")
    authority = url[1].encode("ascii")
    if url[2] is None and url[3] is None and method == b"OPTIONS":
        return "*", "*", authority  # RFC 9112 section 3.2.4
    path = normalize_path(url[2] or "/")
    return path, path + (url[3] or ""), authority


def _host_value(host: bytes) -> str | None:
    """The normal form of the host of a Host value, or None if it is invalid; a valid one
    is kept in ``_HOSTS``, so that the next head with the same value skips the pattern
    (a match took about 6,000 instructions, a dict lookup a few hundred)."""
    m = _HOST_RE.fullmatch(host)
    if m is not None and m[2] is not None:  # a name: the usual case, inline
        name: str | None = m[2].decode("ascii").lower()
    else:
        name = _hostname(host)  # an IP literal, none, or invalid
    if name is not None:
        if len(_HOSTS) >= MAX_HOSTS_KEPT:  # bounded whatever clients send
            _HOSTS.clear()
        _HOSTS[host] = name
    return name


def _hostname(value: bytes) -> str | None:
    """The normal form of the host in a Host value or an authority ("" if it has none), or
    None if it is invalid."""
    m = _HOST_RE.fullmatch(value)
    if m is None:
        return None
    name = m[2]
    if name is not None:
        return name.decode("ascii").lower()
    return "" if m[1] is None else ip_literal(m[1].decode("ascii"))


def _rewrite_head(head: bytes, request_line: bytes, host: bytes | None) -> bytes:
    """``head`` with ``request_line`` for its own and, given ``host``, one Host field with
    that value for the client's (llhttp has checked it: CRLF lines, no folding, no space
    before a colon, so a field is a line and its name what precedes the colon)."""
    line_end = head.index(b"\r\n")
    if host is None:
        return request_line + head[line_end:]
    block = head[line_end + 2 : -4]
    fields = [f for f in block.split(b"\r\n") if f[:5].lower() != b"host:"] if block else []
    return b"\r\n".join([request_line, b"Host: " + host, *fields, b"", b""])


class _Complete:
    """llhttp callback target of a :class:`ChunkedBody`: the message's end."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True


# What puts a ChunkedBody's parser where a chunked request's body starts.
_CHUNKED_HEAD: Final = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


class ChunkedBody:
    """Feed a chunked request body as it arrives; learn where it ends (see the module's
    docstring).  Its bytes are judged by llhttp: a malformed body is a Reject."""

    __slots__ = ("_done", "_parser", "_tail")

    def __init__(self) -> None:
        self._done = _Complete()
        self._parser = HttpRequestParser(self._done)
        self._parser.feed_data(_CHUNKED_HEAD)
        self._tail = b""  # the last bytes fed, up to 3: a CRLF CRLF may straddle two feeds

    def feed(self, data: bytes) -> int | Reject:
        """How many bytes of ``data`` belong to the body: ``len(data)`` or fewer when it
        ends within them (what follows is the next request), -1 when it goes on after."""
        if self._done.complete:
            raise RuntimeError("ChunkedBody.feed() called after the body ended")
        view = memoryview(data)
        start = 0
        try:
            for end in _ends(self._tail, data):
                self._parser.feed_data(view[start:end])
                if self._done.complete:
                    return end
                start = end
            if start < len(data):
                self._parser.feed_data(view[start:])
        except HttpParserError as exc:
            message = str(exc)
            return Reject(400, f"malformed chunked body: {message[:1].lower()}{message[1:]}")
        if self._done.complete:  # defensive: the body cannot end but after a CRLF CRLF
            return Reject(400, "malformed chunked body")
        self._tail = (self._tail + data[-3:])[-3:]
        return -1


def _ends(tail: bytes, data: bytes) -> list[int]:
    """The offsets in ``data`` just past each CRLF CRLF, counting one that begins in
    ``tail`` (the bytes fed before ``data``)."""
    ends = []
    if tail:  # 4 bytes fit in neither tail nor data[:3]: what is found here straddles
        joined = tail + data[:3]
        at = joined.find(_TERMINATOR)
        while at >= 0:
            ends.append(at + 4 - len(tail))
            at = joined.find(_TERMINATOR, at + 1)
    at = data.find(_TERMINATOR)
    while at >= 0:
        ends.append(at + 4)
        at = data.find(_TERMINATOR, at + 1)
    return ends


def _split_request_line(line: bytes) -> list[bytes] | str:
    """Method, target, version of a request line, or why it is rejected.

    llhttp checks the characters; this checks what llhttp lets through: more
    than one space between parts, leading empty lines, versions other than 1.x
    (the HTTP/2 preface "PRI * HTTP/2.0" is caught here, before llhttp sees it).
    """
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return "malformed request line"
    if parts[2] not in _VERSIONS:
        return "HTTP/2 is not supported" if parts[2] == b"HTTP/2.0" else "unsupported HTTP version"
    return parts


def _has_token(value: bytes | None, token: bytes) -> bool:
    """Whether a comma-separated header value lists ``token`` (lower case; the value's
    case does not matter)."""
    if value is None:
        return False
    value = value.lower()
    if value == token:  # the usual value: one token
        return True
    if token not in value:
        return False
    return any(item.strip(b" \t") == token for item in value.split(b","))


def _describe(exc: HttpParserError) -> str:
    if isinstance(exc, HttpParserInvalidMethodError):
        return "invalid method"
    if isinstance(exc, HttpParserInvalidURLError):
        return "invalid request-target"
    message = str(exc)
    return f"malformed request head: {message[:1].lower()}{message[1:]}"
