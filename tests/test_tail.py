"""``splicelb tail``'s pieces: formatting and filtering real log lines, and following a file.

The lines are real: tests/fixtures/splicelb-run.log (see tests/fixtures/README.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb import tail
from lb.errors import LBError

FIXTURE = Path(__file__).parent / "fixtures" / "splicelb-run.log"
LINES = FIXTURE.read_text().splitlines()
RECORDS = [json.loads(line) for line in LINES]
CONNS = [r for r in RECORDS if r["event"] == "conn"]
PLAIN = tail.Style(utc=True)
ANSI = "\x1b["


def shown(keep: tail.Filter, lines: list[str] = LINES) -> list[str]:
    return [text for line in lines if (text := tail.render(line, keep, PLAIN)) is not None]


def conn(reason: str) -> dict[str, Any]:
    """The first conn record of the fixture that ended with ``reason``."""
    return next(r for r in CONNS if r["reason"] == reason)


# -- one line per connection ---------------------------------------------------


def test_a_conn_line_shows_time_client_route_ending_duration_and_bytes() -> None:
    line = next(line for line in LINES if '"client":"127.0.0.1:37744"' in line)
    assert tail.render(line, tail.Filter(), PLAIN) == (
        "2026-12-06 15:42:47.719Z  127.0.0.1:37744  public → app/a1  ws (client closed)"
        "  2.3 ms  in 161 B, out 221 B"
    )


def test_the_ending_is_the_answer_the_tunnel_or_an_early_close() -> None:
    texts = {r["reason"]: tail.format_record(r, PLAIN) for r in reversed(CONNS)}  # the first
    assert "  public → gone  503 (no server available)  " in texts["no server available"]
    assert "  public → -  403 (origin not allowed)  " in texts["origin not allowed"]
    assert "  public → app/a1  tunnel (server closed)  " in texts["server closed"]
    tcp = next(r for r in CONNS if r["listener"] == "raw")
    assert "  raw → app/a1  tunnel (server closed)  " in tail.format_record(tcp, PLAIN)
    assert (
        "  public → -  closed (client closed before the head)  "
        in texts["client closed before the head"]
    )
    assert "  1.0 s  in 16 B, out 170 B" in texts["request head not complete within 1 s"]


def test_times_are_local_unless_utc_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9, no daylight saving time
    time.tzset()
    try:
        record = conn("client closed")
        assert tail.format_record(record, tail.Style()).startswith("2026-12-07 00:42:47.719  ")
        assert tail.format_record(record, PLAIN).startswith("2026-12-06 15:42:47.719Z  ")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0.069, "0.1 ms"), (5.192, "5.2 ms"), (286.651, "287 ms"), (1005.5, "1.0 s"),
     (59_949, "59.9 s"), (200_000, "3m20s"), (7_500_000, "2h05m")],
)  # fmt: skip
def test_durations_read_in_human_units(ms: float, text: str) -> None:
    assert tail.human_duration(ms) == text


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1536, "1.5 kB"), (3_400_000, "3.4 MB"),
     (7 * 10**9, "7.0 GB"), (2 * 10**12, "2.0 TB")],
)  # fmt: skip
def test_bytes_read_in_the_dashboards_units(count: int, text: str) -> None:
    assert tail.human_bytes(count) == text


# -- outcome and colour ------------------------------------------------------------


def test_each_ending_has_the_outcome_a_person_expects() -> None:
    outcomes = {r["reason"]: tail.outcome(r) for r in CONNS}
    assert outcomes == {
        "server closed": tail.OK,
        "client closed": tail.OK,
        "origin not allowed": tail.WARN,  # 403
        "malformed request line": tail.WARN,  # 400
        "request head not complete within 1 s": tail.WARN,  # 408
        "client closed before the head": tail.WARN,
        "client reset": tail.WARN,
        "tunnel idle timeout": tail.WARN,
        "worker stopped": tail.WARN,
        "no server available": tail.FAIL,  # 503
        "worker error: RuntimeError('injected fault in lb.worker.conn:Connection.expire')": (
            tail.FAIL  # 500
        ),
    }
    assert tail.outcome({**conn("client closed"), "reason": "server reset"}) == tail.FAIL
    assert tail.outcome({**conn("client closed"), "reason": "server down"}) == tail.FAIL
    assert tail.outcome({**conn("client closed"), "reason": "server in maint"}) == tail.WARN


def test_colours_green_yellow_red_by_outcome_and_none_without_color() -> None:
    color = tail.Style(color=True, utc=True)
    green, yellow, red = "\x1b[32m", "\x1b[33m", "\x1b[31m"
    assert green + "ws (client closed)" in tail.format_record(conn("client closed"), color)
    assert yellow + "408 (request" in tail.format_record(
        conn("request head not complete within 1 s"), color
    )
    assert yellow + "ws (tunnel idle timeout)" in tail.format_record(
        conn("tunnel idle timeout"), color
    )
    assert red + "503 (no server available)" in tail.format_record(
        conn("no server available"), color
    )
    by_event = {r["event"]: r for r in RECORDS}
    assert yellow + "warning  connect_failed" in tail.format_record(
        by_event["connect_failed"], color
    )
    assert red + "error    worker_error" in tail.format_record(by_event["worker_error"], color)
    assert ANSI not in tail.format_record(by_event["ready"], color)  # info: as it is
    assert not any(ANSI in text for text in shown(tail.Filter()))


# -- other events ------------------------------------------------------------------


def test_other_events_are_one_line_of_level_event_and_fields() -> None:
    line = next(line for line in LINES if '"to":"down"' in line)
    assert tail.render(line, tail.Filter(), PLAIN) == (
        "2026-12-06 15:42:48.890Z  warning  server_state  backend=api server=p1 from=up to=down"
        ' reason="HTTP 500" latency_ms=1.928  [prober 29505 gen 1]'
    )


def test_a_traceback_goes_below_its_line_indented() -> None:
    line = next(line for line in LINES if '"worker_error"' in line)
    first, *below = tail.render(line, tail.Filter(), PLAIN).split("\n")  # type: ignore[union-attr]
    assert first.endswith(
        "error    worker_error  error=\"RuntimeError('injected fault in "
        "lb.worker.conn:Connection.expire')\"  [worker 29881 gen 1]"
    )
    assert below[0] == "    traceback:"
    assert below[1] == "      Traceback (most recent call last):"
    assert below[-1] == "      RuntimeError: injected fault in lb.worker.conn:Connection.expire"


# -- what is not ours, or not as expected ------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage \x00\ufffd",
        LINES[5][:60],  # a line cut short
        "[1, 2]",
        '{"not": "a splicelb line"}',
        "2026-12-06T15:42:47.537Z [info     ] ready    generation=1 pid=29499",  # console
        "Traceback (most recent call last):",
    ],
)
def test_a_line_that_is_not_ours_is_printed_as_it_is_even_when_filtering(line: str) -> None:
    assert tail.render(line, tail.Filter(), PLAIN) == line
    assert tail.render(line, tail.Filter(backends=frozenset({"x"}), errors=True), PLAIN) == line


def test_unknown_fields_are_shown_and_missing_or_odd_ones_do_not_break_the_line() -> None:
    text = tail.format_record({**conn("client closed"), "sni": "a.test", "truncated": True}, PLAIN)
    assert text.endswith("in 161 B, out 221 B  sni=a.test truncated=true")
    odd = {
        "event": "conn",
        "timestamp": "yesterday",
        "client": 5,
        "status": "abc",
        "duration_ms": "x",
        "bytes_in": None,
        "bytes_out": float("nan"),
        "reason": ["a"],
    }
    assert tail.format_record(odd, PLAIN) == ('yesterday  5  - → -  closed (["a"])  -  in -, out -')
    assert tail.format_record({"event": "conn"}, PLAIN) == "-  -  - → -  closed  -  in -, out -"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=5,
)
KEYS = st.sampled_from([*tail.CONN_FIELDS, "traceback", "x"]) | st.text()


@given(st.dictionaries(KEYS, JSON_VALUES), st.sampled_from(["conn", "ready", 5, None]))
def test_no_record_breaks_the_formatter_or_the_filter(record: dict[str, Any], event: Any) -> None:
    record["event"] = event
    keep = tail.Filter(frozenset({"app"}), frozenset({"a1"}), ("5xx", "404"), errors=True)
    for style in (PLAIN, tail.Style(color=True)):
        assert isinstance(tail.format_record(record, style), str)
    assert keep(record) in (True, False)
    line = json.dumps(record, default=str)
    assert tail.render(line, tail.Filter(), PLAIN) is not None


# -- filters -----------------------------------------------------------------------


def events_of(keep: tail.Filter) -> list[tuple[str, Any]]:
    """What a filter shows, as (event, the conn's reason or the server_state's change)."""
    out = []
    for record in RECORDS:
        if keep(record):
            detail = record.get("reason") if record["event"] == "conn" else record.get("to")
            out.append((record["event"], detail))
    return out


def test_backend_shows_its_connections_and_its_servers_health() -> None:
    assert events_of(tail.Filter(backends=frozenset({"api"}))) == [
        ("server_state", "up"),
        ("server_state", "down"),
        ("conn", "no server available"),
        ("server_state", "up"),
    ]


def test_server_and_backend_filters_combine_and_repeat() -> None:
    shown_a1 = events_of(tail.Filter(servers=frozenset({"a1"})))
    assert ("admin_state", "drain") in shown_a1
    assert {e for e, _ in shown_a1} == {"conn", "admin_state"}
    both = tail.Filter(backends=frozenset({"app", "gone"}), servers=frozenset({"a1", "g1"}))
    assert ("connect_failed", None) in events_of(both)
    assert ("conn", "no server available") not in events_of(both)  # no server: not g1


def test_status_takes_codes_and_classes() -> None:
    fives = events_of(tail.Filter(statuses=("5xx",)))
    assert [reason[:20] for _, reason in fives] == [
        "no server available",
        "no server available",
        "worker error: Runtim",
    ]
    some = tail.Filter(statuses=(tail.parse_status("403"), tail.parse_status("4XX")))
    assert {r["status"] for r in RECORDS if some(r)} == {400, 403, 408}


@pytest.mark.parametrize("text", ["600", "5x5", "abc", "99", "5000", "", "0xx"])
def test_a_status_that_is_not_one_is_refused_with_what_to_give(text: str) -> None:
    with pytest.raises(ValueError, match="give a code such as 503 or a class such as 5xx"):
        tail.parse_status(text)


def test_errors_shows_failed_connections_warnings_and_errors_only() -> None:
    failures = events_of(tail.Filter(errors=True))
    assert [e for e, _ in failures if e != "conn"] == [
        "connect_failed",
        "server_state",  # to down; its way back up is info
        "fd_limit",
        "worker_error",
    ]
    assert sorted(str(r) for e, r in failures if e == "conn") == sorted(
        str(r["reason"]) for r in CONNS if tail.outcome(r) != tail.OK
    )
    assert ("conn", "client closed") not in failures
    errors_of_app = events_of(tail.Filter(backends=frozenset({"app"}), errors=True))
    assert errors_of_app == [
        ("conn", "client reset"),
        ("conn", "tunnel idle timeout"),
        ("conn", "worker stopped"),
    ]


# -- following a file ----------------------------------------------------------------


class Follower:
    """follow_file with a sleep that runs the test's next step: no real waiting."""

    def __init__(self, path: Path, steps: list[Callable[[], None]], **kwargs: Any) -> None:
        self.notices: list[str] = []
        self.steps = steps
        self.lines = tail.follow_file(
            str(path), notice=self.notices.append, sleep=self._sleep, **kwargs
        )

    def _sleep(self, _seconds: float) -> None:
        if not self.steps:
            raise AssertionError("the follower waits for more, and the test has no more")
        self.steps.pop(0)()

    def take(self, count: int) -> list[str]:
        return [next(self.lines) for _ in range(count)]


