"""A worker's pool of pipes for splicing: created and sized once, reused by every tunnel.

A pipe is taken when a flow has bytes to move and given back as soon as it
is empty again, so an idle tunnel holds no pipe.  The pool keeps up to
``keep`` empty pipes for reuse; more are made when more flows hold bytes in
flight at once, and closed when they come back to a full pool.

Theory of operation: the pipe budget
------------------------------------
Linux charges pipe buffers to the user that made the pipe, summed over all
of that user's processes: every worker of the instance, its supervisor and
prober, and anything else the user runs.  A process without
``CAP_SYS_RESOURCE`` or ``CAP_SYS_ADMIN`` may enlarge a pipe
(``F_SETPIPE_SZ``) only while the user's total stays within
``fs.pipe-user-pages-soft`` pages; past it the call fails with ``EPERM`` and
new pipes get 2 pages instead of 16, so a flow moves at most 8 KiB per
``splice``.  Past ``fs.pipe-user-pages-hard`` (when set) no pipe can be made
at all, and ``fs.pipe-max-size`` caps one pipe for a process without
``CAP_SYS_RESOURCE``.

So each worker plans its pool when it starts (:func:`plan_pipes`, from the
process's capabilities and those sysctls: :func:`plan_for_worker`).  When the
budget applies, a worker's share is the budget divided by the instance's
workers; it leaves ``1/RESERVE_PART`` of its share for pipes of the default
size and makes its large pipes from the rest: as many of ``PIPE_SIZE`` as fit,
or of half that while fewer than ``MIN_LARGE`` would.  Invariant: a worker
holds at most ``plan.large`` enlarged pipes at once, idle in the pool and in
flight alike (the pool counts them as it makes and closes them).  The workers'
large pipes together therefore stay within the rest of the budget, and a flow
that needs a pipe past the plan gets one of the default size, not one of 2
pages: the room left over is what keeps it there (and the wake-up pipes of
every process of the instance).  Past the plan a new pipe is not enlarged at
all, rather than asking the kernel for what it must refuse.  A reload runs two
generations as the same user for a while: a draining worker closes its idle
pipes (:meth:`PipePool.drain`) so that the new one finds the budget.

Without the budget (a privileged process, or ``fs.pipe-user-pages-soft = 0``)
every pipe is enlarged and the pool keeps ``KEEP_PIPES`` of them, as a pool
built with ``PipePool()`` does.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: a 1 MiB pipe roughly doubles bulk throughput over 64 KiB
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PAGE = os.sysconf("SC_PAGE_SIZE")  # a pipe slot holds at most a page
KEEP_PIPES = 64  # idle pipes a worker keeps for reuse, when the budget allows
UNLIMITED = 1 << 62  # large pipes a worker may hold when no budget applies

# The kernel's side of it (fs/pipe.c).
DEFAULT_PIPE_PAGES = 16  # PIPE_DEF_BUFFERS: a new pipe's slots, if the budget has room
CAP_SYS_ADMIN = 21  # exempts from the per-user budget
CAP_SYS_RESOURCE = 24  # exempts from the per-user budget and from fs.pipe-max-size
SYSCTLS = "/proc/sys/fs"
SOFT = "fs.pipe-user-pages-soft"
HARD = "fs.pipe-user-pages-hard"
MAX_SIZE = "fs.pipe-max-size"
KERNEL_DEFAULTS = {SOFT: 16384, HARD: 0, MAX_SIZE: 1 << 20}  # since Linux 4.9

# The plan's rules.
RESERVE_PART = 4  # a worker leaves 1/4 of its share for pipes of the default size
MIN_LARGE = 8  # fewer large pipes than this: halve their size (not below the default)

Pipe = tuple[int, int, int]  # read end, write end, slots
Fields = dict[str, Any]  # a log line's fields, for the worker to log


@dataclass(frozen=True, slots=True)
class PipePlan:
    """How one worker of ``workers`` sizes its pipes, and why.

    ``size`` is what a pipe is enlarged to; ``large`` how many enlarged pipes
    the worker may hold at once (``UNLIMITED`` without a budget, 0 when
    ``size`` is only the default); ``keep`` how many empty ones it keeps.
    ``budget`` is the user's pipe budget in pages (0: none applies); ``needed``
    the ``fs.pipe-user-pages-soft`` with which every worker keeps
    ``KEEP_PIPES`` pipes of ``PIPE_SIZE``.
    """

    workers: int
    size: int
    large: int
    keep: int
    default_size: int
    budget: int
    needed: int
    soft: int
    hard: int
    max_size: int
    size_capped: bool  # fs.pipe-max-size applies (no CAP_SYS_RESOURCE)
    assumed: bool = False  # the sysctls could not be read: the kernel's defaults

    def warnings(self) -> list[Fields]:
        """One log line's fields for each sysctl that makes the pool smaller than full."""
        found: list[Fields] = []
        if self.budget:
            for name, value in ((SOFT, self.soft), (HARD, self.hard)):
                if 0 < value < self.needed:
                    found.append(self._fields(name, value, self.needed))
        if self.size_capped and self.max_size < PIPE_SIZE:
            found.append(self._fields(MAX_SIZE, self.max_size, PIPE_SIZE))
        return found

    def refused(self, exc: OSError, holding: int | None) -> Fields:
        """The fields for the kernel refusing an enlargement the plan allowed, when the
        worker held ``holding`` enlarged pipes (None: it does not count them)."""
        fields: Fields = {
            "error": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            "pipe_size": self.size,
            "workers": self.workers,
        }
        if holding is not None:
            fields |= {"large_pipes": holding, "planned": self.large}
        if self.budget:
            fields["note"] = (
                f"this user's other pipes take part of {SOFT} = {self.soft}"
                " (another instance or a reload running as the same user?);"
                " pipes past it keep a smaller size"
            )
        return fields

    def _fields(self, name: str, value: int, needed: int) -> Fields:
        fields: Fields = {
            "sysctl": name,
            "value": value,
            "needed": needed,
            "workers": self.workers,
            "pipe_size": self.size,
            "large_pipes": self.large,
            "keep": self.keep,
            "fix": f"sysctl -w {name}={needed}",
        }
        if self.assumed:
            fields["note"] = (
                f"{SYSCTLS} is not readable here: these are the kernel's defaults;"
                " the worker cannot see a raised value (systemd: no ProcSubset=pid)"
            )
        return fields


