"""Routing a request head to a backend, and the Origin allowlist.

Pure functions of the listener's config and the sniffed head: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.config import Listener
    from lb.proto.http1 import Head


class Router:
    """A listener's routes, first match wins, else the default backend."""

    __slots__ = ("_allowed_origins", "_default", "_routes")

    def __init__(self, listener: Listener) -> None:
        self._routes = tuple(
            (r.websocket, r.host, r.path_prefix, r.backend) for r in listener.routes
        )
        self._default = listener.default_backend
        self._allowed_origins = frozenset(listener.allowed_origins)

    def backend_for(self, head: Head) -> str:
        for websocket, host, prefix, backend in self._routes:
            if websocket is not None and websocket != head.websocket:
                continue
            if host is not None and host != head.host:
                continue
            if prefix is not None and not head.path.startswith(prefix):
                continue
            return backend
        return self._default

    def origin_allowed(self, head: Head) -> bool:
        """An upgrade from a browser must come from a listed Origin.

        Only WebSocket upgrades are checked (CORS protects the rest); a request
        without an Origin header is not from a browser page and is let
        through, as ASP.NET Core's WebSocket middleware does.
        """
        if not self._allowed_origins or not head.websocket or head.origin is None:
            return True
        return normalize_origin(head.origin) in self._allowed_origins


def normalize_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")
