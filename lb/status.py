"""What ``splicelb status`` shows, read straight from the live pool.

Reading the pool file needs no answer from any process, so status works even
while every worker is busy.  The object follows ARCHITECTURE.md's contract
(``generation``, ``workers``, ``backends`` with ``servers``) and adds a few
fields (check results, bytes, a listener's counters, answers by status).  A server whose health
record cannot be read (its writer died mid-write) shows health ``unknown``
and a ``health_reason``; the rest of the status is read as usual.

Totals (connections, bytes, failed connects, answers, a slot's accepted) are
the instance's since it started, reloads included, for the servers, listeners
and slots the current generation names (:class:`lb.pool.shm.Totals`); active
counts are those of the generations still running.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Sequence
from typing import Any

from lb.errors import LBError, NotRunningError
from lb.generation import POOL_LINK
from lb.pool import layout as L
from lb.pool.servers import read_answer
from lb.pool.shm import Pool, Totals
from lb.rundir import running_pid

UNREADABLE = "health record unreadable: its last write never finished"
# Times the pool link is followed: its target may be gone if reloads moved the link
# on and the generation it named finished while we followed it.
LINK_TRIES = 3


def open_pool(runtime_dir: str) -> Pool:
    """The current generation's pool."""
    running_pid(runtime_dir)
    for _ in range(LINK_TRIES):
        try:
            return Pool.open(os.path.join(runtime_dir, POOL_LINK))
        except FileNotFoundError:
            continue
        except PermissionError:
            raise LBError(
                f"{runtime_dir}: cannot read the live pool: permission denied"
                " (run as the instance's user or root)"
            ) from None
    raise NotRunningError(f"no instance is running in {runtime_dir}")


def open_pools(runtime_dir: str) -> tuple[Pool, list[Pool]]:
    """The current generation's pool and the pools of the others still running.

    The others first, then the current one: the order :class:`Totals` needs (a pool
    unlinked after we opened it is still mapped; one unlinked before is folded into
    the current pool's totals already).
    """
    others: list[Pool] = []
    try:
        for path in glob.glob(os.path.join(runtime_dir, "pool-*.shm")):
            with contextlib.suppress(OSError, LBError):  # finished while we looked
                others.append(Pool.open(path))
        pool = open_pool(runtime_dir)
    except BaseException:
        for other in others:
            other.close()
        raise
    number = pool.q[L.H_GENERATION]
    for other in [p for p in others if p.q[L.H_GENERATION] == number]:
        others.remove(other)
        other.close()
    return pool, others


def read_status(runtime_dir: str) -> dict[str, Any]:
    """The status object: the current generation, plus workers still draining older ones."""
    pool, others = open_pools(runtime_dir)
    try:
        return snapshot(pool, others)
    finally:
        for p in [pool, *others]:
            p.close()


def snapshot(pool: Pool, others: list[Pool] | None = None) -> dict[str, Any]:
    """The status object of one pool; ``others`` are older generations' pools (opened
    before ``pool``: see :func:`open_pools`)."""
    now = time.monotonic()
    totals = Totals(pool, others or [])
    workers = []
    for p in sorted(totals.running, key=lambda p: p.q[L.H_GENERATION]):
        workers += _workers(p, totals.slot_accepted(p), now)
    backends = []
    for i, backend in enumerate(pool.backends()):
        servers = [_server(pool, s, backend["checked"], now, totals) for s in backend["servers"]]
        entry: dict[str, Any] = {"name": backend["name"], "servers": servers}
        if backend.get("dns_slots", (0, 0))[1]:
            entry["discovery"] = _discovery(pool, i)
        backends.append(entry)
    q, d = pool.q, pool.d
    prober_pid = q[L.H_PROBER_PID]
    return {
        "generation": q[L.H_GENERATION],
        "workers": workers,
        "prober": {
            "pid": prober_pid if alive(prober_pid) else None,
            "heartbeat_age_s": round(now - d[L.H_PROBER_BEAT], 3),
        },
        "listeners": [
            {**listener, **totals.listener(i)} for i, listener in enumerate(pool.names["listeners"])
        ],
        "backends": backends,
        "answers": {str(status): count for status, count in totals.answers().items()},
    }


