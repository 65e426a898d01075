"""``splicelb tail``: the balancer's JSON log lines, followed and printed for people.

Nothing here writes logs: it reads the lines :mod:`lb.log` already writes,
from the journal (``journalctl -u UNIT -o cat``), from a file (followed the
way ``tail -F`` does) or from stdin, and prints each one shorter:

- a ``conn`` line becomes one line: time, client, route (listener →
  backend/server), what ended it (the balancer's answer, or the tunnel and
  why it closed), duration and bytes, coloured by :func:`outcome`;
- any other event becomes ``level event key=value ...`` (a multi-line value,
  a traceback, goes below it, indented);
- a line that is not one of ours (not a JSON object with an ``event``) is
  printed as it is: it may be the last words of a crashed process.

The parts are separate so each can be tested alone: :func:`render` (one line
in, the text to print or None out: no I/O), the sources (iterators of lines)
and :func:`run`, which joins them.  Only the standard library, click and
:mod:`lb.errors` are imported: ``splicelb tail`` starts without loading the
balancer.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, TextIO

import click

from lb.errors import LBError  # no imports of its own

Record = dict[str, Any]

OK, WARN, FAIL = "ok", "warn", "fail"
COLORS = {OK: "green", WARN: "yellow", FAIL: "red"}

# How a tunnel ends when nothing went wrong: one side closed, the other followed.
NORMAL_ENDS = frozenset({"client closed", "server closed"})
# Reasons that say a server or the balancer failed (red); every other end of a
# tunnel that is not normal (a timeout, a client reset, a policy such as
# max_tunnel_age or a stop) is yellow.
FAIL_REASONS = ("server reset", "server error", "server down", "worker error")
LEVEL_OUTCOMES = {"warning": WARN, "error": FAIL, "critical": FAIL}

# The fields a conn line shows in its own way; any other field follows as key=value.
CONN_FIELDS = frozenset(
    {
        "timestamp",
        "level",
        "event",
        "pid",
        "role",
        "generation",
        "client",
        "listener",
        "backend",
        "server",
        "websocket",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "reason",
    }
)
# Every line has them: other events show them last, in brackets.
COMMON_FIELDS = ("timestamp", "level", "event", "pid", "role", "generation")

STATUS_PATTERN = re.compile(r"[1-5](\d\d|xx)", re.IGNORECASE)


# -- filtering ---------------------------------------------------------------------


def outcome(record: Record) -> str:
    """OK, WARN or FAIL: a line's colour, and what ``--errors`` keeps (WARN and FAIL).

    A conn line goes by the balancer's answer (4xx WARN, 5xx FAIL) or, for a
    tunnel, by why it closed; any other event by its level.
    """
    if record.get("event") != "conn":
        return LEVEL_OUTCOMES.get(str(record.get("level")), OK)
    status = _number(record.get("status"))
    if status is not None:
        return FAIL if status >= 500 else WARN if status >= 400 else OK
    reason = str(record.get("reason") or "")
    if reason in NORMAL_ENDS:
        return OK
    return FAIL if reason.startswith(FAIL_REASONS) else WARN


def parse_status(text: str) -> str:
    """A ``--status`` value as it is matched: ``503``, or a class such as ``5xx``."""
    if not STATUS_PATTERN.fullmatch(text.strip()):
        raise ValueError(
            f"{text!r} is not an HTTP status: give a code such as 503 or a class such as 5xx"
        )
    return text.strip().lower()


def _status_matches(pattern: str, status: float | None) -> bool:
    if status is None:
        return False
    if pattern.endswith("xx"):
        return status // 100 == int(pattern[0])
    return status == int(pattern)


@dataclass(frozen=True)
class Filter:
    """Which records are shown: every given criterion must hold (a value repeated
    within one criterion is any of them).  A record without the field a criterion
    looks at is not shown: ``--backend app`` hides ``ready`` but shows the health
    changes of app's servers."""

    backends: frozenset[str] = frozenset()
    servers: frozenset[str] = frozenset()
    statuses: tuple[str, ...] = ()  # from parse_status
    errors: bool = False

    def __call__(self, record: Record) -> bool:
        if self.backends and _text(record.get("backend")) not in self.backends:
            return False
        if self.servers and _text(record.get("server")) not in self.servers:
            return False
        if self.statuses:
            status = _number(record.get("status"))
            if not any(_status_matches(p, status) for p in self.statuses):
                return False
        return not self.errors or outcome(record) != OK


