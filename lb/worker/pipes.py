"""A worker's pool of pipes for splicing: created and sized once, reused by every tunnel.

A pipe is taken when a flow has bytes to move and given back as soon as it
is empty again, so an idle tunnel holds no pipe.  The pool keeps up to
``KEEP_PIPES`` empty pipes for reuse; more are made when more flows hold
bytes in flight at once, and closed when they come back to a full pool.
"""

from __future__ import annotations

import fcntl
import os

PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: a 1 MiB pipe roughly doubles bulk throughput over 64 KiB
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PAGE = os.sysconf("SC_PAGE_SIZE")  # a pipe slot holds at most a page
KEEP_PIPES = 64  # idle pipes a worker keeps for reuse

Pipe = tuple[int, int, int]  # read end, write end, slots


class PipePool:
    """Empty pipes for reuse; created and sized once, not per connection.

    Flows use ``free`` directly (a list pop and append on the hot path).
    """

    __slots__ = ("free", "keep", "size")

    def __init__(self, size: int = PIPE_SIZE, keep: int = KEEP_PIPES) -> None:
        self.free: list[Pipe] = []
        self.size = size
        self.keep = keep

    def new(self) -> Pipe:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:  # EPERM past the per-user pipe budget: a smaller pipe still works
            size = fcntl.fcntl(w, F_GETPIPE_SZ)
        return r, w, size // PAGE

    def give(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            discard(pipe)

    def close(self) -> None:
        for pipe in self.free:
            discard(pipe)
        self.free.clear()


def discard(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
