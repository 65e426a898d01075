"""The runtime server API: ``splicelb server add|remove|weight`` over the control socket.

The supervisor answers these commands and is the one writer of a backend's
``api_slots`` (see :mod:`lb.pool.servers`): each takes effect at the next
connection every worker picks a server for, with no reload.  The config file
stays the source of truth for what it declares: a configured server cannot be
removed or re-weighted here, nor one DNS names.

A request: ``{"cmd": "server", "action": "add", "backend": B, "server": N,
"address": "ip:port", "weight": W}`` (``remove`` needs backend and server,
``weight`` those and weight).  The address is numeric: ``splicelb server
add`` resolves a host name itself, so the supervisor never waits for DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from lb.config import MAX_WEIGHT
from lb.config_table import NAME_RE
from lb.generation import find_server, no_such_server
from lb.pool import layout as L
from lb.pool import servers
from lb.pool.shm import Pool

ACTIONS = ("add", "remove", "weight")


def parse_numeric(text: str) -> tuple[int, str, int] | str:
    """``ip:port`` or ``[v6]:port`` as (family, ip, port); or what is wrong with it."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return f"an IPv6 address needs brackets, e.g. '[::1]:8080'; got '{text}'"
    if not sep or not host:
        return f"expected host:port or [v6]:port, got '{text}'"
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        return f"port '{port_text}' is not a port number (1-65535)"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"'{host}' is not an IP address"
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, str(ip), int(port_text)


def _weight(value: Any) -> int | str:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WEIGHT:
        return f"weight must be an integer from 1 to {MAX_WEIGHT}, got {value!r}"
    return value


def _fail(*errors: str) -> dict[str, Any]:
    return {"ok": False, "errors": list(errors)}


def handle(pool: Pool, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one ``server`` request; a change is written to ``pool`` (the current one)."""
    action, backend, name = request.get("action"), request.get("backend"), request.get("server")
    if action not in ACTIONS or not isinstance(backend, str) or not isinstance(name, str):
        return _fail("server needs action (add, remove, weight), backend and server")
    entry = next((b for b in pool.names["backends"] if b["name"] == backend), None)
    if entry is None:
        known = ", ".join(b["name"] for b in pool.names["backends"])
        return _fail(f"no backend '{backend}'; the backends: {known}")
    if action == "add":
        return _add(pool, entry, name, request)
    index = find_server(pool, backend, name)
    if index is None:
        return _fail(no_such_server(pool, backend, name))
    spare = pool.spare(index)
    if spare is None:
        return _fail(f"{backend}/{name} comes from the config file: change it there, then reload")
    if spare.source != L.SOURCE_API:
        return _fail(
            f"{backend}/{name} comes from DNS (the backend's discovery): change its records"
        )
    if action == "remove":
        servers.remove(pool, index)
        servers.bump(pool, L.SOURCE_API)
        return {"ok": True, "backend": backend, "server": name, "address": spare.address}
    weight = _weight(request.get("weight"))
    if isinstance(weight, str):
        return _fail(weight)
    servers.reweigh(pool, index, weight)
    servers.bump(pool, L.SOURCE_API)
    return {"ok": True, "backend": backend, "server": name, "from": spare.weight, "to": weight}


def _add(pool: Pool, entry: dict[str, Any], name: str, request: dict[str, Any]) -> dict[str, Any]:
    backend = entry["name"]
    if not NAME_RE.fullmatch(name) or len(name.encode()) > L.NAME_BYTES:
        return _fail(
            f"'{name}' is not a valid server name (letters, digits, '_', '.', '-';"
            f" at most {L.NAME_BYTES} bytes)"
        )
    address = request.get("address")
    parsed = parse_numeric(address) if isinstance(address, str) else "address is missing"
    weight = _weight(request.get("weight", 1))
    problems = [p for p in (parsed, weight) if isinstance(p, str)]
    if problems:
        return _fail(*problems)
    assert not isinstance(parsed, str) and isinstance(weight, int)
    if find_server(pool, backend, name) is not None:
        return _fail(f"duplicate server name: {backend}/{name} exists (splicelb status lists it)")
    first, count = entry.get("api_slots", (0, 0))
    if not count:
        return _fail(
            f"backend {backend} has no spare slots for servers added at runtime:"
            f" set spare_servers in its [[backends]] table, then reload"
        )
    index = servers.take(pool, range(first, first + count))
    if index is None:
        return _fail(
            f"no spare slot left in backend {backend} (all {count} hold servers):"
            f" raise its spare_servers, then reload"
        )
    family, host, port = parsed
    if pool.admin(index) != L.READY:
        pool.set_admin(index, L.READY)  # a slot's last server may have been in drain or maint
    spare = servers.add(pool, index, name, family, host, port, weight, L.SOURCE_API)
    servers.bump(pool, L.SOURCE_API)
    return {
        "ok": True,
        "backend": backend,
        "server": name,
        "address": spare.address,
        "weight": weight,
    }


class DnsAdmin:
    """Puts a DNS slot back to ``ready`` when it takes a new server (the supervisor
    writes admin states; the prober, which fills DNS slots, cannot)."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.version = -1
        self.seen: dict[int, int] = {}  # slot -> the epoch last seen

    def check(self, pool: Pool) -> None:
        if pool is not self.pool:  # a reload: the new pool's slots, as they were carried
            self.pool, self.version, self.seen = pool, -1, {}
        version = pool.spare_versions()[1]
        if version == self.version:
            return
        first_look = self.version < 0
        self.version = version
        for entry in pool.names["backends"]:
            first, count = entry.get("dns_slots", (0, 0))
            for index in range(first, first + count):
                epoch = servers.raw(pool, index).epoch
                before = self.seen.get(index)
                self.seen[index] = epoch
                if not first_look and before != epoch and pool.admin(index) != L.READY:
                    pool.set_admin(index, L.READY)