def plan_pipes(
    workers: int, soft: int, capabilities: int, page: int, max_size: int, hard: int = 0
) -> PipePlan:
    """The pool of one of ``workers`` workers of a process with effective ``capabilities``
    (the ``CapEff`` bit mask), for the sysctls' values (``soft`` and ``hard`` in pages)."""
    resource = bool(capabilities >> CAP_SYS_RESOURCE & 1)
    exempt = resource or bool(capabilities >> CAP_SYS_ADMIN & 1)
    top_pages = PIPE_SIZE // page
    default_pages = DEFAULT_PIPE_PAGES
    if not resource:  # fs.pipe-max-size caps even a new pipe's default
        max_pages = max(1, max_size // page)
        top_pages = min(top_pages, 1 << (max_pages.bit_length() - 1))  # sizes go by powers of 2
        default_pages = min(default_pages, max_pages)
    limits = [value for value in (soft, hard) if value > 0]
    budget = 0 if exempt or not limits else min(limits)
    pages, large, keep, needed = top_pages, UNLIMITED, KEEP_PIPES, 0
    if budget:
        share = budget // workers
        usable = share - share // RESERVE_PART
        while pages > default_pages and usable // pages < MIN_LARGE:
            pages //= 2
        pages = max(pages, default_pages)
        fits = usable // pages
        large, keep = fits, min(KEEP_PIPES, fits)
        needed = workers * share_for(KEEP_PIPES * (PIPE_SIZE // page))
    return PipePlan(
        workers=workers,
        size=pages * page,
        large=large if pages > default_pages else 0,
        keep=keep,
        default_size=default_pages * page,
        budget=budget,
        needed=needed,
        soft=soft,
        hard=hard,
        max_size=max_size,
        size_capped=not resource,
    )


def share_for(pages: int) -> int:
    """The smallest share whose part past the reserve holds ``pages``:
    ``m - m // RESERVE_PART >= pages``."""
    return (pages - 1) * RESERVE_PART // (RESERVE_PART - 1) + 1


def plan_for_worker(workers: int) -> PipePlan:
    """The plan for this process: its capabilities and this machine's sysctls."""
    limits, assumed = dict(KERNEL_DEFAULTS), False
    for name in limits:
        try:
            with open(f"{SYSCTLS}/{name.removeprefix('fs.')}") as f:
                limits[name] = int(f.read())
        except (OSError, ValueError):  # systemd's ProcSubset=pid hides /proc/sys
            assumed = True
    plan = plan_pipes(
        workers, limits[SOFT], effective_capabilities(), PAGE, limits[MAX_SIZE], limits[HARD]
    )
    return dataclasses.replace(plan, assumed=True) if assumed else plan


def effective_capabilities() -> int:
    """The capabilities that exempt this process from the budget: ``CapEff`` from
    /proc/self/status; 0 if unknown, or in a user namespace other than the first
    (the kernel asks ``capable()``, which looks at the initial namespace only)."""
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() != ["0", "0", "4294967295"]:
                return 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


class PipePool:
    """Empty pipes for reuse; created and sized once, not per connection.

    Flows use ``free`` directly (a list pop and append on the hot path).  This
    pool enlarges every pipe it makes: it serves where no budget applies (and
    ``PipePool()`` in tests and ``bench/floor.py``); :class:`CappedPipePool`
    serves where one does.
    """

    __slots__ = ("free", "keep", "on_refused", "plan", "refused", "size")

    def __init__(self, size: int = PIPE_SIZE, keep: int = KEEP_PIPES) -> None:
        self.free: list[Pipe] = []
        self.size = size
        self.keep = keep
        self.plan: PipePlan | None = None
        self.on_refused: Callable[[Fields], None] | None = None
        self.refused = False

    @classmethod
    def from_plan(
        cls, plan: PipePlan, on_refused: Callable[[Fields], None] | None = None
    ) -> PipePool:
        """A pool sized by ``plan``; ``on_refused`` gets the fields of a warning, once, the
        first time the kernel refuses an enlargement the plan allowed."""
        if plan.large == UNLIMITED:
            pool = PipePool(plan.size, plan.keep)
        else:
            pool = CappedPipePool(plan.size, plan.keep, plan.large)
        pool.plan = plan
        pool.on_refused = on_refused
        return pool

    @classmethod
    def for_worker(
        cls, workers: int, on_refused: Callable[[Fields], None] | None = None
    ) -> PipePool:
        """The pool of a worker of ``workers``, planned for this process and machine."""
        return cls.from_plan(plan_for_worker(workers), on_refused)

    def new(self) -> Pipe:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError as exc:  # EPERM past the per-user pipe budget: a smaller pipe still works
            self._refused(exc)
            size = fcntl.fcntl(w, F_GETPIPE_SZ)
        return r, w, size // PAGE

    def give(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            discard(pipe)

    def adopt(self, pipe: Pipe) -> None:
        """A pipe that came with a tunnel from another process: this pool's from now on."""

    def close(self) -> None:
        for pipe in self.free:
            discard(pipe)
        self.free.clear()

    def drain(self) -> None:
        """The worker is draining: close the idle pipes and keep none from now on, so that
        a new generation running as the same user finds their share of the budget free."""
        self.keep = 0
        self.close()

    def _refused(self, exc: OSError) -> None:
        if self.refused:
            return
        self.refused = True
        if self.on_refused is not None and self.plan is not None:
            self.on_refused(self.plan.refused(exc, self.holding()))

    def holding(self) -> int | None:
        """Enlarged pipes this pool holds, idle and in flight; None: it does not count."""
        return None


class CappedPipePool(PipePool):
    """A pool that holds at most ``large`` enlarged pipes at once: the budget's pool.

    Past that a new pipe keeps the default size.  The free list holds pipes of
    the planned size only: one of the default size is closed when it comes
    back, so that the next flow gets a large one if the plan allows.
    """

    __slots__ = ("enlarged", "large", "slots")

    def __init__(self, size: int, keep: int, large: int) -> None:
        super().__init__(size, keep)
        self.slots = size // PAGE
        self.large = large
        self.enlarged = 0  # pipes this pool resized and has not closed

    def new(self) -> Pipe:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.enlarged < self.large:
            try:
                size = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
            except OSError as exc:  # EPERM: the user's other pipes took the budget
                self._refused(exc)
            else:
                self.enlarged += 1
                _enlarged_by[w] = self
                return r, w, size // PAGE
        return r, w, fcntl.fcntl(w, F_GETPIPE_SZ) // PAGE  # the default, or 2 pages

    def give(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self.free) < self.keep and pipe[2] == self.slots:
            self.free.append(pipe)
        else:
            discard(pipe)

    def holding(self) -> int | None:
        return self.enlarged

    def adopt(self, pipe: Pipe) -> None:
        if pipe[2] == self.slots:  # an enlarged one: counted as if this pool had made it
            self.enlarged += 1
            _enlarged_by[pipe[1]] = self


# Which capped pool enlarged the pipe with this write end.  Descriptors belong to
# the process, so this record does too: a tunnel that closes with bytes still in
# its pipe calls ``discard`` without its pool, and the pool must still count the
# pipe as gone.
_enlarged_by: dict[int, CappedPipePool] = {}


def discard(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
    if _enlarged_by:  # empty where no budget applies
        pool = _enlarged_by.pop(pipe[1], None)
        if pool is not None:
            pool.enlarged -= 1
