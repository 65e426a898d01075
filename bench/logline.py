"""User-space instructions of one ``conn`` log line (callgrind), the worker's call included.

``python -m bench.logline`` runs a loop that makes a worker's ``conn`` line
``N`` times (the arguments evaluated as the worker's ``_finish`` does, the
line rendered by ``lb.log.ConnLog`` and written to a file) under valgrind's
callgrind, once with ``--lines N`` and once with ten times as many; the
difference over the extra lines is the cost of one, without the
interpreter's start-up.  Two cases: ``batched``, the loop's turn ending
every ``--per-turn`` lines (the batch of that turn written in one write, as
under load), and ``alone``, a write per line (one connection per turn, an
idle worker's case).  ``bench.instructions --log-level info`` measures the
same in a whole worker, where a line's cost is lost in the run-to-run spread
of the connection's (a few thousand instructions); this measures the line by
itself, to the hundred.  ``--code REV`` measures the line of an earlier
commit (``git archive``; before ``d3e5713`` the worker passed the duration,
rounded, rather than when the connection began).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.procs import BenchError, log
from bench.snippet import code_under_test, per_call


def make_lines(lines: int, per_turn: str, path: str) -> None:
    """A worker's ``lines`` conn lines, a batch written every ``per_turn`` (0: each line
    alone), to ``path`` (a bench.snippet snippet)."""
    import inspect  # noqa: PLC0415
    import os  # noqa: PLC0415
    import time  # noqa: PLC0415

    from lb import log as lblog  # noqa: PLC0415
    from lb.worker.runtime import format_peer  # noqa: PLC0415

    client, fields = ("127.0.0.1", 50123), ("http", "app", "app1", False, None, 78, 145)
    batch = int(per_turn)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    conn_log = lblog.ConnLog("worker", 1, lblog.Sink.open(fd))
    turn_end: list[object] = []
    if batch:
        conn_log.batch(turn_end.append)
    # since d3e5713 the line is given when the connection began; before, its duration
    gets_start = "started" in inspect.signature(conn_log).parameters
    started = time.monotonic()
    for i in range(lines):
        conn_log(
            format_peer(client),
            *fields,  # listener ... bytes_out
            started if gets_start else round((time.monotonic() - started) * 1000, 3),
            "server closed",
            sni=False,
        )
        if batch and (i + 1) % batch == 0:
            conn_log.flush()
            turn_end.clear()
    conn_log.flush()


def per_line(code: Path, lines: int, per_turn: int, tmp: Path) -> int:
    """One line's instructions; the lines of the last run must all be in the file."""
    path = tmp / "lines.log"
    cost = per_call(code, make_lines, lines, str(per_turn), str(path))
    written = path.read_bytes().count(b"\n")
    if written != 10 * lines:
        raise BenchError(f"{10 * lines} conn lines made, {written} written")
    return cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000, help="lines of the short run (1000)")
    parser.add_argument("--per-turn", type=int, default=8, help="lines per batch (8)")
    parser.add_argument("--code", default="", help="the line of commit CODE (git archive)")
    args = parser.parse_args(argv)
    with code_under_test(args.code) as (code, tmp):
        log(f"conn lines of {args.code or 'this tree'} under callgrind")
        result = {
            "code": args.code or "this tree",
            "batched": per_line(code, args.lines, args.per_turn, tmp),
            "per_turn": args.per_turn,
            "alone": per_line(code, args.lines, 0, tmp),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
