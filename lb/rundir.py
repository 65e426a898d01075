"""The runtime dir: checked, locked, and no file in it ever reached through a link.

The instance keeps its pid file, live pool files, the ``pool`` link and the
control socket in ``global.runtime_dir``, often as root and often on a host
that other users share.  So before it touches anything there:

- the directory is created 0700 if it is missing; one that exists must be a
  real directory (not a symlink), owned by this user or root, and writable
  by no one else: then no other user can plant or swap a file in it, and the
  checks below are made on the descriptor opened once with
  ``O_DIRECTORY | O_NOFOLLOW``, so nothing can be swapped between check and use;
- the pid file is the instance's lock: it is opened (never followed) and
  locked with ``flock`` before anything else is written.  A second ``splicelb
  run`` that finds it locked is refused and changes no file; a pid file whose
  lock is free is stale, whatever process its number names now;
- every file is created with ``O_EXCL | O_NOFOLLOW`` and mode 0600 (the
  topology in the pool is nobody else's business), then renamed into place.

A user who may not create or write the directory is told what to do, and
``splicelb check`` warns of it beforehand (:func:`not_writable`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time

from lb.errors import LBError, NotRunningError

PID_FILE = "splicelb.pid"
LOCK_TRIES = 5  # a status check holds the lock shared for an instant: try again a moment later
LOCK_PAUSE = 0.02
KEY = "global.runtime_dir"
# What to do when this user may not create or write the runtime dir.
NOT_YOURS = (
    "run splicelb as root or as the user the service runs as,"
    f" or set {KEY} to a directory this user owns"
)


def check_directory(fd: int, path: str) -> None:
    """Refuse a runtime dir that someone else could write into."""
    st = os.fstat(fd)
    if st.st_uid not in (os.geteuid(), 0):
        raise LBError(
            f"{KEY}: {path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()}) or root"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        raise LBError(
            f"{KEY}: {path} is writable by {_who(st.st_mode)} (mode {mode:04o});"
            " make it 0700 or 0755"
        )


def _cannot(verb: str, path: str, exc: OSError) -> str:
    """The problem line for a failed ``verb`` on ``path``, with the fix when it is a permission."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{KEY}: cannot {verb} {path}: permission denied; {NOT_YOURS}"
    return f"{KEY}: cannot {verb} {path}: {exc.strerror or exc}"


def _who(mode: int) -> str:
    return " and ".join(
        name for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if mode & bit
    )


def open_directory(path: str) -> int:
    """The runtime dir, created 0700 if missing, opened without following a link, checked."""
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LBError(_cannot("create", path, exc)) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symlink" if os.path.islink(path) else "not a directory"
            raise LBError(f"{KEY}: {path} is {what}; give a real directory") from None
        raise LBError(_cannot("open", path, exc)) from None
    try:
        check_directory(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_writable(path: str) -> str | None:
    """Why ``splicelb run`` as this user could not write the runtime dir at ``path``, if so.

    Advice for ``splicelb check``, which may be run by another user than the
    instance: nothing is created or opened.  A missing directory is judged by
    its nearest existing parent, where ``run`` would create it.
    """
    uid, target = os.geteuid(), os.path.abspath(path)
    parent = target
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if parent != target:
        if not os.path.isdir(parent):
            return f"{KEY}: {path} cannot be created: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
            return (
                f"{KEY}: {path} does not exist and this user (uid {uid}) may not create it"
                f" in {parent}; {NOT_YOURS}"
            )
    elif os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK, effective_ids=True):
        return f"{KEY}: {path} is not writable by this user (uid {uid}); {NOT_YOURS}"
    return None


class RuntimeDir:
    """A runtime dir this process has claimed: checked, and its pid file locked."""

    def __init__(self, path: str, fd: int, lock: int) -> None:
        self.path = path
        self.fd = fd  # the directory, opened once
        self.lock = lock  # the pid file, locked for the life of the instance

    @classmethod
    def claim(cls, path: str) -> RuntimeDir:
        """Check and lock ``path`` for this instance; refuse if another one holds it."""
        fd = open_directory(path)
        try:
            lock = _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())
        return cls(path, fd, lock)

    def inherited(self) -> list[int]:
        """The descriptors a child must close (so the lock ends with the supervisor)."""
        return [self.lock, self.fd]

    def release(self) -> None:
        """The instance ends: its pid file goes, and the lock with it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PID_FILE, dir_fd=self.fd)
        os.close(self.lock)
        os.close(self.fd)


def _lock(dir_fd: int, path: str) -> int:
    try:
        lock = os.open(
            PID_FILE,
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
    except OSError as exc:
        raise LBError(_cannot("open", f"{path}/{PID_FILE}", exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(lock).st_mode):
            raise LBError(f"{KEY}: {path}/{PID_FILE} is not a regular file")
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    raise LBError(
                        f"{KEY}: an instance is already running there (pid {_read_pid(lock)})"
                    ) from None
                time.sleep(LOCK_PAUSE)
    except BaseException:
        os.close(lock)
        raise
    raise AssertionError("unreachable")


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except OSError:
        return "?"


def running_pid(path: str) -> int:
    """The pid of the instance that holds ``path``, or NotRunningError.

    The lock tells: a pid file nobody holds locked is stale.  Where the pid file
    cannot be read, neither can the pool: the caller is told so."""
    pid_path = os.path.join(path, PID_FILE)
    try:
        fd = os.open(pid_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotRunningError(f"no instance is running in {path}") from None
    except PermissionError:
        raise LBError(
            f"{pid_path}: permission denied (run as the instance's user or root)"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: running
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise NotRunningError(f"no instance is running in {path} (stale {PID_FILE})")
        try:
            return int(_read_pid(fd))
        except ValueError:
            raise NotRunningError(f"no instance is running in {path}") from None
    finally:
        os.close(fd)
