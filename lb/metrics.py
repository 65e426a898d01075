"""Prometheus metrics, computed from the live pool files at each scrape.

A custom ``prometheus_client`` collector reads the current generation's pool
and those of older generations still draining, sums the workers' slots with
what finished generations counted (:class:`lb.pool.shm.Totals`), and yields
metric families; ``prometheus_client`` renders the text format.  A counter
never falls while the instance runs, reloads included; the series are the
servers and listeners the current generation names (one that a reload
removed is no longer exported).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lb.pool import layout as L
from lb.pool.shm import Pool, Totals
from lb.status import open_pools

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
        current, others = open_pools(self.runtime_dir)
        try:
            yield from self._collect(current, others)
        finally:
            for pool in [current, *others]:
                pool.close()

    def _collect(self, current: Pool, others: list[Pool]) -> Iterator[Metric]:
        f = _families()
        totals = Totals(current, others)
        _add_counters(totals, f)
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


def _add_counters(totals: Totals, f: dict[str, Metric]) -> None:
    names = totals.pool.names
    for i, listener in enumerate(names["listeners"]):
        for name, value in totals.listener(i).items():
            f[f"l_{name}"].add_metric([listener["name"]], value)  # type: ignore[attr-defined]
    for backend in totals.pool.backends():
        for server in backend["servers"]:
            labels = [backend["name"], server["name"]]
            for name, value in totals.server(server["index"]).items():
                f[f"s_{name}"].add_metric(labels, value)  # type: ignore[attr-defined]
    for status, count in totals.answers().items():
        f["answers"].add_metric([str(status)], count)  # type: ignore[attr-defined]
    states = {"running": 0, "draining": 0}
    for pool in totals.running:
        q, geo = pool.q, pool.geometry
        for slot in range(geo.nslots):
            word = q[geo.slot(slot) + L.S_STATE]
            if word != L.SLOT_EMPTY:
                states["draining" if word == L.SLOT_DRAINING else "running"] += 1
    for state, count in states.items():
        f["workers"].add_metric([state], count)  # type: ignore[attr-defined]


def _add_states(pool: Pool, f: dict[str, Metric]) -> None:
    for backend in pool.backends():
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
    for backend in pool.backends():
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
