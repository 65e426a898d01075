"""Listening sockets: one ``SO_REUSEPORT`` socket per worker slot per listener.

The supervisor binds them all before forking and keeps them for its whole
life, so a worker that is replaced hands its accept queue to its successor
(a connection queued on a socket outlives the worker that was to accept it).
"""

from __future__ import annotations

import math
import socket

from lb.config import Listener
from lb.errors import LBError
from lb.worker.process import set_keepalive

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def bind_listener(listener: Listener, path: str) -> socket.socket:
    """Bind and listen; an error names the config key (``path``)."""
    address = listener.bind
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_keepalive(sock)  # inherited by every accepted socket
        if listener.mode == "http":
            # Wake the worker only once the client has sent something (HAProxy's
            # defer-accept); a client that sends nothing is still accepted after
            # about this many seconds and then gets its 408 after head_timeout.
            defer = max(1, math.ceil(min(listener.head_timeout, 1.0)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
        sock.bind(address.sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LBError(f"{path}.bind: cannot listen on {address}: {exc.strerror}") from exc
    return sock
