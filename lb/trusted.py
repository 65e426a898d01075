"""A listener's trusted proxies: the peers whose word on the client's address is taken.

Two features ask: ``accept_proxy`` (a PROXY header is required from these
peers, and only from them) and the forwarded head (the ``X-Forwarded-*`` and
``Forwarded`` fields these peers send are kept and extended, anyone else's
removed).  An IPv4 client of a dual-stack listener (``::ffff:a.b.c.d``)
matches the IPv4 networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class TrustedProxies:
    """Networks (CIDRs, validated by the config) and whether an address is in one."""

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[str]) -> None:
        parsed = [ipaddress.ip_network(text) for text in networks]
        self.networks = tuple(str(network) for network in parsed)
        self._v4 = tuple((int(n.netmask), int(n.network_address)) for n in parsed if n.version == 4)
        self._v6 = tuple((int(n.netmask), int(n.network_address)) for n in parsed if n.version == 6)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: object) -> bool:
        """Whether the address ``host`` (as the kernel formats it) is in a trusted network."""
        if not self.networks or not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        value = int(address)
        masks = self._v4 if address.version == 4 else self._v6
        return any(value & mask == network for mask, network in masks)
