"""The forwarded head: a request head as the balancer passes it on, saying whom it serves.

A server behind the balancer sees the balancer as its peer.  The forwarded
head tells it the client's address, the scheme and the Host the client
asked for: ``X-Forwarded-For``, ``X-Forwarded-Proto``, ``X-Forwarded-Host``
and RFC 7239's ``Forwarded`` (``for=``, ``proto=``, ``host=``; an IPv6
address in brackets and quoted, as the RFC requires; the host always
quoted, as a port's colon requires).  Sans-I/O and one head at a time: each
request of a connection gets its own.

Trust: whatever copies of these fields the client sent are removed, unless
the client is a trusted proxy (its address in the listener's
``trusted_proxies``).  A trusted proxy's fields are kept: its
``X-Forwarded-For`` and ``Forwarded`` get the client's address appended (the
next hop of the chain), its ``X-Forwarded-Proto`` and ``-Host`` stay as they
are (they describe the original request, which the proxy saw and we did not).

Theory of operation: the head was judged valid by the sniffer (CRLF line
ends, one field per line, no folding, a field's name a token followed at
once by ``:``, a Host value without quotes or backslashes), so the name of a
field is the bytes between a CRLF and the first colon after it, and every
byte of the fields we do not touch is kept as it came.  A head that does not
contain ``forwarded`` in any case (the common case) is not split into lines:
the new fields go in before its blank line with one copy.  Every C method
call costs an interpreter round trip here, so the common case makes four
(``lower``, ``find``, ``encode``, ``strip``) and one formatting.
"""

from __future__ import annotations

from typing import Final

from lb.trusted import TrustedProxies

_XFF: Final = b"x-forwarded-for"
_XFP: Final = b"x-forwarded-proto"
_XFH: Final = b"x-forwarded-host"
_FORWARDED: Final = b"forwarded"
_OURS: Final = frozenset({_XFF, _XFP, _XFH, _FORWARDED})

_ALL_FIELDS: Final = (
    b"%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n"
    b'Forwarded: for=%s;proto=%s;host="%s"\r\n\r\n'
)
_HOSTLESS: Final = (  # an HTTP/1.0 request without Host
    b"%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nForwarded: for=%s;proto=%s\r\n\r\n"
)


def forwarded_head(
    head: bytes,
    client: str,
    host: bytes | None,
    trusted: TrustedProxies,
    proto: bytes = b"http",
) -> bytes:
    """``head`` (request line to blank line, as the sniffer accepted it) with the
    forwarded fields for ``client`` (its address, as the kernel or a PROXY header gives
    it) and ``host`` (the Host value to forward, surrounding whitespace ignored; None or
    empty: none)."""
    lower = head.lower()
    if lower.find(_FORWARDED) >= 0:  # (`in` would try the bytes as an int first: slower)
        return _rewrite(head, lower, client, host, client in trusted, proto)
    address = client.encode()
    node = b'"[' + address + b']"' if ":" in client else address
    if host is not None:
        host = host.strip()
    if not host:
        return _HOSTLESS % (head[:-2], address, proto, node, proto)
    return _ALL_FIELDS % (head[:-2], address, proto, host, node, proto, host)


def _rewrite(
    head: bytes, lower: bytes, client: str, host: bytes | None, trusted: bool, proto: bytes
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
        kept.append(line)
    if host is not None:
        host = host.strip() or None
    address = client.encode()
    if _XFF in last:
        kept[last[_XFF]] = _append(kept[last[_XFF]], address)
    if _FORWARDED in last:
        kept[last[_FORWARDED]] = _append(kept[last[_FORWARDED]], _element(client, proto, host))
    added = _new_fields(client, proto, host, _OURS.difference(last))
    return b"\r\n".join(kept) + b"\r\n" + added + b"\r\n"


def _new_fields(client: str, proto: bytes, host: bytes | None, which: frozenset[bytes]) -> bytes:
    """The lines of the fields in ``which``, each ending in CRLF, in the one-copy order."""
    out = b""
    if _XFF in which:
        out += b"X-Forwarded-For: " + client.encode() + b"\r\n"
    if _XFP in which:
        out += b"X-Forwarded-Proto: " + proto + b"\r\n"
    if _XFH in which and host is not None:
        out += b"X-Forwarded-Host: " + host + b"\r\n"
    if _FORWARDED in which:
        out += b"Forwarded: " + _element(client, proto, host) + b"\r\n"
    return out


def _element(client: str, proto: bytes, host: bytes | None) -> bytes:
    """One RFC 7239 forwarded-element: ``for=`` (IPv6 in brackets, quoted), ``proto=``,
    ``host=`` (quoted)."""
    address = client.encode()
    element = b"for=" + (b'"[' + address + b']"' if ":" in client else address)
    element += b";proto=" + proto
    if host is not None:
        element += b';host="' + host + b'"'
    return element


def _append(line: bytes, value: bytes) -> bytes:
    """A field line with ``value`` as one more element of its comma-separated list."""
    colon = line.find(b":")
    if not line[colon + 1 :].strip(b" \t"):
        return line[: colon + 1] + b" " + value
    return line.rstrip(b" \t") + b", " + value
