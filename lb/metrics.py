"""Prometheus metrics, computed from the live pool files at each scrape.

A custom ``prometheus_client`` collector reads the current generation's pool
and those of older generations still draining, sums the workers' slots, and
yields metric families; ``prometheus_client`` renders the text format.
Counters restart at a reload once the old generation is gone, as they would
at a process restart (Prometheus' ``rate`` handles that).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lb.errors import LBError
from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.status import open_pool

SERVER = ["backend", "server"]
HEALTH_STATES = (*L.HEALTH_NAMES, L.HEALTH_UNKNOWN)


def _families() -> dict[str, Metric]:
    c, g = CounterMetricFamily, GaugeMetricFamily
    return {
        "l_active": g(
            "splicelb_listener_connections_active", "Open client connections", labels=["listener"]
        ),
        "l_total": c(
            "splicelb_listener_connections", "Accepted client connections", labels=["listener"]
        ),
        "l_bytes_in": c(
            "splicelb_listener_bytes_in", "Bytes received from clients", labels=["listener"]
        ),
        "l_bytes_out": c(
            "splicelb_listener_bytes_out", "Bytes sent to clients", labels=["listener"]
        ),
        "s_active": g(
            "splicelb_server_connections_active", "Open tunnels to the server", labels=SERVER
        ),
        "s_total": c("splicelb_server_connections", "Tunnels opened to the server", labels=SERVER),
        "s_bytes_in": c(
            "splicelb_server_bytes_in", "Bytes from clients to the server", labels=SERVER
        ),
        "s_bytes_out": c(
            "splicelb_server_bytes_out", "Bytes from the server to clients", labels=SERVER
        ),
        "s_failed_connects": c(
            "splicelb_server_connect_failures",
            "Connects to the server refused or timed out",
            labels=SERVER,
        ),
        "s_up": g(
            "splicelb_server_up", "1 if the server may get connections by health", labels=SERVER
        ),
        "s_health": g(
            "splicelb_server_health",
            "Health state (1 for the current one; unknown: the health record is unreadable,"
            " its last write never finished)",
            labels=[*SERVER, "state"],
        ),
        "s_admin": g(
            "splicelb_server_admin_state",
            "Admin state (1 for the current one)",
            labels=[*SERVER, "state"],
        ),
        "answers": c(
            "splicelb_answers",
            "Requests the balancer answered itself, by status",
            labels=["status"],
        ),
        "workers": g("splicelb_workers", "Worker processes", labels=["state"]),
    }


class PoolCollector(Collector):
    """Collects from the pools in one runtime dir."""

    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir

    def collect(self) -> Iterator[Metric]:
        current = open_pool(self.runtime_dir)
        pools = [current]
        try:
            for path in glob.glob(os.path.join(self.runtime_dir, "pool-*.shm")):
                if not os.path.samefile(path, current.path):
                    with contextlib.suppress(OSError, LBError):
                        pools.append(Pool.open(path))
            yield from self._collect(current, pools)
        finally:
            for pool in pools:
                pool.close()

    def _collect(self, current: Pool, pools: list[Pool]) -> Iterator[Metric]:
        f = _families()
        sums: dict[tuple[str, tuple[str, ...]], float] = {}

        def add(key: str, labels: tuple[str, ...], value: float) -> None:
            sums[(key, labels)] = sums.get((key, labels), 0) + value

        for pool in pools:
            _add_counters(pool, add)
        for (key, labels), value in sorted(sums.items()):
            f[key].add_metric(list(labels), value)  # type: ignore[attr-defined]
        _add_states(current, f)
        q = current.q
        yield from f.values()
        yield CounterMetricFamily(
            "splicelb_worker_restarts",
            "Worker and prober restarts after a crash",
            value=q[L.H_RESTARTS],
        )
        yield CounterMetricFamily("splicelb_reloads", "Successful reloads", value=q[L.H_RELOADS])
        yield GaugeMetricFamily(
            "splicelb_generation", "The serving generation", value=q[L.H_GENERATION]
        )
        yield _latency(current)


def _add_counters(pool: Pool, add: Any) -> None:
    q, geo, names = pool.q, pool.geometry, pool.names
    for slot in range(geo.nslots):
        base = geo.slot(slot)
        state = q[base + L.S_STATE]
        if state != L.SLOT_EMPTY:
            add("workers", ("draining" if state == L.SLOT_DRAINING else "running",), 1)
        for i, status in enumerate(L.ANSWER_STATUSES):
            if status:
                add("answers", (str(status),), q[base + L.S_ANSWERS + i])
        for i, listener in enumerate(names["listeners"]):
            c = geo.listener_counter(slot, i)
            for name, word in L.LISTENER_COUNTERS:
                add(f"l_{name}", (listener["name"],), q[c + word])
        for backend in names["backends"]:
            for server in backend["servers"]:
                c = geo.counter(slot, server["index"])
                labels = (backend["name"], server["name"])
                for name, word in L.SERVER_COUNTERS:
                    add(f"s_{name}", labels, q[c + word])


def _add_states(pool: Pool, f: dict[str, Metric]) -> None:
    for backend in pool.names["backends"]:
        for server in backend["servers"]:
            labels = [backend["name"], server["name"]]
            index, checked = server["index"], backend["checked"]
            # Up or not by the health word the workers pick by: one word, never torn.
            up = not checked or pool.health(index) != L.DOWN
            health = _health(pool, index) if checked else "unchecked"
            admin = pool.admin(index)
            f["s_up"].add_metric(labels, int(up))  # type: ignore[attr-defined]
            for name in HEALTH_STATES:
                f["s_health"].add_metric([*labels, name], int(name == health))  # type: ignore[attr-defined]
            for value, name in enumerate(L.ADMIN_NAMES):
                f["s_admin"].add_metric([*labels, name], int(value == admin))  # type: ignore[attr-defined]


def _health(pool: Pool, index: int) -> str:
    """The server's health state, ``unknown`` if its record cannot be read."""
    record = pool.read_record(index)
    return L.HEALTH_UNKNOWN if record is None else L.HEALTH_NAMES[record.health]


def _latency(pool: Pool) -> Metric:
    family = HistogramMetricFamily(
        "splicelb_server_check_latency_seconds", "Health check latency", labels=SERVER
    )
    bounds = [*(f"{b:g}" for b in L.LATENCY_BUCKETS), "+Inf"]
    for backend in pool.names["backends"]:
        if not backend["checked"]:
            continue
        for server in backend["servers"]:
            counts, total = pool.latency_histogram(server["index"])
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric([backend["name"], server["name"]], cumulative, total)
    return family
