"""DNS discovery: a backend's servers, looked up in DNS by the prober (never a worker).

Theory of operation
-------------------
One asyncio task per backend with ``[backends.discovery]``, in the prober's
loop, asks the resolvers (dnspython) every ``interval`` seconds, or sooner
when the records' TTL is shorter (not under ``MIN_INTERVAL``), and puts the
answer in the backend's DNS slots in the live pool (see
:mod:`lb.pool.servers`; the prober is their one writer).  A server is named
by its address (``10.0.0.5:9001``, ``[fd00::5]:9001``): the name is what
``balance = "hash"`` salts a key with, so nodes with the same answer send a
key to the same server whatever order the records came in, and a slot is
matched to the answer by it.

What changes nothing: a lookup that fails (timeout, SERVFAIL, refused, no
resolver): the last good answer stays, one warning per streak of failures,
and ``status`` shows the answer's age.  An answer with no record (NXDOMAIN,
or no data) empties the backend only once two more lookups, a second apart,
confirm it.  SRV: only the records of the lowest priority are used (the
others are for when those are gone from DNS), a target is resolved (A and
AAAA, from the answer's additional section when it is there), and one that
does not resolve is left out with a warning.  SRV weights (0..65535) become
server weights (1..256) in proportion, the largest 256; weight 0 becomes 1,
the least share (RFC 2782: "a very small chance").  More servers than
``max_servers``: the first ``max_servers`` by name are kept (the same on
every node) and a warning names the key to raise.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from lb.config import MAX_WEIGHT, Backend
from lb.discovery_config import MIN_INTERVAL, Discovery
from lb.pool import layout as L
from lb.pool import servers
from lb.pool.shm import Pool

EMPTY_CONFIRMATIONS = 2  # more lookups that must agree before an empty answer is applied
LOOKUP_TIMEOUT = 3.0  # at most, seconds per lookup (never more than the interval)


@dataclass(frozen=True, slots=True)
class Found:
    """One server in a DNS answer."""

    name: str
    family: int
    host: str
    port: int
    weight: int


@dataclass(frozen=True, slots=True)
class Lookup:
    servers: list[Found]  # sorted by name; empty: no record
    ttl: float  # the shortest TTL of the records (0: none)
    notes: list[str]  # what was left out, and why


class LookupFailed(Exception):
    """The resolvers did not answer: nothing is changed."""


def make_resolver(discovery: Discovery) -> dns.asyncresolver.Resolver:
    if discovery.resolvers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ip, port) for ip, port in discovery.resolvers
        ]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = min(LOOKUP_TIMEOUT, discovery.interval)
    resolver.timeout = resolver.lifetime / 2
    return resolver


def server_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def srv_weights(weights: list[int]) -> list[int]:
    """SRV weights as server weights: in proportion, the largest MAX_WEIGHT, 0 as 1."""
    top = max(weights, default=0)
    if not top:
        return [1] * len(weights)
    return [max(1, round(MAX_WEIGHT * w / top)) for w in weights]


async def _query(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> dns.resolver.Answer | None:
    """The answer, or None when the name has no such record (NXDOMAIN, no data)."""
    try:
        return await resolver.resolve(name, rdtype, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.resolver.NoNameservers as exc:
        raise LookupFailed(f"{name} {rdtype}: no resolver answered ({_short(exc)})") from None
    except dns.exception.Timeout:
        raise LookupFailed(f"{name} {rdtype}: timeout after {resolver.lifetime:g} s") from None
    except (dns.exception.DNSException, OSError) as exc:
        raise LookupFailed(f"{name} {rdtype}: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


async def _addresses(
    resolver: dns.asyncresolver.Resolver, name: str, types: tuple[str, ...]
) -> tuple[list[tuple[int, str]], float]:
    """(family, ip) of a name's A and/or AAAA records, and their shortest TTL."""
    found: list[tuple[int, str]] = []
    ttl = 0.0
    answers = await asyncio.gather(*(_query(resolver, name, t) for t in types))
    for rdtype, answer in zip(types, answers, strict=True):
        if answer is None or answer.rrset is None:
            continue
        family = socket.AF_INET6 if rdtype == "AAAA" else socket.AF_INET
        found += [(family, rdata.address) for rdata in answer.rrset]
        ttl = min(ttl or answer.rrset.ttl, answer.rrset.ttl)
    return found, ttl


