"""Tunnels with TLS on a side: the client's (terminated here), the server's, or both.

Theory of operation
-------------------
On a listener with ``[listeners.tls]`` the connection wraps the client's
socket in a non-blocking :class:`TlsSocket` (:func:`wrap`), drives the
handshake from the loop's readiness callbacks and reads the decrypted head
through it (:mod:`lb.worker.conn`).  To a backend with ``tls = true`` it
connects, then wraps the server's socket the same way on the client's side
of TLS (:func:`wrap_client`) and completes that handshake within the
backend's ``connect_timeout`` before anything is sent.  After the head a
:class:`TlsTunnel` moves the bytes.  They cannot be spliced: the kernel holds
only records, so every byte is copied through OpenSSL, in large pieces and
never byte by byte in Python.  Each direction is a :class:`CopyFlow` (the
client's, :class:`TlsUp`, also judges later requests as
:mod:`lb.worker.requests` does):

- from a TLS side: ``SSL_read`` into the worker's one ``COPY_BYTES`` buffer,
  record after record, until OpenSSL wants more from the socket or the buffer
  is full; from a plain side: one ``readv`` of up to ``COPY_BYTES``;
- to a TLS side: one ``SSL_write`` (OpenSSL cuts it into records); to a plain
  side: one ``writev``.

The buffer is shared: what a destination does not take at once is copied out
of it (``pending``) and the flow stops reading its source until the
destination has taken it (backpressure, as in a splicing flow: the source
is watched for failure only).  Every ``SSL_read`` is given room for a whole
record (``MAX_RECORD``): OpenSSL reads records one at a time and returns a
record's plaintext whole, so it keeps no decrypted byte back that the
level-triggered readiness of the socket would not tell of (a record split over
two reads would stall until the peer sends again).  A ``SSL_write`` that wants
the socket is repeated with the same bytes once it is writable, as OpenSSL
requires.

End of file: a ``close_notify`` or a TCP FIN (a "ragged" end, which browsers
and curl send) ends a flow, which passes it on as a ``close_notify`` (to a TLS
side) and a half-close.  Byte counts are of the plaintext, both ways.

A tunnel with TLS on a side is never handed to another process on reload: its
TLS state (keys, sequence numbers) lives in this process's OpenSSL.  It stays
in the old generation until it ends or the drain rules close it (``movable``).

A PROXY header before TLS (a listener with ``accept_proxy``, behind an L4
balancer that sends one: HAProxy's and nginx's order, header then handshake)
is read by :func:`take_proxy_header` in plain text, and not a byte after it:
the ClientHello that follows must stay in the socket for OpenSSL to read.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from lb.proto.events import NeedData
from lb.proto.http1 import Head
from lb.proto.proxy import ProxyHeader, ProxyReader, ProxyReject
from lb.worker.deadlines import Queue
from lb.worker.requests import (
    DISCARD_BYTES,
    HEAD,
    REFUSED,
    TUNNEL,
    RequestStream,
    arm_head,
    disarm_head,
    head_expired,
)
from lb.worker.splice import Flow, Pump, Tunnel, TunnelOwner, failure_reason, shutdown_write

if TYPE_CHECKING:
    from lb.worker.requests import RequestOwner

COPY_BYTES = 256 * 1024  # what a flow moves per wake-up, at most
MAX_RECORD = 16 * 1024  # a TLS record's plaintext, at most (RFC 8446 5.1)
PEEK_BYTES = 16 * 1024  # of a PROXY header before TLS, per read (a longer v2 takes more reads)
_buffer = bytearray(COPY_BYTES)  # the worker's one copy buffer (one thread, copied out if kept)
_view = memoryview(_buffer)
WOULD_BLOCK = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# The client's end: a FIN without close_notify (a "ragged" end), or a close_notify that
# came after ours (OpenSSL reports it as an error then, not as a read of 0 bytes).
END = (ssl.SSLEOFError, ssl.SSLZeroReturnError)


def take_proxy_header(fd: int, reader: ProxyReader) -> ProxyHeader | ProxyReject | NeedData | None:
    """Read a PROXY header from the client's socket ``fd`` into ``reader``, leaving every
    byte after it in the socket (the ClientHello, for OpenSSL); None at the client's end
    of file; BlockingIOError when nothing came, OSError on a failure.

    The bytes are peeked (``MSG_PEEK``) and fed to ``reader`` (all new to it: what it
    had before was taken from the socket), then taken from the socket as far as they
    belong to the header: all of them while it is incomplete (it goes on past them),
    up to its end once it is complete.  So nothing stays peeked while the reader waits
    for more, and the socket's readiness, level-triggered, does not fire again and
    again for bytes already seen.  A rejection takes nothing: the caller closes.
    """
    sock = _socket.socket(fileno=fd)
    try:
        data = sock.recv(PEEK_BYTES, _socket.MSG_PEEK)
        if not data:
            return None
        event = reader.feed(data)
        if isinstance(event, ProxyReject):
            return event
        left = len(data) - len(reader.rest)
        while left > 0:  # in the socket's queue already: taken at once
            taken = len(sock.recv(left))
            if not taken:
                raise OSError(errno.EPROTO, "peeked bytes are gone")
            left -= taken
        return event
    finally:
        sock.detach()


class RawTls(Protocol):
    """OpenSSL's connection object as the ``_ssl`` module makes it (what
    :class:`ssl.SSLSocket` keeps as ``_sslobj``): the calls the worker makes."""

    context: ssl.SSLContext

    def do_handshake(self) -> None: ...
    def read(self, size: int, buffer: memoryview) -> int: ...
    def write(self, data: bytes | memoryview) -> int: ...
    def shutdown(self) -> object: ...
    def pending(self) -> int: ...


class TlsSocket:
    """A non-blocking TLS connection over a socket: ``ssl``, OpenSSL's connection object,
    called directly.

    :class:`ssl.SSLSocket` puts Python between the worker and that object on every
    call (four frames a read, a ``settimeout`` system call after every handshake step)
    and asks the kernel three times what the socket is when it is made: about 12 us
    of a new TLS connection's work here.  ``SSLContext._wrap_socket`` is how
    ``ssl.SSLSocket`` itself makes the object (Python 3.7 to 3.14 alike); this class
    is the ``owner`` it is given, the object a server-name callback sees (its
    ``context`` switches the certificate, as an SSLSocket's does).  The socket is
    kept here: OpenSSL's object holds it only weakly."""

    __slots__ = ("__weakref__", "sock", "ssl")

    def __init__(
        self,
        context: ssl.SSLContext,
        sock: socket.socket,
        server_side: bool,
        server_name: str | None = None,
    ) -> None:
        self.sock = sock
        make: Callable[..., RawTls] = context._wrap_socket  # type: ignore[attr-defined]
        self.ssl = make(sock, server_side, server_name, owner=self, session=None)

    @property
    def context(self) -> ssl.SSLContext:
        return self.ssl.context

    @context.setter
    def context(self, context: ssl.SSLContext) -> None:
        self.ssl.context = context

    def fileno(self) -> int:
        return self.sock.fileno()


def wrap(context: ssl.SSLContext, fd: int, family: int) -> TlsSocket:
    """The client's (non-blocking) socket as a server-side TLS connection; the handshake
    is the caller's (``do_handshake`` until it neither wants to read nor to write)."""
    # SOCK_NONBLOCK: the socket object knows it never blocks (no system call to say so)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd)
    return TlsSocket(context, sock, server_side=True)


def wrap_client(context: ssl.SSLContext, fd: int, family: int, server_name: str) -> TlsSocket:
    """A connected (non-blocking) server socket as a client-side TLS connection asking
    for ``server_name`` (sent as SNI unless it is an address; checked in its
    certificate unless the backend has ``verify = false``)."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd)
    if context.check_hostname and not server_name:
        raise ValueError("check_hostname requires server_hostname")
    return TlsSocket(context, sock, server_side=False, server_name=server_name)


def server_failure(exc: Exception) -> str:
    """Why a TLS handshake with a server failed, as a connect failure's reason."""
    message = getattr(exc, "verify_message", None)
    reason = tls_reason(exc) if isinstance(exc, OSError) else str(exc)
    return f"TLS: {reason}: {message}" if message else f"TLS: {reason}"


def release(tls: TlsSocket) -> int:
    """The raw descriptor, no longer owned by the TLS socket (whose garbage collection
    would otherwise close that number again, maybe someone else's by then)."""
    return tls.sock.detach()


def ended_by(exc: OSError) -> bool:
    """Whether a TLS error is only the client's end without close_notify (OpenSSL 3 may
    report it as UNEXPECTED_EOF_WHILE_READING rather than as an end of file)."""
    return getattr(exc, "reason", None) == "UNEXPECTED_EOF_WHILE_READING"


def tls_reason(exc: OSError) -> str:
    """A TLS failure in a few words ("wrong version number", "http request")."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "client closed"
    if reason:
        return str(reason).lower().replace("_", " ")
    return exc.strerror or str(exc)


def read_tls(tls: TlsSocket, limit: int) -> bytes:
    """Up to ``limit`` decrypted bytes, b"" at the client's end; BlockingIOError when
    none is there yet; OSError on a TLS failure."""
    read = tls.ssl.read
    size = 0
    while size < limit:
        try:
            n = read(COPY_BYTES - size, _view[size:])  # room for a whole record: none is split
        except WOULD_BLOCK:
            if not size:
                raise BlockingIOError from None
            break
        except END:  # a TCP FIN without close_notify: an end all the same
            break
        except ssl.SSLError as exc:
            if ended_by(exc):
                break
            raise OSError(errno.EPROTO, f"TLS: {tls_reason(exc)}") from None
        if not n:
            break
        size += n
        if n < MAX_RECORD:  # a short record: the sender's burst ended (see CopyFlow._read)
            break
    return bytes(_view[:size])


def send_answer(tls: TlsSocket, data: bytes) -> int:
    """Send a short answer and a ``close_notify``; the bytes of it the client got."""
    try:
        sent = tls.ssl.write(data)
    except (OSError, ValueError):
        sent = 0
    close_notify(tls)
    return sent


def close_notify(tls: TlsSocket) -> None:
    """Tell the client no more data comes (``SSL_shutdown``'s first half; its answer is
    not waited for)."""
    # It raises when it wants the client's close_notify (not waited for), or the client
    # is gone.
    with contextlib.suppress(OSError, ValueError):
        tls.ssl.shutdown()


class CopyFlow(Flow):
    """One direction of a tunnel with TLS on either side (``src_tls``, ``dst_tls``: the
    TLS socket of that side, None for plain): read in large pieces, decrypted if it comes
    over TLS, then written, encrypted if it goes over TLS."""

    __slots__ = ("dst_tls", "eof", "pending", "src_tls")

    def __init__(self, tunnel: Tunnel, src: int, dst: int, src_name: str) -> None:
        super().__init__(tunnel, src, dst, src_name)
        self.src_tls: TlsSocket | None = None
        self.dst_tls: TlsSocket | None = None
        self.pending = b""  # for dst, not yet taken (over TLS: given to SSL_write again)
        self.eof = False  # the source's end came while dst had not taken everything

    def on_readable(self) -> None:
        tunnel = self.tunnel
        while True:
            size, end = self._read()
            if size < 0:  # the tunnel closed
                return
            if size:
                self.nbytes += size
                if not tunnel.moved:
                    tunnel.moved = True
                    tunnel.pump.moved.add(tunnel)
                if not self._forward(size):
                    return
            if end:
                self._source_ended()
                return
            # The buffer was full: go on while OpenSSL holds bytes no readiness would tell
            # of (it should not, each read having room for a whole record).
            tls = self.src_tls
            if self.pending or tunnel.closed or tls is None or not tls.ssl.pending():
                return

    def _read(self) -> tuple[int, bool]:
        """Read into the copy buffer: (bytes read, end of file seen); -1 when it failed
        and the tunnel closed.

        Over TLS, records are read until OpenSSL wants more from the socket, or the
        buffer has no room for another, or one was short: a sender writing in bulk fills
        its records, and one that is not is most often its last for the moment.  Trying
        once more would cost a read that finds nothing (a system call and an exception,
        a fifth of what a small message costs here); stopping early loses nothing, as
        every record is read whole and what the socket still holds wakes the loop again
        (level-triggered)."""
        tls = self.src_tls
        if tls is None:
            try:
                n = os.readv(self.src, [_buffer])
            except BlockingIOError:
                return 0, False
            except OSError as exc:
                self.tunnel.close(failure_reason(exc, self.src_name), reset=True)
                return -1, False
            return n, not n
        read = tls.ssl.read
        size = 0
        while COPY_BYTES - size >= MAX_RECORD:  # room for a whole record: none is split
            try:
                n = read(COPY_BYTES - size, _view[size:])
            except WOULD_BLOCK:
                break
            except END:  # close_notify after ours, or a FIN without one: an end all the same
                return size, True
            except OSError as exc:
                if ended_by(exc):
                    return size, True
                self.tunnel.close(_failure(exc, self.src_name), reset=True)
                return -1, False
            if not n:
                return size, True
            size += n
            if n < MAX_RECORD:  # a short record, likely its sender's last for now: see below
                break
        return size, False

    def _forward(self, size: int) -> bool:
        """Pass on what was read; False when the tunnel closed."""
        return self._send([_view[:size]])

    def _send(self, out: list[bytes | memoryview]) -> bool:
        """Write ``out`` to dst, keeping what it does not take; False when the tunnel
        closed."""
        tls = self.dst_tls
        try:
            if tls is None:
                sent = os.writev(self.dst, out) if out else 0
            else:
                data = out[0] if len(out) == 1 else b"".join(out)
                sent = tls.ssl.write(data) if data else 0
        except (BlockingIOError, *WOULD_BLOCK):
            sent = 0
        except OSError as exc:
            self.tunnel.close(_failure(exc, self.dst_name), reset=True)
            return False
        whole = sum(len(piece) for piece in out)
        if sent < whole:  # SSL_write: the same bytes again, once dst is writable
            self.pending = b"".join(bytes(piece) for piece in out)[sent:]
            loop = self.tunnel.loop
            loop.watch_failure(self.src, self.on_failure)  # not read, still heard if it resets
            loop.add_writer(self.dst, self.on_writable)
        return True

    def on_writable(self) -> None:
        tunnel = self.tunnel
        tls = self.dst_tls
        try:
            sent = os.write(self.dst, self.pending) if tls is None else tls.ssl.write(self.pending)
        except (BlockingIOError, *WOULD_BLOCK):
            return
        except OSError as exc:
            tunnel.close(_failure(exc, self.dst_name), reset=True)
            return
        self.pending = self.pending[sent:]
        if self.pending:
            return
        tunnel.loop.remove_writer(self.dst)
        self._resume()

    def _resume(self) -> None:
        """dst has taken everything: read the source again, or pass its end on."""
        if self.eof:
            self._end()
        else:
            self.tunnel.loop.add_reader(self.src, self.on_readable)

    def _source_ended(self) -> None:
        if self.pending:  # passed on once dst has the rest
            self.eof = True
        else:
            self._end()

    def _end(self) -> None:
        """End of file on the source: over TLS, a close_notify first; then the half-close."""
        if self.dst_tls is not None:
            close_notify(self.dst_tls)
        super()._end()


class TlsUp(CopyFlow):
    """Client to server, judged request by request after a first request that does not
    upgrade, as :mod:`lb.worker.requests` does (``stream``)."""

    __slots__ = ("deadline", "discarded", "head_timeout", "owner", "stream")

    def __init__(self, tunnel: Tunnel, src: int, dst: int, src_name: str) -> None:
        super().__init__(tunnel, src, dst, src_name)
        self.stream: RequestStream | None = None
        self.discarded = 0  # after a refused request: read and dropped
        self.deadline: Queue | None = None  # a begun head's timeout, while armed
        self.head_timeout = 0.0

    def attach(
        self, stream: RequestStream | None, owner: RequestOwner, head_timeout: float
    ) -> None:
        self.stream = stream
        self.owner = owner
        self.head_timeout = head_timeout

    def _forward(self, size: int) -> bool:
        stream = self.stream
        if self.ended:  # a request was refused: the rest is read and dropped
            self.discarded += size
            if self.discarded > DISCARD_BYTES:
                self.tunnel.loop.watch_failure(self.src, self.on_failure)
            return True
        if stream is None:
            return self._send([_view[:size]])
        return self._send(stream.feed(bytes(_view[:size]))) and self._settle(stream)

    def _settle(self, stream: RequestStream) -> bool:
        """What the stream's state asks for; False when the tunnel closed.  A head that has
        begun must be complete within the listener's ``head_timeout``, as on a plain
        listener (lb.worker.requests)."""
        if stream.state == HEAD and stream.sniffer is not None:
            arm_head(self)
        elif self.deadline is not None:
            disarm_head(self)
        if stream.state == TUNNEL:  # an upgrade went to the server: copied unjudged now
            self.stream = None
            head = stream.head
            assert isinstance(head, Head)
            self.owner.request_upgraded(head)
        elif stream.state == REFUSED:
            self.stream = None
            self.ended = True
            self.owner.request_refused(stream.reason)
            tunnel = self.tunnel
            if tunnel.down.ended:
                tunnel.close("server closed")
                return False
            if not self.pending:
                self._half_close()
        return True

    def expire(self) -> None:
        """The head timeout: the head begun is not complete (called by the deadlines)."""
        self.deadline = None
        stream = self.stream
        if not self.tunnel.closed and stream is not None and head_expired(self, stream):
            self._settle(stream)

    def _half_close(self) -> None:
        if self.dst_tls is not None:
            close_notify(self.dst_tls)
        shutdown_write(self.dst)

    def _source_ended(self) -> None:
        if self.ended:  # refused already: only a reset matters now
            self.tunnel.loop.watch_failure(self.src, self.on_failure)
        else:
            super()._source_ended()

    def _resume(self) -> None:
        if self.ended:  # a request was refused: the server gets its end of file now
            self._half_close()
            if not self.eof:
                self.tunnel.loop.add_reader(self.src, self.on_readable)  # what comes is dropped
        else:
            super()._resume()


def _failure(exc: OSError, side: str) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"{side} TLS error: {tls_reason(exc)}"
    return failure_reason(exc, side)


class TlsTunnel(Tunnel):
    """A tunnel with TLS on the client's side (terminated here), on the server's (a
    backend with ``tls = true``), or both: see the module's docstring."""

    __slots__ = ("client_tls", "server_tls")
    movable = False  # its TLS state lives in this process: never handed over

    def __init__(
        self,
        pump: Pump,
        owner: TunnelOwner,
        client: int,
        client_tls: TlsSocket | None,
        server: int,
        server_tls: TlsSocket | None,
        idle_timeout: float,
        stream: RequestStream | None,
        requests: RequestOwner,
        head_timeout: float,
    ) -> None:
        self.client_tls, self.server_tls = client_tls, server_tls
        super().__init__(pump, owner, client, server, idle_timeout, up=TlsUp, down=CopyFlow)
        up, down = self.up, self.down
        assert isinstance(up, TlsUp) and isinstance(down, CopyFlow)
        up.attach(stream, requests, head_timeout)
        up.src_tls = down.dst_tls = client_tls
        up.dst_tls = down.src_tls = server_tls

    def settle(self) -> None:
        """Once started: what the requests read with the head ask for (one may have been
        refused, or have upgraded, before the tunnel was made)."""
        up = self.up
        assert isinstance(up, TlsUp)
        if up.stream is not None and not up.pending:
            up._settle(up.stream)

    def close(self, reason: str, reset: bool = False) -> None:
        if not self.closed:  # the loop closes the descriptors, not the TLS sockets
            for tls in (self.client_tls, self.server_tls):
                if tls is not None:
                    release(tls)
            up = self.up
            assert isinstance(up, TlsUp)
            disarm_head(up)
        super().close(reason, reset)
