"""The ``[backends.discovery]`` table and ``spare_servers``: servers that come and go.

A backend's servers may change at runtime, in spare slots the live pool
reserves for them (see :mod:`lb.pool.servers`): ``spare_servers`` for those
an operator adds with ``splicelb server add``, ``discovery.max_servers`` for
those DNS names.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lb.config_table import Table, describe

DISCOVERY_TYPES = ("SRV", "A", "AAAA", "A+AAAA")
MAX_SPARE = 1024  # spare slots per backend, of each kind
DEFAULT_MAX_SERVERS = 64
DEFAULT_INTERVAL = 5.0
MIN_INTERVAL = 1.0  # record TTLs shorter than the interval are honoured down to this
DNS_PORT = 53
_DNS_NAME_RE = re.compile(
    r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)


@dataclass(frozen=True, slots=True)
class Discovery:
    """Where a backend's servers are looked up in DNS, and how often."""

    name: str  # e.g. _ws._tcp.chat.service.consul or chat.default.svc.cluster.local
    type: str  # SRV | A | AAAA | A+AAAA
    port: int  # the servers' port for A/AAAA answers (0 for SRV: the records say)
    resolvers: tuple[tuple[str, int], ...]  # (ip, port); (): the system's (/etc/resolv.conf)
    interval: float  # seconds between lookups; a shorter TTL is honoured down to MIN_INTERVAL
    max_servers: int  # spare slots reserved for what DNS names


def parse_resolver(text: str) -> tuple[str, int] | str:
    """``ip``, ``ip:port`` or ``[v6]:port``; or what is wrong with it."""
    host, port = text, DNS_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return f"expected ip, ip:port or [v6]:port, got '{text}'"
        port_text = rest[1:]
        if rest and not port_text.isdigit():
            return f"port '{port_text}' is not a number"
        port = int(port_text) if rest else DNS_PORT
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            return f"port '{port_text}' is not a number"
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"expected an IP address (with an optional port), got '{text}'"
    if not 1 <= port <= 65535:
        return f"port {port} is out of range (1-65535)"
    return host, port


def parse_discovery(t: Table) -> Discovery:
    name = t.string("name")
    if name and not _DNS_NAME_RE.fullmatch(name):
        t.problem("name", f"'{name}' is not a DNS name")
    kind = t.choice("type", "SRV", DISCOVERY_TYPES)
    port = t.integer("port", 0, 1, 65535)
    if kind == "SRV" and "port" in t.data:
        t.problem("port", 'SRV records carry their ports: port is for type = "A", "AAAA", "A+AAAA"')
    elif kind in DISCOVERY_TYPES and kind != "SRV" and "port" not in t.data:
        t.problem("port", f'required with type = "{kind}" (the servers\' port)')
    resolvers = []
    for path, value in t.items("resolvers", 'an array of "ip[:port]" strings'):
        found = parse_resolver(value) if isinstance(value, str) else f"got {describe(value)}"
        if isinstance(found, str):
            t.problems.append(f"{path}: {found}")
        else:
            resolvers.append(found)
    if "resolvers" in t.data and not t.data["resolvers"]:
        t.problem(
            "resolvers", "must list at least one resolver (leave it out for /etc/resolv.conf)"
        )
    interval = t.seconds("interval", DEFAULT_INTERVAL)
    if 0 < interval < MIN_INTERVAL:
        t.problem("interval", f"must be at least {MIN_INTERVAL:g} s, got {interval:g}")
    discovery = Discovery(
        name=name,
        type=kind,
        port=port if kind != "SRV" else 0,
        resolvers=tuple(resolvers),
        interval=interval,
        max_servers=t.integer("max_servers", DEFAULT_MAX_SERVERS, 1, MAX_SPARE),
    )
    t.finish()
    return discovery
