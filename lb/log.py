"""Structured logging: one JSON object per line on stdout, whole lines per ``write(2)``.

Every process configures structlog once, right after it knows its role
(``supervisor``, ``worker``, ``prober``) and generation; those and the pid are
bound once and appear on every line.  A line is rendered to bytes and written
with a single ``write`` (a worker's ``conn`` lines: a batch of whole lines, see
below) so lines from several processes sharing one stdout pipe never
interleave (writes up to PIPE_BUF, 4096 bytes, are atomic).

Theory of operation: the sink
-----------------------------
Logging never blocks a process: a worker that waits for a slow reader of its
stdout stalls every tunnel it holds.  Every process writes through its own
:class:`Sink`, opened by :func:`configure` for the kind of file stdout is:

- a pipe, FIFO or terminal is opened again through ``/proc/self/fd/N`` with
  ``O_NONBLOCK``: a new open file description of the same pipe, this
  process's own.  ``O_NONBLOCK`` belongs to the description, so setting it on
  the inherited one would change it for every process that shares it;
- a socket (journald's stream) gets ``send`` with ``MSG_DONTWAIT``, a flag of
  the call, not of the socket;
- a regular file gets a plain ``write`` on the shared description (a file
  does not wait for a reader, and sharing the description shares the offset).

A write of at most PIPE_BUF bytes to a pipe is all or nothing: it fails with
``EAGAIN`` when the line does not fit, it never writes part of it; a Unix
stream socket takes a line of that size in one buffer, also all or nothing.
Lines are cut to ``MAX_LINE``, so what is written is whole and never
interleaves with another process's line.  A line that cannot be written is
dropped and counted, and the count goes out as one ``log_dropped`` warning:
right after the next line that is written, and from :func:`tick`, which each
process's periodic work calls about once a second (so the count comes even
when no other line does); at most one such line per ``REPORT_EVERY``, and
:func:`flush` for the last one before a process ends.  When the report does
not fit either, the count is kept for the next try.  Where the kernel takes
part of a line after all (a terminal, a TCP socket, a console line longer
than PIPE_BUF), the rest is kept and written before any other line of this
process; lines that come while it waits are dropped and counted.  So memory
stays bounded: a count and the rest of at most one line.

Theory of operation: conn lines in batches
------------------------------------------
A worker's ``conn`` lines (one per connection, thousands a second) go out
in batches: :class:`ConnLog` renders each line at once and appends it to a
batch, which goes out in one write when the loop's turn that made it ends
(after every callback of the turn, before the loop waits again), or at once
when the next line would take it over ``MAX_LINE`` bytes (so a batch, like a
line, stays under PIPE_BUF: whole on a pipe, never mixed with another
process's lines).  One system call per batch instead of per line: a write
costs more than the rendering of the line, and under load one turn finishes
many connections.  A line is not delayed past its turn (no timer: a reader
of the log sees it as soon as the worker goes back to waiting).  A batch
that cannot be written is dropped and its lines counted, as single lines
are; :func:`flush` writes what waits before a process ends (a SIGKILL loses
it).
"""

from __future__ import annotations

import inspect
import io
import math
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, MutableMapping
from time import monotonic
from typing import Any

import orjson
import structlog

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console")
_LEVEL_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

EventDict = MutableMapping[str, Any]

REPORT_EVERY = 1.0  # seconds: at most one log_dropped line per process in this time
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def _closed(_line: bytes) -> int:
    return 0  # no descriptor (stdout closed, or the sink replaced by another configure())


