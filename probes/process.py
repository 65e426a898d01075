"""The prober process: its own event loop, the only writer of server health.

It publishes its pid and a heartbeat in the pool header.  Health checks are
scheduled here (see :mod:`probes.checks`); until a backend has a
``[backends.health]`` section its servers stay ``unchecked``, which counts as up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import uvloop

from lb.config import Config
from lb.pool import layout as L
from lb.pool.shm import Pool

HEARTBEAT_INTERVAL = 1.0


class Prober:
    def __init__(self, config: Config, pool: Pool, log: Any) -> None:
        self.config = config
        self.pool = pool
        self.log = log
        self.loop = uvloop.new_event_loop()

    def run(self) -> int:
        loop = self.loop
        asyncio.set_event_loop(loop)
        self.pool.q[L.H_PROBER_PID] = os.getpid()
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        loop.add_signal_handler(signal.SIGQUIT, loop.stop)
        self._beat()
        self.log.info("prober_start")
        try:
            loop.run_forever()
        finally:
            loop.close()
        return 0

    def _beat(self) -> None:
        self.pool.d[L.H_PROBER_BEAT] = time.monotonic()
        self.loop.call_later(HEARTBEAT_INTERVAL, self._beat)
