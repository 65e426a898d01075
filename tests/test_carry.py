"""Totals outlive reloads: what a finished generation counted is carried, by names, and a
reader counts it exactly once, whenever it reads.

An instance here is a real supervisor object without processes: its generations are
created as a reload creates them, a worker's counting is a store into its slot, and a
finished generation is cleared away by the supervisor's own ``_progress``.  Readers
are the real ones: ``read_status`` (``splicelb status``, ``/status``) and the metrics
collector, through the runtime dir.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from lb.config import Config, parse_config
from lb.generation import Generation
from lb.metrics import PoolCollector
from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.rundir import RuntimeDir
from lb.status import read_status, snapshot
from lb.supervisor import Supervisor

SERVERS_AB = [("a", "127.0.0.1:2001"), ("b", "127.0.0.1:2002")]


def make_config(runtime_dir: Path, servers: list[tuple[str, str]], workers: int = 2) -> Config:
    return parse_config(
        {
            "global": {"workers": workers, "runtime_dir": str(runtime_dir), "admin_bind": ""},
            "listeners": [{"name": "pub", "bind": "127.0.0.1:1", "default_backend": "app"}],
            "backends": [
                {
                    "name": "app",
                    "servers": [{"name": name, "address": addr} for name, addr in servers],
                }
            ],
        }
    )


@contextlib.contextmanager
def instance(tmp_path: Path, servers: list[tuple[str, str]]) -> Iterator[Supervisor]:
    """A supervisor serving generation 1, its runtime dir locked as ``splicelb run`` does."""
    runtime_dir = tmp_path / "run"
    rundir = RuntimeDir.claim(str(runtime_dir))
    supervisor = Supervisor(make_config(runtime_dir, servers))
    generation = Generation.create(1, supervisor.config, None)
    generation.publish()
    generation.serving = True
    supervisor.generations[1] = supervisor.current = generation
    try:
        yield supervisor
    finally:
        for g in supervisor.generations.values():
            g.pool.close()
        rundir.release()


def reload(supervisor: Supervisor, servers: list[tuple[str, str]], workers: int = 2) -> Pool:
    """What a successful reload does to the generations: a new one, published and
    serving; the one before retiring (its workers drain)."""
    current = supervisor.current
    assert current is not None
    config = make_config(Path(supervisor.runtime_dir), servers, workers)
    number = max(supervisor.generations) + 1
    generation = Generation.create(number, config, current.pool)
    generation.publish()
    generation.serving = True
    current.retiring = True
    supervisor.generations[number] = supervisor.current = generation
    return generation.pool


def finish(supervisor: Supervisor) -> None:
    """The retiring generations' last children are gone: the supervisor clears them away."""
    supervisor._progress(time.monotonic())
    assert all(not g.retiring for g in supervisor.generations.values())


def count(
    pool: Pool,
    slot: int,
    server: str | None = None,
    connections: int = 1,
    bytes_in: int = 0,
    active: int = 0,
    failed: int = 0,
    answer: int | None = None,
) -> None:
    """What a worker in ``slot`` publishes for ``connections`` new connections of the
    listener, to ``server`` (by name) or answered by the balancer (``answer``)."""
    q, geo = pool.q, pool.geometry
    base = geo.slot(slot)
    q[base + L.S_STATE] = L.SLOT_RUNNING
    q[base + L.S_PID] = os.getpid()  # alive: status lists the worker
    q[base + L.S_GENERATION] = q[L.H_GENERATION]
    q[base + L.S_ACCEPTED] += connections
    at = geo.listener_counter(slot, 0)
    q[at + L.C_TOTAL] += connections
    q[at + L.C_BYTES_IN] += bytes_in
    if server is not None:
        index = next(
            s["index"] for s in pool.names["backends"][0]["servers"] if s["name"] == server
        )
        at = geo.counter(slot, index)
        q[at + L.C_TOTAL] += connections
        q[at + L.C_BYTES_IN] += bytes_in
        q[at + L.C_ACTIVE] += active
        q[at + L.C_FAILED] += failed
    if answer is not None:
        q[base + L.S_ANSWERS + L.ANSWER_STATUSES.index(answer)] += connections


