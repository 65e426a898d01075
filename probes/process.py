"""The prober process: checks every server on its own schedule; the only writer of health.

Theory of operation
-------------------
One asyncio task per checked server.  Each waits a random part of its
interval before its first check (so checks of many servers spread out), then
checks every ``interval`` seconds ±10% jitter, measured from the previous
scheduled start so a slow check does not push the schedule back.  Results go
through HAProxy's rise/fall rule: ``fall`` consecutive failures take an up
server down, ``rise`` consecutive successes bring a down server up; a server
never checked yet (``unchecked``, counted as up) takes the first result at
once.  Every result is published in the server's pool record; a change of
health bumps the pool's health version so workers recompute their eligible
servers on their next connection.  The record keeps when the server last
came back up from down (a backend's ``slowstart`` ramps from then; a server
that was never down, as at start, has no ramp).

A worker whose connect to a server failed marks it suspect in its own slot,
and every worker avoids the server until a check succeeds after the mark
(or the mark's hold runs out).  The prober notices the mark within
``SUSPECT_POLL`` seconds and checks that server at once: a success clears
the mark for every worker; failures keep it out while ``fall`` counts down.  A server in ``maint``
is not checked.  A prober that is restarted continues from the records in
the pool; it never resets a server's health.  It first rewrites, as they
stand, the records a predecessor left mid-write (killed between its two
sequence stores), which readers would otherwise report unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

from lb import log as lblog
from lb.config import Config
from lb.config_table import Address
from lb.pool import layout as L
from lb.pool import servers
from lb.pool.shm import HealthRecord, Pool
from probes.checks import Checker, CheckResult
from probes.discovery import Discoverer

HEARTBEAT_INTERVAL = 1.0
SUSPECT_POLL = 0.1  # seconds between looks at the workers' suspect marks
JITTER = 0.1  # ±10% of the interval


STOP_SIGNALS = (signal.SIGTERM, signal.SIGQUIT)
NEVER_CHECKED = HealthRecord(L.UNCHECKED, 0, 0, 0.0, 0.0, 0.0, 0, "")
NOT_CHECKED_YET = "new server: not checked yet"


@dataclass(slots=True)
class Probe:
    index: int  # the server's index in the pool
    backend: str
    server: str
    address: Address
    checker: Checker
    interval: float
    rise: int
    fall: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    fresh: bool = False  # a new server in a spare slot: checked at once, ramps up when up


def next_health(health: int, rise_count: int, fall_count: int, rise: int, fall: int) -> int:
    """HAProxy's rule; ``unchecked`` takes the first result at once."""
    if health == L.UNCHECKED:
        return L.UP if rise_count else L.DOWN
    if health == L.UP and fall_count >= fall:
        return L.DOWN
    if health == L.DOWN and rise_count >= rise:
        return L.UP
    return health


