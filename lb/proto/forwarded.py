"""The forwarded head: a request head as the balancer passes it on, saying whom it serves.

A server behind the balancer sees the balancer as its peer.  The forwarded
head tells it the client's address, the scheme and the Host the client
asked for: ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host``
and RFC 7239's ``Forwarded`` (``for=``, ``proto=``, ``host=``; an IPv6
address quoted and in brackets, as the RFC requires).  Sans-I/O and one head
at a time: each request of a connection gets its own.

Trust: whatever copies of these fields the client sent are removed, unless
the client is a trusted proxy (its address in the listener's
``trusted_proxies``).  A trusted proxy's fields are kept: its
``X-Forwarded-For`` and ``Forwarded`` get the client's address appended (the
next hop of the chain), its ``X-Forwarded-Proto`` and ``-Host`` stay as they
are (they describe the original request, which the proxy saw and we did not).

Theory of operation: the head was judged valid by the sniffer (CRLF line
ends, one field per line, no folding, a field's name a token followed at
once by ``:``), so the name of a field is the bytes between a CRLF and the
first colon after it, and every byte of the fields we do not touch is kept
as it came.  A head that does not contain ``forwarded`` in any case (the
common case) is not split into lines at all: it is searched for its Host,
and the new fields go in before its blank line with one copy.
"""

from __future__ import annotations

import string
from typing import Final

from lb.trusted import TrustedProxies

_TCHARS: Final = (string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~").encode()  # RFC 9110
_XFF: Final = b"x-forwarded-for"
_XFP: Final = b"x-forwarded-proto"
_XFH: Final = b"x-forwarded-host"
_FORWARDED: Final = b"forwarded"
_OURS: Final = frozenset({_XFF, _XFP, _XFH, _FORWARDED})


def forwarded_head(
    head: bytes,
    client: str,
    trusted: TrustedProxies,
    proto: bytes = b"http",
    host: bytes | None = None,
) -> bytes:
    """``head`` (request line to blank line, as the sniffer accepted it) with the
    forwarded fields for ``client`` (its address, as the kernel or a PROXY header gives
    it); ``host``: the Host to forward, default the head's own Host field."""
    lower = head.lower()
    if _FORWARDED in lower:
        return _rewrite(head, lower, client, client in trusted, proto, host)
    # Nothing to remove or extend: the same lines as _new_fields, in one copy.
    if host is None:
        host = _host_field(head, lower)
    address = client.encode("ascii")
    node = b'"[' + address + b']"' if b":" in address else address
    if host is None:
        return _HOSTLESS % (head[:-2], address, proto, node, proto)
    return _ALL_FIELDS % (head[:-2], address, proto, host, node, proto, _host_value(host))


_ALL_FIELDS: Final = (
    b"%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n"
    b"Forwarded: for=%s;proto=%s;host=%s\r\n\r\n"
)
_HOSTLESS: Final = (  # an HTTP/1.0 request without Host
    b"%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nForwarded: for=%s;proto=%s\r\n\r\n"
)


def _host_field(head: bytes, lower: bytes) -> bytes | None:
    start = lower.find(b"\r\nhost:")
    if start < 0:
        return None
    start += 7
    return head[start : head.find(b"\r\n", start)].strip(b" \t") or None


def _rewrite(
    head: bytes, lower: bytes, client: str, trusted: bool, proto: bytes, host: bytes | None
) -> bytes:
    """The head line by line: our fields removed, or (trusted) kept and extended."""
    lines = head[:-4].split(b"\r\n")
    names = [low[: low.find(b":")] for low in lower[:-4].split(b"\r\n")]
    kept = [lines[0]]
    last: dict[bytes, int] = {}  # a trusted client's fields: where the last line of each is
    for line, name in zip(lines[1:], names[1:], strict=True):
        if name in _OURS:
            if not trusted:
                continue
            last[name] = len(kept)
        elif name == b"host" and host is None:
            host = line[5:].strip(b" \t") or None
        kept.append(line)
    address = client.encode("ascii")
    if _XFF in last:
        kept[last[_XFF]] = _append(kept[last[_XFF]], address)
    if _FORWARDED in last:
        kept[last[_FORWARDED]] = _append(kept[last[_FORWARDED]], _element(address, proto, host))
    added = _new_fields(client, proto, host, _OURS.difference(last))
    return b"\r\n".join(kept) + b"\r\n" + added + b"\r\n"


def _new_fields(client: str, proto: bytes, host: bytes | None, which: frozenset[bytes]) -> bytes:
    """The lines of the fields in ``which``, each ending in CRLF."""
    address = client.encode("ascii")
    out = b""
    if _XFF in which:
        out += b"X-Forwarded-For: " + address + b"\r\n"
    if _XFP in which:
        out += b"X-Forwarded-Proto: " + proto + b"\r\n"
    if _XFH in which and host is not None:
        out += b"X-Forwarded-Host: " + host + b"\r\n"
    if _FORWARDED in which:
        out += b"Forwarded: " + _element(address, proto, host) + b"\r\n"
    return out


def _element(address: bytes, proto: bytes, host: bytes | None) -> bytes:
    """One RFC 7239 forwarded-element: ``for=`` (IPv6 quoted, in brackets), ``proto=``,
    ``host=`` (quoted unless a token)."""
    node = b'"[' + address + b']"' if b":" in address else address
    element = b"for=" + node + b";proto=" + proto
    if host is not None:
        element += b";host=" + _host_value(host)
    return element


def _host_value(host: bytes) -> bytes:
    """``host=``'s value: the Host as it is if a token, else quoted (a port's colon)."""
    if not host.translate(None, _TCHARS):
        return host
    return b'"' + host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _append(line: bytes, value: bytes) -> bytes:
    """A field line with ``value`` as one more element of its comma-separated list."""
    colon = line.find(b":")
    if not line[colon + 1 :].strip(b" \t"):
        return line[: colon + 1] + b" " + value
    return line.rstrip(b" \t") + b", " + value