# -- formatting --------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How lines are printed: colours (only for a terminal), time zone, the arrow."""

    color: bool = False
    utc: bool = False
    arrow: str = "→"


def parse(line: str) -> Record | None:
    """The record on a log line, or None when the line is not one of ours."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:  # garbage, a line cut short, or not UTF-8 JSON
        return None
    if not isinstance(record, dict) or "event" not in record:
        return None
    return record


def render(line: str, keep: Filter, style: Style) -> str | None:
    """What to print for one log line (without its newline), or None to hide it."""
    record = parse(line)
    if record is None:
        return line
    if not keep(record):
        return None
    return format_record(record, style)


def format_record(record: Record, style: Style) -> str:
    if record.get("event") == "conn":
        return _format_conn(record, style)
    return _format_event(record, style)


def _format_conn(record: Record, style: Style) -> str:
    client = _text(record.get("client")) or "-"
    listener = _text(record.get("listener")) or "-"
    backend = _text(record.get("backend"))
    server = _text(record.get("server"))
    route = f"{listener} {style.arrow} {backend or '-'}"
    if server:
        route += f"/{server}"
    status = _number(record.get("status"))
    if status is not None:
        label = str(status)
    elif server:  # spliced to a server: a tunnel, whatever went through it
        label = "ws" if record.get("websocket") is True else "tunnel"
    else:  # it ended before it was answered or routed
        label = "closed"
    reason = _text(record.get("reason"))
    ending = f"{label} ({reason})" if reason else label
    if style.color:
        ending = click.style(ending, fg=COLORS[outcome(record)])
    parts = [_when(record.get("timestamp"), style.utc), client, route, ending]
    duration = _number(record.get("duration_ms"))
    parts.append(human_duration(duration) if duration is not None else "-")
    parts.append(f"in {_bytes(record.get('bytes_in'))}, out {_bytes(record.get('bytes_out'))}")
    extra = [f"{key}={_value(value)}" for key, value in record.items() if key not in CONN_FIELDS]
    if extra:
        parts.append(" ".join(extra))
    return "  ".join(parts)


def _format_event(record: Record, style: Style) -> str:
    level = _text(record.get("level")) or "-"
    head = f"{level:<7}  {_text(record.get('event')) or '-'}"
    if style.color and outcome(record) != OK:
        head = click.style(head, fg=COLORS[outcome(record)])
    fields, below = [], []
    for key, value in record.items():
        if key in COMMON_FIELDS:
            continue
        if isinstance(value, str) and "\n" in value:
            below.append(f"    {key}:")
            below += [f"      {line}" for line in value.rstrip("\n").split("\n")]
        else:
            fields.append(f"{key}={_value(value)}")
    origin = " ".join(
        _text(record.get(key)) or "" for key in ("role", "pid") if record.get(key) is not None
    )
    generation = record.get("generation")
    if generation is not None:
        origin += f" gen {_value(generation)}"
    parts = [_when(record.get("timestamp"), style.utc), head]
    if fields:
        parts.append(" ".join(fields))
    if origin.strip():
        parts.append(f"[{origin.strip()}]")
    return "\n".join(["  ".join(parts), *below])


def _when(timestamp: Any, utc: bool) -> str:
    """The line's time, to the millisecond: local time, or UTC as it was logged."""
    if not isinstance(timestamp, str):
        return "-"
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC if utc else None)
    text = moment.strftime("%Y-%m-%d %H:%M:%S") + f".{moment.microsecond // 1000:03d}"
    return text + "Z" if utc else text


def human_duration(ms: float) -> str:
    """``0.2 ms``, ``12 ms``, ``1.5 s``, ``3m20s``, ``2h05m``."""
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, second = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{second:02d}s"
    hours, minute = divmod(minutes, 60)
    return f"{hours}h{minute:02d}m"


