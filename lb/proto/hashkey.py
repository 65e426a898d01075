"""The value ``balance = "hash"`` hashes, read from a request head (sans-I/O).

Read only for a backend whose ``hash_key`` names a header, cookie or query
parameter, once the head is routed there: no other connection pays for it.
The head is one that :class:`~lb.proto.http1.HeadSniffer` accepted, so
llhttp has checked its framing: every header line starts right after a CRLF
with its name and a colon (no space before the colon, no CR inside a value),
so finding ``CRLF name:`` in the lowercased head finds exactly the header
lines of that name, and nothing in the request line or past the head.

A key that is absent or empty gives None: the caller hashes the client's
address instead (a client that has no session yet).  Which key keeps a
session on one server is the operator's choice: one the client sends from
its first request on (an application's login cookie, a client id); a
session id that the server hands out in its first answer (socket.io's
``sid``) is hashed only from the second request, which may then go to
another server than the first.
"""

from __future__ import annotations

from collections.abc import Iterator

from lb.config import HashKey
from lb.proto.http1 import Head

_OWS = b" \t"


class KeyReader:
    """Reads one backend's ``hash_key`` (a header, cookie or query parameter) from a head."""

    __slots__ = ("_name", "_needle", "_source")

    def __init__(self, key: HashKey) -> None:
        if key.source not in ("header", "cookie", "query"):
            raise ValueError(f"no key to read from a request for hash_key {key.source!r}")
        self._source = key.source
        self._name = key.name
        header = b"cookie" if key.source == "cookie" else key.name.lower().encode()
        self._needle = b"\r\n" + header + b":"

    def read(self, head: Head, buffer: bytes) -> bytes | None:
        """The key's value in the request whose head starts ``buffer``, or None."""
        if self._source == "query":
            return _query_param(head.target, self._name)
        values = _header_values(buffer[: head.head_len], self._needle)
        if self._source == "header":
            return next(values, None)
        name = self._name.encode()
        for value in values:
            if found := _cookie(value, name):
                return found
        return None


def _header_values(head: bytes, needle: bytes) -> Iterator[bytes]:
    """The non-empty values of the header lines that start with ``needle``, in order."""
    lowered = head.lower()
    at = lowered.find(needle)
    while at >= 0:
        start = at + len(needle)
        end = head.find(b"\r\n", start)
        value = head[start:end].strip(_OWS)
        if value:
            yield value
        at = lowered.find(needle, end)


def _cookie(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in one Cookie header (``a=1; b=2``), if not empty."""
    for pair in header.split(b";"):
        key, equals, value = pair.strip(_OWS).partition(b"=")
        if equals and key == name and value:
            return value
    return None


def _query_param(target: str, name: str) -> bytes | None:
    """The raw value of query parameter ``name`` in a request-target, if not empty."""
    query_at = target.find("?")
    if query_at < 0:
        return None
    for pair in target[query_at + 1 :].split("&"):
        key, equals, value = pair.partition("=")
        if equals and key == name and value:
            return value.encode()
    return None
