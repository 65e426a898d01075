"""A generation: one config, its live pool file, and the prober and workers started for it.

``splicelb run`` starts generation 1; every successful reload starts the
next one.  A new generation's pool starts with the health records and admin
states of the servers it shares (same backend, name and address) with the
generation before it, so health and drain/maint survive a reload, and with
the totals that the generations before it counted (its carried block); a
generation that finishes adds its own to the carried blocks of those that go
on before its pool file goes (see :mod:`lb.pool.layout`), so no total starts
again at a reload.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lb.config import Config
from lb.pool import layout as L
from lb.pool import servers
from lb.pool.shm import Pool, create_pool, fold
from lb.sockets import handover_path, handover_socket

if TYPE_CHECKING:
    import ssl

POOL_LINK = "pool"
NAMES_SHOWN = 20  # servers named in the answer to an unknown one; `splicelb status` has them all


def pool_path(runtime_dir: str, number: int) -> str:
    return os.path.join(runtime_dir, f"pool-{number}.shm")


@dataclass(eq=False)
class Generation:
    number: int
    config: Config
    pool: Pool
    started: float = field(default_factory=time.monotonic)
    serving: bool = False  # every worker has started accepting
    retiring: bool = False
    waiters: list[socket.socket] = field(default_factory=list)  # `splicelb reload` clients
    sockets: dict[Any, int] = field(default_factory=dict)  # listening sockets its workers get
    handover: list[socket.socket] = field(default_factory=list)  # by slot: where tunnels come in
    retired: bool = False  # told to close its connections now (too many generations draining)
    dropped: list[str] = field(default_factory=list)  # spare servers a reload could not carry
    tls: dict[str, ssl.SSLContext] | None = None  # see tls_contexts

    def tls_contexts(self) -> dict[str, ssl.SSLContext] | None:
        """Each TLS listener's server context by listener name, made once, in the
        supervisor, before it forks a worker: every worker of the generation then has the
        same session ticket keys (OpenSSL makes them with the context), so a client
        resumes its TLS session on whichever worker its next connection reaches.  None
        when they cannot be made here: each worker makes its own (and says why not)."""
        if self.tls is None:
            from lb.tls import server_context  # noqa: PLC0415 (ssl: only with TLS listeners)

            try:
                self.tls = {
                    lc.name: server_context(lc.tls)
                    for lc in self.config.listeners
                    if lc.tls is not None
                }
            except (OSError, ValueError):  # ssl.SSLError included: the worker reports it
                return None
        return self.tls

    @classmethod
    def create(cls, number: int, config: Config, previous: Pool | None) -> Generation:
        """Its pool, and a handover socket per worker slot (see lb.worker.handover)."""
        runtime_dir = config.global_.runtime_dir
        pool = create_pool(pool_path(runtime_dir, number), config, number, config.global_.workers)
        generation = cls(number, config, pool)
        try:
            if previous is not None:
                generation.dropped = carry_over(previous, pool)
            for slot in range(config.global_.workers):
                path = handover_path(runtime_dir, number, slot)
                generation.handover.append(handover_socket(path))
        except BaseException:
            generation.remove()
            raise
        return generation

    def publish(self) -> None:
        """Point the runtime dir's ``pool`` link (read by ``splicelb status``) here."""
        runtime_dir = self.config.global_.runtime_dir
        link = os.path.join(runtime_dir, POOL_LINK)
        tmp = f"{link}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.path.basename(self.pool.path), tmp)
        os.rename(tmp, link)

    def set_admin(self, request: dict[str, Any]) -> dict[str, Any]:
        """An operator's drain/maint/ready for one server (the supervisor writes admin states)."""
        backend, server, state = request.get("backend"), request.get("server"), request.get("state")
        if (
            state not in L.ADMIN_NAMES
            or not isinstance(backend, str)
            or not isinstance(server, str)
        ):
            return {"ok": False, "errors": ["admin needs backend, server and state"]}
        index = find_server(self.pool, backend, server)
        if index is None:
            return {"ok": False, "errors": [no_such_server(self.pool, backend, server)]}
        before = L.ADMIN_NAMES[self.pool.admin(index)]
        self.pool.set_admin(index, L.ADMIN_NAMES.index(state))
        return {"ok": True, "backend": backend, "server": server, "from": before, "to": state}

    def workers_running(self, pids: dict[int, int]) -> bool:
        """Every slot is run by the given child (slot -> pid) and accepting."""
        q, geo = self.pool.q, self.pool.geometry
        return all(
            pids.get(slot) == q[geo.slot(slot) + L.S_PID]
            and q[geo.slot(slot) + L.S_STATE] == L.SLOT_RUNNING
            for slot in range(self.config.global_.workers)
        )

    def remove(self, carry_to: Iterable[Generation] = ()) -> None:
        """The generation is over: its totals go on in the pools of ``carry_to`` (the
        generations kept: a reader may take any of them for the current one), then its
        pool file is unmapped and deleted, in that order (see :mod:`lb.pool.layout`)."""
        targets = [g.pool for g in carry_to if g is not self]
        if targets:
            fold(self.pool, targets)
        path = self.pool.path
        self.pool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        runtime_dir = self.config.global_.runtime_dir
        for slot, sock in enumerate(self.handover):
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handover_path(runtime_dir, self.number, slot))
        self.handover.clear()


def server_keys(pool: Pool) -> dict[tuple[str, str, str], int]:
    return {
        (backend["name"], server["name"], server["address"]): server["index"]
        for backend in pool.backends()
        for server in backend["servers"]
    }


def carry_over(old: Pool, new: Pool) -> list[str]:
    """Copy the spare servers (lb.pool.servers), then health, admin state (and when it
    went back to ready: a slow start goes on) and check histograms of the servers both
    pools know, the instance's restart and reload counts, and the carried totals (by
    names).  Returns the spare servers left out, each described.

    A health record that cannot be read (its writer died mid-write) is not
    carried: that server starts unchecked, as a new one would, until the new
    prober checks it.  The reload goes on either way.
    """
    new.q[L.H_RESTARTS] = old.q[L.H_RESTARTS]
    new.q[L.H_RELOADS] = old.q[L.H_RELOADS]
    dropped = servers.carry(old, new) if old.geometry.spare_off else []
    new.carry_from(old)
    old_keys = server_keys(old)
    for k, index in server_keys(new).items():
        previous = old_keys.get(k)
        if previous is None:
            continue
        record = old.read_record(previous)
        if record is not None:
            new.write_record(index, record)
        src, dst = old.geometry.histogram(previous), new.geometry.histogram(index)
        new.q[dst : dst + L.HIST_WORDS] = old.q[src : src + L.HIST_WORDS]
        new.set_admin(index, old.admin(previous), ready_at=old.ready_at(previous))
    return dropped


def find_server(pool: Pool, backend: str, server: str) -> int | None:
    for b in pool.backends():
        if b["name"] == backend:
            for s in b["servers"]:
                if s["name"] == server:
                    return int(s["index"])
    return None


def no_such_server(pool: Pool, backend: str, server: str) -> str:
    """The answer to a server the pool does not name: the names it could have been."""
    servers = {
        b["name"]: [f"{b['name']}/{s['name']}" for s in b["servers"]] for b in pool.backends()
    }
    if backend in servers:
        said, names = f"no server {backend}/{server}; the servers of {backend}:", servers[backend]
    else:
        said = f"no server {backend}/{server} (no backend '{backend}'); the servers:"
        names = [name for names in servers.values() for name in names]
    shown = ", ".join(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f" and {len(names) - NAMES_SHOWN} more (splicelb status lists them)"
    return f"{said} {shown}"