def human_bytes(count: float) -> str:
    """``512 B``, ``1.5 kB``, ``3.4 MB``: decimal units, as the dashboard shows them."""
    value, unit = float(count), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


def _bytes(value: Any) -> str:
    number = _number(value)
    return human_bytes(number) if number is not None else "-"


def _number(value: Any) -> int | float | None:
    """A number from a record, or None (absent, null, or not a number: never an error)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None  # NaN or infinity: nothing to show


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else _value(value)


_BARE = re.compile(r"[^\s\"=]+")


def _value(value: Any) -> str:
    """A value in ``key=value``: bare when it can be, else as JSON."""
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# -- sources -----------------------------------------------------------------------

DEFAULT_LINES = 10  # lines already in the file or journal printed first when following
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, as a shell reports a process ended by SIGINT
READ_SIZE = 1 << 16
MAX_PARTIAL = 1 << 20  # bytes without a newline this long are printed as a line of their own
POLL_INTERVAL = 0.2  # seconds between looks at a followed file that did not grow


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").removesuffix("\r")


def _start_of_last(handle: IO[bytes], count: int) -> int:
    """Where the last ``count`` lines of the file start (a last line without its
    newline counts as one)."""
    end = handle.seek(0, os.SEEK_END)
    if count == 0:
        return end
    position = end
    while position > 0:
        size = min(READ_SIZE, position)
        position -= size
        handle.seek(position)
        block = handle.read(size)
        if position + size == end:
            block = block.removesuffix(b"\n")  # the last line's own newline
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            count -= 1
            if count == 0:
                return position + index + 1
    return 0


def follow_file(
    path: str,
    *,
    follow: bool,
    last: int | None,
    notice: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[str, None, None]:
    """The lines of a file, then (``follow``) the lines added to it, as ``tail -F`` does.

    ``last``: start with only the last lines already there (None: all of them).
    Survives what log rotation does: a file truncated in place is read again
    from its start; a file replaced by another (renamed, or removed and
    created again) is read to its end, then the new one from its start; a
    file that does not exist yet is waited for.  Each of those is told
    through ``notice``.  A line still being written (no newline yet) waits
    for its end, except at the very end without ``follow``.  What is not a
    regular file (a FIFO) is read as it comes, to its end.
    """
    handle: IO[bytes] | None = None
    pending = b""
    waiting = False
    first = True
    try:
        while True:
            if handle is None:
                try:
                    handle = open(path, "rb")  # noqa: SIM115 (held across yields, closed below)
                except FileNotFoundError:
                    if not follow:
                        raise LBError(f"{path}: no such file") from None
                    if not waiting:
                        notice(f"{path} does not exist (yet): waiting for it")
                        waiting = True
                    sleep(POLL_INTERVAL)
                    continue
                except OSError as exc:
                    raise LBError(f"{path}: {exc.strerror or exc}") from None
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    yield from read_stream(handle)  # a FIFO, /dev/stdin: read as it comes
                    return
                if waiting:
                    notice(f"{path} appeared: following it")
                elif first and last is not None:
                    handle.seek(_start_of_last(handle, last))
                waiting = first = False  # a file that appears or replaces this one: from its start
            chunk = handle.read(READ_SIZE)
            change = ""
            if not chunk:
                if not follow:
                    if pending:
                        yield _decode(pending)
                    return
                change = _changed(handle, path)
                if change == "truncated":
                    notice(f"{path} was truncated: reading it from the start")
                    handle.seek(0)
                elif change == "replaced":
                    chunk = handle.read()  # the last lines written to the old file
                else:
                    sleep(POLL_INTERVAL)
                    continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                yield _decode(raw)
            # A line cut short by the change, or too long to wait for, goes as it is.
            if pending and (change or len(pending) >= MAX_PARTIAL):
                yield _decode(pending)
                pending = b""
            if change == "replaced":
                handle.close()
                handle = None
                notice(f"{path} was replaced: following the new file")
    finally:
        if handle is not None:
            handle.close()


def _changed(handle: IO[bytes], path: str) -> str:
    """What happened to a followed file: "", "truncated" or "replaced"."""
    mine = os.fstat(handle.fileno())
    try:
        now = os.stat(path)
    except OSError:  # gone (being rotated): keep the one we have until a new one comes
        return ""
    if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        return "replaced"
    if mine.st_size < handle.tell():
        return "truncated"
    return ""


def read_stream(stream: IO[bytes]) -> Generator[str, None, None]:
    """The lines of a stream, as they come, to its end."""
    for raw in iter(lambda: stream.readline(MAX_PARTIAL), b""):
        yield _decode(raw.removesuffix(b"\n"))


def stdin_is_piped(fd: int = 0) -> bool:
    """Whether stdin holds a log to read: a pipe or a file (not a terminal, not /dev/null)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def unit_known(unit: str) -> bool:
    """Whether systemd knows ``unit`` here (then its journal holds the log)."""
    if shutil.which("journalctl") is None or shutil.which("systemctl") is None:
        return False
    try:
        result = subprocess.run(
            ["systemctl", "show", "--property=LoadState", "--value", unit],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and result.stdout.strip() == "loaded"


def journal_command(unit: str, *, follow: bool, last: int | None) -> list[str]:
    command = ["journalctl", "--unit", unit, "--output", "cat", "--no-pager"]
    if last is not None:
        command += ["--lines", str(last)]
    if follow:
        command.append("--follow")
    return command


@dataclass
class Journal:
    """``journalctl`` for one unit, as a source of lines; stopped when left."""

    command: list[str]
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def lines(self) -> Generator[str, None, None]:
        try:
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE)
        except OSError as exc:
            raise LBError(f"cannot run journalctl: {exc.strerror or exc}") from None
        try:
            assert self.process.stdout is not None
            yield from read_stream(self.process.stdout)
            code = self.process.wait()
            if code:
                raise LBError(f"journalctl exited with code {code}")
        finally:
            self.stop()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


