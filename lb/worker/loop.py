"""A worker's event loop: one epoll set for its sockets, a few timers, two signals.

Why not uvloop: a worker's loop has one job, waiting on sockets.  Nested in
uvloop, every wake-up cost two ``epoll_wait`` calls (libuv's, then ours) and
libuv's turn; uvloop's own per-descriptor handles, tried before that, cost
about fifteen system calls per connection.  This loop took the worker's
instructions per 64-byte round trip from 20,400 to 15,100
(``bench/instructions.py``) and the round trip, with every process on one
CPU, from 33.1 to 31.8 µs: what HAProxy takes there.

Theory of operation: level-triggered.  Registering a descriptor is one
``epoll_ctl``, changing its interest another, and a socket that is closed
leaves the set by itself (the kernel drops a closed file from every epoll
set).  Each turn waits, with no timeout, and dispatches a batch of ready
descriptors (``events`` holds the mask of the callback being called: a
connect done or failed, a peer's end of file); a timerfd armed for the
earliest timer and the signals' wake-up pipe are descriptors of the same set,
so a turn reads no clock.  Busy polling (``busy_poll`` seconds, the
config's ``busy_poll_us``): a turn that finds nothing ready polls again,
calling ``sched_yield`` between polls so that any other runnable process on
the CPU goes first, until ``busy_poll`` has passed since the last work; only
then does it sleep.  A message answered within that time is met without
waking the worker: on a VM, waking a process on an idle vCPU costs tens of µs
(the 64-byte round trip through the balancer went from about 71 to 41 µs).
Under load the first poll finds work and nothing spins; idle, the worker
sleeps after ``busy_poll`` at most.  A yield that gives the CPU away for
``CONTENDED`` or more (another task ran) ends the polling, and the worker
does not poll again for ``CALM_AFTER``: when the machine has more runnable
tasks than CPUs, a task that yields waits in the run queue behind them for
as long as a time slice, and no event wakes it, where a sleeping one is
woken by its next event.  Between those polls the loop calls
``on_idle``, if given: work that is worth doing only when there is nothing
else (the worker takes connections waiting on other workers' sockets), and
that never wakes the loop.  A callback may close other descriptors
of the same batch: closing goes through :meth:`Loop.close`, which forgets the
descriptor at once and defers the ``close(2)`` until the batch is done, so a
descriptor number cannot be reused (by an accept in the same batch) while a
stale event for it is still to be dispatched.  Signal handlers only enqueue
(the wake-up pipe carries the signal numbers); their callbacks run in the
loop.

Failure: an exception in a callback is reported to ``on_error`` once, then
handed to the callback's owner: a callback that is a bound method of an
object with a ``fail(exc)`` method (a connection, a tunnel's flow, the
acceptor) has that method called, and the owner ends what it owns (a
connection is answered or aborted, its descriptors closed through
:meth:`close`, its counters settled).  A descriptor whose callback has no
such owner, or whose owner failed too, is forgotten and closed, so the bug
can neither spin (level-triggered readiness would report it on every turn)
nor leak it; descriptors marked with :meth:`protect` (listening sockets) and
the loop's own (the timerfd, the wake-up pipe) are never closed that way.
A failing timer callback is handed to its owner the same way.

Watching only for failure: :meth:`watch_failure` keeps a descriptor in the
set with no interest but the errors and hang-ups epoll always reports, so a
flow that stopped reading its source (the other side is full) still hears
of a reset at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import os
import select
import signal
from collections.abc import Callable
from time import monotonic

# Readers also hear of the peer's end of file (RDHUP): a tunnel's flow that sees it
# with the last bytes passes the end of file on at once, without another read.
IN, OUT = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT
RDHUP = select.EPOLLRDHUP
READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
FAILED = select.EPOLLHUP | select.EPOLLERR
ERR = select.EPOLLERR  # always reported: as an interest, it only keeps a descriptor in the set
BATCH = 512
# A sched_yield that takes this long gave the CPU to another task for a while (longer
# than this VM's rare stalls of an idle CPU, at most about 100 µs in 200,000 yields):
# busy polling stops, and starts again after CALM_AFTER.
CONTENDED = 200e-6
CALM_AFTER = 0.1

Callback = Callable[[], None]

# timerfd (Python 3.11 has no binding; 3.13's os.timerfd_* would do): the loop's
# timers wake it through the epoll set, so a turn needs no timeout and no clock.
_libc = ctypes.CDLL(None, use_errno=True)
CLOCK_MONOTONIC = 1  # time.monotonic's clock on Linux
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class TimerFd:
    """A CLOCK_MONOTONIC timerfd that fires once, at an absolute ``time.monotonic()``."""

    __slots__ = ("fd", "spec")

    def __init__(self) -> None:
        self.fd = _check(_libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
        self.spec = _Itimerspec()

    def arm(self, when: float) -> None:
        seconds, fraction = divmod(max(when, 1e-9), 1.0)  # 0 would disarm it
        self.spec.it_value.tv_sec = int(seconds)
        self.spec.it_value.tv_nsec = int(fraction * 1e9)
        _check(_libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self.spec), None))

    def clear(self) -> None:
        """Consume the expiry, so the descriptor is no longer readable."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class Timer:
    """A call at a point in time; ``cancel`` before it fires and it never does."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callback | None) -> None:
        self.when = when
        self.callback = callback

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        self.callback = None


class Loop:
    __slots__ = (
        "_after_turn",
        "_armed",
        "_busy_poll",
        "_calm_at",
        "_deferred",
        "_dispatching",
        "_on_idle",
        "_protected",
        "_running",
        "_signals",
        "_timerfd",
        "_timers",
        "_wakeup",
        "epoll",
        "events",
        "masks",
        "on_error",
        "readers",
        "writers",
    )

    def __init__(
        self,
        on_error: Callable[[BaseException], None],
        busy_poll: float = 0.0,
        on_idle: Callable[[], bool] | None = None,
    ) -> None:
        self.epoll = select.epoll()
        self._busy_poll = busy_poll  # seconds; 0: sleep as soon as nothing is ready
        self._on_idle = on_idle  # called between busy polls; True: it found work
        self._calm_at = 0.0  # before then (monotonic()) the CPU had other work: no polling
        self.readers: dict[int, Callback] = {}
        self.writers: dict[int, Callback] = {}
        self.masks: dict[int, int] = {}
        self.events = 0  # the events of the callback being called
        self.on_error = on_error
        self._dispatching = False
        self._deferred: list[int] = []
        self._after_turn: list[Callback] = []  # one-shot, when this turn's callbacks are done
        self._timers: list[Timer] = []
        self._timerfd = TimerFd()
        self._armed = float("inf")  # when the timerfd fires next
        self._protected = {self._timerfd.fd}  # never closed when a callback fails
        self.add_reader(self._timerfd.fd, self._run_timers)
        self._signals: dict[int, Callback] = {}
        self._wakeup: tuple[int, int] | None = None
        self._running = False

    # -- descriptors -------------------------------------------------------------

    def _interest(self, fd: int, add: int, drop: int) -> None:
        """Turn ``add`` on and ``drop`` off in ``fd``'s interest: at most one ``epoll_ctl``."""
        masks = self.masks
        old = masks.get(fd, 0)
        mask = (old | add) & ~drop
        if mask == old:
            return
        if not mask:
            del masks[fd]
            self.epoll.unregister(fd)
        elif not old:
            masks[fd] = mask
            self.epoll.register(fd, mask)
        else:
            masks[fd] = mask
            self.epoll.modify(fd, mask)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self.readers[fd] = callback
        if fd not in self.masks:  # not in the set yet (a new socket): one register
            self.masks[fd] = IN
            self.epoll.register(fd, IN)
        else:
            self._interest(fd, IN, 0)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            if fd in self.writers:
                self._interest(fd, 0, IN)
            else:  # reading was its only interest: it leaves the set
                del self.masks[fd]
                self.epoll.unregister(fd)

    def watch_failure(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` only on an error or hang-up of ``fd`` (its reader is replaced):
        for a source that is not read for a while but whose reset must end its tunnel."""
        self.readers[fd] = callback
        old = self.masks.get(fd, 0)
        mask = (old | ERR) & ~IN
        if mask != old:  # what _interest does, inline: once or twice per tunnel
            self.masks[fd] = mask
            if old:
                self.epoll.modify(fd, mask)
            else:
                self.epoll.register(fd, mask)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self.writers[fd] = callback
        self._interest(fd, OUT, 0)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._interest(fd, 0, OUT)

    def set(self, fd: int, reader: Callback | None, writer: Callback | None) -> None:
        """Both interests of ``fd`` at once: one ``epoll_ctl`` (e.g. connected: write -> read)."""
        add = drop = 0
        if reader is None:
            self.readers.pop(fd, None)
            drop = IN
        else:
            self.readers[fd] = reader
            add = IN
        if writer is None:
            self.writers.pop(fd, None)
            drop |= OUT
        else:
            self.writers[fd] = writer
            add |= OUT
        self._interest(fd, add, drop)

    def protect(self, fd: int) -> None:
        """Never close ``fd`` when its callback fails (a listening socket the supervisor shares)."""
        self._protected.add(fd)

    def unprotect(self, fd: int) -> None:
        self._protected.discard(fd)

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

    # -- timers and signals ------------------------------------------------------

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(monotonic() + delay, callback)

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Call ``callback`` at ``when`` (``time.monotonic()`` seconds)."""
        timer = Timer(when, callback)
        heapq.heappush(self._timers, timer)
        if timer.when < self._armed:
            self._armed = timer.when
            self._timerfd.arm(timer.when)
        return timer

    def _run_timers(self) -> None:
        """The timerfd fired: run what is due, arm it for the next one."""
        self._timerfd.clear()
        timers, now = self._timers, monotonic()
        while timers and timers[0].when <= now:
            callback = heapq.heappop(timers).callback
            if callback is not None:
                try:
                    callback()
                except Exception as exc:
                    self._failed(-1, callback, exc)
        self._armed = timers[0].when if timers else float("inf")
        if timers:
            self._timerfd.arm(self._armed)

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run ``callback`` in the loop after ``signum`` arrives."""
        if self._wakeup is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wakeup = (r, w)
            self._protected.add(r)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.add_reader(r, self._read_signals)
        self._signals[signum] = callback
        signal.signal(signum, _enqueue_only)

    def _read_signals(self) -> None:
        assert self._wakeup is not None
        try:
            data = os.read(self._wakeup[0], 64)
        except BlockingIOError:
            return
        for signum in data:  # the wake-up fd carries each signal's number
            callback = self._signals.get(signum)
            if callback is not None:
                try:
                    callback()
                except Exception as exc:  # not the pipe's fault: keep hearing signals
                    self.on_error(exc)

    # -- running -----------------------------------------------------------------

    def run(self) -> None:
        """Turn until :meth:`stop`: wait, then call back every ready descriptor."""
        self._running = True
        poll, readers, writers, deferred, busy, after = (
            self.epoll.poll,
            self.readers,
            self.writers,
            self._deferred,
            self._busy_poll,
            self._after_turn,
        )
        callback: Callback | None = None
        while self._running:
            # Timers and signals wake it too: the wait needs no timeout.
            events = (poll(0, BATCH) or self._spin()) if busy else poll(-1, BATCH)
            self._dispatching = True
            fd = -1
            try:
                for fd, mask in events:
                    if mask & READ:
                        callback = readers.get(fd)
                        if callback is not None:
                            self.events = mask
                            callback()
                    if mask & WRITE:
                        callback = writers.get(fd)
                        if callback is not None:
                            self.events = mask
                            callback()
            except Exception as exc:
                self._failed(fd, callback, exc)
            finally:
                self._dispatching = False
                while deferred:  # a double close is a bug, not a crash
                    try:  # noqa: SIM105 (contextlib.suppress costs three calls a close)
                        os.close(deferred.pop())
                    except OSError:
                        pass
                if after:
                    self._end_turn()

    def at_turn_end(self, callback: Callback) -> None:
        """Call ``callback`` once, when the callbacks of this turn are done (before the
        loop waits again): work that many callbacks of one turn share, done once."""
        self._after_turn.append(callback)

    def _end_turn(self) -> None:
        # Emptied in place: run() holds this list, and checks it after every turn.
        after = self._after_turn[:]
        self._after_turn.clear()
        for callback in after:
            try:
                callback()
            except Exception as exc:
                self._failed(-1, callback, exc)

    def _spin(self) -> list[tuple[int, int]]:
        """Nothing is ready: poll on for ``busy_poll`` seconds, letting any other
        runnable process have the CPU between polls (and calling ``on_idle``, which
        may find work of its own); then sleep until something is ready.  A yield that
        gave the CPU away (it took ``CONTENDED`` or longer) ends the polling, and
        there is none for ``CALM_AFTER``: see "Busy polling" in the module's docstring."""
        poll, on_idle = self.epoll.poll, self._on_idle
        now = monotonic()
        if now < self._calm_at:
            return poll(-1, BATCH)
        until = now + self._busy_poll
        while now < until:
            os.sched_yield()
            yielded, now = now, monotonic()
            if now - yielded >= CONTENDED:
                self._calm_at = now + CALM_AFTER
                break
            events = poll(0, BATCH)
            if events:
                return events
            if on_idle is not None:
                try:
                    if on_idle():
                        until = monotonic() + self._busy_poll  # as after any other work
                except Exception as exc:
                    self.on_error(exc)
            now = monotonic()
        return poll(-1, BATCH)

    def _failed(self, fd: int, callback: Callback | None, exc: Exception) -> None:
        """A callback raised: report it once, let its owner end what it owns, and never
        call it again for ``fd`` (see "Failure" in the module's docstring)."""
        self.on_error(exc)
        owner = getattr(callback, "__self__", None)
        if owner is None:  # a functools.partial of a bound method
            owner = getattr(getattr(callback, "func", None), "__self__", None)
        fail = getattr(owner, "fail", None)
        if fail is not None:
            try:
                fail(exc)
            except Exception as again:
                self.on_error(again)
            else:
                return
        if fd >= 0 and fd not in self._protected:
            self.readers.pop(fd, None)
            self.writers.pop(fd, None)
            if self.masks.pop(fd, 0):
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)
            self.close(fd)

    def stop(self) -> None:
        self._running = False

    def shutdown(self) -> None:
        """Close the epoll set, the timerfd and the wake-up pipe; signals go back to defaults."""
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for signum in self._signals:
                signal.signal(signum, signal.SIG_DFL)
            os.close(self._wakeup[0])
            os.close(self._wakeup[1])
            self._wakeup = None
        self._timerfd.close()
        self.epoll.close()


def _enqueue_only(_signum: int, _frame: object) -> None:
    """The Python-level handler: nothing; the wake-up pipe already queued the signal."""
