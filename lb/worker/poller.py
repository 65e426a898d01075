"""Socket readiness for a worker: one epoll set, nested in the uvloop loop.

Why not ``loop.add_reader``: the profile of a worker under new-connection
load showed about a third of its system time in ``epoll_ctl`` and ``ioctl``.
uvloop gives every descriptor a libuv poll handle, and libuv checks each new
one with an extra ``epoll_ctl`` add and delete and sets it non-blocking
again; a connection's life creates three of them.  Here registering is one
``epoll_ctl``, changing interest another, and a socket that is closed leaves
the set by itself (the kernel drops a closed file from every epoll set), so
a connection costs four ``epoll_ctl`` calls instead of about fifteen system
calls.  The set's own descriptor is the only thing uvloop watches; timers and
signals stay with uvloop.

Theory of operation: level-triggered.  ``dispatch`` takes a batch of ready
descriptors and calls each one's reader and/or writer.  A callback may close
other descriptors of the same batch: closing goes through :meth:`close`,
which forgets the descriptor at once and defers the ``close(2)`` until the
batch is done, so a descriptor number cannot be reused (by an accept in the
same batch) while a stale event for it is still to be dispatched.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

# Readers also hear of the peer's end of file (RDHUP): a reader that sees it is
# called again at once (for the rest of the bytes or the end of file) instead of
# on the loop's next turn; a connection whose server answers and closes saves a turn.
IN, OUT = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT
RDHUP = select.EPOLLRDHUP
READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
FAILED = select.EPOLLHUP | select.EPOLLERR
BATCH = 512

Callback = Callable[[], None]


class Poller:
    __slots__ = ("_deferred", "_dispatching", "epoll", "events", "masks", "readers", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.epoll = select.epoll()
        self.readers: dict[int, Callback] = {}
        self.writers: dict[int, Callback] = {}
        self.masks: dict[int, int] = {}
        self.events = 0  # the events of the writer being called (a connect: done or failed?)
        self._dispatching = False
        self._deferred: list[int] = []
        loop.add_reader(self.epoll.fileno(), self.dispatch)

    def _update(self, fd: int) -> None:
        mask = (IN if fd in self.readers else 0) | (OUT if fd in self.writers else 0)
        old = self.masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            del self.masks[fd]
            self.epoll.unregister(fd)
        elif not old:
            self.masks[fd] = mask
            self.epoll.register(fd, mask)
        else:
            self.masks[fd] = mask
            self.epoll.modify(fd, mask)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self.readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self.writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._update(fd)

    def set(self, fd: int, reader: Callback | None, writer: Callback | None) -> None:
        """Both interests of ``fd`` at once: one ``epoll_ctl`` (e.g. connected: write -> read)."""
        for table, callback in ((self.readers, reader), (self.writers, writer)):
            if callback is None:
                table.pop(fd, None)
            else:
                table[fd] = callback
        self._update(fd)

    def close(self, fd: int) -> None:
        """Forget ``fd`` and close it (after the current batch).

        Only for descriptors no other process or descriptor shares (sockets
        this worker accepted or connected): closing their last reference is
        what takes them out of the epoll set.
        """
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)
        self.masks.pop(fd, None)
        if self._dispatching:
            self._deferred.append(fd)
        else:
            os.close(fd)

    def dispatch(self) -> None:
        readers, writers, rdhup = self.readers, self.writers, RDHUP
        self._dispatching = True
        try:
            for fd, events in self.epoll.poll(0, BATCH):
                if events & READ:
                    callback = readers.get(fd)
                    if callback is not None:
                        callback()
                        if events & rdhup and readers.get(fd) is callback:
                            callback()
                if events & WRITE:
                    callback = writers.get(fd)
                    if callback is not None:
                        self.events = events
                        callback()
        finally:
            self._dispatching = False
            deferred, self._deferred = self._deferred, []
            for fd in deferred:
                os.close(fd)

    def shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