# -- the command -------------------------------------------------------------------


def color_wanted(no_color: bool, stream: IO[str]) -> bool:
    """Colours only for a terminal, and not with --no-color or NO_COLOR (no-color.org)."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    with contextlib.suppress(ValueError, OSError):  # a closed or odd stream: no colours
        return stream.isatty()
    return False


def arrow_for(stream: TextIO) -> str:
    """→ where the output can show it, else ->."""
    try:
        "→".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "->"
    return "→"


def open_lines(
    path: str | None,
    unit: str,
    *,
    unit_given: bool,
    follow: bool,
    last: int | None,
    notice: Callable[[str], None],
) -> Generator[str, None, None]:
    """The lines to print: from ``--file`` (``-``: stdin); else from the journal
    when ``--unit`` was given; else from stdin when a log is piped in; else from
    the unit's journal when systemd knows the unit.  ``last`` (None: the default)."""
    if last is None and follow:
        last = DEFAULT_LINES
    if path == "-" or (path is None and not unit_given and stdin_is_piped()):
        return read_stream(sys.stdin.buffer)
    if path is not None:
        return follow_file(path, follow=follow, last=last, notice=notice)
    if unit_given or unit_known(unit):
        return Journal(journal_command(unit, follow=follow, last=last)).lines()
    raise LBError(
        f"no log to read: systemd knows no unit {unit!r} here; "
        "give --file PATH, --unit NAME, or pipe the log in"
    )


def run(lines: Iterable[str], keep: Filter, style: Style, write: Callable[[str], None]) -> None:
    """Print each line of ``lines`` that ``keep`` shows, formatted, as it comes."""
    for line in lines:
        text = render(line, keep, style)
        if text is not None:
            write(text)


def serve(lines: Generator[str, None, None], keep: Filter, style: Style) -> int:
    """Print ``lines`` to stdout until they end, the reader goes away (``| head``) or
    the user stops it; the exit code.  A source's errors are raised as LBError."""
    # SIGTERM ends it as Ctrl-C does: the source is closed (the journal's child stopped).
    signal.signal(signal.SIGTERM, _terminated)
    if isinstance(sys.stdout, io.TextIOWrapper):  # never fail on what a terminal cannot show
        sys.stdout.reconfigure(errors="replace")
    try:
        with contextlib.closing(lines):
            run(lines, keep, style, click.echo)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # nobody reads any more: done (and no error at exit's flush)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _terminated(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
