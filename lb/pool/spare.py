"""A spare slot's record as readers see it (the layout: lb.pool.layout; writers and
the rules: lb.pool.servers)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from lb.pool import layout as L


@dataclass(frozen=True, slots=True)
class Spare:
    """One consistent read of a spare slot's record (see lb.pool.servers)."""

    index: int  # the server index
    used: bool
    epoch: int  # counts the servers the slot has held: a new one is checked afresh
    weight: int
    family: int
    host: str  # the IP address
    port: int
    source: int  # L.SOURCE_API or L.SOURCE_DNS
    added_at: float  # monotonic seconds
    freed_at: float  # monotonic seconds its last server left (0: never)
    name: str

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def sockaddr(self) -> tuple[Any, ...]:
        if self.family == socket.AF_INET6:
            return (self.host, self.port, 0, 0)
        return (self.host, self.port)

    def entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "index": self.index,
            "source": L.SOURCE_NAMES[self.source],
            "weight": self.weight,
            "epoch": self.epoch,
        }


def copy_spare(
    q: memoryview[int], d: memoryview[float], raw: memoryview[int], server: int, base: int
) -> Spare:
    """The fields of the spare record at word ``base``, as they stand (no lock)."""
    family = int(q[base + L.D_FAMILY])
    packed = bytes(raw[base * 8 + L.D_HOST_OFF : base * 8 + L.D_HOST_OFF + 16])
    name_at = base * 8 + L.D_NAME_OFF
    try:
        host = socket.inet_ntop(family, packed[: 16 if family == socket.AF_INET6 else 4])
    except (OSError, ValueError):
        host = ""
    return Spare(
        index=server,
        used=q[base + L.D_STATE] == L.SPARE_USED,
        epoch=int(q[base + L.D_EPOCH]),
        weight=int(q[base + L.D_WEIGHT]),
        family=family,
        host=host,
        port=int(q[base + L.D_PORT]),
        source=int(q[base + L.D_SOURCE]),
        added_at=float(d[base + L.D_ADDED_AT]),
        freed_at=float(d[base + L.D_FREED_AT]),
        name=bytes(raw[name_at : name_at + L.NAME_BYTES]).rstrip(b"\0").decode("utf-8", "replace"),
    )
