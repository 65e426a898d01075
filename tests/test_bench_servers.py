"""The balancers the benchmark starts: splicelb's variants differ in their http listener only."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench.servers import TLS_NAME, VARIANTS, haproxy_sni_frontend, target_toml
from lb.config import parse_config
from lb.route import Router

PORTS = {"bulk": 8001, "http": 8002, "ws": 8003}
SERVERS = {"bulk": 9001, "http": 9002, "http_pp": 9012, "https": 9022, "ws": 9003}


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
    elif variant == "splicelb-tls":  # routes on the server name the clients send
        assert http.mode == "tls"
        assert [r.sni for r in http.routes][-1] == TLS_NAME
        assert Router(http).backend_for_sni(TLS_NAME) == "http"
    else:
        assert http.mode == "http"
        assert http.forwarded_headers is (variant in ("splicelb-address", "splicelb-http-defaults"))
        assert not http.limits_clients
    ports = {"splicelb-address": (2, 9012), "splicelb-tls": (0, 9022)}
    assert (backend.send_proxy, backend.servers[0].address.port) == ports.get(variant, (0, 9002))


def test_haproxy_tls_routes_on_the_same_name() -> None:
    frontend = haproxy_sni_frontend(8002, 9022)
    assert "tcp-request content accept if { req.ssl_hello_type 1 }" in frontend
    assert f"use_backend https if {{ req.ssl_sni -i {TLS_NAME} }}" in frontend
    assert "server https1 127.0.0.1:9022" in frontend