def write(path: Path, text: str, mode: str = "a") -> Callable[[], None]:
    def step() -> None:
        with open(path, mode) as handle:
            handle.write(text)

    return step


def test_without_follow_every_line_is_read_and_a_last_one_without_newline_too(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"one\r\ntwo\n\xff\xfe\nlast")
    lines = tail.follow_file(str(path), follow=False, last=None, notice=print)
    assert list(lines) == ["one", "two", "\ufffd\ufffd", "last"]


@pytest.mark.parametrize(
    ("text", "last", "expected"),
    [
        ("a\nb\nc\n", 2, ["b", "c"]),
        ("a\nb\nc", 2, ["b", "c"]),
        ("a\nb\nc\n", 10, ["a", "b", "c"]),
        ("a\nb\nc\n", 0, []),
        ("\n\n", 1, [""]),
        ("", 3, []),
    ],
)
def test_last_starts_with_the_last_lines(
    tmp_path: Path, text: str, last: int, expected: list[str]
) -> None:
    path = tmp_path / "log"
    path.write_text(text)
    assert list(tail.follow_file(str(path), follow=False, last=last, notice=print)) == expected


def test_last_lines_are_found_across_read_blocks(tmp_path: Path) -> None:
    path = tmp_path / "log"
    lines = [f"{i:06d}" + "x" * 93 for i in range(3000)]  # 100 bytes a line: 300 kB
    path.write_text("\n".join(lines) + "\n")
    assert list(tail.follow_file(str(path), follow=False, last=1500, notice=print)) == lines[1500:]


