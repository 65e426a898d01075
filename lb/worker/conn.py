"""One client connection in a worker: head, route, connect, then hand over to a tunnel.

Theory of operation
-------------------
Everything runs as callbacks on raw file descriptors (the worker's
:class:`~lb.worker.loop.Loop`); there is no Task or coroutine per
connection.  The head and connect timeouts are not loop timers either (one
costs a connection more than the rest of its connect step): the connection
sets its deadline in the worker's :class:`~lb.worker.deadlines.Deadlines`,
which calls :meth:`Connection.expire` when it comes due.  A connection knows
the worker only through its :class:`Context`: the loop, the deadlines, the
backends, and the callbacks through which it reports back.  A connection goes
through at most four steps, after its client's limits (a listener's
``client_maxconn`` and ``client_rate``: :mod:`lb.pool.clients`), which answer
429 (http, before the head is read; over TLS once the handshake is done) or
close (tcp) a connection over one:

1. head (``mode = "http"``): read until the sniffer returns a head or a
   rejection, within ``head_timeout``; the bytes read are kept verbatim.
   In ``mode = "tls"`` the same for the TLS ClientHello (:mod:`lb.proto.tls`),
   within ``tls_head_timeout``: its bytes are kept verbatim too, and a
   connection whose hello cannot be read is closed with its reason, nothing
   of it forwarded.  First, on a listener with ``accept_proxy``, a peer in
   its ``trusted_proxies`` must send a PROXY header (within the same deadline,
   in tcp mode too), whose source is the client from then on; a connection
   that starts with a PROXY header it may not send is closed.  On a listener
   that terminates TLS the header comes first, in plain text, and is read
   without taking a byte of the ClientHello after it (:func:`~lb.worker.tls.take_proxy_header`),
   then the handshake;
2. route and pick: the listener's router names a backend, its picker a server
   that is up, ``ready``, not suspect and under its ``maxconn`` (tls: the router
   names it from the hello's server name, and the hello is what the server
   gets first, after a PROXY header if any, exactly as it came; a backend
   that hashes a header, cookie or query parameter has it read from the head
   here, once; without it, or in tcp mode, the client's address is hashed);
   what the server is to get is built now: the PROXY header of a ``send_proxy``
   backend, then the head with its forwarded fields (``forwarded_headers``:
   :mod:`lb.proto.forwarded`) and the bytes after it;
3. connect: non-blocking ``connect_ex``, done at once to a server on the same
   host; a refusal or a ``connect_timeout`` marks the server suspect and tries
   another, up to ``retries`` times; the balancer's own limits (no descriptor
   for the socket, no local port: :mod:`lb.worker.limits`) are answered 503
   at once, with no server blamed and none tried;
4. send, with one ``write``, the PROXY header of a ``send_proxy`` backend, the
   head through :meth:`Connection.forward_head` (the one place where a head is
   changed on its way: its target as routed, its forwarded fields) and the
   bytes read after it, and start a :class:`~lb.worker.splice.Tunnel` (given
   its close time if its listener has a ``max_tunnel_age``:
   :class:`~lb.worker.closing.MaxAge`).  Unless the first request asks to
   upgrade, the tunnel's client side reads the requests that follow
   (:mod:`lb.worker.requests`): each is judged by :meth:`Connection.judge`, as
   the first was, and goes to the server only if it routes to the
   connection's server and passes the checks.

Whatever happens, the connection ends in exactly one call to
``Context.finish`` (one ``event="conn"`` log line): a rejected or unservable
request is answered with a short HTTP response and a lingering close, so the
client reads the answer instead of a reset.  That holds when a callback of
the connection raises too (:meth:`Connection.fail`, called by the loop or the
deadlines): a tunnel is closed, a connection before its tunnel is answered
500 (http) or closed (tcp), and every descriptor it holds goes through the
loop's close, which defers ``close(2)`` to the end of the loop's batch so that
a stale event can never reach a socket that took the same number.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from time import monotonic
from typing import Any

from lb.pool.clients import UNCOUNTED, Refusal
from lb.proto.events import NEED_DATA, NeedData
from lb.proto.forwarded import forwarded_head
from lb.proto.http1 import Head, HeadSniffer, Reject
from lb.proto.proxy import NOT_PROXY, ProxyHeader, ProxyReader, ProxyReject, looks_like_proxy
from lb.proto.proxy import header as proxy_header
from lb.proto.tls import ClientHello, HelloReader, HelloReject
from lb.worker.closing import MaxAge
from lb.worker.deadlines import Deadlines, Queue
from lb.worker.limits import LOCAL_ERRNOS
from lb.worker.limits import reason as limit_reason
from lb.worker.loop import FAILED, Loop
from lb.worker.requests import RequestFlow, RequestStream
from lb.worker.runtime import BackendRuntime, ListenerRuntime
from lb.worker.splice import Flow, Pump, Tunnel, shutdown_write
from lb.worker.tls import (
    TlsSocket,
    TlsTunnel,
    read_tls,
    release,
    send_answer,
    server_failure,
    take_proxy_header,
    tls_reason,
    wrap,
    wrap_client,
)

READ_SIZE = 16 * 1024 + 1
LINGER_TIMEOUT = 2.0  # seconds we keep reading a client we answered, so it gets the answer
LINGER_BYTES = 256 * 1024  # ... or until it sent this much more
SOCK_TYPE = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>; not in Python's socket module before 3.12
ESTABLISHED = b"\x01"  # TCP_ESTABLISHED, as the first byte of TCP_INFO (tcpi_state)
ORIGIN_REFUSED = Reject(403, "origin not allowed")

_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def response(status: int, text: str, retry_after: int = 0) -> bytes:
    """A short HTTP/1.1 answer of the balancer's own, closing the connection;
    ``retry_after``: seconds the client is told to wait (``Retry-After``), if any."""
    body = f"{status} {_PHRASES[status]}: {text}\n".encode()
    retry = f"Retry-After: {retry_after}\r\n" if retry_after else ""
    return (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{retry}"
        "Connection: close\r\n\r\n"
    ).encode() + body


def _connect_from(sock: _socket.socket, source: tuple[str, int], sockaddr: Any) -> int:
    """Bind ``sock`` to a source address, then connect it (the errno, 0 if done).

    ``IP_BIND_ADDRESS_NO_PORT``: the port is chosen at connect, per destination, so a
    source address holds a port range's worth of tunnels to each server."""
    sock.setsockopt(_socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    try:
        sock.bind(source)
    except OSError as exc:
        if exc.errno not in LOCAL_ERRNOS:
            raise
        return exc.errno or errno.EADDRNOTAVAIL
    return sock.connect_ex(sockaddr)


def _has_peer(sock: _socket.socket) -> bool:
    """Whether a socket whose ``connect`` said "in progress" is connected by now.

    To a server on the same host (loopback, a veth), the kernel runs the whole
    handshake inside ``connect`` and still answers ``EINPROGRESS``; asking
    costs one ``getsockopt`` and saves an ``epoll_ctl``, a loop turn and the
    connect deadline.  To a remote server the answer is no (a system call
    spent for nothing, under a microsecond against the network's round trip)
    and we wait.  The first byte of ``TCP_INFO`` is the connection's state:
    unlike ``getpeername`` it formats no address and raises nothing when the
    answer is no.
    """
    return sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, 1) == ESTABLISHED


