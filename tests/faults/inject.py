"""Run ``splicelb`` with a fault injected into a named function of its code.

    python -m tests.faults.inject --raise lb.worker.conn:Connection.expire -- run -c FILE

The function is replaced, in the supervisor before anything runs, by one
that raises ``RuntimeError("injected fault")`` on its first ``N`` calls in
each process (``--raise TARGET=N``; 1 by default) and then behaves as
before; the supervisor's children inherit the replacement when they are
forked, each with its own count.  ``--when EXPR`` limits the fault to the
calls for which the Python expression is true (``args`` and ``kwargs`` are
the call's: ``--when "args[3] > 1"``).  ``--slow TARGET=SECONDS`` makes every
call of the function wait that long first (a slow step, to land another
fault in the middle of it).  Nothing in splicelb's own code knows about
this: the fault is what a bug in that function would do.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import time
from collections.abc import Callable
from typing import Any

from lb.cli import cli


def resolve(target: str) -> tuple[Any, str]:
    """``module:Class.name``: the object that holds the function, and its name."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def inject(target: str, times: int, when: str = "True") -> None:
    owner, name = resolve(target)
    original: Callable[..., Any] = getattr(owner, name)
    left = [times]

    @functools.wraps(original)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        if left[0] > 0 and eval(when, {"args": args, "kwargs": kwargs}):
            left[0] -= 1
            raise RuntimeError(f"injected fault in {target}")
        return original(*args, **kwargs)

    setattr(owner, name, faulty)


def slow(target: str, seconds: float) -> None:
    owner, name = resolve(target)
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(owner, name, slowed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raise", dest="raises", action="append", default=[], metavar="TARGET[=N]")
    parser.add_argument("--when", default="True", metavar="EXPR")
    parser.add_argument("--slow", action="append", default=[], metavar="TARGET=SECONDS")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    for spec in options.raises:
        target, _, times = spec.partition("=")
        inject(target, int(times or 1), options.when)
    for spec in options.slow:
        target, _, seconds = spec.partition("=")
        slow(target, float(seconds))
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    cli(args, prog_name="splicelb")


if __name__ == "__main__":
    main()