def servers_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status["backends"][0]["servers"]}


def metrics(supervisor: Supervisor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in PoolCollector(supervisor.runtime_dir).collect():
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def server_metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, server: str
) -> float | None:
    return samples.get((name, (("backend", "app"), ("server", server))))


def test_totals_go_on_across_reloads_for_the_servers_and_listeners_still_named(
    tmp_path: Path,
) -> None:
    with instance(tmp_path, SERVERS_AB) as supervisor:
        run = supervisor.runtime_dir
        assert supervisor.current is not None
        first = supervisor.current.pool
        count(first, 0, "a", connections=3, bytes_in=300, failed=1)
        count(first, 1, "b", connections=2, bytes_in=200)
        count(first, 1, answer=431)

        # Reload: b removed, c added.
        second = reload(supervisor, [("a", "127.0.0.1:2001"), ("c", "127.0.0.1:2003")])
        count(second, 0, "a", connections=1, bytes_in=100)
        count(second, 1, "c", connections=4, bytes_in=400)
        count(second, 0, answer=431)
        during = read_status(run)
        finish(supervisor)
        after = read_status(run)
        assert not os.path.exists(first.path)
        for status in (during, after):
            servers = servers_of(status)
            assert set(servers) == {"a", "c"}  # b is no longer reported
            assert servers["a"]["total"] == 4 and servers["a"]["bytes_in"] == 400
            assert servers["a"]["failed_connects"] == 1
            assert servers["c"]["total"] == 4
            assert status["answers"]["431"] == 2
            (pub,) = status["listeners"]
            assert pub["name"] == "pub" and pub["bind"] == "127.0.0.1:1"
            assert pub["total"] == 6 + 6 and pub["bytes_in"] == 500 + 500
        # Each worker of the serving generation goes on from its slot's count.
        assert {w["slot"]: w["accepted"] for w in after["workers"]} == {0: 3 + 2, 1: 3 + 4}

        samples = metrics(supervisor)
        listener = (("listener", "pub"),)
        assert samples[("splicelb_listener_connections_total", listener)] == 6 + 6
        assert samples[("splicelb_listener_bytes_in_total", listener)] == 500 + 500
        assert server_metric(samples, "splicelb_server_connections_total", "a") == 4
        assert server_metric(samples, "splicelb_server_connections_total", "b") is None
        assert server_metric(samples, "splicelb_server_connect_failures_total", "a") == 1
        assert samples[("splicelb_answers_total", (("status", "431"),))] == 2

        # And again, through a generation that never saw b nor the first one.
        third = reload(supervisor, [("a", "127.0.0.1:2001"), ("c", "127.0.0.1:2003")])
        count(third, 1, "a", connections=5)
        accepted = {
            (w["generation"], w["slot"]): w["accepted"] for w in read_status(run)["workers"]
        }
        # The draining workers keep their counts; the new one goes on from its slot's.
        assert accepted == {(2, 0): 3 + 2, (2, 1): 3 + 4, (3, 1): 3 + 5}
        finish(supervisor)
        status = read_status(run)
        assert {w["slot"]: w["accepted"] for w in status["workers"]} == {1: 3 + 4 + 5}
        servers = servers_of(status)
        assert servers["a"]["total"] == 9 and servers["c"]["total"] == 4
        samples = metrics(supervisor)
        assert samples[("splicelb_listener_connections_total", listener)] == 6 + 6 + 5


