"""Routing a request head to a backend, and the Origin allowlist; a TLS server name too.

Pure functions of the listener's config and the sniffed head (or ClientHello):
no I/O.  The head's path and host are in normal form (:mod:`lb.proto.uri`),
and so are the routes' (the config refuses others), so comparing them is
comparing what the server will read; server names are compared lowercased and
without a trailing dot on both sides (:func:`lb.proto.tls.normalize_server_name`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lb.proto.uri import without_parameters

if TYPE_CHECKING:
    from lb.config import Listener
    from lb.proto.http1 import Head

_ASCII_WHITESPACE = " \t\n\f\r"  # WHATWG's: what a browser would not put in an Origin


class Router:
    """A listener's routes, first match wins, else the default backend.

    A ``path_prefix`` matches on segment boundaries: ``/admin`` matches
    ``/admin``, ``/admin/`` and ``/admin/x`` but not ``/administrator``; one
    that ends in ``/`` matches the paths that start with it.  Path parameters
    (``;jsessionid=1``) are left out of the comparison, as servers that read
    them (Tomcat, Jetty) do, so ``/admin;x/y`` is under ``/admin``.
    """

    __slots__ = ("_allowed_origins", "_by_path", "_default", "_routes", "_sni_routes")

    def __init__(self, listener: Listener) -> None:
        self._routes = tuple(
            (r.websocket, r.host, _prefixes(r.path_prefix), r.backend) for r in listener.routes
        )
        self._by_path = any(r.path_prefix is not None for r in listener.routes)
        self._default = listener.default_backend
        self._allowed_origins = frozenset(listener.allowed_origins)
        # mode = "tls": (exact name, or None; the suffix a wildcard's one label precedes)
        self._sni_routes = tuple(
            (
                None if r.sni is None or r.sni.startswith("*.") else r.sni,
                r.sni[1:] if r.sni is not None and r.sni.startswith("*.") else None,
                r.sni is None,
                r.backend,
            )
            for r in listener.routes
        )

    def backend_for(self, head: Head) -> str:
        path = head.path
        if self._by_path and ";" in path:
            path = without_parameters(path)
        for websocket, host, prefixes, backend in self._routes:
            if websocket is not None and websocket != head.websocket:
                continue
            if host is not None and host != head.host:
                continue
            if prefixes is not None and path != prefixes[0] and not path.startswith(prefixes[1]):
                continue
            return backend
        return self._default

    def backend_for_sni(self, server_name: str | None) -> str:
        """The backend of a ClientHello's server name (normalized; None: it sent none).

        An ``sni`` route matches the name exactly, or, as ``*.example.com``, any name
        of one more label (``a.example.com``, not ``example.com`` nor
        ``a.b.example.com``), as a wildcard certificate does; a route without ``sni``
        matches every hello, one without a name included.
        """
        for exact, suffix, any_name, backend in self._sni_routes:
            if any_name:
                return backend
            if server_name is None:
                continue
            if exact is not None:
                if exact == server_name:
                    return backend
            elif (
                suffix is not None
                and server_name.endswith(suffix)
                and "." not in server_name[: -len(suffix)]
                and len(server_name) > len(suffix)
            ):
                return backend
        return self._default

    def origin_allowed(self, head: Head) -> bool:
        """A request that asks to upgrade, from a browser, must come from a listed Origin.

        Every request with an ``Upgrade`` field is checked, whatever its method
        and ``Connection``, since servers that check less than a handshake needs
        upgrade it all the same; CORS protects the rest.  A request without an
        Origin header is not from a browser page and is let through, as ASP.NET
        Core's WebSocket middleware does.
        """
        if not self._allowed_origins or not head.upgrade or head.origin is None:
            return True
        return normalize_origin(head.origin) in self._allowed_origins


def _prefixes(prefix: str | None) -> tuple[str, str] | None:
    """What a path equals, or starts with, to be under ``prefix``."""
    if prefix is None:
        return None
    return (prefix, prefix if prefix.endswith("/") else prefix + "/")


def normalize_origin(origin: str) -> str:
    """An Origin as ``allowed_origins`` holds them: without the ASCII whitespace around it
    (and no other: a no-break space is part of the value), in lower case, without a
    trailing "/"."""
    return origin.strip(_ASCII_WHITESPACE).lower().rstrip("/")