def _additional(answer: dns.resolver.Answer, target: str) -> list[tuple[int, str]]:
    """A target's addresses from the SRV answer's additional section, if it has them."""
    found: list[tuple[int, str]] = []
    for rrset in answer.response.additional:
        if rrset.name.to_text().rstrip(".").lower() != target.lower():
            continue
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            family = socket.AF_INET6 if rrset.rdtype == dns.rdatatype.AAAA else socket.AF_INET
            found += [(family, rdata.address) for rdata in rrset]
    return found


async def lookup(resolver: dns.asyncresolver.Resolver, discovery: Discovery) -> Lookup:
    """One lookup of a backend's servers; LookupFailed when the resolvers fail."""
    if discovery.type != "SRV":
        types = ("A", "AAAA") if discovery.type == "A+AAAA" else (discovery.type,)
        found, ttl = await _addresses(resolver, discovery.name, types)
        by_address = {
            server_name(ip, discovery.port): Found(
                server_name(ip, discovery.port), family, ip, discovery.port, 1
            )
            for family, ip in found
        }
        missing = [] if by_address else [f"no {discovery.type} record for {discovery.name}"]
        return Lookup(sorted(by_address.values(), key=lambda f: f.name), ttl, missing)
    answer = await _query(resolver, discovery.name, "SRV")
    if answer is None or answer.rrset is None or not len(answer.rrset):
        return Lookup([], 0.0, [f"no SRV record for {discovery.name}"])
    ttl = float(answer.rrset.ttl)
    records = list(answer.rrset)
    best = min(r.priority for r in records)
    records = [r for r in records if r.priority == best]
    weights = srv_weights([r.weight for r in records])
    notes: list[str] = []
    named: dict[str, Found] = {}
    targets = {r.target.to_text().rstrip(".") for r in records}
    resolved: dict[str, list[tuple[int, str]]] = {}
    for target in sorted(targets):
        addresses = _additional(answer, target)
        if not addresses:
            addresses, target_ttl = await _addresses(resolver, target, ("A", "AAAA"))
            if target_ttl:
                ttl = min(ttl, target_ttl)
        if not addresses:
            notes.append(f"SRV target {target} does not resolve: left out")
        resolved[target] = addresses
    for record, weight in zip(records, weights, strict=True):
        for family, ip in resolved[record.target.to_text().rstrip(".")]:
            name = server_name(ip, record.port)
            if name not in named or named[name].weight < weight:
                named[name] = Found(name, family, ip, record.port, weight)
    return Lookup(sorted(named.values(), key=lambda f: f.name), ttl, notes)


def next_lookup(discovery: Discovery, ttl: float) -> float:
    """Seconds to the next lookup: the interval, or the TTL if shorter (not under 1 s)."""
    if ttl and ttl < discovery.interval:
        return max(MIN_INTERVAL, ttl)
    return discovery.interval


