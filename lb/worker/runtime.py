"""What a worker builds from its config once: its listeners and backends as it uses them.

A listener knows its router and timeouts and where its counters start in the
worker's tally; a backend its picker (the balancing algorithm over the live
pool), its servers' addresses and names, and which of its servers' active
counts other workers read as they change (see :mod:`lb.worker.tally`).
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lb.config import Backend, Config
from lb.pool.clients import ClientTable
from lb.pool.select import (
    SUSPECT_HOLD_UNCHECKED,
    BackendPicker,
    Balancer,
    Hash,
    LeastConn,
    Random2,
    RoundRobin,
)
from lb.pool.servers import slots
from lb.pool.shm import Pool
from lb.pool.spare import Spare
from lb.proto.hashkey import KeyReader
from lb.route import Router
from lb.tls import client_context, server_context
from lb.trusted import TrustedProxies

NO_TRUSTED = TrustedProxies(())
WILDCARDS = frozenset({"0.0.0.0", "::"})


@dataclass(slots=True)
class ListenerRuntime:
    index: int
    name: str
    mode: str
    router: Router
    default_backend: str
    head_timeout: float  # what bounds the read before routing: head_timeout, tls_head_timeout
    tunnel_timeout: float
    socks: list[socket.socket]  # all of the listener's: socket k belongs to slot k mod workers
    tally_at: int  # where its counters start in the worker's tally (see Tally)
    forwarded: bool = False  # mode = "http" with forwarded_headers: see lb.proto.forwarded
    accept_proxy: bool = False  # its trusted peers must send a PROXY header first
    trusted: TrustedProxies = NO_TRUSTED
    local: tuple[Any, ...] | None = None  # its bind address; None: a wildcard (ask the socket)
    clients: ClientTable | None = None  # its client limits, if it has any
    tls: ssl.SSLContext | None = None  # [listeners.tls]: its clients' TLS is terminated here
    family: int = socket.AF_INET  # its sockets' address family


@dataclass(slots=True)
class BackendRuntime:
    name: str
    picker: BackendPicker
    connect_timeout: float
    retries: int
    addresses: dict[int, tuple[int, Any]]  # server index -> (family, sockaddr)
    names: dict[int, str]
    live: frozenset[int]  # servers whose active count other workers read as it changes
    handover: bool  # its tunnels go to the new generation on reload (on_reload = "handover")
    # balance = "hash" on a header, cookie or query parameter: reads it from the head
    # (None: the picker gets the client's address)
    key_reader: KeyReader | None = None
    # ``source``: the local addresses to connect from, by family, taken in turn
    sources: dict[int, Sources] | None = None
    send_proxy: int = 0  # the PROXY protocol version its servers get first; 0: none
    tls: ssl.SSLContext | None = None  # tls = true: its servers are reached over TLS ...
    server_names: dict[int, str] | None = None  # ... the name each is asked for and checked by


class Sources:
    """A backend's source addresses of one family, each taken in turn."""

    __slots__ = ("addresses", "next")

    def __init__(self, addresses: list[tuple[str, int]]) -> None:
        self.addresses = addresses
        self.next = 0

    def in_turn(self) -> list[tuple[str, int]]:
        """Every address, starting with the next one's turn (a connect that finds
        one's ports used up tries the next)."""
        i, addresses = self.next, self.addresses
        self.next = (i + 1) % len(addresses)
        return addresses[i:] + addresses[:i]


def make_sources(source: tuple[tuple[int, str], ...]) -> dict[int, Sources] | None:
    by_family: dict[int, list[tuple[str, int]]] = {}
    for family, address in source:
        by_family.setdefault(family, []).append((address, 0))
    return {family: Sources(addresses) for family, addresses in by_family.items()} or None


def make_balancer(
    bc: Backend, weights: dict[int, int], names: dict[int, str], pool: Pool
) -> Balancer:
    if bc.balance == "leastconn":
        return LeastConn(weights, pool)
    if bc.balance == "random2":
        return Random2(weights, pool)
    if bc.balance == "hash":
        return Hash(weights, names, pool, bc.hash_balance_factor)
    return RoundRobin(weights)


