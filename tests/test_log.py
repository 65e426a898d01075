"""Log lines: one JSON object per line, written whole, and never waited for."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from time import monotonic
from typing import Any

import pytest

from lb import log as lblog
from lb.log import MAX_LINE, configure, conn_logger

CONN = {
    "client": "127.0.0.1:5",
    "listener": "public",
    "backend": "app",
    "server": "a1",
    "websocket": True,
    "status": None,
    "bytes_in": 100,
    "bytes_out": 200,
    "duration_ms": 1.5,
    "reason": "client closed",
}


def conn_args(**changes: Any) -> dict[str, Any]:
    """A worker's arguments for the line CONN: ``started`` in place of ``duration_ms``, as
    long ago as CONN's duration."""
    fields = {**CONN, **changes}
    return {
        ("started" if key == "duration_ms" else key): (
            monotonic() - value / 1000 if key == "duration_ms" else value
        )
        for key, value in fields.items()
    }


def same_conn(record: dict[str, Any]) -> bool:
    """Whether a line has CONN's fields: a duration at least CONN's (it was logged later)."""
    fields = {key: value for key, value in record.items() if key in CONN}
    return fields.pop("duration_ms") >= CONN["duration_ms"] and fields == {
        key: value for key, value in CONN.items() if key != "duration_ms"
    }


def read_lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def test_every_line_has_the_contract_fields_in_order() -> None:
    r, w = os.pipe()
    log = configure("worker", 4, fd=w)
    log.info("conn", client="127.0.0.1:5", status=None, bytes_in=10)
    log.debug("hidden")
    [line] = read_lines(r)
    record = json.loads(line)
    assert list(record)[:6] == ["timestamp", "level", "event", "pid", "role", "generation"]
    assert record["event"] == "conn" and record["role"] == "worker" and record["generation"] == 4
    assert record["status"] is None and record["timestamp"].endswith("Z")
    os.close(r)
    os.close(w)


def test_a_huge_line_is_shortened_to_stay_atomic_on_a_pipe() -> None:
    r, w = os.pipe()
    log = configure("supervisor", 1, fd=w)
    problems = [f"backends[{i}].servers[0].address: port 70000 is out of range" for i in range(500)]
    log.error("reload", outcome="rejected", problems=problems)
    [line] = read_lines(r)
    assert len(line) + 1 <= MAX_LINE + 1 <= 4096
    record = json.loads(line)
    assert record["truncated"] is True and record["outcome"] == "rejected"
    assert record["problems"].startswith('["backends[0]')
    os.close(r)
    os.close(w)