def _workers(pool: Pool, carried: list[int], now: float) -> list[dict[str, Any]]:
    """The live workers of one pool; ``carried``: what each slot accepted in the
    generations that have finished (a worker's ``accepted`` goes on from it)."""
    q, d, geo = pool.q, pool.d, pool.geometry
    workers = []
    for slot in range(geo.nslots):
        base = geo.slot(slot)
        if q[base + L.S_STATE] == L.SLOT_EMPTY or not alive(q[base + L.S_PID]):
            continue
        workers.append(
            {
                "pid": q[base + L.S_PID],
                "generation": q[base + L.S_GENERATION],
                "connections": q[base + L.S_CONNECTIONS],
                "slot": slot,
                "state": "draining" if q[base + L.S_STATE] == L.SLOT_DRAINING else "running",
                "accepted": q[base + L.S_ACCEPTED] + carried[slot],
                "adopted": q[base + L.S_ADOPTED],
                "heartbeat_age_s": round(now - d[base + L.S_BEAT], 3),
            }
        )
    return workers


def _server(
    pool: Pool, server: dict[str, Any], checked: bool, now: float, totals: Totals
) -> dict[str, Any]:
    index = server["index"]
    record = pool.read_record(index) if checked else None
    if not checked:
        health = "unchecked"
    elif record is None:
        health = L.HEALTH_UNKNOWN
    else:
        health = L.HEALTH_NAMES[record.health]
    out: dict[str, Any] = {
        "name": server["name"],
        "address": server["address"],
        "source": server["source"],
        "health": health,
        "admin": L.ADMIN_NAMES[pool.admin(index)],
        **totals.server(index),
    }
    if "weight" in server:
        out["weight"] = server["weight"]
    if checked and "epoch" in server and pool.checked_epoch(index) != server["epoch"]:
        out["health"], record = "unchecked", None  # the prober has not taken it up yet
        out["health_reason"] = "new server: not checked yet"
    elif checked and record is None:
        out["health_reason"] = UNREADABLE
    elif record is not None and record.checks:
        out["check"] = {
            "result": record.text,
            "latency_ms": round(record.latency * 1000, 3),
            "checks": record.checks,
            "age_s": round(now - record.checked_at, 3),
            "since": _iso(record.changed_at) if record.changed_at else None,
        }
    return out


def _discovery(pool: Pool, backend: int) -> dict[str, Any]:
    """A backend's DNS answer: its age (null: none yet), its servers, the failures since."""
    answer = read_answer(pool, backend)
    if answer is None:
        return {"answer_age_s": None, "servers": 0, "failures": 0, "problem": UNREADABLE}
    return {
        "answer_age_s": round(time.time() - answer.ok_at, 3) if answer.ok_at else None,
        "servers": answer.servers,
        "failures": answer.failures,
        "problem": answer.text or None,
    }


def format_table(status: dict[str, Any]) -> str:
    """The human view: one line per listener, one per server, then the workers."""
    lines = [f"generation {status['generation']}"]
    listeners = [("LISTENER", "BIND", "MODE", "ACTIVE", "TOTAL")]
    for listener in status["listeners"]:
        listeners.append(
            (
                listener["name"],
                listener["bind"],
                listener["mode"] + (f"+tls ({listener['tls']})" if listener.get("tls") else ""),
                str(listener["active"]),
                str(listener["total"]),
            )
        )
    lines += _columns(listeners)
    lines.append("")
    servers = [("BACKEND", "SERVER", "ADDRESS", "HEALTH", "ADMIN", "ACTIVE", "TOTAL", "LAST CHECK")]
    for backend in status["backends"]:
        for s in backend["servers"]:
            check = s.get("check")
            if check:
                last = f"{check['result']} ({check['latency_ms']:g} ms)"
            else:
                last = s.get("health_reason", "-")
            servers.append(
                (
                    backend["name"],
                    s["name"],
                    s["address"],
                    s["health"],
                    s["admin"],
                    str(s["active"]),
                    str(s["total"]),
                    last,
                )
            )
    lines += _columns(servers)
    for backend in status["backends"]:
        found = backend.get("discovery")
        if found is not None:
            age = found["answer_age_s"]
            said = f"answer {age:g} s old" if age is not None else "no answer yet"
            problem = f"; {found['problem']}" if found["problem"] else ""
            lines.append(f"{backend['name']}: DNS {said}, {found['servers']} servers{problem}")
    lines.append("")
    workers = ", ".join(
        f"{w['pid']} (slot {w['slot']}, {w['connections']} conns, {w['state']})"
        for w in status["workers"]
    )
    lines.append(f"workers: {workers or 'none'}")
    prober = status["prober"]["pid"]
    lines.append(f"prober: {prober if prober else 'not running'}")
    return "\n".join(lines)


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows (a header first) as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def alive(pid: int) -> bool:
    """Whether a process exists (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
