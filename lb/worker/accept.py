"""Accepting: a worker's own listening sockets, and taking from the other slots' queues.

The supervisor forks a worker with every listener's ``SO_REUSEPORT`` sockets
(socket k belongs to slot k mod workers).  The worker accepts on its slot's
sockets in batches until ``EAGAIN``, and hands every connection to the
worker's ``on_accept``, which may not raise (it ends a connection whose start
fails).  It stops accepting at its cap (the kernel's listen backlog holds
the rest until a connection ends) and, for ``ACCEPT_BACKOFF``, when the
worker is out of descriptors or memory for a new socket; the operator hears
of that once per episode.

Taking from the other slots
---------------------------
The kernel spreads a listener's connections over its sockets, one per
slot, by a hash of their addresses; a worker that is preempted, busy with a
batch or stuck leaves its share waiting while another worker may have
nothing to do.  So a worker keeps the other slots' sockets in an epoll set
of their own (``queued``) that never wakes it, and looks at it when it is
idle: between its busy polls (the loop's ``on_idle``), and at each sweep.
It takes what waits there when that slot's worker is behind: it holds more
connections than this one (its count in the pool, at most ``PUBLISH_DELAY``
late), or it is not accepting (its slot is empty or starting, or its
heartbeat is more than ``STALLED_AFTER`` old).  Otherwise the connections
are left to the slot's worker.  So:

- long-lived connections stay spread over the workers as the hash spreads
  them (taken by whichever worker woke first, 200 tunnels opened one at a
  time all went to one worker);
- a worker that sleeps is not woken for another's connections (every
  arrival waking two workers cost a quarter more CPU per connection at low
  rates);
- a stuck worker's queue is served within about ``STALLED_AFTER`` plus a
  sweep, not after ``worker_timeout``; a slot's queue still passes to its
  successor.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.worker.limits import LOCAL_ERRNOS, Episode
from lb.worker.loop import Loop
from lb.worker.runtime import ListenerRuntime
from lb.worker.tally import Tally

ACCEPT_BATCH = 64  # connections accepted per readable event, for fairness between listeners
ACCEPT_BACKOFF = 0.1  # seconds accepting pauses when out of file descriptors or memory
HEARTBEAT_INTERVAL = 1.0
STALLED_AFTER = 2 * HEARTBEAT_INTERVAL  # a slot's worker with an older heartbeat is not accepting
GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})

OnAccept = Callable[[int, tuple[Any, ...], ListenerRuntime], None]


@dataclass(frozen=True, slots=True)
class Listening:
    """One listening socket as a worker watches it."""

    fd: int
    accept: Any  # the socket's _accept: (fd, addr), without a socket object
    listener: ListenerRuntime
    owner: int  # the offset in the pool of the slot it belongs to (see Acceptor.take)


class Acceptor:
    __slots__ = (
        "accepting",
        "backoff",
        "cap",
        "closed",
        "loop",
        "on_accept",
        "others",
        "own",
        "pool",
        "queued",
        "stopped",
        "tally",
    )

    def __init__(
        self,
        loop: Loop,
        pool: Pool,
        tally: Tally,
        listeners: list[ListenerRuntime],
        slot: int,
        workers: int,
        cap: int,
        on_accept: OnAccept,
        log: Any,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.tally = tally
        self.cap = cap  # connections held at once
        self.on_accept = on_accept
        self.accepting = False
        self.stopped = False  # draining: never again
        self.closed = False
        self.backoff = Episode(log, "accept_paused", "accept_resumed")
        geo = pool.geometry
        mine = geo.slot(slot)
        listening = [
            Listening(sock.fileno(), sock._accept, listener, geo.slot(k % workers))  # type: ignore[attr-defined]
            for listener in listeners
            for k, sock in enumerate(listener.socks)
        ]
        self.own = [ls for ls in listening if ls.owner == mine]
        for ls in listening:  # shared with the supervisor: never closed by the loop
            loop.protect(ls.fd)
        # The other slots' sockets, in a set of their own that never wakes the loop:
        # see "Taking from the other slots".
        self.others = {ls.fd: ls for ls in listening if ls.owner != mine}
        self.queued = select.epoll()
        for fd in self.others:
            self.queued.register(fd, select.EPOLLIN)

    def resume(self) -> None:
        if self.accepting or self.stopped:
            return
        self.accepting = True
        loop = self.loop
        for ls in self.own:
            loop.add_reader(ls.fd, functools.partial(self.accept, ls.accept, ls.listener))

    def pause(self) -> None:
        if not self.accepting:
            return
        self.accepting = False
        for ls in self.own:  # shared with the supervisor: unregister, never close
            self.loop.remove_reader(ls.fd)

    def stop(self) -> None:
        """Stop for good (drain): the worker closes its copies of the listening sockets next."""
        self.pause()
        self.stopped = True
        for fd in [ls.fd for ls in self.own] + list(self.others):
            self.loop.unprotect(fd)

    def take(self) -> bool:
        """Idle: accept what waits on the other slots' sockets whose worker is behind
        (see "Taking from the other slots"); whether there was any."""
        if not self.accepting:
            return False
        took, q, tally = False, self.pool.q, self.tally
        for fd, _ in self.queued.poll(0):
            ls = self.others[fd]
            if tally.active < q[ls.owner + L.S_CONNECTIONS] or self._not_accepting(ls.owner):
                accepted = ls.listener.tally_at + L.C_TOTAL
                before = tally.values[accepted]
                self.accept(ls.accept, ls.listener)
                took = took or tally.values[accepted] != before  # its owner may have emptied it
        return took

    def _not_accepting(self, owner: int) -> bool:
        """Whether the worker of the slot at ``owner`` is gone, starting or stuck."""
        if self.pool.q[owner + L.S_STATE] != L.SLOT_RUNNING:
            return True
        return time.monotonic() - self.pool.d[owner + L.S_BEAT] > STALLED_AFTER

    def accept(self, accept: Any, listener: ListenerRuntime) -> None:
        tally, on_accept, set_blocking = self.tally, self.on_accept, os.set_blocking
        for _ in range(ACCEPT_BATCH):
            if tally.active >= self.cap:
                self.pause()  # the listen backlog holds the rest until we are below the cap
                return
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in LOCAL_ERRNOS:
                    self._back_off(exc)
                    return
                if exc.errno in GONE:
                    continue  # that client is gone already
                raise
            set_blocking(fd, False)
            on_accept(fd, addr, listener)

    def _back_off(self, exc: OSError) -> None:
        """Out of descriptors or memory: the backlog holds new clients for a while."""
        self.backoff.hit(exc.errno or 0, "accept")
        self.pause()
        self.loop.call_later(ACCEPT_BACKOFF, self.resume)

    def fail(self, exc: BaseException) -> None:
        """A bug while accepting (the loop reported it): back off, as when out of descriptors."""
        self.pause()
        self.loop.call_later(ACCEPT_BACKOFF, self.resume)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queued.close()
