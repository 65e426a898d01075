"""Normal forms of a request's path and host: what routes compare, and what is forwarded.

Theory of operation
-------------------
A route holds only if it reads a request as the server behind the balancer
will: ``/%61dmin``, ``//admin`` and ``/./admin`` are ``/admin`` to most
servers, so a route that compared raw bytes could be walked around.  The
router therefore compares normal forms, and the balancer forwards the path in
the same normal form, so that the server has nothing left to read otherwise.

* Path: RFC 3986 section 6.2.2.  Escapes of unreserved characters (ALPHA
  DIGIT ``-._~``) are decoded, other escapes are upper-cased (``%c3`` is
  ``%C3``), ``.`` and ``..`` segments are resolved (section 5.2.4) and empty
  segments (``//``) merged.  What servers read in different ways is refused
  rather than guessed: ``..`` above the root (nginx answers 400 too), a
  ``%`` without two hex digits, an encoded NUL, an encoded ``/`` or ``\\``
  (``%2F``, ``%5C``: nginx decodes ``%2F`` into a separator, Apache and
  Tomcat refuse it by default), a raw ``\\`` (not a URI character; URL
  parsers after WHATWG read it as ``/``), a ``.`` or ``..`` segment with
  path parameters (``/..;/``, which Tomcat resolves as ``..``), and a ``..``
  after a segment of parameters only (``/a/;x/..``: Tomcat drops the
  parameters, merges the empty segment and goes up from ``/a``).
* Host: lower case, without its port, one trailing dot removed (the fully
  qualified ``example.com.`` is ``example.com``), an IPv6 literal in its
  compressed form within brackets.  Empty labels and percent-escapes are
  refused: no client sends them, and servers disagree on what they mean.

A path with no normal form raises :class:`~lb.errors.ProtocolError` (400)
naming why.  A path without ``%``, ``\\``, ``//`` or ``/.`` is in normal form
already: four substring tests, which the sniffer makes inline.  Paths are
ASCII text (the sniffer has checked): substring tests on ``str`` cost a
fraction of those on ``bytes``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from lb.errors import ProtocolError

_HEX: Final = frozenset("0123456789abcdefABCDEF")
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_REFUSED_ESCAPES: Final = {
    0x00: "encoded NUL in path (%00)",
    0x2F: "encoded '/' in path (%2F)",
    0x5C: "encoded '\\' in path (%5C)",
}
_DOT_SEGMENTS: Final = (".", "..")

_LABEL: Final = r"[A-Za-z0-9\-_~!$&'()*+,;=]+"
HOST_PATTERN: Final = rf"(?:(\[[0-9A-Fa-f:.]+\])|({_LABEL}(?:\.{_LABEL})*)\.?)"
"""A host as RFC 3986 writes it, but for what servers disagree on (no empty label, no
escape): an IP literal (group 1), or a name, IPv4 included, without the one trailing dot
it may have (group 2)."""
_HOST_RE: Final = re.compile(HOST_PATTERN)


def normalize_path(path: str) -> str:
    """The normal form of an absolute path (ASCII, starting with "/"); ``path`` itself if
    it is in normal form already.  Raises ProtocolError (400, why) if it has none."""
    if "%" not in path and "\\" not in path and "//" not in path and "/." not in path:
        return path  # nothing to decode, resolve or merge
    if "\\" in path:
        raise ProtocolError(400, "'\\' in path: write '/' or encode it")
    normal = _resolve_segments(_normalize_escapes(path) if "%" in path else path)
    return path if normal == path else normal


def _normalize_escapes(path: str) -> str:
    """``path`` with unreserved characters decoded and other escapes upper-cased."""
    pieces = path.split("%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise ProtocolError(
                400, "invalid percent-escape in path: '%' must be followed by two hex digits"
            )
        byte = int(piece[:2], 16)
        if byte in _UNRESERVED:
            out.append(chr(byte))
        elif byte in _REFUSED_ESCAPES:
            raise ProtocolError(400, _REFUSED_ESCAPES[byte])
        else:
            out.append("%" + piece[:2].upper())
        out.append(piece[2:])
    return "".join(out)


def _resolve_segments(path: str) -> str:
    """``path`` with dot segments resolved and empty segments merged (RFC 3986 5.2.4)."""
    segments = path.split("/")
    last = len(segments) - 1
    kept: list[str] = []
    trailing_slash = False
    for i in range(1, last + 1):  # segments[0] is what precedes the leading "/": ""
        segment = segments[i]
        if segment == ".." and not kept:
            raise ProtocolError(400, "path goes above the root ('..')")
        if segment in _DOT_SEGMENTS or not segment:
            # (A segment of parameters only is empty to Tomcat: its ".." goes one further.)
            if segment == ".." and kept.pop().startswith(";"):
                raise ProtocolError(400, "'..' after a segment of path parameters only")
            trailing_slash = i == last  # "/a/.." is "/a/" ... but "/a//b" is "/a/b"
            continue
        if ";" in segment and segment.split(";", 1)[0] in _DOT_SEGMENTS:
            raise ProtocolError(400, "path parameters on a '.' or '..' segment")
        kept.append(segment)
        trailing_slash = False
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing_slash else "")


def without_parameters(path: str) -> str:
    """``path`` with each segment's parameters (";..." up to the next "/") removed and the
    segments that leaves empty merged: the path a server that strips them reads (Tomcat,
    Jetty: ``/admin;jsessionid=1/x`` is ``/admin/x``)."""
    names = [segment.split(";", 1)[0] for segment in path.split("/")]
    kept = [name for name in names if name]
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("" if names[-1] else "/")


def normalize_host(host: str) -> str | None:
    """The normal form of a host written without port (see the module's docstring), or None
    if it is not a valid one."""
    m = _HOST_RE.fullmatch(host)
    if m is None:
        return None
    return m[2].lower() if m[2] is not None else ip_literal(m[1])


def ip_literal(text: str) -> str | None:
    """The normal form of an IPv6 literal written in brackets, or None if it is not one."""
    try:
        return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]"
    except ValueError:
        return None
