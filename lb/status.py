"""What ``splicelb status`` shows, read straight from the live pool.

Reading the pool file needs no answer from any process, so status works even
while every worker is busy.  The object follows ARCHITECTURE.md's contract
(``generation``, ``workers``, ``backends`` with ``servers``) and adds a few
fields (check results, bytes, answers by status).  A server whose health
record cannot be read (its writer died mid-write) shows health ``unknown``
and a ``health_reason``; the rest of the status is read as usual.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from typing import Any

from lb.errors import LBError, NotRunningError
from lb.generation import POOL_LINK
from lb.pool import layout as L
from lb.pool.shm import Pool
from lb.rundir import running_pid

UNREADABLE = "health record unreadable: its last write never finished"


def open_pool(runtime_dir: str) -> Pool:
    """The current generation's pool."""
    running_pid(runtime_dir)
    try:
        return Pool.open(os.path.join(runtime_dir, POOL_LINK))
    except FileNotFoundError:
        raise NotRunningError(f"no instance is running in {runtime_dir}") from None
    except PermissionError:
        raise LBError(
            f"{runtime_dir}: cannot read the live pool: permission denied"
            " (run as the instance's user or root)"
        ) from None


def read_status(runtime_dir: str) -> dict[str, Any]:
    """The status object: the current generation, plus workers still draining older ones."""
    pool = open_pool(runtime_dir)
    others: list[Pool] = []
    try:
        for path in glob.glob(os.path.join(runtime_dir, "pool-*.shm")):
            if os.path.samefile(path, pool.path):
                continue
            with contextlib.suppress(OSError, LBError):  # finished while we looked
                others.append(Pool.open(path))
        return snapshot(pool, others)
    finally:
        for p in [pool, *others]:
            p.close()


def snapshot(pool: Pool, others: list[Pool] | None = None) -> dict[str, Any]:
    """The status object of one pool; ``others`` are older generations still draining."""
    now = time.monotonic()
    answers = dict.fromkeys((str(s) for s in L.ANSWER_STATUSES if s), 0)
    workers = []
    older = sorted(others or [], key=lambda p: p.q[L.H_GENERATION])
    for p in [*older, pool]:
        workers += _workers(p, answers, now)
    backends = []
    for backend in pool.names["backends"]:
        servers = [_server(pool, s, backend["checked"], now) for s in backend["servers"]]
        for server in servers:  # older generations' workers still carry tunnels: count them
            for p in older:
                for key, value in _counters(p, backend["name"], server).items():
                    server[key] += value
        backends.append({"name": backend["name"], "servers": servers})
    q, d = pool.q, pool.d
    prober_pid = q[L.H_PROBER_PID]
    return {
        "generation": q[L.H_GENERATION],
        "workers": workers,
        "prober": {
            "pid": prober_pid if alive(prober_pid) else None,
            "heartbeat_age_s": round(now - d[L.H_PROBER_BEAT], 3),
        },
        "listeners": pool.names["listeners"],
        "backends": backends,
        "answers": answers,
    }


def _workers(pool: Pool, answers: dict[str, int], now: float) -> list[dict[str, Any]]:
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
                "accepted": q[base + L.S_ACCEPTED],
                "adopted": q[base + L.S_ADOPTED],
                "heartbeat_age_s": round(now - d[base + L.S_BEAT], 3),
            }
        )
        for i, status in enumerate(L.ANSWER_STATUSES):
            if status:
                answers[str(status)] += q[base + L.S_ANSWERS + i]
    return workers


def _counters(pool: Pool, backend: str, server: dict[str, Any]) -> dict[str, int]:
    """The same server's counters in another generation's pool (none if it has no such server)."""
    for b in pool.names["backends"]:
        for s in b["servers"] if b["name"] == backend else ():
            if s["name"] == server["name"] and s["address"] == server["address"]:
                return _sums(pool, s["index"])
    return {}


def _sums(pool: Pool, index: int) -> dict[str, int]:
    q, geo = pool.q, pool.geometry
    counters = [geo.counter(slot, index) for slot in range(geo.nslots)]
    return {key: sum(q[c + word] for c in counters) for key, word in L.SERVER_COUNTERS}


def _server(pool: Pool, server: dict[str, Any], checked: bool, now: float) -> dict[str, Any]:
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
        "health": health,
        "admin": L.ADMIN_NAMES[pool.admin(index)],
        **_sums(pool, index),
    }
    if checked and record is None:
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


def format_table(status: dict[str, Any]) -> str:
    """The human view: one line per server, then the workers."""
    lines = [f"generation {status['generation']}"]
    header = ("BACKEND", "SERVER", "ADDRESS", "HEALTH", "ADMIN", "ACTIVE", "TOTAL", "LAST CHECK")
    rows = [header]
    for backend in status["backends"]:
        for s in backend["servers"]:
            check = s.get("check")
            if check:
                last = f"{check['result']} ({check['latency_ms']:g} ms)"
            else:
                last = s.get("health_reason", "-")
            rows.append(
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    workers = ", ".join(
        f"{w['pid']} (slot {w['slot']}, {w['connections']} conns, {w['state']})"
        for w in status["workers"]
    )
    lines.append(f"workers: {workers or 'none'}")
    prober = status["prober"]["pid"]
    lines.append(f"prober: {prober if prober else 'not running'}")
    return "\n".join(lines)


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