def test_a_missing_file_without_follow_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(LBError, match=r"absent\.log: no such file"):
        list(tail.follow_file(str(tmp_path / "absent.log"), follow=False, last=None, notice=print))


def test_a_named_pipe_is_read_as_it_comes_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: path.write_text("a\nb\n"), daemon=True)
    writer.start()
    assert list(tail.follow_file(str(path), follow=True, last=1, notice=print)) == ["a", "b"]
    writer.join(10)


def test_follow_prints_lines_as_they_come_and_waits_for_a_line_to_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("old 1\nold 2\nold 3\n")
    follower = Follower(
        path, [write(path, "new 1\nnew "), write(path, "2 ends"), write(path, " here\n")],
        follow=True, last=1,
    )  # fmt: skip
    assert follower.take(3) == ["old 3", "new 1", "new 2 ends here"]
    assert follower.notices == []


def test_follow_reads_a_truncated_file_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("before 1\nbefore 2\n")
    follower = Follower(path, [write(path, "after 1\n", "w")], follow=True, last=None)
    assert follower.take(3) == ["before 1", "before 2", "after 1"]
    assert follower.notices == [f"{path} was truncated: reading it from the start"]


def test_follow_reads_a_replaced_file_to_its_end_then_the_new_one(tmp_path: Path) -> None:
    path, rotated = tmp_path / "log", tmp_path / "log.1"

    def rotate() -> None:
        path.rename(rotated)
        with open(rotated, "a") as old:
            old.write("last of the old\n")  # the writer had it open: it goes on a moment
        path.write_text("first of the new\n")

    path.write_text("one\n")
    follower = Follower(path, [rotate, write(path, "second of the new\n")], follow=True, last=0)
    assert follower.take(3) == ["last of the old", "first of the new", "second of the new"]
    assert follower.notices == [f"{path} was replaced: following the new file"]