class Prober:
    def __init__(self, config: Config, pool: Pool, log: Any) -> None:
        self.config = config
        self.pool = pool
        self.log = log
        self.loop = uvloop.new_event_loop()
        self.stop = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.checkers: dict[str, Checker] = {}  # by backend, for the servers in its spare slots
        self.probes = self._probes()  # TLS contexts are built here: a bad ca_file fails the boot
        # Spare slots' probes: slot -> (the epoch checked, its probe and task).
        self.spare_probes: dict[int, tuple[int, Probe, asyncio.Task[None]]] = {}
        self.spare_versions = (-1, -1)
        self.discoverers = [
            Discoverer(pool, i, backend, log)
            for i, backend in enumerate(config.backends)
            if backend.discovery is not None
        ]

    def run(self) -> int:
        asyncio.set_event_loop(self.loop)
        self.pool.q[L.H_PROBER_PID] = os.getpid()
        # Held until the loop runs (_main): a SIGTERM that uvloop takes before then is
        # lost, and the prober would run on until the supervisor kills it.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self._repair()
        for sig in STOP_SIGNALS:
            self.loop.add_signal_handler(sig, self.stop.set)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()
        return 0

    async def _main(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # see run
        connector = aiohttp.TCPConnector(force_close=True, limit=0, use_dns_cache=False)
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        ) as session:
            self.session = session
            probes = self.probes
            self.log.info("prober_start", checks=len(probes))
            tasks = [asyncio.create_task(self._probe_loop(p)) for p in probes]
            tasks.append(asyncio.create_task(self._beat()))
            tasks += [asyncio.create_task(d.run()) for d in self.discoverers]
            tasks.append(asyncio.create_task(self._watch_suspects(probes)))
            await self.stop.wait()
            for task in tasks + [task for _, _, task in self.spare_probes.values()]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _repair(self) -> None:
        """Make readable again the records a prober that died mid-write left odd.

        Every server's, checked or not: a server in maint is not checked, and
        its record would otherwise stay unreadable until it is.  The supervisor
        starts a prober only once the one before it is gone, so no write is
        under way.
        """
        for backend in self.pool.backends():
            for server in backend["servers"]:
                if self.pool.repair_record(server["index"]):
                    self.log.warning(
                        "record_repaired",
                        backend=backend["name"],
                        server=server["name"],
                        reason="its last write never finished; rewritten as it stood",
                    )

    def _probes(self) -> list[Probe]:
        probes = []
        index = 0
        for backend in self.config.backends:
            health = backend.health
            if health is not None and health.type == "https" and not health.verify:
                self.log.warning(
                    "tls_verify_off",
                    backend=backend.name,
                    reason="health.verify = false: server certificates are not checked",
                )
            checker = Checker(health, backend.send_proxy) if health is not None else None
            if checker is not None:
                self.checkers[backend.name] = checker
            for server in backend.servers:
                if checker is not None and health is not None:
                    probes.append(
                        Probe(
                            index,
                            backend.name,
                            server.name,
                            server.address,
                            checker,
                            health.interval,
                            health.rise,
                            health.fall,
                        )
                    )
                index += 1
        return probes

    async def _beat(self) -> None:
        while True:
            self.pool.d[L.H_PROBER_BEAT] = time.monotonic()
            lblog.tick()  # lines the log could not take: counted, reported
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _probe_loop(self, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        session = self.session
        assert session is not None
        if not probe.fresh:  # a new server is checked at once: it takes no traffic before
            await asyncio.sleep(random.uniform(0, probe.interval))
        due = loop.time()
        while True:
            if self.pool.admin(probe.index) != L.MAINT:  # maint: checks paused
                result = await probe.checker.check(session, probe.address)
                self._publish(probe, result)
            due += probe.interval * random.uniform(1 - JITTER, 1 + JITTER)
            due = max(due, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(probe.wake.wait(), due - loop.time())
                due = loop.time()  # woken for a suspect server: check now, schedule from now
            probe.wake.clear()

    async def _watch_suspects(self, probes: list[Probe]) -> None:
        """Wake the probes of servers that workers marked suspect, and take up the servers
        that came to spare slots or left them (both polled: the pool has no doorbell)."""
        pool, geo = self.pool, self.pool.geometry
        seen = -1
        while True:
            if pool.spare_versions() != self.spare_versions:
                self._sync_spares()
                seen = -1
            version = sum(pool.q[geo.slot(s) + L.S_SUSPECT_VERSION] for s in range(geo.nslots))
            if version != seen:
                seen = version
                for probe in probes + [probe for _, probe, _ in self.spare_probes.values()]:
                    if pool.suspect_since(probe.index) > pool.checked_at(probe.index):
                        probe.wake.set()
            await asyncio.sleep(SUSPECT_POLL)

    def _sync_spares(self) -> None:
        """Start checking the servers new in spare slots of checked backends, stop checking
        those gone.  A new one's record starts afresh (see lb.pool.servers)."""
        pool = self.pool
        self.spare_versions = pool.spare_versions()
        for backend in pool.names["backends"]:
            checker = self.checkers.get(backend["name"])
            if checker is None:
                continue
            for kind in ("api_slots", "dns_slots"):
                first, count = backend.get(kind, (0, 0))
                for index in range(first, first + count):
                    self._sync_spare(index, backend["name"], checker)

    def _sync_spare(self, index: int, backend: str, checker: Checker) -> None:
        pool = self.pool
        spare = pool.spare(index)
        held = self.spare_probes.get(index)
        if held is not None and (spare is None or spare.epoch != held[0]):
            held[2].cancel()
            del self.spare_probes[index]
            held = None
        if spare is None or held is not None:
            return
        fresh = pool.checked_epoch(index) != spare.epoch
        if fresh:  # the record was another server's: this one starts unchecked
            pool.write_record(index, dataclasses.replace(NEVER_CHECKED, text=NOT_CHECKED_YET))
            servers.set_checked_epoch(pool, index, spare.epoch)
            pool.bump_health_version()
        health = checker.health
        address = Address(spare.host, spare.port, spare.family, spare.sockaddr)
        probe = Probe(
            index, backend, spare.name, address, checker, health.interval, health.rise,
            health.fall, fresh=fresh,
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._probe_loop(probe))
        self.spare_probes[index] = (spare.epoch, probe, task)

    def _publish(self, probe: Probe, result: CheckResult) -> None:
        pool = self.pool
        old = pool.read_record(probe.index)
        if old is None:  # left mid-write since this prober started: start afresh,
            old = NEVER_CHECKED  # and the write below makes it readable again
            self.log.warning(
                "record_repaired",
                backend=probe.backend,
                server=probe.server,
                reason="its last write never finished; counting from unchecked",
            )
        rise_count = old.rise_count + 1 if result.ok else 0
        fall_count = 0 if result.ok else old.fall_count + 1
        health = next_health(old.health, rise_count, fall_count, probe.rise, probe.fall)
        was_suspect = pool.suspect_since(probe.index) > old.ok_at
        now = time.monotonic()
        # Up after down; or a new server in a spare slot up for the first time: slow start.
        came_up = health == L.UP and (old.health == L.DOWN or probe.fresh)
        pool.write_record(
            probe.index,
            HealthRecord(
                health=health,
                rise_count=rise_count,
                fall_count=fall_count,
                checked_at=now,
                changed_at=time.time() if health != old.health else old.changed_at,
                latency=result.latency,
                checks=old.checks + 1,
                text=result.text,
                ok_at=now if result.ok else old.ok_at,
                up_at=now if came_up else old.up_at,
            ),
        )
        probe.fresh = probe.fresh and health != L.UP
        pool.observe_latency(probe.index, result.latency)
        if was_suspect and result.ok and health == old.health:
            pool.bump_health_version()  # the suspect mark is settled: workers look again
        if health != old.health:
            log = self.log.warning if health == L.DOWN else self.log.info
            log(
                "server_state",
                backend=probe.backend,
                server=probe.server,
                **{"from": L.HEALTH_NAMES[old.health], "to": L.HEALTH_NAMES[health]},
                reason=result.text,
                latency_ms=round(result.latency * 1000, 3),
            )
