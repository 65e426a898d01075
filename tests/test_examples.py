"""The example set-ups in examples/: each config passes ``splicelb check`` and does what its
comments say; the systemd drop-in raises the unit's limit and verifies."""

from __future__ import annotations

import asyncio
import configparser
import shutil
import socket
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path, PurePath

import aiohttp
import pytest
import trustme
from aiohttp import web

from lb.config import Config, load_config
from lb.config_table import parse_address
from lb.proto.http1 import Head, HeadSniffer
from lb.proto.tls import normalize_server_name
from lb.route import Router
from probes.checks import Checker, CheckResult

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))
UNIT = REPO / "systemd" / "splicelb.service"
LIMITS = REPO / "examples" / "systemd" / "limits.conf"
INSTALLED = "/usr/local/bin/splicelb"  # where the README installs the command
# The set-ups users asked for, each with its own example.
SET_UPS = {
    "splicelb.toml",
    "tcp.toml",
    "routing.toml",
    "https-health.toml",
    "dual-stack.toml",
    "sni.toml",
}


def ca_files(example: Path) -> list[str]:
    """The ca_file of every backend's health section, as written."""
    data = tomllib.loads(example.read_text())
    named = (backend.get("health", {}).get("ca_file", "") for backend in data.get("backends", []))
    return [name for name in named if name]


def place(example: Path, directory: Path, ca: trustme.CA | None) -> Path:
    """A copy of ``example`` in ``directory``, with each CA file it names issued by ``ca``.

    Examples name their CA files relative to the config (as the user installs
    them next to it), so the copy finds them here.
    """
    copy = directory / example.name
    shutil.copyfile(example, copy)
    for name in ca_files(example):
        assert not PurePath(name).is_absolute(), f"{example.name}: ca_file {name!r} is absolute"
        if ca is not None:
            ca.cert_pem.write_to_path(str(directory / name))
    return copy


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lb", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def loaded(name: str, directory: Path, ca: trustme.CA | None = None) -> Config:
    return load_config(place(REPO / "examples" / name, directory, ca))