def test_follow_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "log"
    steps = [lambda: None, write(path, "a\nb\n")]
    follower = Follower(path, steps, follow=True, last=1)
    assert follower.take(2) == ["a", "b"]  # a file that appears is read from its start
    assert follower.notices == [
        f"{path} does not exist (yet): waiting for it",
        f"{path} appeared: following it",
    ]


def test_a_removed_file_is_followed_until_another_takes_its_place(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("a\n")
    handle = open(path, "a")  # noqa: SIM115 (the writer, open across the steps)

    def remove() -> None:
        path.unlink()
        handle.write("b\n")
        handle.flush()

    try:
        follower = Follower(path, [remove, lambda: None, write(path, "c\n")], follow=True, last=5)
        assert follower.take(3) == ["a", "b", "c"]
    finally:
        handle.close()


def test_a_line_without_end_is_printed_once_it_is_too_long_to_wait_for(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"x" * (tail.MAX_PARTIAL + 10))
    follower = Follower(path, [write(path, "\n")], follow=True, last=None)
    first, rest = follower.take(2)
    assert len(first) >= tail.MAX_PARTIAL and len(first) + len(rest) == tail.MAX_PARTIAL + 10


def test_the_journal_is_asked_for_its_units_messages_only() -> None:
    assert tail.journal_command("splicelb", follow=True, last=10) == [
        "journalctl", "--unit", "splicelb", "--output", "cat", "--no-pager",
        "--lines", "10", "--follow",
    ]  # fmt: skip
    assert tail.journal_command("lb2", follow=False, last=None) == [
        "journalctl", "--unit", "lb2", "--output", "cat", "--no-pager",
    ]  # fmt: skip


# -- the command: where it reads, colours, and how it ends ----------------------------

REPO = Path(__file__).resolve().parents[1]
FAKE_JOURNALCTL = """#!{python}
import json, os, sys, time
with open(os.environ["FAKE_JOURNAL_CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": sys.argv[1:], "pid": os.getpid()}}) + "\\n")
sys.stdout.write(open(os.environ["FAKE_JOURNAL_LINES"]).read())
sys.stdout.flush()
if "--follow" in sys.argv:
    time.sleep(300)
"""
FAKE_SYSTEMCTL = """#!{python}
import os, sys
print("loaded" if sys.argv[-1] in os.environ["FAKE_UNITS"].split() else "not-found")
"""


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A PATH whose journalctl prints the fixture's lines (and notes how it was called)
    and whose systemctl knows the units in FAKE_UNITS (splicelb): the environment to run with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("journalctl", FAKE_JOURNALCTL), ("systemctl", FAKE_SYSTEMCTL)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_JOURNAL_CALLS": str(calls),
        "FAKE_JOURNAL_LINES": str(FIXTURE),
        "FAKE_UNITS": "splicelb",
    }
    yield env
    for call in journal_calls(env):  # a journalctl left behind is a failure, and is ended
        with contextlib.suppress(ProcessLookupError):
            os.kill(call["pid"], signal.SIGKILL)
            raise AssertionError(f"journalctl {call['pid']} was left running")