def test_a_server_moved_to_another_address_keeps_its_totals(tmp_path: Path) -> None:
    """Its metrics are named by backend and server: they must not fall to zero."""
    with instance(tmp_path, SERVERS_AB) as supervisor:
        assert supervisor.current is not None
        count(supervisor.current.pool, 0, "a", connections=7)
        reload(supervisor, [("a", "127.0.0.1:2999"), ("b", "127.0.0.1:2002")])
        for _ in ("draining", "finished"):
            servers = servers_of(read_status(supervisor.runtime_dir))
            assert servers["a"]["address"] == "127.0.0.1:2999"
            assert servers["a"]["total"] == 7
            samples = metrics(supervisor)
            assert server_metric(samples, "splicelb_server_connections_total", "a") == 7
            finish(supervisor)


def test_open_connections_are_never_carried(tmp_path: Path) -> None:
    """A finished generation has nothing open, whatever its slots last said (a worker
    killed with tunnels open never took its count back)."""
    with instance(tmp_path, SERVERS_AB) as supervisor:
        assert supervisor.current is not None
        count(supervisor.current.pool, 0, "a", connections=2, active=2)
        reload(supervisor, SERVERS_AB)
        assert servers_of(read_status(supervisor.runtime_dir))["a"]["active"] == 2  # draining
        finish(supervisor)
        server = servers_of(read_status(supervisor.runtime_dir))["a"]
        assert (server["active"], server["total"]) == (0, 2)
        samples = metrics(supervisor)
        assert server_metric(samples, "splicelb_server_connections_active", "a") == 0


def test_a_slot_or_a_worker_count_that_a_reload_removes_is_dropped(tmp_path: Path) -> None:
    with instance(tmp_path, SERVERS_AB) as supervisor:
        assert supervisor.current is not None
        count(supervisor.current.pool, 0, "a", connections=2)
        count(supervisor.current.pool, 1, "a", connections=3)
        one = reload(supervisor, SERVERS_AB, workers=1)
        count(one, 0, "a", connections=1)
        finish(supervisor)
        status = read_status(supervisor.runtime_dir)
        assert [(w["slot"], w["accepted"]) for w in status["workers"]] == [(0, 3)]
        assert servers_of(status)["a"]["total"] == 6  # the server's total keeps all