def test_every_set_up_has_an_example() -> None:
    assert {example.name for example in EXAMPLES} >= SET_UPS


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_passes_check(example: Path, tmp_path: Path) -> None:
    copy = place(example, tmp_path, trustme.CA())
    result = check(copy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{copy}: OK ("), result.stdout
    assert result.stderr == ""


def test_tcp_example_splices_without_reading(tmp_path: Path) -> None:
    config = loaded("tcp.toml", tmp_path)
    assert [(listener.mode, listener.routes) for listener in config.listeners] == [("tcp", ())]
    backend = config.backend(config.listeners[0].default_backend)
    assert backend.health is not None
    assert backend.health.type == "tcp"


def head(request: bytes) -> Head:
    event = HeadSniffer().feed(request + b"\r\n")
    assert isinstance(event, Head)
    return event


def upgrade(path: str, host: str, origin: str | None = None) -> Head:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return head("".join(line + "\r\n" for line in lines).encode())


def test_routing_example_routes_by_host_and_path(tmp_path: Path) -> None:
    config = loaded("routing.toml", tmp_path)
    (listener,) = config.listeners
    router = Router(listener)
    served = {
        "chat websocket": router.backend_for(upgrade("/anything", "Chat.Example.com:80")),
        "chat page": router.backend_for(head(b"GET / HTTP/1.1\r\nHost: chat.example.com\r\n")),
        "live websocket": router.backend_for(upgrade("/live/prices", "www.example.com")),
        "live, not an upgrade": router.backend_for(
            head(b"GET /live/prices HTTP/1.1\r\nHost: www.example.com\r\n")
        ),
        "api": router.backend_for(head(b"GET /api/v1/users HTTP/1.1\r\nHost: example.com\r\n")),
        "page": router.backend_for(head(b"GET /about HTTP/1.1\r\nHost: www.example.com\r\n")),
    }
    assert served == {
        "chat websocket": "chat",
        "chat page": "chat-web",
        "live websocket": "live",
        "live, not an upgrade": "web",
        "api": "api",
        "page": "web",
    }
    assert {backend.name for backend in config.backends} == set(served.values())
    assert router.origin_allowed(upgrade("/live/x", "example.com", "https://www.example.com"))
    assert not router.origin_allowed(upgrade("/live/x", "example.com", "https://evil.example"))


def test_sni_example_routes_by_server_name(tmp_path: Path) -> None:
    config = loaded("sni.toml", tmp_path)
    (listener,) = config.listeners
    assert listener.mode == "tls"
    router = Router(listener)
    names = ["Chat.Example.com.", "eu.api.example.com", "api.example.com", "www.example.com"]
    served = {name: router.backend_for_sni(normalize_server_name(name.encode())) for name in names}
    assert served == {
        "Chat.Example.com.": "chat",
        "eu.api.example.com": "api",
        "api.example.com": "www",  # the wildcard needs one more label
        "www.example.com": "www",
    }
    assert router.backend_for_sni(None) == "www"  # no server name sent
    assert {backend.name for backend in config.backends} == {"www", "chat", "api"}


def test_dual_stack_example_listens_on_both_families(tmp_path: Path) -> None:
    config = loaded("dual-stack.toml", tmp_path)
    binds = {(listener.bind.family, listener.bind.host) for listener in config.listeners}
    assert {(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")} <= binds
    assert {(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")} <= binds
    servers = {server.address.family for backend in config.backends for server in backend.servers}
    assert servers == {socket.AF_INET, socket.AF_INET6}
    assert config.global_.admin_bind is not None
    assert config.global_.admin_bind.family == socket.AF_INET6


def test_https_example_needs_its_ca_file(tmp_path: Path) -> None:
    result = check(place(REPO / "examples" / "https-health.toml", tmp_path, ca=None))
    assert result.returncode == 1
    assert result.stderr.startswith("backends[0].health.ca_file: no such file: "), result.stderr


def https_check(config: Config, server_ca: trustme.CA) -> CheckResult:
    """One check of the example's first backend against a local HTTPS server whose
    certificate ``server_ca`` issued for the example's sni."""
    health = config.backends[0].health
    assert health is not None
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert(health.sni).configure_cert(server_ssl)

    async def healthz(request: web.Request) -> web.Response:
        assert request.host == health.host
        return web.Response(text="ok")

    async def go() -> CheckResult:
        app = web.Application()
        app.router.add_get(health.path, healthz)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
            await site.start()
            port = runner.addresses[0][1]
            address = parse_address(f"127.0.0.1:{port}", "test")
            async with aiohttp.ClientSession() as session:
                return await Checker(health).check(session, address)
        finally:
            await runner.cleanup()

    return asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_https_example_trusts_servers_its_ca_file_vouches_for(tmp_path: Path) -> None:
    ca = trustme.CA()
    config = loaded("https-health.toml", tmp_path, ca)
    result = https_check(config, ca)
    assert (result.ok, result.text) == (True, "HTTP 200")


def test_https_example_fails_servers_of_another_ca(tmp_path: Path) -> None:
    config = loaded("https-health.toml", tmp_path, trustme.CA())
    result = https_check(config, trustme.CA())
    assert not result.ok
    assert result.text.startswith("TLS: certificate verify failed"), result.text


def service_value(path: Path, key: str) -> str:
    """A key of a unit file's [Service] section (repeated keys: the last)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser["Service"][key]


def test_limits_drop_in_raises_the_units_open_file_limit() -> None:
    assert int(service_value(LIMITS, "LimitNOFILE")) > int(service_value(UNIT, "LimitNOFILE"))


def verify(unit_dir: Path) -> str:
    """What ``systemd-analyze verify`` says of the unit in ``unit_dir`` and its drop-ins."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "splicelb.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze (Debian package systemd) is missing",
)
def test_limits_drop_in_verifies_with_the_unit(tmp_path: Path) -> None:
    command = shutil.which("splicelb") or str(Path(sys.executable).with_name("splicelb"))
    (tmp_path / "splicelb.service").write_text(UNIT.read_text().replace(INSTALLED, command))
    drop_in = tmp_path / "splicelb.service.d" / "limits.conf"
    drop_in.parent.mkdir()
    shutil.copyfile(LIMITS, drop_in)
    assert verify(tmp_path) == ""
    # The drop-in is read from there: a bad value in it is reported.
    drop_in.write_text(LIMITS.read_text() + "LimitNOFILE=lots\n")
    assert "limits.conf" in verify(tmp_path)