def journal_calls(env: dict[str, str]) -> list[dict[str, Any]]:
    path = Path(env["FAKE_JOURNAL_CALLS"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def splicelb_tail(
    *args: str, env: dict[str, str] | None = None, stdin: Any = subprocess.DEVNULL, text: str = ""
) -> subprocess.CompletedProcess[str]:
    """``splicelb tail ARGS`` with stdin as given (never the test runner's own)."""
    return subprocess.run(
        [sys.executable, "-m", "lb", "tail", *args],
        stdin=None if text else stdin,
        input=text or None,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )


def test_without_a_file_it_reads_the_journal_of_the_unit_systemd_knows(
    fake_systemd: dict[str, str],
) -> None:
    result = splicelb_tail("--no-follow", "--utc", env=fake_systemd)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n".join(shown(tail.Filter())) + "\n"
    assert [c["argv"] for c in journal_calls(fake_systemd)] == [
        ["--unit", "splicelb", "--output", "cat", "--no-pager"]
    ]


def test_a_unit_given_is_read_and_lines_go_to_journalctl(fake_systemd: dict[str, str]) -> None:
    result = splicelb_tail("--no-follow", "-n", "5", "--unit", "lb2", env=fake_systemd)
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in journal_calls(fake_systemd)] == [
        ["--unit", "lb2", "--output", "cat", "--no-pager", "--lines", "5"]
    ]


def test_with_no_known_unit_and_no_file_it_says_what_to_give(
    fake_systemd: dict[str, str],
) -> None:
    result = splicelb_tail(env={**fake_systemd, "FAKE_UNITS": ""})
    assert result.returncode == 1
    assert result.stderr == (
        "splicelb: no log to read: systemd knows no unit 'splicelb' here; "
        "give --file PATH, --unit NAME, or pipe the log in\n"
    )
    assert result.stdout == ""
    assert journal_calls(fake_systemd) == []


def test_a_log_piped_in_is_read_instead_of_the_journal(fake_systemd: dict[str, str]) -> None:
    result = splicelb_tail("--utc", "--status", "503", env=fake_systemd, text=FIXTURE.read_text())
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    assert all("503 (no server available)" in line for line in result.stdout.splitlines())
    assert journal_calls(fake_systemd) == []
    dash = splicelb_tail("--file", "-", "--utc", env=fake_systemd, text=LINES[0] + "\n")
    assert dash.stdout == shown(tail.Filter(), LINES[:1])[0] + "\n"


def test_following_the_journal_ends_on_sigterm_and_stops_journalctl(
    fake_systemd: dict[str, str],
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "lb", "tail", "--errors"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=fake_systemd,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().decode()  # the journal's lines came through
        assert "403 (origin not allowed)" in first
        assert [c["argv"][-3:] for c in journal_calls(fake_systemd)] == [
            ["--lines", "10", "--follow"]
        ]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == tail.EXIT_INTERRUPTED
        assert process.stderr is not None and process.stderr.read() == b""
    finally:
        process.kill()
        process.wait()
    # the fixture's teardown checks that journalctl was stopped


def test_a_reader_that_goes_away_ends_it_quietly(tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_text(FIXTURE.read_text() * 1000)
    process = subprocess.Popen(
        [sys.executable, "-m", "lb", "tail", "--no-follow", "--file", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    assert process.wait(60) == 0
    assert process.stderr.read() == b""


def on_a_terminal(*args: str, env: dict[str, str] | None = None) -> str:
    """What ``splicelb tail ARGS`` prints on a terminal (a pty), to its end."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes splicelb
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "lb", "tail", *args], env or os.environ)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child is gone and all it wrote was read
                    break
                if not chunk:
                    break
                out += chunk
        else:
            raise AssertionError(f"splicelb tail {args} did not end: {out[-300:]!r}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    return out.decode("utf-8", "replace")


def test_colours_on_a_terminal_unless_no_color_is_asked() -> None:
    base = ("--file", str(FIXTURE), "--no-follow")
    coloured = on_a_terminal(*base)
    assert "\x1b[31m503 (no server available)" in coloured
    assert "\x1b[32mws (client closed)" in coloured
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    for plain in (
        on_a_terminal(*base, "--no-color"),
        on_a_terminal(*base, env={**env, "NO_COLOR": "1"}),
    ):
        assert "503 (no server available)" in plain
        assert ANSI not in plain


def test_bad_input_gets_a_clear_answer() -> None:
    status = splicelb_tail("--status", "5x5")
    assert status.returncode == 2
    assert "'5x5' is not an HTTP status: give a code such as 503 or a class such as 5xx" in (
        status.stderr
    )
    missing = splicelb_tail("--file", "/nonexistent/splicelb.log", "--no-follow")
    assert (missing.returncode, missing.stderr) == (
        1,
        "splicelb: /nonexistent/splicelb.log: no such file\n",
    )
    directory = splicelb_tail("--file", str(REPO), "--no-follow")
    assert (directory.returncode, directory.stderr) == (1, f"splicelb: {REPO}: Is a directory\n")
