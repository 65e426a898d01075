"""Listening sockets: ``SO_REUSEPORT`` sockets per listener, kept across reloads.

The supervisor binds them and keeps them for its whole life, so a worker
that is replaced hands its accept queue to its successor: a connection
queued on a socket outlives the worker that was to accept it.  A listener
has at least one socket per worker slot; on reload a listener whose address
did not change keeps its sockets (and their queues), a new address gets new
ones, and only the sockets of removed listeners are closed.  When the number
of workers shrinks, the extra sockets stay open and are shared out among the
remaining workers (socket k belongs to worker slot k mod workers), so nothing
queued on them is lost either.  Every worker gets all of a listener's
sockets: it accepts on its own slot's, and takes from the others' queues
when their worker is behind (see "Taking from the other slots" in
:mod:`lb.worker.process`).
"""

from __future__ import annotations

import _socket
import math
import os
import socket
from typing import Any

from lb.config import Config, Listener
from lb.config_table import Address
from lb.errors import LBError

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 6))

Key = tuple[int, Any]  # (family, sockaddr)


def key(listener: Listener) -> Key:
    return listener.bind.family, listener.bind.sockaddr


def set_keepalive(sock: _socket.socket) -> None:
    """TCP keepalive and no Nagle; accepted sockets inherit both from the listener."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive_only(sock)


def set_keepalive_only(sock: _socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def set_keepalive_fd(fd: int) -> None:
    """Keepalive on a server socket the sweep finds still open (see ``Worker._sweep``)."""
    sock = socket.socket(fileno=fd)
    try:
        set_keepalive_only(sock)
    except OSError:
        pass  # the connection is failing: its tunnel notices
    finally:
        sock.detach()


def ensure_free(listener: Listener, path: str) -> None:
    """Refuse an address where something already listens.

    ``SO_REUSEPORT`` lets any socket of the same user join a listening group on
    the same address, and the kernel then splits the connections between
    them: a second instance (or any process of the service's user) started on
    a running instance's address would silently take a share of its traffic.
    A socket bound without ``SO_REUSEPORT`` cannot join: binding one first
    says whether anything listens there (``SO_REUSEADDR``: connections still
    in TIME_WAIT do not count).
    """
    address = listener.bind
    probe = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address.sockaddr)
    except OSError as exc:
        raise LBError(f"{path}.bind: cannot listen on {address}: {exc.strerror}") from exc
    finally:
        probe.close()


def bind_listener(listener: Listener, path: str) -> socket.socket:
    """Bind and listen; an error names the config key (``path``)."""
    address = listener.bind
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        configure(sock, listener)
        sock.bind(address.sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LBError(f"{path}.bind: cannot listen on {address}: {exc.strerror}") from exc
    return sock


def configure(sock: socket.socket, listener: Listener) -> None:
    """Options that may change on reload; accepted sockets inherit them."""
    set_keepalive(sock)
    # http and tls (the client speaks first): wake the worker only once the client has
    # sent something (HAProxy's defer-accept); a client that sends nothing is still
    # accepted after about a second and then gets its 408 (or close) after its timeout.
    timeout = listener.first_bytes_timeout
    defer = max(1, math.ceil(min(timeout, 1.0))) if listener.mode != "tcp" else 0
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)


def bind_admin(address: Address) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LBError(f"global.admin_bind: cannot listen on {address}: {exc.strerror}") from exc
    return sock


class SocketTable:
    """Every listening socket of the instance, by bind address."""

    def __init__(self) -> None:
        self.sockets: dict[Key, list[socket.socket]] = {}
        self.admin: dict[Key, socket.socket] = {}

    def prepare(self, config: Config) -> None:
        """Bind what ``config`` needs and is missing; all or nothing."""
        added: list[tuple[Key, socket.socket]] = []
        admin = config.global_.admin_bind
        admin_key = (admin.family, admin.sockaddr) if admin else None
        try:
            for index, listener in enumerate(config.listeners):
                have = self.sockets.get(key(listener), [])
                if not have:  # an address new to this instance: nobody else may listen there
                    ensure_free(listener, f"listeners[{index}]")
                for sock in have:
                    configure(sock, listener)
                for _ in range(len(have), config.global_.workers):
                    added.append((key(listener), bind_listener(listener, f"listeners[{index}]")))
            if admin and admin_key not in self.admin:
                self.admin[admin_key] = bind_admin(admin)  # type: ignore[index]
        except LBError:
            for _, sock in added:
                sock.close()
            raise
        for k, sock in added:
            self.sockets.setdefault(k, []).append(sock)

    def admin_socket(self, config: Config) -> socket.socket | None:
        admin = config.global_.admin_bind
        return self.admin.get((admin.family, admin.sockaddr)) if admin else None

    def for_workers(self, config: Config) -> dict[str, list[socket.socket]]:
        """Every listener's sockets, in order: socket k belongs to slot k mod workers."""
        return {listener.name: list(self.sockets[key(listener)]) for listener in config.listeners}

    def counts(self) -> dict[Key, int]:
        """How many sockets each address has: what a generation's workers were given."""
        return {k: len(socks) for k, socks in self.sockets.items()}

    def trim(self, counts: dict[Key, int]) -> int:
        """Close the sockets bound after ``counts`` was taken (a reload that did not
        happen): no worker accepts on them, and the kernel would still hash new
        connections into their queues.  How many were closed."""
        closed = 0
        for k, socks in list(self.sockets.items()):
            keep = counts.get(k, 0)
            for sock in socks[keep:]:
                sock.close()
                closed += 1
            del socks[keep:]
            if not socks:
                del self.sockets[k]
        return closed

    def keep_only(self, config: Config) -> list[Key]:
        """Close the sockets of listeners that ``config`` no longer has."""
        wanted = {key(listener) for listener in config.listeners}
        gone = [k for k in self.sockets if k not in wanted]
        for k in gone:
            for sock in self.sockets.pop(k):
                sock.close()
        keep = self.admin_socket(config)
        for k, sock in list(self.admin.items()):
            if sock is not keep:
                sock.close()
                del self.admin[k]
        return gone

    def handoff(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Every socket's descriptor by address, for an upgrade (see lb.upgrade)."""
        listening = [[k[0], k[1], [s.fileno() for s in socks]] for k, socks in self.sockets.items()]
        admin = [[k[0], k[1], s.fileno()] for k, s in self.admin.items()]
        return listening, admin

    def take_over(self, listening: list[list[Any]], admin: list[list[Any]]) -> None:
        """The sockets of a handoff, as this table's (after an upgrade's exec)."""
        for family, sockaddr, fds in listening:
            key = (family, tuple(sockaddr))
            self.sockets[key] = [socket.socket(fileno=fd) for fd in fds]
        for family, sockaddr, fd in admin:
            self.admin[(family, tuple(sockaddr))] = socket.socket(fileno=fd)

    def all(self) -> list[socket.socket]:
        return [s for socks in self.sockets.values() for s in socks] + list(self.admin.values())

    def close(self) -> None:
        for sock in self.all():
            sock.close()
        self.sockets.clear()
        self.admin.clear()


HANDOVER_TYPE = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC  # one message, one tunnel
HANDOVER_BACKLOG = 64


def handover_path(runtime_dir: str, generation: int, slot: int) -> str:
    return os.path.join(runtime_dir, f"handover-{generation}-{slot}.sock")


def handover_socket(path: str) -> socket.socket:
    """A worker slot's handover socket (bound by the supervisor, mode 0600)."""
    sock = socket.socket(socket.AF_UNIX, HANDOVER_TYPE)
    old = os.umask(0o177)
    try:
        if os.path.lexists(path):
            os.unlink(path)
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(HANDOVER_BACKLOG)
    sock.setblocking(False)
    return sock
