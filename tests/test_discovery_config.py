"""``[backends.discovery]`` and ``spare_servers``: loading and every problem, by key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lb.cli import cli
from lb.config import load_config
from lb.discovery_config import Discovery, parse_resolver
from lb.errors import ConfigError


def text(backend: str, discovery: str | None = None, servers: bool = False) -> str:
    out = (
        '[global]\n[[listeners]]\nname = "l"\nbind = "127.0.0.1:8080"\ndefault_backend = "app"\n'
        f'[[backends]]\nname = "app"\n{backend}\n'
    )
    if discovery is not None:
        out += f"[backends.discovery]\n{discovery}\n"
    if servers:
        out += '[[backends.servers]]\nname = "a1"\naddress = "127.0.0.1:9001"\n'
    return out


def load(tmp_path: Path, config: str) -> list[str] | object:
    path = tmp_path / "splicelb.toml"
    path.write_text(config)
    try:
        return load_config(path)
    except ConfigError as exc:
        return exc.problems


def test_discovery_defaults_and_a_backend_with_no_configured_server(tmp_path: Path) -> None:
    config = load(tmp_path, text("", 'name = "_ws._tcp.chat.service.consul"'))
    backend = config.backends[0]  # type: ignore[attr-defined]
    assert backend.servers == () and backend.spare_servers == 0 and backend.dns_slots == 64
    assert backend.discovery == Discovery(
        name="_ws._tcp.chat.service.consul",
        type="SRV",
        port=0,
        resolvers=(),
        interval=5.0,
        max_servers=64,
    )


def test_discovery_keys_load(tmp_path: Path) -> None:
    keys = (
        'name = "chat.default.svc.cluster.local"\ntype = "A+AAAA"\nport = 8080\n'
        'resolvers = ["10.96.0.10", "127.0.0.1:5353", "[fd00::53]:53"]\ninterval = 2\n'
        "max_servers = 8"
    )
    config = load(tmp_path, text("spare_servers = 4", keys, servers=True))
    backend = config.backends[0]  # type: ignore[attr-defined]
    assert backend.spare_servers == 4 and backend.dns_slots == 8
    assert backend.discovery.resolvers == (
        ("10.96.0.10", 53),
        ("127.0.0.1", 5353),
        ("fd00::53", 53),
    )
    assert (backend.discovery.type, backend.discovery.port, backend.discovery.interval) == (
        "A+AAAA",
        8080,
        2.0,
    )


CASES = [
    (text(""), "backends[0].servers: at least one server ([[backends.servers]]) is required"),
    (
        text("spare_servers = -1", servers=True),
        "backends[0].spare_servers: must be between 0 and 1024, got -1",
    ),
    (text("", ""), "backends[0].discovery.name: required key is missing"),
    (text("", 'name = "bad name"'), "backends[0].discovery.name: 'bad name' is not a DNS name"),
    (
        text("", 'name = "x.test"\ntype = "MX"'),
        "backends[0].discovery.type: expected one of SRV, A, AAAA, A+AAAA; got 'MX'",
    ),
    (
        text("", 'name = "x.test"\ntype = "A"'),
        'backends[0].discovery.port: required with type = "A" (the servers\' port)',
    ),
    (
        text("", 'name = "x.test"\nport = 80'),
        'backends[0].discovery.port: SRV records carry their ports: port is for type = "A",'
        ' "AAAA", "A+AAAA"',
    ),
    (
        text("", 'name = "x.test"\ntype = "A"\nport = 70000'),
        "backends[0].discovery.port: must be between 1 and 65535, got 70000",
    ),
    (
        text("", 'name = "x.test"\nresolvers = ["dns.example"]'),
        "backends[0].discovery.resolvers[0]: expected an IP address (with an optional port),"
        " got 'dns.example'",
    ),
    (
        text("", 'name = "x.test"\nresolvers = []'),
        "backends[0].discovery.resolvers: must list at least one resolver (leave it out for"
        " /etc/resolv.conf)",
    ),
    (
        text("", 'name = "x.test"\ninterval = 0.5'),
        "backends[0].discovery.interval: must be at least 1 s, got 0.5",
    ),
    (
        text("", 'name = "x.test"\nmax_servers = 0'),
        "backends[0].discovery.max_servers: must be between 1 and 1024, got 0",
    ),
    (
        text("", 'name = "x.test"\nttl = 3'),
        "backends[0].discovery.ttl: unknown key",
    ),
]


@pytest.mark.parametrize(("config", "line"), CASES, ids=[line.split(":")[0] for _, line in CASES])
def test_each_problem_is_one_line_naming_its_key(tmp_path: Path, config: str, line: str) -> None:
    assert load(tmp_path, config) == [line]


@pytest.mark.parametrize(
    ("written", "parsed"),
    [
        ("10.0.0.1", ("10.0.0.1", 53)),
        ("10.0.0.1:5353", ("10.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("10.0.0.1:0", "port 0 is out of range (1-65535)"),
        ("[::1]x", "expected ip, ip:port or [v6]:port, got '[::1]x'"),
    ],
)
def test_resolvers(written: str, parsed: object) -> None:
    assert parse_resolver(written) == parsed


def test_check_counts_the_spare_slots(tmp_path: Path) -> None:
    path = tmp_path / "splicelb.toml"
    path.write_text(text("spare_servers = 2", 'name = "x.test"\nmax_servers = 3', servers=True))
    done = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert done.exit_code == 0, done.output
    assert f"{path}: OK (1 listeners, 1 backends, 1 servers, 5 spare slots)" in done.output