class Sink:
    """Where one process's lines go: one non-blocking write per line, and what was dropped.

    ``nonblocking_write`` writes to the descriptor without waiting and returns
    the bytes written (:meth:`open` picks it for the kind of file); ``owned``
    is what :meth:`close` closes.  ``put`` is the same while nothing waits,
    and while the rest of a line or a count of dropped lines waits, a write
    that sends that too (:meth:`_pending`): so a line costs no test of that
    state.  The worker's conn line calls ``put`` directly, everything else
    calls :meth:`write`.
    """

    __slots__ = ("_next_report", "_owned", "_rest", "_write", "dropped", "put", "report")

    def __init__(
        self,
        nonblocking_write: Callable[[bytes], int | None],
        owned: io.FileIO | socket.socket | None = None,
    ) -> None:
        self.dropped = 0  # lines not written since the last log_dropped line
        self.report: Callable[[int], bytes] | None = None  # renders the log_dropped line
        self.put = self._write = nonblocking_write
        self._next_report = 0.0
        self._owned = owned
        self._rest = b""  # the end of a line the kernel took only part of

    @classmethod
    def open(cls, fd: int) -> Sink:
        """The sink for ``fd`` as the kind of file it is (see the module's docstring).

        A file's write is ``FileIO.write``, a bound builtin: it costs less per line
        than ``os.write`` (None when nothing could be written, not EAGAIN).
        """
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # no stdout: every write fails and is counted
            return cls(_closed)
        if stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=os.dup(fd))
            send = sock.send
            return cls(lambda line: send(line, _SEND_FLAGS), sock)
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            try:
                own = io.FileIO(os.open(f"/proc/self/fd/{fd}", flags), "wb")
            except OSError:
                # No /proc, or a FIFO nobody has open for reading (ENXIO: a write
                # fails with EPIPE and does not wait): the shared description as it is.
                return cls(io.FileIO(fd, "wb", closefd=False).write)
            return cls(own.write, own)
        return cls(io.FileIO(fd, "wb", closefd=False).write)

    def write(self, line: bytes) -> bool:
        """Write one line, its newline included, or drop and count it: never wait.

        True when the line went out whole now.
        """
        try:
            written = self.put(line)
        except OSError:  # full (EAGAIN), or nobody reads it any more (EPIPE)
            written = 0
        if written == len(line):
            return True
        self.missed(line, written)
        return False

    def missed(self, line: bytes, written: int | None, lines: int = 1) -> None:
        """``put`` wrote ``written`` bytes of ``line`` (``lines`` lines), not all: count
        them, or keep the rest."""
        if not written:  # 0, or None from FileIO.write
            self.dropped += lines
        else:
            self._rest = line[written:]
        self.put = self._pending

    def _pending(self, line: bytes) -> int | None:
        """``put`` while something waits: the rest of a line goes before ``line``, a
        count of dropped lines after it (at most once per ``REPORT_EVERY``)."""
        if self._rest and not self._finish_rest():
            return 0
        written = self._write(line)
        if written == len(line) and self.dropped and time.monotonic() >= self._next_report:
            self._report()
        return written

    def _finish_rest(self) -> bool:
        try:
            written = self._write(self._rest) or 0
        except OSError:
            return False
        self._rest = self._rest[written:]
        if self._rest:
            return False
        self._settle()
        return True

    def _settle(self) -> None:
        """Once nothing waits, ``put`` is the descriptor's write again."""
        if not self._rest and not self.dropped:
            self.put = self._write

    def tick(self) -> None:
        """The periodic work, at any cadence: finish a line cut short, and report
        the lines dropped, at most once per ``REPORT_EVERY``."""
        if self._rest and not self._finish_rest():
            return
        if self.dropped and time.monotonic() >= self._next_report:
            self._report()

    def flush(self) -> None:
        """What :meth:`tick` does, however recent the last report: for a process's end."""
        if self._rest and not self._finish_rest():
            return
        if self.dropped:
            self._report()

    def _report(self) -> None:
        """One ``log_dropped`` line; when it does not fit, the count waits (and grows)."""
        if self.report is None:
            return
        count = self.dropped
        line = self.report(count)
        try:
            written = self._write(line)
        except OSError:
            return
        if written:
            self.dropped -= count
            self._next_report = time.monotonic() + REPORT_EVERY
            if written != len(line):
                self.missed(line, written)
            else:
                self._settle()

    def close(self) -> None:
        """Stop writing (later lines are dropped) and close this process's own description."""
        self.put = self._write = _closed
        self._rest = b""
        if self._owned is not None:
            self._owned.close()
        self._owned = None


_sink: Sink | None = None  # this process's, opened by configure()
_conn_log: ConnLog | None = None  # this process's batched conn lines, if any (conn_logger)


def tick() -> None:
    """For each process's periodic work, about once a second: see :meth:`Sink.tick`."""
    if _sink is not None:
        _sink.tick()


def flush() -> None:
    """For the end of each process, after its last line: the conn lines that wait for
    their batch (:class:`ConnLog`), then see :meth:`Sink.flush`."""
    if _conn_log is not None:
        _conn_log.flush()
    if _sink is not None:
        _sink.flush()


def _as_line(message: bytes | str) -> bytes:
    return (message.encode() if isinstance(message, str) else message) + b"\n"


