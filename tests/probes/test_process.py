"""The prober's record of a server: when it last came back up (slow start ramps from then)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lb.config import parse_config
from lb.pool import layout as L
from lb.pool.shm import create_pool
from probes.checks import CheckResult
from probes.process import Prober

CONFIG = {
    "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "app"}],
    "backends": [
        {
            "name": "app",
            "health": {"type": "tcp", "rise": 2, "fall": 2},
            "servers": [{"name": "s0", "address": "127.0.0.1:1"}],
        }
    ],
}
OK, FAILED = CheckResult(True, "connected", 0.001), CheckResult(False, "connection refused", 0.001)


class Quiet:
    """A logger that keeps the events it is given."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, _level: str) -> Any:
        return lambda event, **_fields: self.events.append(event)


def test_the_record_says_when_a_server_came_back_up_from_down(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    pool = create_pool(str(tmp_path / "pool"), config, 1, nslots=1)
    prober = Prober(config, pool, Quiet())
    try:
        (probe,) = prober.probes
        prober._publish(probe, OK)  # the first check: unchecked -> up, as at start
        assert pool.health(0) == L.UP
        assert pool.up_at(0) == 0.0  # never down: no slow start
        for result in (FAILED, FAILED, OK):
            prober._publish(probe, result)
        assert (pool.health(0), pool.up_at(0)) == (L.DOWN, 0.0)
        before = time.monotonic()
        prober._publish(probe, OK)  # rise = 2: up again
        came_up = pool.up_at(0)
        assert pool.health(0) == L.UP
        assert before <= came_up <= time.monotonic()
        prober._publish(probe, OK)
        prober._publish(probe, FAILED)
        assert pool.up_at(0) == came_up  # a check that changes nothing keeps it
    finally:
        prober.loop.close()
        pool.close()