def build_backends(config: Config, pool: Pool) -> dict[str, BackendRuntime]:
    backends: dict[str, BackendRuntime] = {}
    index = 0
    for bc in config.backends:
        ids = list(range(index, index + len(bc.servers)))
        index += len(bc.servers)
        pairs = list(zip(ids, bc.servers, strict=True))
        weights = {i: s.weight for i, s in pairs}
        names = {i: s.name for i, s in pairs}
        hold = (
            (bc.health.fall + 1) * bc.health.interval + bc.health.timeout
            if bc.health is not None
            else SUSPECT_HOLD_UNCHECKED
        )
        balancer = make_balancer(bc, weights, names, pool)
        caps = {i: s.maxconn for i, s in pairs if s.maxconn}
        spares = [*slots(pool, bc.name, "api"), *slots(pool, bc.name, "dns")]
        live = frozenset(i for i in ids + spares if balancer.reads_active or i in caps)
        addresses = {i: (s.address.family, s.address.sockaddr) for i, s in pairs}
        # Known from the start: tunnels handed over by an older worker find their server.
        used = {i: spare for i in spares if (spare := pool.spare(i)) is not None}
        _spares_changed(weights, names, addresses, used)
        picker = BackendPicker(
            pool,
            ids,
            balancer,
            caps,
            hold,
            bc.slowstart,
            spares,
            bc.health is not None,
            functools.partial(_spares_changed, weights, names, addresses),
        )
        backends[bc.name] = BackendRuntime(
            name=bc.name,
            picker=picker,
            connect_timeout=bc.connect_timeout,
            retries=bc.retries,
            addresses=addresses,
            names=names,
            live=live,
            handover=bc.on_reload == "handover",
            key_reader=(
                KeyReader(bc.hash_key)
                if bc.balance == "hash" and bc.hash_key.source != "source"
                else None
            ),
            sources=make_sources(bc.source),
            send_proxy=bc.send_proxy,
            tls=None if bc.tls is None else client_context(bc.tls.ca_file, bc.tls.verify),
            server_names=(
                None if bc.tls is None else {i: bc.tls.sni or s.address.host for i, s in pairs}
            ),
        )
    return backends


def _spares_changed(
    weights: dict[int, int],
    names: dict[int, str],
    addresses: dict[int, tuple[int, Any]],
    used: dict[int, Spare],
) -> None:
    """The servers in a backend's spare slots, read again: what the worker connects to
    and logs.  A server that left keeps its name here (its open tunnels are logged
    under it) until its slot holds another."""
    for index, spare in used.items():
        weights[index] = spare.weight
        names[index] = spare.name
        addresses[index] = (spare.family, spare.sockaddr)


def build_listeners(
    config: Config,
    sockets: dict[str, list[socket.socket]],
    tally_at: list[int],
    clients: list[ClientTable | None] | None = None,
    tls: dict[str, ssl.SSLContext] | None = None,
) -> list[ListenerRuntime]:
    """``tally_at``: where each listener's counters start in the tally, by listener index;
    ``clients``: their client limits (see ``client_tables``), by listener index; ``tls``:
    the TLS listeners' server contexts by name, made by the supervisor (else made here)."""
    made = tls or {}
    return [
        ListenerRuntime(
            index=i,
            name=lc.name,
            mode=lc.mode,
            router=Router(lc),
            default_backend=lc.default_backend,
            head_timeout=lc.first_bytes_timeout,
            tunnel_timeout=lc.tunnel_timeout,
            socks=sockets[lc.name],
            tally_at=tally_at[i],
            forwarded=lc.mode == "http" and lc.forwarded_headers,
            accept_proxy=lc.accept_proxy,
            trusted=TrustedProxies(lc.trusted_proxies),
            local=None if lc.bind.sockaddr[0] in WILDCARDS else lc.bind.sockaddr,
            clients=clients[i] if clients else None,
            tls=None if lc.tls is None else made.get(lc.name) or server_context(lc.tls),
            family=lc.bind.family,
        )
        for i, lc in enumerate(config.listeners)
    ]


def client_tables(
    config: Config, pool: Pool, slot: int, on_full: Callable[[str, int], None]
) -> list[ClientTable | None]:
    """Each listener's client limits as the worker in ``slot`` counts them (None: it has
    none), in the pool's tables, one per listener that has limits, in the config's order;
    ``on_full(listener, entries)`` when its table is first found full.  A pool made
    before client tables existed (a worker of a generation started by the previous
    release, replaced after an upgrade) has none: its listeners are not limited."""
    tables: list[ClientTable | None] = []
    made = pool.geometry.client_tables
    for lc in config.listeners:
        number = sum(1 for t in tables if t is not None)
        if not lc.limits_clients or number >= made:
            tables.append(None)
            continue
        table = ClientTable(
            pool,
            number,
            slot,
            lc.client_maxconn,
            lc.client_rate,
            lc.client_burst,
            functools.partial(on_full, lc.name),
        )
        tables.append(table)
    return tables


def format_peer(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
