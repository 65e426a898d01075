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
sender) and waits for the destination to become writable.  While it does not
read its source it still watches it for failure (see
:meth:`~lb.worker.loop.Loop.watch_failure`): a peer that resets while the
other side stalls ends the tunnel at once, not at its idle timeout.

Invariants: a pipe in the pool is empty; a flow reads its source only while
its pipe is empty; end of file on a source is seen only with an empty pipe,
so it becomes ``shutdown(SHUT_WR)`` on the destination at once (half-close
is honoured in each direction independently).  The tunnel closes when both
flows have ended, on any error or reset, or after ``tunnel_timeout`` without
a byte either way.  Its sockets are closed through the worker's
:class:`~lb.worker.loop.Loop`, and its owner (the connection) hears of it
once, through :meth:`TunnelOwner.tunnel_closed`.

No pipe: when the worker is out of descriptors (or memory) for a new pipe,
the flow stops reading its source, as for a full destination, and tries
again every ``PIPE_RETRY`` seconds: its bytes wait in the kernel's socket
buffers, none is lost, and the tunnel goes on once descriptors are free.

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
between.  Should the destination not take them all, the flow waits for it as
for any other bytes, and its ACKs push them out.

The read path does as little as it can per event: the two splices, a byte
count in the flow, the pipe back to the pool, and, for the first bytes since
the last sweep, the tunnel in the pump's ``moved`` set.  The shared-memory
byte counters and the tunnel's last-activity time are brought up to date by
the worker's sweep of that list (:meth:`Tunnel.flush`, once a second) and when
the tunnel closes, not on every read; an idle tunnel costs the sweep nothing.

Timeouts: a tunnel's deadline is in the worker's
:class:`~lb.worker.deadlines.Deadlines`: first ``KEEPALIVE_AFTER`` after it
opens (then TCP keepalive goes on for its server socket: a connection that
ends sooner never needs it, and the connect path saves four system calls),
then ``tunnel_timeout`` after its last byte, checked when it comes due.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from lb.sockets import set_keepalive_fd
from lb.worker.deadlines import Deadlines, Queue
from lb.worker.limits import LOCAL_ERRNOS
from lb.worker.loop import ERR, RDHUP, Loop, Timer
from lb.worker.pipes import PIPE_SIZE, Pipe, PipePool, discard

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SPLICE_LAST = SPLICE_FLAGS | os.SPLICE_F_MORE  # last bytes before a FIN: see "Last bytes and FIN"
splice = os.splice  # called with positional arguments only: keyword parsing costs per call
PIPE_RETRY = 0.1  # seconds between attempts at a new pipe when none could be made
KEEPALIVE_AFTER = 1.0  # seconds a tunnel lasts before keepalive goes on for its server socket

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


def socket_error(fd: int) -> int:
    """The pending error of a socket (``SO_ERROR``, which also clears it)."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        sock.detach()


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_on_close(fd: int) -> None:
    """Make the ``close`` of a socket send a reset and drop what it still holds."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # gone already
    finally:
        sock.detach()


class TunnelOwner(Protocol):
    """What a tunnel reports to: the connection it was made for."""

    def tunnel_moved(self, up: int, down: int) -> None:
        """Bytes moved since the last report (client to server, server to client)."""

    def tunnel_closed(self, reason: str, up: int, down: int) -> None:
        """The tunnel closed, having moved these bytes since the last report."""


