"""The balancers the benchmark starts: splicelb's variants differ in their http listener only;
the http listener's figures meet HAProxy in ``mode http``."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from bench.servers import (
    FRONTS,
    TLS_NAME,
    VARIANTS,
    Backends,
    direct_ports,
    haproxy_sni_frontend,
    start_haproxy,
    target_toml,
)
from lb.config import parse_config
from lb.route import Router

PORTS = {"bulk": 8001, "http": 8002, "ws": 8003, "http7": 8004, "ws7": 8005}
SERVERS = {"bulk": 9001, "http": 9002, "http_pp": 9012, "https": 9022, "ws": 9003}


@pytest.mark.parametrize("variant", ["splicelb", *VARIANTS])
def test_every_variant_is_a_valid_config(variant: str) -> None:
    config = parse_config(tomllib.loads(target_toml(variant, Path("/run/x"), 2, PORTS, SERVERS)))
    http = next(listener for listener in config.listeners if listener.name == "http")
    backend = config.backend("http")
    others = [(lc.name, lc.mode) for lc in config.listeners if lc.name != "http"]
    assert others == [("bulk", "tcp"), ("ws", "http"), ("http7", "http"), ("ws7", "http")]
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


def test_the_http_listeners_lead_to_nginx_and_the_echo_backend_with_their_defaults() -> None:
    config = parse_config(tomllib.loads(target_toml("splicelb", Path("/run/x"), 1, PORTS, SERVERS)))
    by_name = {lc.name: lc for lc in config.listeners}
    for name, server in (("http7", 9002), ("ws7", 9003)):
        assert by_name[name].mode == "http" and by_name[name].forwarded_headers  # defaults
        assert config.backend(name).servers[0].address.port == server
    assert config.global_.log_level == "warning"  # no conn line per connection


def test_info_turns_the_conn_lines_on_and_changes_nothing_else() -> None:
    plain = target_toml("splicelb-http", Path("/run/x"), 1, PORTS, SERVERS)
    logged = target_toml("splicelb-http+info", Path("/run/x"), 1, PORTS, SERVERS)
    assert parse_config(tomllib.loads(logged)).global_.log_level == "info"
    assert logged.replace('log_level = "info"', 'log_level = "warning"') == plain


def test_direct_leads_every_front_to_its_backend() -> None:
    ports = direct_ports(SERVERS)
    assert {front: ports[front] for front in FRONTS} == {
        "bulk": 9001,
        "http": 9002,
        "ws": 9003,
        "http7": 9002,
        "ws7": 9003,
    }


def test_haproxy_runs_mode_http_on_the_http_listeners_fronts(tmp_path: Path) -> None:
    """The config HAProxy gets, checked by HAProxy itself (``haproxy -c``) when installed."""
    seen: dict[str, str] = {}

    class NoProc:  # start_haproxy's Proc, which would run HAProxy: keep its argv instead
        def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
            seen["cfg"] = Path(argv[-1]).read_text()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bench.servers.Proc", NoProc)
        patch.setattr("bench.servers.wait_listening", lambda *_: None)
        start_haproxy("haproxy", 2, Backends(ports=SERVERS), tmp_path, "t")
    sections = {block.split()[0]: block for block in seen["cfg"].split("\nlisten ")[1:]}
    assert set(sections) == set(FRONTS)
    for name, (_, mode, to) in FRONTS.items():
        assert ("mode http" in sections[name]) is (mode == "http"), name
        assert f"127.0.0.1:{SERVERS[to]}" in sections[name], name
    assert "nbthread 2" in seen["cfg"]
    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin")
    if haproxy is not None:
        cfg = tmp_path / "check.cfg"
        cfg.write_text(seen["cfg"])
        done = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