def test_the_fast_conn_line_matches_the_structlog_line() -> None:
    r, w = os.pipe()
    log = configure("worker", 2, fd=w)
    log.info("conn", **CONN)
    conn_logger(log, "worker", 2, level="info", fmt="json")(**conn_args())
    slow, fast = (json.loads(line) for line in read_lines(r))
    assert list(slow) == list(fast)
    assert {k: v for k, v in slow.items() if k not in ("timestamp", "duration_ms")} == {
        k: v for k, v in fast.items() if k not in ("timestamp", "duration_ms")
    }
    # the fast line's own clock: the same text, a moment later (its duration too)
    stamps = [datetime.strptime(r["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ") for r in (slow, fast)]
    assert timedelta(0) <= stamps[1] - stamps[0] < timedelta(seconds=1)
    assert slow["duration_ms"] <= fast["duration_ms"] < slow["duration_ms"] + 1000
    os.close(r)
    os.close(w)


# -- a stdout that nobody reads -------------------------------------------------

LINES = 2000
Writes = Callable[[Any, Any], None]  # given the process's logger and its conn line


class Writer:
    """A forked process whose stdout is ``stdout``, logging as a worker does.

    It runs ``first``, says so, waits for the test's go (the test reads its
    stdout meanwhile), runs ``then`` and exits.  Every wait on it is bounded.
    """

    def __init__(self, stdout: int, first: Writes, then: Writes) -> None:
        written_r, written_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(stdout, 1)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (it is the process's stdout)
                log = configure("worker", 1)
                conn = conn_logger(log, "worker", 1, level="info", fmt="json")
                first(log, conn)
                os.write(written_w, b"w")
                os.read(go_r, 1)
                then(log, conn)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(written_w)
        os.close(go_r)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.written_fd, self._go = written_r, go_w

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        for fd in (self.pidfd, self.written_fd, self._go):
            os.close(fd)

    def wait_written(self, timeout: float) -> None:
        """Until ``first`` returned: its writes must not wait for a reader."""
        ready, _, _ = select.select([self.written_fd], [], [], timeout)
        assert ready, f"still writing after {timeout:g} s: its log writes wait for the reader"
        assert os.read(self.written_fd, 1) == b"w", "the writer failed (traceback on stderr)"

    def finish(self, timeout: float = 10) -> None:
        """Let it run ``then``, and wait for its exit."""
        os.write(self._go, b"g")
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        assert ready, f"the writer did not exit within {timeout:g} s"
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def fill(fd: int) -> int:
    """Fill the pipe ``fd`` writes to, to its last byte (through a description of our own)."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    filled = 0
    try:
        for size in (4096, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    filled += os.write(own, b"\0" * size)
    finally:
        os.close(own)
    return filled


def drain(fd: int) -> bytes:
    """What the reader can have now, without waiting."""
    out = bytearray()
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_to_end(fd: int, timeout: float = 10) -> bytes:
    """Everything until the last writer is gone."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"the writers still hold it open after {timeout:g} s"
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


def read_while_writing(fd: int, writers: list[Writer], limit: int, timeout: float = 10) -> bytes:
    """What ``fd`` gets while ``writers`` write, up to ``limit`` bytes: then it stops reading."""
    deadline = time.monotonic() + timeout
    writing = {writer.written_fd for writer in writers}
    out = bytearray()
    while writing and len(out) < limit:
        ready, _, _ = select.select([fd, *writing], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"nothing to read after {timeout:g} s"
        writing -= set(ready)
        if fd in ready:
            out += os.read(fd, 1 << 16)
    return bytes(out)


def whole_lines(data: bytes) -> list[dict[str, Any]]:
    """Every line of ``data`` as JSON: a line cut short or mixed with another fails here."""
    assert not data or data.endswith(b"\n"), data[-200:]
    records = []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a broken line: {line[:300]!r}") from None
    return records


def test_a_pipe_nobody_reads_drops_lines_at_once_and_reports_them_once_read() -> None:
    r, w = os.pipe()
    filled = fill(w)

    def first(log: Any, conn: Any) -> None:
        for _ in range(LINES):
            conn(**conn_args())
        log.warning("still_full")
        lblog.tick()  # the report does not fit either: its count is kept

    def then(_log: Any, conn: Any) -> None:
        lblog.tick()
        conn(**conn_args())

    with Writer(w, first, then) as writer:
        os.close(w)
        writer.wait_written(5)
        assert len(drain(r)) == filled  # nothing got in
        writer.finish()
        records = whole_lines(read_to_end(r))
    os.close(r)
    assert [(r["event"], r["level"]) for r in records] == [
        ("log_dropped", "warning"),
        ("conn", "info"),
    ]
    assert records[0]["lines"] == LINES + 1
    assert records[0]["pid"] == writer.pid and records[0]["role"] == "worker"


def test_a_stream_socket_nobody_reads_drops_lines_at_once_and_reports_them_once_read() -> None:
    ours, theirs = socket.socketpair()  # journald's stdout is a Unix stream socket
    lines = 4 * LINES  # more than the socket's buffers hold

    def first(_log: Any, conn: Any) -> None:
        for _ in range(lines):
            conn(**conn_args())

    def then(_log: Any, _conn: Any) -> None:
        lblog.flush()  # the last count, however recent the last report

    with Writer(theirs.fileno(), first, then) as writer:
        theirs.close()
        writer.wait_written(5)
        early = drain(ours.fileno())
        writer.finish()
        records = whole_lines(early + read_to_end(ours.fileno()))
    ours.close()
    conns = sum(record["event"] == "conn" for record in records)
    [report] = [record for record in records if record["event"] == "log_dropped"]
    assert conns > 0 and report["lines"] > 0
    assert conns + report["lines"] == lines


def test_lines_of_two_processes_on_one_pipe_never_mix() -> None:
    r, w = os.pipe()
    start_r, start_w = os.pipe()
    lines = 5 * LINES  # long enough for both to write while the test reads

    def first(log: Any, conn: Any) -> None:
        os.read(start_r, 1)  # both at once
        for i in range(lines):
            if i % 2:
                conn(**conn_args())
            else:  # lengths that end anywhere in a page of the pipe
                log.info("big", pad="x" * (100 + i * 37 % 3700))

    def then(_log: Any, _conn: Any) -> None:
        lblog.flush()  # the last count, however recent the last report

    with Writer(w, first, then) as one, Writer(w, first, then) as two:
        os.close(w)
        os.write(start_w, b"go")
        # Read while both write, then stop: the pipe fills while they write on.
        early = read_while_writing(r, [one, two], limit=1 << 21)
        one.wait_written(10)
        two.wait_written(10)
        early += drain(r)
        one.finish()
        two.finish()
        records = whole_lines(early + read_to_end(r))
    for fd in (r, start_r, start_w):
        os.close(fd)
    dropped = 0
    for writer in (one, two):
        mine = [record for record in records if record["pid"] == writer.pid]
        reports = [record["lines"] for record in mine if record["event"] == "log_dropped"]
        assert len(mine) - len(reports) > 0
        assert len(mine) - len(reports) + sum(reports) == lines
        dropped += sum(reports)
    assert dropped > 0  # the pipe was full at times


class Terminal:
    """A stream that takes what fits of a write, as a terminal's buffer does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()

    def write(self, line: bytes) -> int:
        if not self.room:
            raise BlockingIOError
        taken = line[: self.room]
        self.data += taken
        self.room -= len(taken)
        return len(taken)


def test_a_line_written_in_part_is_finished_before_any_other() -> None:
    terminal = Terminal(room=250)
    sink = lblog.Sink(terminal.write)
    sink.report = lambda lines: b'{"event":"log_dropped","lines":%d}\n' % lines
    lines = [b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * 80) for n in range(5)]
    assert [sink.write(line) for line in lines] == [True, True, False, False, False]
    sink.tick()  # nothing read yet: nothing moves
    terminal.room = 10_000
    sink.tick()
    assert sink.write(lines[0])
    records = [json.loads(line) for line in terminal.data.splitlines()]
    assert records == [
        {"n": 0, "pad": "x" * 80},
        {"n": 1, "pad": "x" * 80},
        {"n": 2, "pad": "x" * 80},
        {"event": "log_dropped", "lines": 2},
        {"n": 0, "pad": "x" * 80},
    ]


def test_the_count_goes_out_after_the_next_line_written_at_most_once_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lblog, "REPORT_EVERY", 3600.0)
    terminal = Terminal(room=0)
    sink = lblog.Sink(terminal.write)
    sink.report = lambda lines: b'{"event":"log_dropped","lines":%d}\n' % lines
    line = b'{"event":"conn"}\n'
    assert not sink.write(line)
    terminal.room = 10_000
    assert sink.write(line)  # and the count right after it
    terminal.room = 0
    assert not sink.write(line)
    assert not sink.write(line)
    terminal.room = 10_000
    assert sink.write(line)  # the count waits: one report per REPORT_EVERY
    sink.tick()  # so does tick's
    sink.flush()  # not flush's
    assert [json.loads(line) for line in terminal.data.splitlines()] == [
        {"event": "conn"},
        {"event": "log_dropped", "lines": 1},
        {"event": "conn"},
        {"event": "log_dropped", "lines": 2},
    ]


# -- conn lines in batches ------------------------------------------------------


class Later:
    """A loop's ``at_turn_end`` for a ConnLog: keeps what it was asked to call."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.calls.append(callback)

    def fire(self) -> None:
        """The turn ends."""
        calls, self.calls = self.calls, []
        for callback in calls:
            callback()


def batched(writes: list[bytes]) -> tuple[lblog.ConnLog, Later]:
    """A batched ConnLog whose sink records each write it is given."""

    def put(data: bytes) -> int:
        writes.append(data)
        return len(data)

    later = Later()
    conn = lblog.ConnLog("worker", 1, lblog.Sink(put))
    conn.batch(later)
    return conn, later


def test_conn_lines_go_out_in_one_write_per_batch_when_their_turn_ends() -> None:
    writes: list[bytes] = []
    conn, later = batched(writes)
    for _ in range(5):
        conn(**conn_args())
    assert writes == []  # they wait for their batch
    assert len(later.calls) == 1  # one call at the turn's end a batch
    later.fire()
    assert len(writes) == 1
    records = [json.loads(line) for line in writes[0].splitlines()]
    assert [r["event"] for r in records] == ["conn"] * 5
    assert same_conn(records[0])
    conn(**conn_args())  # the next batch has a timer of its own
    assert len(later.calls) == 1
    later.fire()
    assert len(writes) == 2


def test_a_batch_stays_under_pipe_buf_so_it_stays_whole_on_a_pipe() -> None:
    writes: list[bytes] = []
    conn, later = batched(writes)
    sent = 0
    for i in range(200):
        conn(**conn_args(reason="x" * (i * 7 % 300)))
        sent += 1
    later.fire()
    assert all(len(data) <= MAX_LINE for data in writes), [len(d) for d in writes]
    assert len(writes) > 1
    lines = [json.loads(line) for data in writes for line in data.splitlines()]
    assert [r["reason"] for r in lines] == ["x" * (i * 7 % 300) for i in range(sent)]


def test_a_batch_that_cannot_be_written_counts_each_of_its_lines_as_dropped() -> None:
    r, w = os.pipe()
    filled = fill(w)
    os.set_blocking(w, False)
    sink = lblog.Sink(os.fdopen(w, "wb", buffering=0, closefd=False).write)
    conn = lblog.ConnLog("worker", 1, sink)
    later = Later()
    conn.batch(later)
    for _ in range(7):
        conn(**conn_args())
    later.fire()
    assert sink.dropped == 7
    assert len(drain(r)) == filled
    os.close(r)
    os.close(w)


def test_the_lines_that_wait_go_out_before_the_process_ends() -> None:
    r, w = os.pipe()

    def first(_log: Any, conn: Any) -> None:
        conn.batch(lambda _callback: None)  # a loop whose turn never ends
        for _ in range(3):
            conn(**conn_args())

    def then(_log: Any, _conn: Any) -> None:
        lblog.flush()  # what a child does last (lb.children)

    with Writer(w, first, then) as writer:
        os.close(w)
        writer.wait_written(5)
        assert drain(r) == b""  # waiting for their batch
        writer.finish()
        records = whole_lines(read_to_end(r))
    os.close(r)
    assert [record["event"] for record in records] == ["conn"] * 3


def test_a_conn_line_takes_its_fields_in_order_in_either_format() -> None:
    """The worker passes the fields positionally (cheaper than keywords): both formats
    name them alike."""
    r, w = os.pipe()
    log = configure("worker", 2, fd=w, fmt="console")
    conn_logger(log, "worker", 2, level="info", fmt="console")(*conn_args().values())
    console = read_lines(r)
    log = configure("worker", 2, fd=w)
    conn_logger(log, "worker", 2, level="info", fmt="json")(*conn_args().values())
    [line] = read_lines(r)
    assert same_conn(json.loads(line))
    assert len(console) == 1
    for key in ("client", "listener", "reason"):
        assert f"{key}={CONN[key]}" in console[0] or f"{key}='{CONN[key]}'" in console[0]
    os.close(r)
    os.close(w)


def test_a_conn_line_is_stamped_with_the_millisecond_it_was_written_in() -> None:
    """The fast line keeps its timestamp's text for a millisecond: never one that is over."""
    writes: list[bytes] = []
    conn = lblog.ConnLog("worker", 1, lblog.Sink(lambda line: writes.append(line) or len(line)))
    for _ in range(40):
        before = int(time.time() * 1000)
        conn(**conn_args())
        after = int(time.time() * 1000)
        stamp = json.loads(writes[-1])["timestamp"]
        when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before <= int(when.timestamp() * 1000) <= after
        time.sleep(0.0003)  # lines in the same millisecond and in the next ones
