"""Tests of a listener's trusted proxies: which peers' word on the client is taken."""

from __future__ import annotations

import pytest

from lb.trusted import TrustedProxies


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("10.0.0.1", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("::ffff:10.1.2.3", True),  # an IPv4 client of a dual-stack listener
        ("::ffff:11.1.2.3", False),
        ("2001:db8:1::5", True),
        ("2001:db9::5", False),
        ("::1", False),
        ("not an address", False),
    ],
)
def test_membership(host: str, trusted: bool) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"])
    assert (host in proxies) is trusted


def test_none_trusted_by_default() -> None:
    nobody = TrustedProxies(())
    assert not nobody
    assert "127.0.0.1" not in nobody
    assert TrustedProxies(["0.0.0.0/0"]).networks == ("0.0.0.0/0",)
    assert "203.0.113.1" in TrustedProxies(["0.0.0.0/0"])
