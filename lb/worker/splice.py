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
either way.  Readers and writers are removed before a descriptor is closed
(libuv's rule; uvloop otherwise fails on a reused fd number).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: a 1 MiB pipe roughly doubles bulk throughput over 64 KiB
F_SETPIPE_SZ = 1031
KEEP_PIPES = 64  # idle pipes a worker keeps for reuse
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

Pipe = tuple[int, int]


class PipePool:
    """Empty pipes for reuse; created and sized once, not per connection."""

    __slots__ = ("_free", "keep", "size")

    def __init__(self, size: int = PIPE_SIZE, keep: int = KEEP_PIPES) -> None:
        self._free: list[Pipe] = []
        self.size = size
        self.keep = keep

    def take(self) -> Pipe:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # EPERM past the per-user pipe budget: the default size still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        return r, w

    def give(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            discard(pipe)

    def close(self) -> None:
        for pipe in self._free:
            discard(pipe)
        self._free.clear()


def discard(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


def shutdown_write(fd: int) -> None:
    """``shutdown(fd, SHUT_WR)`` on a raw descriptor."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone; the other flow will notice
    finally:
        sock.detach()


class Flow:
    """One direction of a tunnel."""

    __slots__ = (
        "counter",
        "dst",
        "dst_name",
        "ended",
        "lcounter",
        "nbytes",
        "pipe",
        "queued",
        "reading",
        "src",
        "src_name",
        "tunnel",
        "writing",
    )

    def __init__(
        self, tunnel: Tunnel, src: int, dst: int, counters: tuple[int, int], src_name: str
    ) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.src_name = src_name  # "client" or "server", for the close reason
        self.dst_name = "server" if src_name == "client" else "client"
        # Indexes of this flow's byte counters (server's, listener's) in the pool's word view.
        self.counter, self.lcounter = counters
        self.pipe: Pipe | None = None
        self.queued = 0  # bytes in the pipe, not yet in dst
        self.nbytes = 0
        self.reading = False
        self.writing = False
        self.ended = False

    def on_readable(self) -> None:
        tunnel = self.tunnel
        pipe = tunnel.pipes.take()  # we read only with an empty pipe: self.pipe is None
        try:
            n = os.splice(self.src, pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
        except BlockingIOError:
            tunnel.pipes.give(pipe)
            return
        except OSError as exc:
            tunnel.pipes.give(pipe)
            tunnel.close(_reason(exc, self.src_name))
            return
        if n == 0:
            tunnel.pipes.give(pipe)
            self._end()
            return
        self.nbytes += n
        counters = tunnel.counters
        counters[self.counter] += n
        counters[self.lcounter] += n
        tunnel.active_at = time.monotonic()
        try:
            m = os.splice(pipe[0], self.dst, n, flags=SPLICE_FLAGS)
        except BlockingIOError:
            m = 0
        except OSError as exc:
            self.pipe, self.queued = pipe, n
            tunnel.close(_reason(exc, self.dst_name))
            return
        if m == n:
            tunnel.pipes.give(pipe)
            return
        self.pipe, self.queued = pipe, n - m
        tunnel.loop.remove_reader(self.src)
        self.reading = False
        tunnel.loop.add_writer(self.dst, self.on_writable)
        self.writing = True

    def on_writable(self) -> None:
        tunnel = self.tunnel
        pipe = self.pipe
        assert pipe is not None
        try:
            m = os.splice(pipe[0], self.dst, self.queued, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(_reason(exc, self.dst_name))
            return
        self.queued -= m
        tunnel.active_at = time.monotonic()
        if self.queued:
            return
        tunnel.loop.remove_writer(self.dst)
        self.writing = False
        self.pipe = None
        tunnel.pipes.give(pipe)
        tunnel.loop.add_reader(self.src, self.on_readable)
        self.reading = True

    def start(self) -> None:
        self.tunnel.loop.add_reader(self.src, self.on_readable)
        self.reading = True

    def _end(self) -> None:
        """End of file on the source: pass it on as a half-close."""
        self.tunnel.loop.remove_reader(self.src)
        self.reading = False
        self.ended = True
        shutdown_write(self.dst)
        self.tunnel.flow_ended(self)

    def stop(self, loop: asyncio.AbstractEventLoop, pipes: PipePool) -> None:
        if self.reading:
            loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            loop.remove_writer(self.dst)
            self.writing = False
        if self.pipe is not None:
            if self.queued:
                discard(self.pipe)
            else:
                pipes.give(self.pipe)
            self.pipe = None


def _reason(exc: OSError, side: str) -> str:
    """Why a tunnel ends on an error, naming the side that failed."""
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return f"{side} reset"
    if exc.errno == errno.ETIMEDOUT:
        return f"{side} timed out (keepalive)"
    return f"{side} error: {exc.strerror}"


class Tunnel:
    """A spliced client↔server connection; ``on_close(tunnel, reason)`` is called once."""

    __slots__ = (
        "active_at",
        "client",
        "closed",
        "counters",
        "down",
        "loop",
        "on_close",
        "pipes",
        "server",
        "timeout",
        "timer",
        "up",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pipes: PipePool,
        counters: memoryview,
        client: int,
        server: int,
        up_counters: tuple[int, int],
        down_counters: tuple[int, int],
        timeout: float,
        on_close: Callable[[Tunnel, str], None],
    ) -> None:
        self.loop = loop
        self.pipes = pipes
        self.counters = counters
        self.client = client
        self.server = server
        self.up = Flow(self, client, server, up_counters, "client")
        self.down = Flow(self, server, client, down_counters, "server")
        self.timeout = timeout
        self.on_close = on_close
        self.closed = False
        self.active_at = time.monotonic()
        self.timer = loop.call_later(timeout, self._check_idle)

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def flow_ended(self, flow: Flow) -> None:
        """Both flows ended: the side whose flow ended first closed the tunnel."""
        other = self.down if flow is self.up else self.up
        if other.ended:
            self.close(f"{other.src_name} closed")

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.active_at
        if idle >= self.timeout:
            self.close("tunnel idle timeout")
        else:
            self.timer = self.loop.call_later(self.timeout - idle, self._check_idle)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.up.stop(self.loop, self.pipes)
        self.down.stop(self.loop, self.pipes)
        os.close(self.client)
        os.close(self.server)
        self.on_close(self, reason)
