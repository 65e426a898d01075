"""``splicelb upgrade``: the supervisor re-executes itself in place, with the code now installed.

Theory of operation
-------------------
The supervisor is the process systemd knows (its ``MAINPID``) and the parent
of every worker, and it holds everything that must outlive the workers: the
listening sockets, the control socket, the runtime dir's lock, the live
pools.  ``execve`` replaces a process's code and keeps its pid, its children
and every descriptor not marked close-on-exec.  So an upgrade:

1. checks that the installed code starts and accepts the config
   (``python -m lb check``, a process of its own: a broken install is refused
   before anything changes);
2. writes what the new image needs to know (:class:`Handoff`: the descriptors
   it keeps, the generations and their children, the systemd notify settings)
   to a memfd, clears close-on-exec on those descriptors, blocks the signals
   it handles (a signal sent during the exec waits instead of being lost),
   and executes ``python -m lb run --resume FD``;
3. the new image takes everything back (:meth:`lb.supervisor.Supervisor.run`
   with the handoff), installs its signal handlers, unblocks the signals and
   reloads: a new generation, started from the new code, to which the old
   generation's workers hand their tunnels over as on any reload
   (:mod:`lb.worker.handover`; the handover's messages carry a version).

Nothing is dropped: the listening sockets and their queues never close, the
old workers serve until the new ones take over, and the supervisor's pid
does not change.  If the exec itself fails, the running image goes on as
before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from lb.errors import LBError

CHECK_TIMEOUT = 60.0


@dataclass
class ChildState:
    pid: int
    kind: str
    slot: int
    generation: int
    started: float


@dataclass
class GenerationState:
    number: int
    pool: str  # its pool file's path
    serving: bool
    retiring: bool
    retired: bool
    sockets: list[list[Any]]  # [[family, sockaddr], count]: the listening sockets its workers got
    handover: list[int]  # by slot: its handover sockets' descriptors


@dataclass
class Handoff:
    """What the new image takes over (see the module's docstring)."""

    config: str
    log_level: str
    log_format: str
    version: str  # of the code that wrote it
    runtime_dir: str
    rundir: list[int]  # the directory's and the lock's descriptors
    control: int
    sockets: list[list[Any]]  # [family, sockaddr, [fd, ...]] per listening address
    admin: list[list[Any]]  # [family, sockaddr, fd]
    generations: list[GenerationState] = field(default_factory=list)
    children: list[ChildState] = field(default_factory=list)
    current: int = 0
    previous: int = 0
    notify: dict[str, str] = field(default_factory=dict)  # systemd's variables, as they were

    def descriptors(self) -> list[int]:
        fds = [*self.rundir, self.control]
        fds += [fd for _, _, group in self.sockets for fd in group]
        fds += [fd for _, _, fd in self.admin]
        fds += [fd for g in self.generations for fd in g.handover]
        return fds

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> Handoff:
        raw = orjson.loads(data)
        raw["generations"] = [GenerationState(**g) for g in raw["generations"]]
        raw["children"] = [ChildState(**c) for c in raw["children"]]
        return cls(**raw)


def check_installed(config_path: str) -> None:
    """The installed code starts and accepts the config, or LBError saying why not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lb", "check", "-c", config_path],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LBError(f"the installed splicelb does not start: {exc}") from None
    if done.returncode:
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LBError("the installed splicelb refuses to start: " + " | ".join(said))


def write_handoff(handoff: Handoff) -> int:
    """The handoff in a memfd, read back by the new image (kept across the exec)."""
    fd = os.memfd_create("splicelb-handoff", 0)
    os.write(fd, handoff.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_handoff(fd: int) -> Handoff:
    with os.fdopen(fd, "rb") as f:
        return Handoff.decode(f.read())


def exec_in_place(handoff: Handoff, blocked: Iterable[int]) -> None:
    """Execute the installed code in this process; returns only if the exec failed (then
    everything is as it was)."""
    fds = handoff.descriptors()
    state = write_handoff(handoff)
    for fd in [*fds, state]:
        os.set_inheritable(fd, True)
    os.environ.update(handoff.notify)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    argv = [sys.executable, "-m", "lb", "run", "-c", handoff.config, "--resume", str(state)]
    try:
        os.execv(sys.executable, argv)
    finally:  # only on failure
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for name in handoff.notify:
            os.environ.pop(name, None)
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(state)