class Discoverer:
    """Looks up one backend's servers and keeps its DNS slots in step with the answers."""

    def __init__(self, pool: Pool, index: int, backend: Backend, log: Any) -> None:
        assert backend.discovery is not None
        self.pool = pool
        self.index = index  # the backend's, in the config (and the pool's names table)
        self.backend = backend.name
        self.discovery = backend.discovery
        self.slots = servers.slots(pool, backend.name, "dns")
        self.log = log.bind(backend=backend.name, name=self.discovery.name)
        self.resolver = make_resolver(self.discovery)
        repaired = servers.repair(pool, self.slots)  # a prober before us died mid-write
        for spare in repaired:
            self.log.warning(
                "record_repaired",
                server=spare.name,
                reason="its server record's last write never finished; rewritten as it stood",
            )
        if repaired:
            servers.bump(pool, L.SOURCE_DNS)
        last = servers.read_answer(pool, index)  # a prober before us may have answered
        self.answer = last if last is not None else servers.Answer(0.0, 0, 0, "")
        self.empty = 0  # empty answers in a row, not yet applied
        self.notes: list[str] = []  # warnings about the last answer: each logged once

    async def run(self) -> None:
        while True:
            delay = self.discovery.interval
            try:
                found = await lookup(self.resolver, self.discovery)
            except LookupFailed as exc:
                self._failed(str(exc))
            else:
                delay = self._answered(found)
            await asyncio.sleep(delay)

    def _failed(self, reason: str) -> None:
        if not self.answer.failures:
            age = time.time() - self.answer.ok_at if self.answer.ok_at else None
            self.log.warning(
                "discovery_failed",
                reason=reason,
                effect="the last good answer stays" if age is not None else "no servers yet",
                answer_age_s=round(age, 3) if age is not None else None,
            )
        self._publish(self.answer.ok_at, self.answer.failures + 1, self.answer.servers, reason)

    def _answered(self, found: Lookup) -> float:
        if self.answer.failures:
            self.log.info("discovery_recovered", failures=self.answer.failures)
        notes = list(found.notes)
        if not found.servers and self._in_use():
            self.empty += 1
            if self.empty <= EMPTY_CONFIRMATIONS:  # not yet: ask again soon, change nothing
                self._publish(time.time(), 0, self.answer.servers, "empty answer: confirming")
                return MIN_INTERVAL
            self.log.warning("discovery_empty", effect="the backend has no servers from DNS now")
        self.empty = 0
        wanted = sorted(found.servers, key=lambda f: f.name)  # the same cut on every node
        limit = self.discovery.max_servers
        if len(wanted) > limit:
            notes.append(
                f"{len(wanted)} servers in DNS, {len(wanted) - limit} ignored:"
                f" raise backends[{self.index}].discovery.max_servers"
            )
            wanted = wanted[:limit]
        for note in notes:
            if note not in self.notes:  # once, until the answer changes
                self.log.warning("discovery_skipped", reason=note)
        self.notes = notes
        self._apply(wanted)
        self._publish(time.time(), 0, len(wanted), "; ".join(notes))
        return next_lookup(self.discovery, found.ttl)

    def _in_use(self) -> bool:
        return any(self.pool.spare(s) is not None for s in self.slots)

    def _publish(self, ok_at: float, failures: int, count: int, text: str) -> None:
        self.answer = servers.Answer(ok_at, failures, count, text)
        servers.write_answer(self.pool, self.index, self.answer)

    def _apply(self, wanted: list[Found]) -> None:
        """Free the slots of servers gone from DNS, re-weigh those that stay, add new ones."""
        pool = self.pool
        current = {spare.name: spare for s in self.slots if (spare := pool.spare(s)) is not None}
        by_name = {f.name: f for f in wanted}
        removed = [name for name in current if name not in by_name]
        for name in removed:
            servers.remove(pool, current[name].index)
        reweighed = []
        added = []
        for name, f in by_name.items():
            spare = current.get(name)
            if spare is not None:
                if spare.weight != f.weight:
                    servers.reweigh(pool, spare.index, f.weight)
                    reweighed.append(f"{name}={f.weight}")
                continue
            slot = servers.take(pool, self.slots)
            if slot is None:  # cannot happen: wanted is cut to max_servers
                break
            servers.add(pool, slot, name, f.family, f.host, f.port, f.weight, L.SOURCE_DNS)
            added.append(name)
        if removed or reweighed or added:
            servers.bump(pool, L.SOURCE_DNS)
            self.log.info(
                "discovery", added=added, removed=removed, reweighed=reweighed, servers=len(wanted)
            )
