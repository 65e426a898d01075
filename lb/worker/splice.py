"""The splice pump: moves a tunnel's bytes kernel-to-kernel, both ways.

Theory of operation
-------------------
A tunnel is two flows, client→server ("up") and server→client ("down").  A
flow waits for its source to become readable, takes a pipe from the worker's
pool, splices what the socket holds into the pipe and at once from the pipe
into the destination.  If the destination takes everything, the pipe is empty
and goes straight back to the pool: an idle tunnel holds only its two
sockets.  If the destination is full, the flow keeps the pipe, stops reading
its source (backpressure: the kernel's socket buffers fill and TCP slows the
sender) and waits for the destination to become writable.

Invariants: a pipe in the pool is empty; a flow reads its source only while
its pipe is empty; end of file on a source is seen only with an empty pipe,
so it becomes ``shutdown(SHUT_WR)`` on the destination at once (half-close
is honoured in each direction independently).  The tunnel closes when both
flows have ended, on any error, or after ``tunnel_timeout`` without a byte
either way (the worker sweeps its tunnels for that; a tunnel holds no timer).
Its sockets are closed through the worker's :class:`~lb.worker.loop.Loop`.

End of file without a read: when the event that woke a flow says the peer
has sent its FIN (``EPOLLRDHUP``), every byte before the FIN was already in
the socket's receive queue (TCP processes a FIN only in sequence).  A splice
into an empty pipe stops early only when the pipe runs out of slots; so if it
moved fewer bytes than the pipe has slots (each slot holds at least one
byte), it drained the queue, and the flow ends at once: a connection whose
server answers and closes saves a ``splice`` that would return 0.

Last bytes and FIN: that same read's bytes are spliced on with
``SPLICE_F_MORE``, which holds them in the destination's send queue for the
``shutdown`` (or ``close``) that follows at once: the kernel puts the FIN on
the segment that carries them.  A server that answers and closes costs the
client one segment for its answer and end of file, not two and the ACK in
between: 18 segments per connection instead of 20 on loopback, counting all
four sockets (HAProxy, which merges them when it sees both at once, sends
18.8-19.5 under load).  Should the destination not take them all,
the flow waits for it as for any other bytes, and its ACKs push them out.

The read path does as little as it can per event: the two splices, a byte
count in the flow, the pipe back to the pool.  The shared-memory byte
counters (status, metrics) and the tunnel's last-activity time are brought
up to date by the worker's sweep (:meth:`Tunnel.flush`, at least once a
second) and when the tunnel closes, not on every read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from time import monotonic
from typing import TYPE_CHECKING

from lb.worker.loop import RDHUP
from lb.worker.pipes import PIPE_SIZE, Pipe, PipePool, discard

if TYPE_CHECKING:
    from lb.worker.conn import Connection
    from lb.worker.loop import Loop

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SPLICE_LAST = SPLICE_FLAGS | os.SPLICE_F_MORE  # last bytes before a FIN: see "Last bytes and FIN"
splice = os.splice  # called with positional arguments only: keyword parsing costs per call


# No argtypes and no errno: Python ints pass as C ints, the result is ignored, and
# the call costs about 0.7 µs instead of 1.1 µs.  PyDLL: the call keeps the GIL
# (``shutdown`` never blocks), which saves releasing and taking it again.
_libc_shutdown = ctypes.PyDLL(None).shutdown


def shutdown_write(fd: int) -> None:
    """``shutdown(fd, SHUT_WR)`` on a raw descriptor.

    Called through libc: wrapping the descriptor in a socket object would cost
    a ``getsockname`` on every tunnel's end.  A failure means the peer is gone
    already; the other flow notices.
    """
    _libc_shutdown(fd, socket.SHUT_WR)


class Flow:
    """One direction of a tunnel."""

    __slots__ = ("dst", "ended", "nbytes", "pipe", "queued", "src", "src_name", "tunnel")

    def __init__(self, tunnel: Tunnel, src: int, dst: int, src_name: str) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.src_name = src_name  # "client" or "server", for the close reason
        self.pipe: Pipe | None = None
        self.queued = 0  # bytes in the pipe, not yet in dst
        self.nbytes = 0  # moved since the tunnel's last flush (see Tunnel.flush)
        self.ended = False

    @property
    def dst_name(self) -> str:
        return "server" if self.src_name == "client" else "client"

    def on_readable(self) -> None:
        tunnel = self.tunnel
        free = tunnel.free
        # Borrow the pool's top pipe (we read only with an empty pipe) and take it
        # out only if bytes stay in it: a pop and an append per read would make
        # the list shrink and grow again.
        if not free:
            free.append(tunnel.pipes.new())
        pipe = free[-1]
        try:
            n = splice(self.src, pipe[1], PIPE_SIZE, None, None, SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(_reason(exc, self.src_name))
            return
        if n == 0:
            self._end()
            return
        self.nbytes += n
        # Drained, and the FIN is in (see "End of file without a read"): these are the
        # last bytes, and they go out with the end of file in one segment.
        last = n < pipe[2] and tunnel.loop.events & RDHUP
        try:
            m = splice(pipe[0], self.dst, n, None, None, SPLICE_LAST if last else SPLICE_FLAGS)
        except BlockingIOError:
            m = 0
        except OSError as exc:
            self.pipe, self.queued = free.pop(), n
            tunnel.close(_reason(exc, self.dst_name))
            return
        if m == n:  # the pipe is empty again, and still in the pool
            if last:
                self._end()
            return
        self.pipe, self.queued = free.pop(), n - m
        loop = tunnel.loop
        loop.remove_reader(self.src)
        loop.add_writer(self.dst, self.on_writable)

    def on_writable(self) -> None:
        tunnel = self.tunnel
        pipe = self.pipe
        assert pipe is not None
        try:
            m = splice(pipe[0], self.dst, self.queued, None, None, SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(_reason(exc, self.dst_name))
            return
        self.queued -= m
        tunnel.active_at = monotonic()
        if self.queued:
            return
        loop = tunnel.loop
        loop.remove_writer(self.dst)
        self.pipe = None
        tunnel.pipes.give(pipe)
        loop.add_reader(self.src, self.on_readable)

    def _end(self) -> None:
        """End of file on the source: pass it on as a half-close."""
        self.ended = True
        tunnel = self.tunnel
        other = tunnel.down if self is tunnel.up else tunnel.up
        if other.ended:  # both ways done: the other side closed first
            tunnel.close(_CLOSED[other.src_name])
            return
        tunnel.loop.remove_reader(self.src)
        shutdown_write(self.dst)

    def release(self, pipes: PipePool) -> None:
        """The tunnel is closing and this flow holds a pipe: give it back (or drop it)."""
        assert self.pipe is not None
        if self.queued:
            discard(self.pipe)
        else:
            pipes.give(self.pipe)
        self.pipe = None


_CLOSED = {side: f"{side} closed" for side in ("client", "server")}  # built once, not per tunnel


def _reason(exc: OSError, side: str) -> str:
    """Why a tunnel ends on an error, naming the side that failed."""
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return f"{side} reset"
    if exc.errno == errno.ETIMEDOUT:
        return f"{side} timed out (keepalive)"
    return f"{side} error: {exc.strerror}"


class Tunnel:
    """A spliced client<->server connection; tells its connection once, when it closes."""

    __slots__ = (
        "active_at",
        "closed",
        "conn",
        "down",
        "free",
        "keepalive",
        "loop",
        "pipes",
        "up",
    )

    def __init__(self, conn: Connection, server: int) -> None:
        worker = conn.worker
        self.conn = conn
        self.loop: Loop = worker.loop
        self.pipes: PipePool = worker.pipes
        self.free = worker.pipes.free
        self.up = Flow(self, conn.fd, server, "client")
        self.down = Flow(self, server, conn.fd, "server")
        self.closed = False
        self.keepalive = False  # on the server socket; set by the worker's sweep
        self.active_at = monotonic()

    def start(self, speculate: bool) -> None:
        """Watch both sockets; with ``speculate``, try the client's bytes at once.

        The server socket's interest becomes read in one ``epoll_ctl``: it
        turns from "connected" (write) to read if the connect (or the head's
        ``send``) was waited for, or is added if it was done at once.  In
        ``mode = "tcp"`` the client has usually sent its first bytes while we
        connected: reading them now saves a wakeup.
        """
        loop = self.loop
        up, down = self.up, self.down
        loop.add_reader(up.src, up.on_readable)
        if down.src in loop.writers:  # watched for the connect or the head: write becomes read
            loop.set(down.src, down.on_readable, None)
        else:
            loop.add_reader(down.src, down.on_readable)
        if speculate:
            loop.events = 0  # not woken by this socket: no end of file known
            up.on_readable()

    def flush(self) -> bool:
        """Count the bytes moved since the last flush (connection, shared counters); any?"""
        up, down = self.up.nbytes, self.down.nbytes
        if not (up or down):
            return False
        self.up.nbytes = self.down.nbytes = 0
        conn = self.conn
        conn.bytes_in += up
        conn.bytes_out += down
        conn.worker.count_bytes(conn, up, down)
        return True

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.flush()
        up, down, loop = self.up, self.down, self.loop
        if up.pipe is not None:
            up.release(self.pipes)
        if down.pipe is not None:
            down.release(self.pipes)
        loop.close(up.src)  # closing drops them from the epoll set
        loop.close(down.src)
        self.conn.tunnel_closed(self, reason)
        # Break the reference cycles (flow <-> tunnel <-> connection): reference
        # counting frees all of them now, and the cyclic GC has nothing to find.
        del self.up.tunnel, self.down.tunnel, self.conn
