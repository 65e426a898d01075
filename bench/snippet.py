"""The user-space instructions of one call of a snippet of code, counted by callgrind.

A snippet is a module-level function ``f(times, *args)`` of its own module
that imports what it uses inside itself (its source becomes a child's whole
program, run with ``PYTHONPATH`` set to the tree under test, so the child
imports nothing else of this one) and does its work ``times`` times.
:func:`per_call` runs it under valgrind's callgrind with ``times`` and with
ten times as many; the difference over the extra calls is one call's cost,
without the interpreter's start-up.  Counts of instructions, unlike times,
do not depend on what else the machine is doing: a change is judged to the
hundred in a minute.  ``bench/logline.py`` and ``bench/heads.py`` use it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.procs import REPO, BenchError, install_debian
from bench.servers import checkout

CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
CHILD = "{source}\nimport sys\n{name}(int(sys.argv[1]), *sys.argv[2:])\n"


@contextlib.contextmanager
def code_under_test(rev: str) -> Iterator[tuple[Path, Path]]:
    """The tree to count, commit ``rev``'s (``git archive``) or this one's, and a scratch
    directory; valgrind is installed first if it is missing."""
    if shutil.which("valgrind") is None:
        install_debian(["valgrind"])
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        yield (checkout(rev, tmp) if rev else REPO), tmp


def instructions(code: Path, snippet: Callable[..., object], times: int, *args: str) -> int:
    """Instructions of a child that runs ``snippet(times, *args)`` (callgrind's total)."""
    program = CHILD.format(source=inspect.getsource(snippet), name=snippet.__name__)
    result = subprocess.run(
        [*CALLGRIND, sys.executable, "-c", program, str(times), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(code)},
        cwd=code,
    )
    if result.returncode != 0:
        raise BenchError(f"{snippet.__name__} failed under callgrind: {result.stderr[-2000:]}")
    for line in result.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].replace(",", ""))
    raise BenchError(f"callgrind printed no total: {result.stderr[-2000:]}")


def per_call(code: Path, snippet: Callable[..., object], times: int, *args: str) -> int:
    """One call's instructions: the runs of ``times`` and ``10 * times`` calls, apart."""
    few = instructions(code, snippet, times, *args)
    many = instructions(code, snippet, 10 * times, *args)
    return round((many - few) / (9 * times))