class Pump:
    """What a worker's tunnels share: its loop, pipes and deadlines, and the lists its
    sweep flushes (``moved``: a tunnel leaves it when it closes, so that nothing keeps a
    closed tunnel alive) and its pipe retry walks (``starved``)."""

    __slots__ = ("deadlines", "free", "loop", "moved", "on_starved", "pipes", "retry", "starved")

    def __init__(
        self,
        loop: Loop,
        pipes: PipePool,
        deadlines: Deadlines,
        on_starved: Callable[[OSError], None] = lambda _exc: None,
    ) -> None:
        self.loop = loop
        self.pipes = pipes
        self.free = pipes.free
        self.deadlines = deadlines
        self.moved: set[Tunnel] = set()  # tunnels with bytes not yet flushed
        self.starved: list[Flow] = []  # flows waiting for a pipe
        self.retry: Timer | None = None
        self.on_starved = on_starved  # the worker hears of each failure (a warning per episode)

    def starve(self, flow: Flow, exc: OSError) -> None:
        """No pipe could be made for ``flow``: stop reading its source, try again soon."""
        self.loop.watch_failure(flow.src, flow.on_failure)
        self.starved.append(flow)
        if self.retry is None:
            self.retry = self.loop.call_later(PIPE_RETRY, self._retry)
        self.on_starved(exc)

    def _retry(self) -> None:
        self.retry = None
        flows, self.starved = self.starved, []
        for flow in flows:
            if getattr(flow, "tunnel", None) is not None:  # not closed since
                self.loop.add_reader(flow.src, flow.on_readable)  # it tries for a pipe again

    def sweep(self) -> None:
        """Count the bytes every tunnel moved since the last sweep (its counters, its
        last-activity time); a tunnel whose count fails is ended, the others counted."""
        moved, self.moved = self.moved, set()
        for tunnel in moved:
            tunnel.moved = False  # out of the set already
            if not tunnel.closed:
                try:
                    tunnel.flush()
                except Exception as exc:
                    self.deadlines.on_error(exc)
                    tunnel.fail(exc)


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

    def new_pipe(self) -> bool:
        """Put a new pipe on the tunnel's free list; False if none can be had for now
        (the balancer's own limit: the flow waits, starved, until one is free)."""
        tunnel = self.tunnel
        try:
            tunnel.free.append(tunnel.pump.pipes.new())
        except OSError as exc:
            if exc.errno not in LOCAL_ERRNOS:
                raise
            tunnel.pump.starve(self, exc)
            return False
        return True

    def on_readable(self) -> None:
        tunnel = self.tunnel
        free = tunnel.free
        # Borrow the pool's top pipe (we read only with an empty pipe) and take it
        # out only if bytes stay in it: a pop and an append per read would make
        # the list shrink and grow again.
        if not free and not self.new_pipe():
            return
        pipe = free[-1]
        try:
            n = splice(self.src, pipe[1], PIPE_SIZE, None, None, SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(failure_reason(exc, self.src_name), reset=True)
            return
        if n == 0:
            self._end()
            return
        self.nbytes += n
        if not tunnel.moved:  # the first bytes since the last sweep: it counts them
            tunnel.moved = True
            tunnel.pump.moved.add(tunnel)
        # Drained, and the FIN is in (see "End of file without a read"): these are the
        # last bytes, and they go out with the end of file in one segment.
        last = n < pipe[2] and tunnel.loop.events & RDHUP
        try:
            m = splice(pipe[0], self.dst, n, None, None, SPLICE_LAST if last else SPLICE_FLAGS)
        except BlockingIOError:
            m = 0
        except OSError as exc:
            self.pipe, self.queued = free.pop(), n
            tunnel.close(failure_reason(exc, self.dst_name), reset=True)
            return
        if m == n:  # the pipe is empty again, and still in the pool
            if last:
                self._end()
            return
        self.pipe, self.queued = free.pop(), n - m
        loop = tunnel.loop
        loop.watch_failure(self.src, self.on_failure)  # not read, still heard if it resets
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
            tunnel.close(failure_reason(exc, self.dst_name), reset=True)
            return
        self.queued -= m
        tunnel.active_at = monotonic()
        if self.queued:
            return
        loop = tunnel.loop
        loop.remove_writer(self.dst)
        self.pipe = None
        tunnel.pump.pipes.give(pipe)
        loop.add_reader(self.src, self.on_readable)

    def on_failure(self) -> None:
        """The source, not read for now, reports an error or a hang-up."""
        tunnel = self.tunnel
        if tunnel.loop.events & ERR:
            err = socket_error(self.src) or errno.ECONNRESET
            tunnel.close(failure_reason(OSError(err, os.strerror(err)), self.src_name), reset=True)
        else:  # shut down both ways, cleanly: nothing more can come from it
            tunnel.loop.remove_reader(self.src)

    def fail(self, exc: BaseException) -> None:
        """A callback of this flow raised (see :meth:`~lb.worker.loop.Loop.run`)."""
        tunnel = getattr(self, "tunnel", None)
        if tunnel is not None:
            tunnel.fail(exc)

    def _end(self) -> None:
        """End of file on the source: pass it on as a half-close."""
        self.ended = True
        tunnel = self.tunnel
        other = tunnel.down if self is tunnel.up else tunnel.up
        if other.ended:  # both ways done: the other side closed first
            tunnel.close(_CLOSED[other.src_name])
            return
        tunnel.loop.watch_failure(self.src, self.on_failure)  # a later reset still ends it
        shutdown_write(self.dst)

    def release(self, pipes: PipePool) -> None:
        """The tunnel is closing and this flow holds a pipe: give it back (or drop it)."""
        assert self.pipe is not None
        if self.queued:
            discard(self.pipe)
        else:
            pipes.give(self.pipe)
        self.pipe = None


FlowState = tuple[bool, int, Pipe | None]  # ended, bytes queued in its pipe, the pipe

_CLOSED = {side: f"{side} closed" for side in ("client", "server")}  # built once, not per tunnel


def failure_reason(exc: OSError, side: str) -> str:
    """Why a tunnel ends on an error, naming the side that failed."""
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return f"{side} reset"
    if exc.errno == errno.ETIMEDOUT:
        return f"{side} timed out (keepalive)"
    return f"{side} error: {exc.strerror}"


class Tunnel:
    """A spliced client<->server connection; tells its owner once, when it closes."""

    __slots__ = (
        "active_at",
        "closed",
        "down",
        "free",
        "idle_timeout",
        "keepalive",
        "loop",
        "moved",
        "owner",
        "pump",
        "timeouts",
        "up",
    )
    movable = True  # it may go to another process on reload (see lb.worker.handover)

    def __init__(
        self,
        pump: Pump,
        owner: TunnelOwner,
        client: int,
        server: int,
        idle_timeout: float,
        active_at: float = 0.0,
        keepalive: bool = False,
        up: type[Flow] = Flow,
        down: type[Flow] | None = None,
    ) -> None:
        """A new tunnel; ``active_at`` and ``keepalive``: one adopted from another process,
        its last byte's time and whether its server socket has keepalive already; ``up``:
        the class of its client-to-server flow (one that reads HTTP requests:
        :mod:`lb.worker.requests`), ``down`` of the other (TLS: :mod:`lb.worker.tls`)."""
        self.pump = pump
        self.loop = pump.loop
        self.free = pump.free
        self.owner: TunnelOwner | None = owner
        self.up = up(self, client, server, "client")
        self.down = (down or Flow)(self, server, client, "server")
        self.closed = False
        self.keepalive = keepalive  # on its server socket, KEEPALIVE_AFTER after it opened
        self.moved = False  # in the pump's set of tunnels to flush
        self.idle_timeout = idle_timeout
        self.active_at = active_at or monotonic()
        first = idle_timeout if keepalive else KEEPALIVE_AFTER
        self.timeouts: Queue | None = pump.deadlines.arm(self, first, self.active_at)

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

    def resume(
        self, up: tuple[bool, int, Pipe | None], down: tuple[bool, int, Pipe | None]
    ) -> None:
        """Watch an adopted tunnel's sockets as its flows were: each (ended, queued, pipe)."""
        loop, pipes = self.loop, self.pump.pipes
        for flow, (ended, queued, pipe) in ((self.up, up), (self.down, down)):
            flow.ended = ended
            if pipe is not None:
                pipes.adopt(pipe)
                flow.pipe, flow.queued = pipe, queued
        for flow in (self.up, self.down):
            if flow.ended or flow.pipe is not None:
                loop.watch_failure(flow.src, flow.on_failure)
            else:
                loop.add_reader(flow.src, flow.on_readable)
            if flow.pipe is not None:
                loop.add_writer(flow.dst, flow.on_writable)

    def detach(self) -> None:
        """The tunnel went to another process: forget it and close this process's copies
        of its descriptors (no peer sees it: the other process holds them too).  Its owner
        is not told; the flows' byte counts must have been flushed."""
        self.closed = True
        up, down = self.up, self.down
        if self.timeouts is not None:
            self.timeouts.pop(self, None)
        if self.moved:
            self.pump.moved.discard(self)
        for fd in (up.src, down.src):
            self.loop.close(fd)
        for flow in (up, down):
            if flow.pipe is not None:
                self.loop.close(flow.pipe[0])
                self.loop.close(flow.pipe[1])
                flow.pipe = None
        self.owner = None
        del up.tunnel, down.tunnel

    def flush(self) -> None:
        """Count the bytes moved since the last flush (to the owner), and when."""
        if self.moved:
            self.moved = False
            self.pump.moved.discard(self)
        up, down = self.up.nbytes, self.down.nbytes
        if up or down:
            self.up.nbytes = self.down.nbytes = 0
            self.active_at = monotonic()
            if self.owner is not None:
                self.owner.tunnel_moved(up, down)

    def expire(self) -> None:
        """Its deadline came: keepalive for the server socket, or the idle timeout."""
        deadlines = self.pump.deadlines
        if not self.keepalive:  # KEEPALIVE_AFTER after it opened
            self.keepalive = True
            set_keepalive_fd(self.down.src)
            self.timeouts = deadlines.arm(self, self.idle_timeout, self.active_at)
            return
        self.flush()
        if monotonic() - self.active_at >= self.idle_timeout:
            self.close("tunnel idle timeout")
        else:  # active since its deadline was set: due again idle_timeout after its last byte
            assert self.timeouts is not None
            deadlines.rearm(self, self.timeouts, self.active_at + self.idle_timeout)

    def fail(self, exc: BaseException) -> None:
        """Something failed while handling this tunnel: it ends, and says why."""
        self.close(f"worker error: {exc!r}")

    def close(self, reason: str, reset: bool = False) -> None:
        """Close both sockets; ``reset``: one side failed or reset, and the other is reset
        too (what it still holds is dropped at once, not kept for a peer that stalls)."""
        if self.closed:
            return
        self.closed = True
        up, down, pipes = self.up, self.down, self.pump.pipes
        if reset:
            reset_on_close(up.src)
            reset_on_close(down.src)
        if self.timeouts is not None:
            self.timeouts.pop(self, None)
        try:
            if up.pipe is not None:
                up.release(pipes)
            if down.pipe is not None:
                down.release(pipes)
        finally:
            self.loop.close(up.src)  # closing drops them from the epoll set
            self.loop.close(down.src)
        if self.moved:
            self.pump.moved.discard(self)
        owner, self.owner = self.owner, None
        # Break the reference cycles (flow <-> tunnel <-> connection): reference
        # counting frees all of them now, and the cyclic GC has nothing to find.
        del up.tunnel, down.tunnel
        if owner is not None:
            owner.tunnel_closed(reason, up.nbytes, down.nbytes)
