"""Deadlines in FIFO queues, one per timeout value.

Every deadline in one queue was set with the same timeout, so they come due
in the order they were set.  A queue is a dict (insertion-ordered) from the
owner to its deadline: setting one is a store, clearing one a delete, and the
ones that are due are at the front.  A tick looks only at the front of each
queue, so its work follows the deadlines that come due, not how many are
set: a hundred thousand idle tunnels cost it nothing.

Ticks are timer callbacks of the loop, set for the earliest deadline and
rounded up to ``grid`` (many deadlines, one wake-up); none is set while no
deadline is.  An owner is any object with ``expire()`` and ``fail(exc)``;
it keeps the queue ``arm`` returned to clear its deadline
(``queue.pop(owner, None)``).  The tick takes the due owners out of their
queues and schedules the next tick before calling any of them, and an owner
whose ``expire`` raises is handed to its ``fail``: one owner's bug never
stops the deadlines of the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from time import monotonic
from typing import Any

from lb.worker.loop import Loop, Timer

Queue = dict[Any, float]


class Deadlines:
    __slots__ = ("grid", "loop", "on_error", "queues", "tick_at", "timer")

    def __init__(self, loop: Loop, grid: float, on_error: Callable[[BaseException], None]) -> None:
        self.loop = loop
        self.grid = grid  # how late a deadline may fire, at most
        self.on_error = on_error
        self.queues: dict[float, Queue] = {}
        self.tick_at = math.inf
        self.timer: Timer | None = None

    def arm(self, owner: Any, seconds: float, now: float) -> Queue:
        """``owner.expire()`` ``seconds`` after ``now`` (``time.monotonic()``); the queue to
        clear it from."""
        queue = self.queues.get(seconds)
        if queue is None:
            queue = self.queues[seconds] = {}
        deadline = now + seconds
        queue[owner] = deadline
        if deadline < self.tick_at:
            self._schedule(deadline)
        return queue

    def rearm(self, owner: Any, queue: Queue, deadline: float) -> None:
        """Set ``owner``'s deadline in ``queue`` again (at its end: ``deadline`` must not be
        much earlier than the others', or it waits behind them)."""
        queue[owner] = deadline
        if deadline < self.tick_at:
            self._schedule(deadline)

    def pending(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    def _schedule(self, deadline: float) -> None:
        when = math.ceil(deadline / self.grid) * self.grid
        if self.timer is not None:
            self.timer.cancel()
        self.tick_at = when
        self.timer = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self.timer, self.tick_at = None, math.inf
        now = monotonic()
        due: list[Any] = []
        try:
            for queue in self.queues.values():
                start = len(due)
                for owner, deadline in queue.items():
                    if deadline > now:
                        break
                    due.append(owner)
                for owner in due[start:]:
                    del queue[owner]
        finally:  # whatever happens, the next tick is set before any owner runs
            fronts = [next(iter(queue.values())) for queue in self.queues.values() if queue]
            if fronts:
                self._schedule(min(fronts))
        for owner in due:
            try:
                owner.expire()
            except Exception as exc:
                self.on_error(exc)
                try:
                    owner.fail(exc)
                except Exception as again:
                    self.on_error(again)
