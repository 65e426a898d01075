"""The balancers the benchmark starts: splicelb's variants differ in their http listener only."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench.servers import VARIANTS, target_toml
from lb.config import parse_config

PORTS = {"bulk": 8001, "http": 8002, "ws": 8003}
SERVERS = {"bulk": 9001, "http": 9002, "http_pp": 9012, "ws": 9003}


@pytest.mark.parametrize("variant", ["splicelb", *VARIANTS])
def test_every_variant_is_a_valid_config(variant: str) -> None:
    config = parse_config(tomllib.loads(target_toml(variant, Path("/run/x"), 2, PORTS, SERVERS)))
    http = next(listener for listener in config.listeners if listener.name == "http")
    backend = config.backend("http")
    others = [(lc.name, lc.mode) for lc in config.listeners if lc.name != "http"]
    assert others == [("bulk", "tcp"), ("ws", "http")]
    if variant in ("splicelb", "splicelb-limits"):
        assert http.mode == "tcp"
        assert http.limits_clients is (variant == "splicelb-limits")
    else:
        assert http.mode == "http"
        assert http.forwarded_headers is (variant == "splicelb-address")
        assert not http.limits_clients
    expected = (2, 9012) if variant == "splicelb-address" else (0, 9002)
    assert (backend.send_proxy, backend.servers[0].address.port) == expected