class SinkLogger:
    """The structlog logger: each rendered line goes to the process's sink in one write."""

    __slots__ = ("_sink",)

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def msg(self, message: bytes | str) -> None:
        self._sink.write(_as_line(message))

    debug = info = warning = error = critical = exception = log = msg


class _Rendered:
    """A structlog logger that hands back the rendered line instead of writing it."""

    def msg(self, message: bytes | str) -> bytes:
        return _as_line(message)

    warning = msg


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds; the text of the last millisecond is cached."""

    __slots__ = ("_milli", "_prefix", "_second", "_text")

    def __init__(self) -> None:
        self._milli = self._second = -1
        self._prefix = self._text = ""

    def now(self) -> str:
        return self.text(time.time())

    def text(self, wall: float) -> str:
        """The timestamp of the time ``wall`` (seconds since the epoch)."""
        milli = int(wall * 1000)
        if milli == self._milli:
            return self._text
        second, ms = divmod(milli, 1000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._text = f"{self._prefix}.{ms:03d}Z"
        return self._text

    def __call__(self, _logger: Any, _name: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = self.now()
        return event_dict


MAX_LINE = 4000  # under PIPE_BUF (4096) with the newline: one write stays whole on a pipe
FIELD_CUT = 300  # what is left of a long field when a line must shrink


def _render_json(_logger: Any, name: str, event_dict: EventDict) -> bytes:
    line = {
        "timestamp": event_dict.pop("timestamp"),
        "level": name if name != "exception" else "error",
        "event": event_dict.pop("event"),
    }
    line.update(event_dict)
    out = orjson.dumps(line, default=str)
    if len(out) <= MAX_LINE:
        return out
    # Too long to stay atomic: cut the long fields rather than split the line.
    for key, value in line.items():
        text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
        if len(text) > FIELD_CUT:
            line[key] = text[:FIELD_CUT] + "..."
    line["truncated"] = True
    return orjson.dumps(line, default=str)[:MAX_LINE]


def duration_ms(started: float, now: float) -> float:
    """A conn line's ``duration_ms``: from ``started`` to ``now`` (``time.monotonic()``),
    to the microsecond (``round(x, 3)`` costs more)."""
    return int((now - started) * 1e6 + 0.5) / 1000


class ConnLog:
    """The per-connection ``event="conn"`` line, rendered straight to JSON.

    The same keys, in the same order, as a structlog line; skipping structlog's
    processor chain takes a line from about 12 µs to about 3 µs, which matters
    at thousands of connections a second.  The fields that do not change from
    one connection to the next (level, event, pid, role, generation) and the
    timestamp (the same text for every line of a millisecond, read from the
    clock that also gives the duration) are one cached prefix; only the
    connection's own fields go through ``orjson``: about 20,000 instructions a
    line with the worker's call, against 27,000 when every field went through
    it (``python -m bench.logline``).  Once :meth:`batch` has given it
    a way to be called back later, lines go out in batches (see "conn lines in
    batches" in the module's docstring); until then each line is written at once.
    """

    __slots__ = ("_batch", "_clock", "_constant", "_later", "_next", "_prefix", "_sink", "_size")

    def __init__(self, role: str, generation: int, sink: Sink) -> None:
        self._sink = sink
        constant = {
            "level": "info",
            "event": "conn",
            "pid": os.getpid(),
            "role": role,
            "generation": generation,
        }
        self._constant = orjson.dumps(constant)[1:-1]  # "level":...,"generation":N
        self._clock = _Clock()
        self._prefix = b""  # {"timestamp":"<this millisecond's>",<constant>,
        self._next = 0.0  # when the next millisecond begins (time.monotonic())
        self._batch: list[bytes] = []  # lines rendered, not yet written
        self._size = 0  # their bytes
        self._later: Callable[[Callable[[], None]], object] | None = None

    def batch(self, at_turn_end: Callable[[Callable[[], None]], object]) -> None:
        """From now on write lines in batches; ``at_turn_end(callback)`` (the worker's
        loop's) calls :meth:`flush` when the turn that made a batch's first line ends."""
        self._later = at_turn_end

    def __call__(
        self,
        client: str,
        listener: str,
        backend: str | None,
        server: str | None,
        websocket: bool,
        status: int | None,
        bytes_in: int,
        bytes_out: int,
        started: float,
        reason: str,
        sni: str | bool | None = False,
    ) -> None:
        """``started``: when the connection began (``time.monotonic()``); ``sni``: the
        server name a tls listener's client asked for (None: none), False on other
        listeners, whose lines have no ``sni`` field."""
        now = monotonic()  # one clock for the timestamp and the duration
        if now >= self._next:
            self._restamp(now)
        fields = {
            "client": client,
            "listener": listener,
            "backend": backend,
            "server": server,
            "websocket": websocket,
            "status": status,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_ms": duration_ms(started, now),
            "reason": reason,
        }
        if sni is not False:
            fields["sni"] = sni
        line = self._prefix + orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)[1:]
        later = self._later
        if later is None:  # not batched: the line goes out now
            self._write(line, 1)
            return
        if self._size + len(line) > MAX_LINE and self._batch:
            self.flush()  # the batch would not stay whole on a pipe: it goes first
        elif not self._batch:
            later(self.flush)
        self._batch.append(line)
        self._size += len(line)

    def _restamp(self, now: float) -> None:
        """The prefix of this millisecond's lines, and when the next one begins."""
        wall = time.time()
        stamp = self._clock.text(wall).encode()
        self._prefix = b'{"timestamp":"%s",%s,' % (stamp, self._constant)
        self._next = now + (math.floor(wall * 1000) + 1) / 1000 - wall

    def flush(self) -> None:
        """Write the lines that wait, in one write (a no-op when none wait)."""
        batch = self._batch
        if batch:
            self._batch = []  # a new list: the written one is not emptied under its reader
            self._size = 0
            self._write(batch[0] if len(batch) == 1 else b"".join(batch), len(batch))

    def _write(self, data: bytes, lines: int) -> None:
        sink = self._sink  # Sink.write, inlined: this runs once per batch or line
        try:
            written = sink.put(data)
        except OSError:
            written = 0
        if written != len(data):
            sink.missed(data, written, lines)


# The conn line's fields that every connection has, in the order a worker passes them:
# ConnLog's parameters (the console format's logger names them from here).
# (``started`` is given, ``duration_ms`` logged.)
CONN_FIELDS = tuple(
    "duration_ms" if name == "started" else name
    for name in list(inspect.signature(ConnLog.__call__).parameters)[1:-1]  # not self, sni
)


def conn_logger(logger: Any, role: str, generation: int, *, level: str, fmt: str) -> Any:
    """What a worker calls once per connection, with the fields of :class:`ConnLog`
    in its order (positional: a call with ten keywords costs more than the line's
    rendering): the fast JSON line, the structlog line for the console format, or
    None when ``info`` is filtered out.  Call :func:`configure` first: the fast line
    goes to its sink."""
    if _LEVEL_NUMBERS[level] > _LEVEL_NUMBERS["info"]:
        return None
    if fmt == "json":
        global _conn_log
        assert _sink is not None, "configure() opens the sink"
        _conn_log = ConnLog(role, generation, _sink)
        return _conn_log

    def console(*values: Any, sni: str | bool | None = False) -> None:
        fields = dict(zip(CONN_FIELDS, values, strict=True))
        fields["duration_ms"] = duration_ms(fields["duration_ms"], monotonic())
        if sni is not False:
            fields["sni"] = sni
        logger.info("conn", **fields)

    return console


def configure(
    role: str,
    generation: int,
    *,
    level: str = "info",
    fmt: str = "json",
    fd: int | None = None,
) -> Any:
    """Configure structlog for this process, open its sink, return its bound logger.

    Called once per process: by the supervisor at start and by every child
    right after fork (the child's role and pid differ from its parent's, and
    the child opens a sink of its own, closing the one it inherited).
    """
    global _sink
    fd = sys.stdout.fileno() if fd is None else fd
    processors: list[Any] = [_Clock()]
    if fmt == "console":
        processors += [
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=os.isatty(fd)),
        ]
    else:
        processors.append(_render_json)
    if _sink is not None:
        _sink.close()
    sink = _sink = Sink.open(fd)
    bound = {"pid": os.getpid(), "role": role, "generation": generation}
    reporter = structlog.wrap_logger(
        _Rendered(),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),  # reported whatever the level
        context_class=dict,
    ).bind(**bound)
    sink.report = lambda lines: reporter.warning("log_dropped", lines=lines)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVEL_NUMBERS[level]),
        logger_factory=lambda *_args: SinkLogger(sink),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(**bound)