@dataclass(slots=True, eq=False)
class Context:
    """What a worker lends its connections, and the callbacks they report back through."""

    loop: Loop
    pump: Pump
    deadlines: Deadlines
    backends: dict[str, BackendRuntime]
    finish: Callable[[Connection, int | None, str, int], None]  # status, reason, bytes_out
    tunnel_opened: Callable[[int, int, int], None]  # server, listener's tally_at, head bytes
    count_bytes: Callable[[int, int, int, int], None]  # server, listener's tally_at, up, down
    connect_failed: Callable[[Connection, str], None]  # the server is to blame
    local_limit: Callable[[int, str], None]  # errno, where: the balancer's own limit
    max_age: MaxAge | None = None  # None: no listener has a max_tunnel_age (one test a tunnel)


class Connection:
    """A client connection from accept to its log line."""

    __slots__ = (
        "addr",
        "backend",
        "bytes_in",
        "bytes_out",
        "ctx",
        "expires",
        "fd",
        "finished",
        "head",
        "hello",
        "key",
        "listener",
        "local",
        "loop",
        "pending",
        "proxy",
        "reading",
        "refused",
        "requests",
        "sent_any",
        "server",
        "server_name",
        "server_tls",
        "sniffer",
        "sock",
        "started",
        "stream",
        "ticket",
        "timeouts",
        "tls",
        "tls_ready",
        "tried",
        "tunnel",
        "websocket",
    )

    def __init__(
        self, ctx: Context, listener: ListenerRuntime, fd: int, addr: tuple[Any, ...]
    ) -> None:
        self.ctx = ctx
        self.loop: Loop = ctx.loop
        self.listener = listener
        self.fd = fd  # the client's socket while this connection owns it; -1 once handed on
        self.addr = addr  # the client's (host, port, ...): its peer's, or its PROXY header's
        self.local: tuple[Any, ...] | None = None  # the address it reached, once asked for
        self.started = monotonic()
        self.proxy: ProxyReader | None = None  # a trusted peer's PROXY header, while read
        self.sniffer: HeadSniffer | None = None
        self.hello: HelloReader | None = None  # mode = "tls": the ClientHello, while read
        self.server_name: str | None = None  # ... the server name it asked for (SNI)
        self.expires: Callable[[], None] | None = None  # what to do at the deadline
        self.timeouts: Queue | None = None  # the deadline's queue
        self.reading = False
        self.websocket = False
        self.backend: BackendRuntime | None = None
        self.server = -1
        self.key: str | bytes = ""  # what a hash balancer hashes: set by _route
        self.tried: list[int] = []
        self.sock: _socket.socket | None = None
        self.tunnel: Tunnel | None = None
        self.bytes_in = 0  # from the client: the head, then what the tunnel moved up
        self.bytes_out = 0  # to the client, through the tunnel
        self.pending = b""
        self.sent_any = False  # the server has taken some of the first send: no retry
        self.head: Head | None = None  # the first request's, once judged
        self.stream: RequestStream | None = None  # the requests after it, until the tunnel
        self.requests: RequestFlow | None = None  # ... then the tunnel's side that reads them
        self.refused = ""  # why a later request was not forwarded
        self.finished = False
        self.ticket = UNCOUNTED  # where its client's count holds it (lb.pool.clients)
        self.tls: TlsSocket | None = None  # a terminating listener's client, until its tunnel
        self.tls_ready = False  # its handshake is done
        self.server_tls: TlsSocket | None = None  # a tls backend's server, over ``sock``

    def start(self) -> None:
        listener = self.listener
        if listener.accept_proxy and self.addr[0] in listener.trusted:
            # required before anything else (see _proxy_header); its client's limits
            # are counted once it has said who the client is
            self.proxy = ProxyReader()
        else:
            if not self.admit():
                return
            if listener.mode == "tcp":
                self._route(self.ctx.backends[listener.default_backend])
                return
        if listener.mode == "http":
            self.sniffer = HeadSniffer()
        elif listener.mode == "tls":
            self.hello = HelloReader()
        self._arm(listener.head_timeout, self._head_timeout)  # the PROXY header's too
        if listener.tls is not None:
            if self.proxy is None:
                self.tls = wrap(listener.tls, self.fd, listener.family)
                self._handshake()
            else:  # in plain text, before the handshake
                self._read_proxy_before_tls()
            return
        self._read_head()  # with TCP_DEFER_ACCEPT the head is usually there already

    def _handshake(self, refusal: Refusal | None = None) -> None:
        """Drive the TLS handshake (within ``head_timeout``, with the head), then read the
        head through it; a client that fails it is closed, and why logged.  A client over
        its limits (``refusal``) is answered 429 over TLS instead, once the handshake is
        done."""
        tls = self.tls
        assert tls is not None
        try:
            tls.ssl.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            again = self._handshake if refusal is None else partial(self._handshake, refusal)
            self._wait(again, write=isinstance(exc, ssl.SSLWantWriteError))
            return
        except OSError as exc:
            why = (
                f"TLS handshake failed: {tls_reason(exc)}"
                if isinstance(exc, ssl.SSLError)
                else f"client error in the TLS handshake: {exc.strerror}"
            )
            if refusal is None:
                self._drop(why)
            else:
                self._drop(f"{refusal.reason} ({why})", 429)
            return
        self.tls_ready = True
        if refusal is not None:
            self._disarm()
            self.answer(429, refusal.reason, retry_after=refusal.retry_after)
            return
        self._wait(self._read_head, write=False)
        self._read_head()  # the head often came with the handshake's last flight

    def _wait(self, callback: Callable[[], None], write: bool) -> None:
        """Call ``callback`` when the client's socket is readable (or writable)."""
        if write:
            self.loop.set(self.fd, None, callback)
        else:
            self.loop.set(self.fd, callback, None)
        self.reading = True

    def admit(self) -> bool:
        """Count the connection against its listener's client limits, if it has any, by
        ``addr`` (the client's address, whatever told it); over a limit it is answered 429
        (http: before its head is read) or closed (tcp), and False returned."""
        clients = self.listener.clients
        if clients is None:
            return True
        ticket = clients.admit(self.addr[0], self.started)
        if isinstance(ticket, int):
            self.ticket = ticket
            return True
        if self.listener.tls is not None:  # the answer goes over TLS: a handshake first
            self._refuse_over_tls(ticket)
        else:
            self.answer(429, ticket.reason, retry_after=ticket.retry_after)
        return False

    def _refuse_over_tls(self, refusal: Refusal) -> None:
        """A client of a TLS listener over its limits: the handshake, within
        ``head_timeout`` (counted from the accept, a PROXY header's included), then 429
        over TLS.  No count holds it meanwhile (it has no ticket)."""
        listener = self.listener
        assert listener.tls is not None
        self._stop_reading()  # a PROXY header's wait, if there was one
        timeout = listener.head_timeout
        why = f"{refusal.reason} (TLS handshake not complete within {timeout:g} s)"
        expires = partial(self._drop, why, 429)
        if self.expires is None:
            self._arm(timeout, expires)
        else:  # armed at the accept already
            self.expires = expires
        self.tls = wrap(listener.tls, self.fd, listener.family)
        self._handshake(refusal)

    def release_client(self) -> None:
        """Its client's count no longer holds it: it ended, or went to another worker."""
        ticket, self.ticket = self.ticket, UNCOUNTED
        if ticket >= 0:
            clients = self.listener.clients
            assert clients is not None  # a ticket comes from its listener's table
            clients.release(ticket)

    # -- 1. head ---------------------------------------------------------------

    def _read_head(self) -> None:
        try:
            tls = self.tls
            data = os.read(self.fd, READ_SIZE) if tls is None else read_tls(tls, READ_SIZE)
        except BlockingIOError:
            self._wait_readable()
            return
        except OSError as exc:
            self._drop(f"client error before the {self._awaited()}: {exc.strerror}")
            return
        if not data:
            self._drop(f"client closed before the {self._awaited()}")
            return
        if self.proxy is not None:
            rest = self._proxy_header(data)
            if rest is None:  # more to come, or the connection is dropped
                return
            if self.sniffer is None and self.hello is None:  # tcp: what came after it goes first
                self._stop_reading()
                self._disarm()
                self.bytes_in += len(rest)
                self.pending = rest
                self._route(self.ctx.backends[self.listener.default_backend])
                return
            if not rest:
                self._wait_readable()
                return
            data = rest
        if self.hello is not None:
            self._read_hello(data)
            return
        sniffer = self.sniffer
        assert sniffer is not None
        event = sniffer.feed(data)
        if not isinstance(event, (Head, Reject)):  # NEED_DATA
            self._wait_readable()
            return
        self._stop_reading()
        self._disarm()
        if isinstance(event, Reject):
            if looks_like_proxy(sniffer.buffer):
                self._drop(self._untrusted_proxy())
                return
            self.answer(event.status, event.reason)
            return
        self.websocket = event.websocket
        verdict = self.judge(event)
        if isinstance(verdict, Reject):
            self.answer(verdict.status, verdict.reason)
            return
        self.head = event
        self._route(verdict, event, sniffer.buffer)

    def _read_hello(self, data: bytes) -> None:
        """mode = "tls": route on the ClientHello's server name once it is all in; what
        was read goes to the server first, unchanged (``pending``)."""
        hello = self.hello
        assert hello is not None
        event = hello.feed(data)
        if isinstance(event, ClientHello):
            self._stop_reading()
            self._disarm()
            self.hello = None
            self.server_name = event.server_name
            self.pending = hello.buffer
            self.bytes_in += len(self.pending)
            backend = self.listener.router.backend_for_sni(event.server_name)
            self._route(self.ctx.backends[backend])
        elif isinstance(event, HelloReject):
            if looks_like_proxy(hello.buffer):
                self._drop(self._untrusted_proxy())
            else:
                self._drop(event.reason)
        else:
            self._wait_readable()

    def _wait_readable(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.fd, self._read_head)
            self.reading = True

    def _awaited(self) -> str:
        if self.proxy is not None:
            return "PROXY header"
        return "TLS ClientHello" if self.hello is not None else "head"

    def _proxy_header(self, data: bytes) -> bytes | None:
        """Read a trusted peer's PROXY header: the bytes after it once it is complete (its
        source is the client from then on), else None (more to come, or dropped)."""
        proxy = self.proxy
        assert proxy is not None
        event = proxy.feed(data)
        if isinstance(event, NeedData):
            self._wait_readable()
            return None
        return proxy.rest if self._proxy_judged(event) else None

    def _read_proxy_before_tls(self) -> None:
        """A TLS listener's trusted peer: its PROXY header, in plain text, but not a byte
        of the ClientHello after it (see ``take_proxy_header``); then the handshake."""
        proxy = self.proxy
        assert proxy is not None and self.listener.tls is not None
        try:
            event = take_proxy_header(self.fd, proxy)
        except BlockingIOError:
            event = NEED_DATA
        except OSError as exc:
            self._drop(f"client error before the PROXY header: {exc.strerror}")
            return
        if event is None:
            self._drop("client closed before the PROXY header")
        elif isinstance(event, NeedData):
            self._wait(self._read_proxy_before_tls, write=False)
        elif self._proxy_judged(event):
            self.tls = wrap(self.listener.tls, self.fd, self.listener.family)
            self._handshake()

    def _proxy_judged(self, event: ProxyHeader | ProxyReject) -> bool:
        """A trusted peer's PROXY header, read whole: True if it is valid and its client
        (its source, from then on) is admitted; else the connection is closed or
        refused."""
        if isinstance(event, ProxyReject):
            if event.reason == NOT_PROXY:
                self._drop("accept_proxy: a peer in trusted_proxies sent no PROXY header")
            else:
                self._drop(f"accept_proxy: invalid PROXY header: {event.reason}")
            return False
        self.proxy = None
        self.bytes_in += event.length
        if event.source is not None:  # else LOCAL or UNKNOWN: the peer's own addresses
            self.addr, self.local = event.source, event.destination
        return self.admit()

    def _untrusted_proxy(self) -> str:
        """Why a connection that starts with a PROXY header it may not send is closed."""
        if self.listener.accept_proxy:
            return "PROXY header from a peer not in trusted_proxies"
        return "PROXY header on a listener without accept_proxy"

    def judge(self, event: Head | Reject) -> BackendRuntime | Reject:
        """A sniffed head, routed and checked: the one judgement of every request on the
        listener, the first of a connection and each one after it (a Reject passes)."""
        if isinstance(event, Reject):
            return event
        router = self.listener.router
        if not router.origin_allowed(event):
            return ORIGIN_REFUSED
        return self.ctx.backends[router.backend_for(event)]

    def next_request(self, event: Head | Reject, raw: bytes) -> str | None:
        """A later request on this kept-alive connection (``raw``: its head as sent): None
        to forward it to this connection's server, else why it is not (see
        lb.worker.requests).

        A request for this connection's backend stays on its server: with every
        balance there is, that server is as good a choice as a new pick (``source``
        would pick it again: the client's address has not changed), but for a backend
        that hashes a request's key: a request with another key is not forwarded (its
        retry, on a new connection, goes where its key does).
        """
        verdict = self.judge(event)
        if isinstance(verdict, Reject):
            return f"{verdict.reason} ({verdict.status})"
        if verdict is not self.backend:
            return f"routed to backend {verdict.name}"
        if (
            verdict.key_reader is not None
            and isinstance(event, Head)
            and self._key(verdict, event, raw) != self.key
        ):
            return "its hash key is not the connection's"
        return None

    def forward_head(self, head: Head, raw: bytes) -> bytes:
        """What goes to the server for a head the client sent as ``raw``: the head as it
        was routed (an absolute-form or unnormalized target rewritten), with its
        forwarded fields.  Every forwarded head goes through here, the first of a
        connection and each later one; it must be a function of the head and of the
        connection, for a head that repeats on a connection goes as the bytes made for
        it the first time."""
        routed = raw if head.routed is None else head.routed
        listener = self.listener
        if not listener.forwarded:
            return routed
        host = head.host_field if head.routed is None else head.host.encode()
        proto = b"http" if listener.tls is None else b"https"
        return forwarded_head(routed, self.addr[0], host, listener.trusted, proto)

    def _head_timeout(self) -> None:
        self._stop_reading()
        timeout = self.listener.head_timeout
        if self.tls is not None and not self.tls_ready:
            self._drop(f"TLS handshake not complete within {timeout:g} s")
            return
        if self.proxy is not None:
            self._drop(f"accept_proxy: no PROXY header within {timeout:g} s")
            return
        if self.hello is not None:
            self._drop(f"no complete TLS ClientHello within {timeout:g} s")
            return
        self.answer(408, f"request head not complete within {timeout:g} s")

    # -- 2. route and pick, 3. connect -------------------------------------------

    def _route(self, backend: BackendRuntime, head: Head | None = None, raw: bytes = b"") -> None:
        """Connect to a server of ``backend``; ``head`` and ``raw`` (the bytes it was read
        from) for a backend that hashes a request's key.  In tcp and tls mode what the server
        gets first (a PROXY header, the ClientHello, what came after the client's PROXY
        header) is ``pending`` already."""
        self.backend = backend
        self.key = self._key(backend, head, raw)
        if head is None and backend.send_proxy:
            self.pending = self._proxy_prefix() + self.pending
        self._connect_next()

    def _key(self, backend: BackendRuntime, head: Head | None, raw: bytes) -> str | bytes:
        """What ``backend``'s picker hashes for a request: its key, if the backend reads
        one and the request has it, else the client's address."""
        client = str(self.addr[0])
        reader = backend.key_reader
        if reader is not None and head is not None:
            return reader.read(head, raw) or client
        return client

    def _proxy_prefix(self) -> bytes:
        """The PROXY header a ``send_proxy`` backend's server gets first (b"" for others)."""
        backend = self.backend
        if backend is None or not backend.send_proxy:
            return b""
        source, destination = self.addr, self.local or self._local_address()
        return proxy_header(backend.send_proxy, source, destination)

    def _local_address(self) -> tuple[Any, ...]:
        """The address the client reached: the listener's, unless it binds a wildcard."""
        local = self.listener.local
        if local is None:
            sock = _socket.socket(fileno=self.fd)
            try:
                local = sock.getsockname()
            finally:
                sock.detach()
        self.local = local
        return local

    def _connect_next(self) -> None:
        backend = self.backend
        assert backend is not None
        server = None
        if len(self.tried) <= backend.retries:
            server = backend.picker.pick(self.key, self.tried)
        if server is None:
            self.answer(503, "no server available")
            return
        self.server = server
        self.tried.append(server)
        family, sockaddr = backend.addresses[server]
        sources = backend.sources and backend.sources.get(family)
        for source in sources.in_turn() if sources else (None,):
            try:
                sock = _socket.socket(family, SOCK_TYPE)  # non-blocking from birth: no extra call
            except OSError as exc:
                if exc.errno not in LOCAL_ERRNOS:
                    raise
                self._local_limit(exc.errno, "socket")
                return
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)  # keepalive: the tunnel's
            self.sock = sock
            err = (
                sock.connect_ex(sockaddr)
                if source is None
                else _connect_from(sock, source, sockaddr)
            )
            if err != errno.EADDRNOTAVAIL or source is None:
                break
            self._close_server()  # this source's ports toward that server are used up: the next
        if err == errno.EINPROGRESS and _has_peer(sock):
            err = 0  # connected already: see _has_peer
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            self.loop.add_writer(sock.fileno(), self._connect_done)
            self._arm(backend.connect_timeout, self._connect_timeout)
        elif err in LOCAL_ERRNOS:
            self._close_server()
            self._local_limit(err, "connect")
        else:
            self._connect_failed(os.strerror(err))

    def _connect_done(self) -> None:
        assert self.sock is not None
        self._disarm()
        # Writable without error or hang-up: connected, no need to ask SO_ERROR.
        err = 0
        if self.loop.events & FAILED:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
        if err:
            self._connect_failed(os.strerror(err))
        else:
            self._connected()  # still watched for write: the tunnel turns that into read

    def _connect_timeout(self) -> None:
        assert self.backend is not None
        self._connect_failed(f"connect timeout after {self.backend.connect_timeout:g} s")

    def _connect_failed(self, why: str) -> None:
        self._close_server()
        self.ctx.connect_failed(self, why)
        self._connect_next()

    def _local_limit(self, err: int, where: str) -> None:
        """The balancer's own limit, not the server's fault: answered at once, nothing retried."""
        self.ctx.local_limit(err, where)
        self.answer(503, limit_reason(err, where))

    def _close_server(self) -> None:
        """Close the server socket (through the loop: see the module's docstring)."""
        sock, self.sock = self.sock, None
        self.server_tls = None  # the same socket, if the backend has tls = true
        if sock is not None:
            self.loop.close(sock.detach())

    # -- 4. forward and tunnel ---------------------------------------------------

    def _connected(self) -> None:
        sock = self.sock
        assert sock is not None
        backend = self.backend
        if backend is not None and backend.tls is not None and self.server_tls is None:
            self._start_server_tls(sock, backend)
            return
        if self.head is None and not self.pending:  # mode = "tcp", nothing to send first
            self.sock = None
            self._open_tunnel(self._server_fd(sock))
            return
        if self.sniffer is not None:  # else tcp, or a retry: the same bytes to another server
            self._first_send()
        self._send_pending()

    def _server_fd(self, sock: _socket.socket) -> int:
        """The server socket's descriptor, for its tunnel (a TLS socket keeps it: its
        tunnel releases it)."""
        return sock.fileno() if self.server_tls is not None else sock.detach()

    def _start_server_tls(self, sock: _socket.socket, backend: BackendRuntime) -> None:
        """A ``tls = true`` backend: the TLS handshake with the server, within its
        ``connect_timeout``; a failure counts as a failed connect (another server is
        tried)."""
        assert backend.tls is not None and backend.server_names is not None
        family = backend.addresses[self.server][0]
        tls = self.server_tls = wrap_client(
            backend.tls, sock.detach(), family, backend.server_names[self.server]
        )
        self.sock = tls.sock  # the same descriptor, now with TLS over it: see _send_pending
        self._arm(backend.connect_timeout, self._server_tls_timeout)
        self._server_handshake()

    def _server_handshake(self) -> None:
        tls = self.server_tls
        assert tls is not None
        fd = tls.fileno()
        try:
            tls.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.set(fd, self._server_handshake, None)
            return
        except ssl.SSLWantWriteError:
            self.loop.set(fd, None, self._server_handshake)
            return
        except (OSError, ValueError) as exc:  # SSLError, a certificate that fails included
            self._connect_failed(server_failure(exc))
            return
        self._disarm()
        self.loop.set(fd, None, None)
        self._connected()

    def _server_tls_timeout(self) -> None:
        assert self.backend is not None
        self._connect_failed(f"TLS handshake timeout after {self.backend.connect_timeout:g} s")

    def _first_send(self) -> None:
        """What goes to the server first: the head, and whatever the client sent after it,
        judged request by request unless the head asks to upgrade."""
        sniffer, head = self.sniffer, self.head
        assert sniffer is not None and head is not None
        self.sniffer = None  # release the head: an idle tunnel keeps no buffers
        buffer = sniffer.buffer
        size = len(buffer)
        self.bytes_in += size  # after a PROXY header's, if there was one
        length = head.head_len
        raw = buffer if length == size else buffer[:length]
        forwarded = self.forward_head(head, raw)
        out = self._proxy_prefix() + forwarded  # a PROXY header: before the first head only
        if sniffer.upgrade:  # a tunnel at once: see lb.worker.requests
            self.pending = out if length == size else out + buffer[length:]
            return
        stream = self.stream = RequestStream(self)
        stream.first(head, raw, (sniffer.body, sniffer.keep_alive, sniffer.upgrade), forwarded)
        self.pending = out if length == size else b"".join([out, *stream.feed(buffer[length:])])

    def _send_pending(self) -> None:
        """Send the request; one ``send`` takes it all but on a full buffer."""
        sock, tls = self.sock, self.server_tls
        assert sock is not None and self.backend is not None
        try:
            if not self.pending:
                sent = 0
            elif tls is None:
                sent = sock.send(self.pending)
            else:
                sent = tls.ssl.write(self.pending)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            if self.sent_any:  # the server has part of it: no retry
                self._abort_connect(f"server reset: {exc.strerror}")
            else:
                self._connect_failed(f"send failed: {exc.strerror}")
            return
        if sent:
            self.sent_any = True
        self.pending = self.pending[sent:]
        if self.pending:
            if self.expires is None:
                self.loop.add_writer(sock.fileno(), self._send_pending)
                self._arm(self.backend.connect_timeout, self._request_timeout)
            return
        self._disarm()
        self.sock = None
        self._open_tunnel(self._server_fd(sock))

    def _open_tunnel(self, server_fd: int) -> None:
        if self.tls is not None or self.server_tls is not None:
            self._open_tls_tunnel(server_fd)
            return
        stream = self.stream
        tunnel = self.tunnel = Tunnel(
            self.ctx.pump,
            self,
            self.fd,
            server_fd,
            self.listener.tunnel_timeout,
            up=Flow if stream is None else RequestFlow,
        )
        self.ctx.tunnel_opened(self.server, self.listener.tally_at, self.bytes_in)
        if self.ctx.max_age is not None:  # its close time, if its listener has a max age
            self.ctx.max_age.opened(self, self.listener.index, tunnel.active_at)
        if stream is None:
            tunnel.start(speculate=self.listener.mode == "tcp")
            return
        self.stream = None
        requests = self.read_requests(tunnel, stream)
        tunnel.start(speculate=False)
        requests.settle()  # what the first read asks for, beyond its requests forwarded

    def _open_tls_tunnel(self, server_fd: int) -> None:
        """As ``_open_tunnel``, with TLS on the client's side, the server's or both
        (:mod:`lb.worker.tls`)."""
        client_tls, self.tls = self.tls, None
        server_tls, self.server_tls = self.server_tls, None
        stream, self.stream = self.stream, None
        tunnel = self.tunnel = TlsTunnel(
            self.ctx.pump,
            self,
            self.fd,
            client_tls,
            server_fd,
            server_tls,
            self.listener.tunnel_timeout,
            stream,
            self,
            self.listener.head_timeout,
        )
        self.ctx.tunnel_opened(self.server, self.listener.tally_at, self.bytes_in)
        if self.ctx.max_age is not None:
            self.ctx.max_age.opened(self, self.listener.index, tunnel.active_at)
        tunnel.start(speculate=True)  # OpenSSL may hold what came with the head
        if not tunnel.closed:
            tunnel.settle()

    def read_requests(self, tunnel: Tunnel, stream: RequestStream) -> RequestFlow:
        """The tunnel's client side reads the requests that follow (its up flow is a
        RequestFlow: made so by whoever made the tunnel)."""
        requests = tunnel.up
        assert isinstance(requests, RequestFlow)
        requests.attach(stream, self, self.listener.head_timeout)
        self.requests = requests
        return requests

    def request_refused(self, reason: str) -> None:
        """A later request was not forwarded: that is why the tunnel closes, when it does."""
        self.refused = reason

    def request_upgraded(self, head: Head) -> None:
        """A later request asked to upgrade and went to the server: the tunnel splices both
        ways from now on."""
        self.requests = None
        self.websocket = self.websocket or head.websocket

    def handed_over(self) -> None:
        """Its tunnel went to another process (see lb.worker.handover)."""
        self._forget_requests()

    def _forget_requests(self) -> None:
        requests, self.requests = self.requests, None
        if requests is not None:
            requests.forget()  # no reference cycle is left: reference counting frees it all

    def _request_timeout(self) -> None:
        self._abort_connect("server took no request")

    def _abort_connect(self, reason: str) -> None:
        self._disarm()
        self._close_server()
        self.answer(503, reason)

    def tunnel_moved(self, up: int, down: int) -> None:
        """Bytes the tunnel moved since it last said (see ``Tunnel.flush``)."""
        self.bytes_in += up
        self.bytes_out += down
        self.ctx.count_bytes(self.server, self.listener.tally_at, up, down)

    def tunnel_closed(self, reason: str, up: int, down: int) -> None:
        """The one call a tunnel makes when it closes, with its last bytes' counts."""
        if self.requests is not None:
            self._forget_requests()
        if self.refused:  # why it closed: a request was not forwarded
            reason = self.refused
        if up or down:
            self.tunnel_moved(up, down)
        if self.ctx.max_age is not None:  # its close time, if it has one, goes with it
            self.ctx.max_age.closed(self)
        if not self.finished:  # what _finish does, inline: once per tunnel
            self.finished = True
            self.ctx.finish(self, None, reason, self.bytes_out)

    # -- answers and endings -----------------------------------------------------

    def answer(self, status: int, reason: str, text: str = "", retry_after: int = 0) -> None:
        """Answer with the balancer's own response (http) or just close (tcp); the
        response says ``text`` (default: the ``reason`` that is logged), and
        ``Retry-After`` if ``retry_after`` is given."""
        if self.listener.mode != "http" or (self.listener.tls is not None and not self.tls_ready):
            self._drop(reason, status)  # tcp, tls, or before TLS: nothing to answer in
            return
        answer = response(status, text or reason, retry_after)
        if self.tls is not None:
            self._stop_reading()  # the handshake's or the head's wait
            sent = send_answer(self.tls, answer)
            fd = self._take_fd()
        else:
            fd, self.fd = self.fd, -1
            try:
                sent = os.write(fd, answer)
            except OSError:
                sent = 0
        Linger(self.loop, fd)
        self._count_unread()
        self._finish(status, reason, sent)

    def _drop(self, reason: str, status: int | None = None) -> None:
        self._stop_reading()
        self._disarm()
        self._count_unread()
        self.loop.close(self._take_fd())
        self._finish(status, reason, 0)

    def _take_fd(self) -> int:
        """The client's descriptor, no longer this connection's (nor its TLS socket's)."""
        fd, self.fd = self.fd, -1
        tls, self.tls = self.tls, None
        if tls is not None:
            release(tls)
        return fd

    def _count_unread(self) -> None:
        """Count in ``bytes_in`` what the readers hold: the client is no longer read."""
        if self.proxy is not None:
            self.bytes_in += len(self.proxy.buffer)
            self.proxy = None
        if self.sniffer is not None:
            self.bytes_in += len(self.sniffer.buffer)
            self.sniffer = None
        if self.hello is not None:
            self.bytes_in += len(self.hello.buffer)
            self.hello = None

    def _finish(self, status: int | None, reason: str, bytes_out: int) -> None:
        self.stream = None  # it refers to this connection: no cycle is left behind
        if not self.finished:
            self.finished = True
            self.ctx.finish(self, status, reason, bytes_out)

    def abort(self, reason: str) -> None:
        """Close at once, whatever the step (worker shutdown)."""
        if self.tunnel is not None:
            self.tunnel.close(reason)
            return
        self._close_server()
        if self.fd >= 0:
            self._drop(reason)

    def fail(self, exc: BaseException) -> None:
        """A callback of this connection raised: end it all the same (see the module's
        docstring); the loop or the deadlines have reported the error."""
        reason = f"worker error: {exc!r}"
        try:
            if self.tunnel is not None:
                self.tunnel.fail(exc)
                return
            self._stop_reading()
            self._disarm()
            self._close_server()
            if self.fd >= 0 and not self.finished:
                self.answer(500, reason, "internal error")  # tcp: closed; details: the log
        finally:
            if self.tunnel is None and self.fd >= 0:  # the answer failed too
                self.loop.close(self._take_fd())
            self._finish(None, reason, 0)

    def _stop_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)  # a TLS handshake may wait for write
            self.reading = False

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        self.expires = then
        self.timeouts = self.ctx.deadlines.arm(self, seconds, monotonic())

    def _disarm(self) -> None:
        if self.expires is not None:
            self.expires = None
            assert self.timeouts is not None
            self.timeouts.pop(self, None)

    def expire(self) -> None:
        """The deadline set by ``_arm`` has passed (called by the deadlines' tick)."""
        then = self.expires
        self.expires = None  # the tick took it out of its queue
        if then is not None:
            then()


class Linger:
    """Close a client we answered without resetting it.

    Closing a socket with unread input makes the kernel send a reset, which
    can destroy our answer before the client reads it.  So: shut down our
    side, read and discard what the client still sends, close on its end of
    file, after ``LINGER_BYTES`` or after ``LINGER_TIMEOUT``.
    """

    __slots__ = ("fd", "left", "loop", "timer")

    def __init__(self, loop: Loop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.left = LINGER_BYTES
        shutdown_write(fd)
        loop.add_reader(fd, self._drain)
        self.timer = loop.call_later(LINGER_TIMEOUT, self._close)

    def _drain(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.left -= len(data)
        if not data or self.left <= 0:
            self._close()

    def _close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self.timer.cancel()
            self.loop.close(fd)

    def fail(self, _exc: BaseException) -> None:
        self._close()