def test_a_reader_that_holds_the_finished_pool_counts_it_once_at_every_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window: a reader has the finished generation's pool mapped (it opened it
    before the supervisor unlinked it) and the supervisor folds it at any point of
    the read: before the read, or between the copy of the carried totals and the
    marks.  The total is the same every time: no double count, no gap."""
    with instance(tmp_path, SERVERS_AB) as supervisor:
        assert supervisor.current is not None
        count(supervisor.current.pool, 0, "a", connections=5)
        count(supervisor.current.pool, 1, answer=400)
        second = reload(supervisor, SERVERS_AB)
        count(second, 1, "a", connections=2)
        old = Pool.open(supervisor.generations[1].pool.path)  # what a reader has mapped
        read_carried = Pool.read_carried

        def totals(pool: Pool) -> tuple[int, int]:
            status = snapshot(pool, [old])
            return servers_of(status)["a"]["total"], status["answers"]["400"]

        def fold_right_after(pool: Pool) -> list[int] | None:
            carried = read_carried(pool)
            finish(supervisor)  # the supervisor acts between the reader's two steps
            return carried

        assert totals(second) == (7, 1)
        monkeypatch.setattr(Pool, "read_carried", fold_right_after)
        assert totals(second) == (7, 1)  # the copy predates the fold: the slots count
        monkeypatch.setattr(Pool, "read_carried", read_carried)
        assert not os.path.exists(old.path)
        assert totals(second) == (7, 1)  # the copy holds it: its slots are skipped
        assert servers_of(read_status(supervisor.runtime_dir))["a"]["total"] == 7
        old.close()


# -- many reloads, readers in other processes --------------------------------------

RUN_FOR = 1.5
Counter = Any  # a multiprocessing Value("q"): one writer, read by others


def reloader(runtime_dir: str, until: float, begun: Counter, made: Counter) -> None:
    """Reload as fast as it can: generation n counts one connection to server a, of n
    bytes, before it is published; two or three generations are kept at a time, the one
    cleared away picked at random (an older one may outlive a newer one).  ``begun``:
    the generations whose pool file may exist; ``made``: those that have counted."""
    supervisor = Supervisor(make_config(Path(runtime_dir), SERVERS_AB, workers=1))
    rng = random.Random(7)
    number = 0
    while number == 0 or time.monotonic() < until:
        number += 1
        begun.value = number
        config = make_config(Path(runtime_dir), SERVERS_AB, workers=1)
        current = supervisor.current
        generation = Generation.create(number, config, current.pool if current else None)
        count(generation.pool, 0, "a", connections=1, bytes_in=number)
        made.value = number
        generation.publish()
        supervisor.generations[number] = supervisor.current = generation
        older = [g for g in supervisor.generations.values() if g is not generation]
        if len(older) >= 2:
            rng.choice(older).retiring = True
            supervisor._progress(time.monotonic())
    for generation in supervisor.generations.values():
        generation.pool.close()


def watcher(
    runtime_dir: str,
    until: float,
    begun: Counter,
    made: Counter,
    into: multiprocessing.Queue[object],
) -> None:
    """Read status as fast as it can; report the reads that broke a rule: no answer, a
    total fell, a generation made before the read began is missing, or more was counted
    than all the generations begun by its end (a double count).  A generation made during the
    read may be left for the next read: a total late, never one that falls."""
    reads, last = 0, (0, 0)
    problems: list[object] = []
    while time.monotonic() < until:
        before = made.value
        try:
            server = read_status(runtime_dir)["backends"][0]["servers"][0]
        except Exception as exc:  # a reader must answer while generations come and go
            problems.append(repr(exc))
            continue
        after = begun.value
        now = (server["total"], server["bytes_in"])
        fell = now[0] < last[0] or now[1] < last[1]
        missing = now[0] < before or now[1] < triangle(before)
        double = now[0] > after or now[1] > triangle(after)
        if fell or missing or double:
            problems.append((before, after, last, now))
        reads += 1
        last = now
    into.put((reads, problems[:5]))


def triangle(n: int) -> int:
    """Bytes of generations 1 to n: generation n counts n."""
    return n * (n + 1) // 2


def test_readers_see_totals_that_never_fall_and_never_double_while_generations_come_and_go(
    tmp_path: Path,
) -> None:
    runtime_dir = str(tmp_path / "run")
    rundir = RuntimeDir.claim(runtime_dir)  # read_status asks whether an instance runs
    ctx = multiprocessing.get_context("fork")
    begun, made = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
    results: multiprocessing.Queue[object] = ctx.Queue()
    until = time.monotonic() + RUN_FOR
    procs = [ctx.Process(target=reloader, args=(runtime_dir, until, begun, made))]
    procs += [
        ctx.Process(target=watcher, args=(runtime_dir, until, begun, made, results))
        for _ in range(2)
    ]
    try:
        procs[0].start()
        wait(lambda: made.value > 0)  # generation 1 counted, published a moment later
        wait(lambda: os.path.exists(os.path.join(runtime_dir, "pool")))
        for proc in procs[1:]:
            proc.start()
        reads = [cast(tuple[int, list[Any]], results.get(timeout=RUN_FOR + 20)) for _ in range(2)]
        procs[0].join(RUN_FOR + 20)
        assert procs[0].exitcode == 0
        server = read_status(runtime_dir)["backends"][0]["servers"][0]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        rundir.release()
    generations = made.value
    assert generations > 50, generations  # many generations finished while readers read
    assert all(problems == [] for _, problems in reads), reads
    assert all(n > 20 for n, _ in reads), reads
    # Through hundreds of folds in random order, every generation is counted once.
    assert (server["total"], server["bytes_in"]) == (generations, triangle(generations))


def wait(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
