from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import EchoBackend, Proc, SpliceLB


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all killed at the end, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.kill()


@pytest.fixture
def echo_pair(procs: list[Proc]) -> tuple[EchoBackend, EchoBackend]:
    a = EchoBackend("echo1")
    procs.append(a)
    b = EchoBackend("echo2")
    procs.append(b)
    return a, b


@pytest.fixture
def start_lb(tmp_path: Path, procs: list[Proc]) -> Callable[..., SpliceLB]:
    def start(config: str, workers: int = 2) -> SpliceLB:
        lb = SpliceLB(tmp_path, config, workers)
        procs.append(lb)
        return lb

    return start
