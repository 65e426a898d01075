"""Tests for lb.config: what a user sees when a config loads, or why it does not."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from lb.config import (
    DEFAULT_CONFIG_PATH,
    Backend,
    Config,
    HashKey,
    HealthCheck,
    Route,
    Server,
    load_config,
    parse_config,
)
from lb.config_table import Address, parse_address
from lb.errors import ConfigError, LBError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "splicelb.toml"

FULL = """
[global]
workers = 2
runtime_dir = "/run/splicelb"
drain_timeout = 30
admin_bind = "127.0.0.1:9900"
admin_hosts = ["Admin.Example.com", "[FD00::1]", "10.0.0.5"]
maxconn = 10000
log_level = "info"
log_format = "json"
busy_poll_us = 20

[[listeners]]
name = "public"
bind = "127.0.0.1:8080"
mode = "http"
default_backend = "app"
allowed_origins = ["https://Example.com/", "null"]
head_timeout = 5
tunnel_timeout = 3600

  [[listeners.routes]]
  websocket = true
  host = "Chat.Example.com"
  path_prefix = "/ws"
  backend = "chat"

[[listeners]]
name = "raw"
bind = "[::1]:8443"
mode = "tcp"
default_backend = "app"

[[backends]]
name = "app"
balance = "roundrobin"
connect_timeout = 3
retries = 2

  [[backends.servers]]
  name = "a1"
  address = "127.0.0.1:9001"
  weight = 1
  maxconn = 0

  [backends.health]
  type = "http"
  path = "/healthz"
  method = "get"
  host = ""
  expect_status = ["200-399", "404", 204]
  expect_body = ""
  interval = 2
  timeout = 1
  rise = 2
  fall = 3
  ca_file = ""
  sni = ""
  verify = true

[[backends]]
name = "chat"
balance = "leastconn"
connect_timeout = 0.5

  [[backends.servers]]
  name = "c1"
  address = "127.0.0.1:9101"
  weight = 3
  maxconn = 100

  [[backends.servers]]
  name = "c2"
  address = "localhost:9102"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "splicelb.toml"
    path.write_text(text)
    return path


def config(
    *,
    global_: str = "",
    listener: str = "",
    bind: str = "127.0.0.1:8080",
    route: str = "",
    backend: str = "",
    server: str = "",
    address: str = "127.0.0.1:9001",
    health: str = "",
    more: str = "",
) -> str:
    """A minimal valid config, with extra lines spliced into each table."""
    return f"""
[global]
{global_}

[[listeners]]
name = "public"
bind = "{bind}"
default_backend = "app"
{listener}
{route}

[[backends]]
name = "app"
{backend}

  [[backends.servers]]
  name = "a1"
  address = "{address}"
  {server}
{health}
{more}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def test_full_config_loads_with_its_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))

    assert cfg.path == str(tmp_path / "splicelb.toml")
    assert cfg.global_.workers == 2
    assert cfg.global_.admin_bind is not None
    assert str(cfg.global_.admin_bind) == "127.0.0.1:9900"
    assert cfg.global_.admin_hosts == ("admin.example.com", "[fd00::1]", "10.0.0.5")
    assert cfg.global_.worker_timeout == 30.0
    assert cfg.global_.busy_poll_us == 20

    public, raw = cfg.listeners
    assert public.bind == Address("127.0.0.1", 8080, socket.AF_INET, ("127.0.0.1", 8080))
    assert public.allowed_origins == ("https://example.com", "null")
    assert public.routes == (
        Route("chat", websocket=True, host="chat.example.com", path_prefix="/ws"),
    )
    assert raw.mode == "tcp"
    assert raw.bind.family == socket.AF_INET6
    assert raw.bind.sockaddr == ("::1", 8443, 0, 0)
    assert str(raw.bind) == "[::1]:8443"
    assert raw.routes == ()

    app = cfg.backend("app")
    assert app.health == HealthCheck(
        type="http", method="GET", expect_status=((200, 399), (404, 404), (204, 204))
    )
    chat = cfg.backend("chat")
    assert chat.balance == "leastconn"
    assert chat.connect_timeout == 0.5
    assert chat.servers[0] == Server("c1", chat.servers[0].address, weight=3, maxconn=100)
    assert chat.servers[1].address.sockaddr == ("127.0.0.1", 9102)
    assert chat.health is None


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    text = """
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"
default_backend = "app"

[[backends]]
name = "app"
  [[backends.servers]]
  name = "a1"
  address = "127.0.0.1:9001"
"""
    cfg = load_config(write(tmp_path, text))

    g = cfg.global_
    assert g.workers == min(os.cpu_count() or 1, 256)
    assert (g.runtime_dir, g.drain_timeout, g.maxconn) == ("/run/splicelb", 30.0, 10000)
    assert str(g.admin_bind) == "127.0.0.1:9900"
    assert g.admin_hosts == ()
    assert (g.log_level, g.log_format, g.worker_timeout) == ("info", "json", 30.0)
    assert g.busy_poll_us == 50
    (listener,) = cfg.listeners
    assert listener.mode == "http"
    assert listener.allowed_origins == ()
    assert (listener.head_timeout, listener.tunnel_timeout) == (5.0, 3600.0)
    assert listener.routes == ()
    (backend,) = cfg.backends
    assert backend == Backend("app", "roundrobin", 3.0, 2, backend.servers, None)
    assert backend.servers[0].weight == 1
    assert backend.servers[0].maxconn == 0


def test_ends_spread_out_by_default_over_half_of_drain_timeout(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config()))
    assert cfg.global_.close_spread == 15.0  # half of the default drain_timeout, 30
    assert cfg.listeners[0].max_tunnel_age == 0.0  # none
    assert cfg.backends[0].on_server_down == "keep"
    cfg = load_config(write(tmp_path, config(global_="drain_timeout = 8")))
    assert cfg.global_.close_spread == 4.0
    cfg = load_config(write(tmp_path, config(global_="drain_timeout = 0")))
    assert cfg.global_.close_spread == 0.0


def test_close_spread_max_tunnel_age_and_on_server_down_load(tmp_path: Path) -> None:
    text = config(
        global_="drain_timeout = 8\nclose_spread = 8",  # the whole drain: allowed
        listener="max_tunnel_age = 3600",
        backend='on_server_down = "close"',
    )
    cfg = load_config(write(tmp_path, text))
    assert (cfg.global_.drain_timeout, cfg.global_.close_spread) == (8.0, 8.0)
    assert cfg.listeners[0].max_tunnel_age == 3600.0
    assert cfg.backends[0].on_server_down == "close"
    cfg = load_config(write(tmp_path, config(global_="close_spread = 0")))
    assert cfg.global_.close_spread == 0.0  # all at drain_timeout, as before the key


def test_hash_keys_and_slow_start_load(tmp_path: Path) -> None:
    text = config(backend='balance = "hash"\nhash_key = "cookie:sid"\nhash_balance_factor = 150')
    backend = load_config(write(tmp_path, text)).backends[0]
    assert (backend.balance, backend.hash_key) == ("hash", HashKey("cookie", "sid"))
    assert (backend.hash_balance_factor, backend.slowstart) == (150, 0.0)
    text = config(backend='balance = "hash"\nhash_key = "header:X-Session-Id"\nslowstart = 10')
    backend = load_config(write(tmp_path, text)).backends[0]
    assert backend.hash_key == HashKey("header", "x-session-id")  # header names: any case
    assert backend.slowstart == 10.0
    text = config(backend='balance = "hash"\nhash_key = "query:sid"')
    assert load_config(write(tmp_path, text)).backends[0].hash_key == HashKey("query", "sid")


def test_source_is_hash_on_the_client_address(tmp_path: Path) -> None:
    for lines in (
        'balance = "source"',
        'balance = "hash"',
        'balance = "source"\nhash_key = "source"',
    ):
        backend = load_config(write(tmp_path, config(backend=lines))).backends[0]
        assert (backend.balance, backend.hash_key) == ("hash", HashKey("source", ""))
    text = config(backend='balance = "source"\nhash_balance_factor = 125')
    assert load_config(write(tmp_path, text)).backends[0].hash_balance_factor == 125
    text = config(backend='hash_key = "source"\nhash_balance_factor = 0')  # the defaults
    assert load_config(write(tmp_path, text)).backends[0].balance == "roundrobin"


def test_client_address_keys_load(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config()))
    (listener,), (backend,) = cfg.listeners, cfg.backends
    assert (listener.forwarded_headers, listener.trusted_proxies) == (True, ())
    assert (listener.accept_proxy, backend.send_proxy) == (False, 0)
    text = config(
        listener="forwarded_headers = false\naccept_proxy = true\n"
        'trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:DB8::/32"]',
        backend='send_proxy = "v2"',
    )
    cfg = load_config(write(tmp_path, text))
    (listener,), (backend,) = cfg.listeners, cfg.backends
    assert listener.forwarded_headers is False
    assert listener.accept_proxy is True
    assert listener.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")
    assert backend.send_proxy == 2
    cfg = load_config(write(tmp_path, config(backend='send_proxy = "v1"')))
    assert cfg.backends[0].send_proxy == 1
    tcp = config(
        listener='mode = "tcp"\nforwarded_headers = false\naccept_proxy = true\n'
        'trusted_proxies = ["::1"]'
    )
    cfg = load_config(write(tmp_path, tcp))
    assert (cfg.listeners[0].accept_proxy, cfg.listeners[0].trusted_proxies) == (True, ("::1/128",))


@pytest.mark.parametrize(
    ("written", "host"),
    [
        ("Chat.Example.COM", "chat.example.com"),
        ("chat.example.com.", "chat.example.com"),
        ("[0:0::1]", "[::1]"),
    ],
)
def test_a_route_host_is_kept_in_normal_form(tmp_path: Path, written: str, host: str) -> None:
    route = f'[[listeners.routes]]\nbackend = "app"\nhost = "{written}"\npath_prefix = "/ws/"'
    cfg = load_config(write(tmp_path, config(route=route)))
    assert cfg.listeners[0].routes == (Route("app", host=host, path_prefix="/ws/"),)


def test_client_limits_are_off_by_default(tmp_path: Path) -> None:
    (listener,) = load_config(write(tmp_path, config())).listeners
    assert (listener.client_maxconn, listener.client_rate, listener.client_burst) == (0, 0.0, 0)
    assert not listener.limits_clients


@pytest.mark.parametrize(
    ("lines", "maxconn", "rate", "burst"),
    [
        ("client_maxconn = 10", 10, 0.0, 0),
        ("client_rate = 20", 0, 20.0, 20),  # burst: a second's worth
        ("client_rate = 0.5", 0, 0.5, 1),  # ... at least one
        ("client_rate = 2.5\nclient_burst = 40\nclient_maxconn = 100", 100, 2.5, 40),
        ("client_rate = 0", 0, 0.0, 0),
    ],
)
def test_client_limits_load(
    tmp_path: Path, lines: str, maxconn: int, rate: float, burst: int
) -> None:
    (listener,) = load_config(write(tmp_path, config(listener=lines))).listeners
    assert (listener.client_maxconn, listener.client_rate, listener.client_burst) == (
        maxconn,
        rate,
        burst,
    )
    assert listener.limits_clients == bool(maxconn or rate)


def test_health_table_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config(health="[backends.health]")))
    assert cfg.backends[0].health == HealthCheck(type="http")
    assert cfg.backends[0].health.expect_status == ((200, 399),)


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.global_.workers == 2
    assert cfg.global_.runtime_dir == "/tmp/splicelb-demo"
    assert cfg.global_.admin_hosts == ()
    assert [s.name for s in cfg.backend("app").servers] == ["echo1", "echo2"]
    assert cfg.listeners[0].routes == (Route("app", websocket=True, path_prefix="/ws"),)
    assert cfg.backend("app").health == HealthCheck(type="http", path="/healthz")
    assert (cfg.global_.drain_timeout, cfg.global_.close_spread) == (30.0, 15.0)
    assert cfg.listeners[0].max_tunnel_age == 0.0
    assert cfg.backend("app").on_server_down == "keep"


def test_integers_are_accepted_as_durations_and_stored_as_floats(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config(listener="head_timeout = 7")))
    assert cfg.listeners[0].head_timeout == 7.0
    assert isinstance(cfg.listeners[0].head_timeout, float)


def test_empty_admin_bind_turns_the_admin_endpoint_off(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config(global_='admin_bind = ""')))
    assert cfg.global_.admin_bind is None


def test_backend_lookup_by_name(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, config()))
    assert cfg.backend("app").name == "app"
    with pytest.raises(KeyError):
        cfg.backend("nope")


def test_relative_ca_file_is_found_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here")
    cfg = load_config(
        write(tmp_path, config(health='[backends.health]\ntype = "https"\nca_file = "ca.pem"'))
    )
    assert cfg.backends[0].health is not None
    assert cfg.backends[0].health.ca_file == str(tmp_path / "ca.pem")


def test_parse_config_takes_a_parsed_dict() -> None:
    data: dict[str, Any] = {
        "listeners": [{"name": "l", "bind": "127.0.0.1:1", "default_backend": "b"}],
        "backends": [{"name": "b", "servers": [{"name": "s", "address": "127.0.0.1:2"}]}],
    }
    cfg = parse_config(data)
    assert isinstance(cfg, Config)
    assert cfg.path == "<memory>"
    data["listeners"][0]["bind"] = "nowhere"
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.bind: expected host:port"):
        parse_config(data)


# --- addresses -------------------------------------------------------------------


def test_localhost_resolves_once_at_load() -> None:
    address = parse_address("localhost:9001", "x")
    assert address.host == "localhost"
    assert address.family in (socket.AF_INET, socket.AF_INET6)
    assert address.sockaddr[:2] in (("127.0.0.1", 9001), ("::1", 9001))
    assert str(address) == "localhost:9001"


def test_ipv6_literal_in_brackets() -> None:
    address = parse_address("[::1]:8080", "x")
    assert (address.host, address.port, address.family) == ("::1", 8080, socket.AF_INET6)
    assert address.sockaddr == ("::1", 8080, 0, 0)
    assert str(address) == "[::1]:8080"


def test_port_zero_only_where_allowed() -> None:
    assert parse_address("127.0.0.1:0", "x", allow_port_zero=True).port == 0
    with pytest.raises(ConfigError) as caught:
        parse_address("127.0.0.1:0", "admin")
    assert caught.value.problems == ["admin: port 0 is out of range (1-65535)"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("8080", "p: expected host:port or [v6]:port, got '8080'"),
        (":8080", "p: expected host:port or [v6]:port, got ':8080'"),
        ("127.0.0.1:", "p: expected host:port or [v6]:port, got '127.0.0.1:'"),
        ("::1:8080", "p: an IPv6 address needs brackets, e.g. '[::1]:8080'; got '::1:8080'"),
        ("[127.0.0.1]:80", "p: '127.0.0.1' is not an IPv6 address"),
        ("127.0.0.1:http", "p: port 'http' is not a number"),
        ("127.0.0.1:70000", "p: port 70000 is out of range (1-65535)"),
    ],
)
def test_bad_addresses(text: str, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_address(text, "p")
    assert caught.value.problems == [line]


def test_unresolvable_host_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def fake(host: str, *args: Any) -> Any:
        if host == "db.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert problems(tmp_path, config(address="db.invalid:5432")) == [
        "backends[0].servers[0].address: cannot resolve host 'db.invalid': "
        "Name or service not known"
    ]


# --- one problem each ------------------------------------------------------------------

ROUTE_TO_CHAT = '[[listeners.routes]]\nbackend = "app"\n[[listeners.routes]]\nbackend = "chat"'

CASES = [
    # unknown keys, at every level
    (config(global_="wrokers = 2"), "global.wrokers: unknown key (did you mean 'workers'?)"),
    (config(more="[extra]"), "extra: unknown key at top level"),
    # a key of [global] in the wrong table: above [global], or after a later header
    (
        "workers = 2\n" + config(),
        "workers: unknown key at top level; did you mean [global] workers?",
    ),
    (
        "maxconns = 2\n" + config(),
        "maxconns: unknown key at top level; did you mean [global] maxconn?",
    ),
    (
        config(server="drain_timeout = 5"),
        "backends[0].servers[0].drain_timeout: unknown key; did you mean [global] drain_timeout?"
        " (a key belongs to the nearest table header above it)",
    ),
    (
        config(listener="workers = 2"),
        "listeners[0].workers: unknown key; did you mean [global] workers?"
        " (a key belongs to the nearest table header above it)",
    ),
    (
        config(listener="tunel_timeout = 1"),
        "listeners[0].tunel_timeout: unknown key (did you mean 'tunnel_timeout'?)",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\nprefix = "/"'),
        "listeners[0].routes[0].prefix: unknown key (did you mean 'path_prefix'?)",
    ),
    (config(server="port = 1"), "backends[0].servers[0].port: unknown key"),
    (
        config(health="[backends.health]\nintervall = 5"),
        "backends[0].health.intervall: unknown key (did you mean 'interval'?)",
    ),
    # types
    (config(global_="workers = true"), "global.workers: expected an integer, got boolean true"),
    (config(global_="workers = 2.5"), "global.workers: expected an integer, got float 2.5"),
    (
        config(listener='tunnel_timeout = "1h"'),
        "listeners[0].tunnel_timeout: expected a number of seconds, got string '1h'",
    ),
    (
        config(backend="connect_timeout = true"),
        "backends[0].connect_timeout: expected a number of seconds, got boolean true",
    ),
    (config(global_="runtime_dir = 5"), "global.runtime_dir: expected a string, got integer 5"),
    (
        config(health='[backends.health]\nverify = "yes"'),
        "backends[0].health.verify: expected a boolean, got string 'yes'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\nwebsocket = 1'),
        "listeners[0].routes[0].websocket: expected a boolean, got integer 1",
    ),
    (
        config(listener='allowed_origins = "https://a.com"'),
        "listeners[0].allowed_origins: expected an array of strings, got string 'https://a.com'",
    ),
    (
        config(backend="health = 1"),
        "backends[0].health: expected a table ([health]), got integer 1",
    ),
    # ranges and durations
    (config(global_="workers = 0"), "global.workers: must be between 1 and 256, got 0"),
    (config(global_="workers = 300"), "global.workers: must be between 1 and 256, got 300"),
    (config(global_="maxconn = 0"), "global.maxconn: must be >= 1, got 0"),
    (
        config(global_="drain_timeout = -1"),
        "global.drain_timeout: must be a number of seconds >= 0, got -1",
    ),
    (
        config(global_="busy_poll_us = -1"),
        "global.busy_poll_us: must be between 0 and 10000, got -1",
    ),
    (
        config(global_="busy_poll_us = 0.5"),
        "global.busy_poll_us: expected an integer, got float 0.5",
    ),
    (
        config(global_="worker_timeout = 0"),
        "global.worker_timeout: must be a number of seconds > 0, got 0",
    ),
    (
        config(listener="head_timeout = 0"),
        "listeners[0].head_timeout: must be a number of seconds > 0, got 0",
    ),
    (
        config(listener="tunnel_timeout = -5.5"),
        "listeners[0].tunnel_timeout: must be a number of seconds > 0, got -5.5",
    ),
    (
        config(listener="tunnel_timeout = inf"),
        "listeners[0].tunnel_timeout: must be a number of seconds > 0, got inf",
    ),
    (
        config(health="[backends.health]\ninterval = 0"),
        "backends[0].health.interval: must be a number of seconds > 0, got 0",
    ),
    (config(backend="retries = -1"), "backends[0].retries: must be >= 0, got -1"),
    (
        config(server="weight = 0"),
        "backends[0].servers[0].weight: must be between 1 and 256, got 0",
    ),
    (config(server="maxconn = -1"), "backends[0].servers[0].maxconn: must be >= 0, got -1"),
    (config(health="[backends.health]\nrise = 0"), "backends[0].health.rise: must be >= 1, got 0"),
    (config(health="[backends.health]\nfall = 0"), "backends[0].health.fall: must be >= 1, got 0"),
    # addresses
    (
        config(address="127.0.0.1:70000"),
        "backends[0].servers[0].address: port 70000 is out of range (1-65535)",
    ),
    (config(bind="8080"), "listeners[0].bind: expected host:port or [v6]:port, got '8080'"),
    (config(bind="127.0.0.1:0"), "listeners[0].bind: port 0 is out of range (1-65535)"),
    (
        config(global_='admin_bind = "localhost"'),
        "global.admin_bind: expected host:port or [v6]:port, got 'localhost'",
    ),
    # admin_hosts
    (
        config(global_='admin_hosts = "admin.example.com"'),
        "global.admin_hosts: expected an array of strings, got string 'admin.example.com'",
    ),
    (
        config(global_='admin_hosts = ["a.example", 5]'),
        "global.admin_hosts[1]: expected a string, got integer 5",
    ),
    (
        config(global_='admin_hosts = ["a.example", "Admin.Example.com:9900"]'),
        "global.admin_hosts[1]: expected a host name without port, got 'Admin.Example.com:9900'",
    ),
    (
        config(global_='admin_hosts = ["*.example.com"]'),
        "global.admin_hosts[0]: expected a host name without port, got '*.example.com'",
    ),
    (config(global_='admin_hosts = [""]'), "global.admin_hosts[0]: must not be empty"),
    (
        config(global_='admin_hosts = ["fd00::1"]'),
        "global.admin_hosts[0]: an IPv6 address needs brackets, e.g. '[::1]'; got 'fd00::1'",
    ),
    (
        config(global_='admin_hosts = ["[fd00::1]:9900"]'),
        "global.admin_hosts[0]: expected a host name without port, got '[fd00::1]:9900'",
    ),
    (
        config(global_='admin_hosts = ["[fd00::zz]"]'),
        "global.admin_hosts[0]: 'fd00::zz' is not an IPv6 address",
    ),
    # enums
    (
        config(global_='log_level = "verbose"'),
        "global.log_level: expected one of debug, info, warning, error; got 'verbose'",
    ),
    (
        config(global_='log_format = "text"'),
        "global.log_format: expected one of json, console; got 'text'",
    ),
    (
        config(listener='mode = "udp"'),
        "listeners[0].mode: expected one of http, tcp, tls; got 'udp'",
    ),
    (
        config(backend='balance = "maglev"'),
        "backends[0].balance: expected one of roundrobin, leastconn, random2, hash, source;"
        " got 'maglev'",
    ),
    # hash keys, bounded load, slow start
    (
        config(backend='balance = "hash"\nhash_key = "cookie"'),
        "backends[0].hash_key: 'cookie:' needs a name, e.g. 'cookie:sid'",
    ),
    (
        config(backend='balance = "hash"\nhash_key = "body:sid"'),
        "backends[0].hash_key: expected source, header:NAME, cookie:NAME or query:NAME;"
        " got 'body:sid'",
    ),
    (
        config(backend='balance = "hash"\nhash_key = "source:x"'),
        "backends[0].hash_key: 'source' takes no name; got 'source:x'",
    ),
    (
        config(backend='balance = "hash"\nhash_key = "header:X Session"'),
        "backends[0].hash_key: 'X Session' is not a valid header name"
        " (letters, digits and !#$%&'*+-.^_`|~)",
    ),
    (
        config(backend='balance = "hash"\nhash_key = "query:a=b"'),
        "backends[0].hash_key: 'a=b' is not a query parameter name (no '&', '=', space or control)",
    ),
    (
        config(backend='balance = "hash"\nhash_key = 5'),
        "backends[0].hash_key: expected a string, got integer 5",
    ),
    (
        config(backend='hash_key = "cookie:sid"'),
        'backends[0].hash_key: needs balance = "hash", not "roundrobin"',
    ),
    (
        config(backend='balance = "source"\nhash_key = "cookie:sid"'),
        'backends[0].hash_key: needs balance = "hash" (balance = "source" hashes the address only)',
    ),
    (
        config(backend='balance = "hash"\nhash_balance_factor = 100'),
        "backends[0].hash_balance_factor: must be 0 (off) or more than 100"
        " (a percentage of the average load), got 100",
    ),
    (
        config(backend='balance = "hash"\nhash_balance_factor = 1.5'),
        "backends[0].hash_balance_factor: expected an integer, got float 1.5",
    ),
    (
        config(backend='balance = "leastconn"\nhash_balance_factor = 150'),
        'backends[0].hash_balance_factor: needs balance = "hash", not "leastconn"',
    ),
    (
        config(backend="slowstart = -1"),
        "backends[0].slowstart: must be a number of seconds >= 0, got -1",
    ),
    (
        config(backend='slowstart = "30s"'),
        "backends[0].slowstart: expected a number of seconds, got string '30s'",
    ),
    (
        config(health='[backends.health]\ntype = "icmp"'),
        "backends[0].health.type: expected one of http, https, tcp; got 'icmp'",
    ),
    # names
    (
        config(server='name = ""').replace('name = "a1"\n', ""),
        "backends[0].servers[0].name: must not be empty",
    ),
    (
        config(backend="")
        .replace('name = "app"', 'name = "my app"')
        .replace('default_backend = "app"', 'default_backend = "my app"'),
        "backends[0].name: 'my app' is not a valid name (use letters, digits, '_', '.', '-')",
    ),
    (
        config(listener="").replace('name = "public"', 'name = "pub/lic"'),
        "listeners[0].name: 'pub/lic' is not a valid name (use letters, digits, '_', '.', '-')",
    ),
    # references and duplicates
    (
        config().replace('default_backend = "app"', 'default_backend = "nope"'),
        "listeners[0].default_backend: unknown backend 'nope'",
    ),
    (config(route=ROUTE_TO_CHAT), "listeners[0].routes[1].backend: unknown backend 'chat'"),
    (
        config(
            more='[[listeners]]\nname = "public"\nbind = "127.0.0.1:8081"\ndefault_backend = "app"'
        ),
        "listeners[1].name: duplicate listener name 'public' (first at listeners[0].name)",
    ),
    (
        config(
            more='[[listeners]]\nname = "other"\nbind = "localhost:8080"\ndefault_backend = "app"'
        ),
        "listeners[1].bind: duplicate bind address 'localhost:8080' (first at listeners[0].bind)",
    ),
    (
        config(
            more='[[backends]]\nname = "app"\n[[backends.servers]]\nname = "b1"\n'
            'address = "127.0.0.1:9002"'
        ),
        "backends[1].name: duplicate backend name 'app' (first at backends[0].name)",
    ),
    (
        config(server='[[backends.servers]]\nname = "a1"\naddress = "127.0.0.1:9002"'),
        "backends[0].servers[1].name: duplicate server name 'a1' "
        "(first at backends[0].servers[0].name)",
    ),
    # listeners and routes
    (
        config(listener='mode = "tcp"', route='[[listeners.routes]]\nbackend = "app"'),
        'listeners[0].routes: needs mode = "http" (a tcp listener does not read the request)',
    ),
    # what only an http listener reads, on a tcp or a tls listener
    *[
        (
            config(listener=f'mode = "{mode}"\n{key} = {value}'),
            f'listeners[0].{key}: needs mode = "http" '
            f"(a {mode} listener does not read the request)",
        )
        for mode in ("tcp", "tls")
        for key, value in (("allowed_origins", '["https://a.com"]'), ("forwarded_headers", "true"))
    ],
    (
        config(listener='allowed_origins = ["https://a.com", "a.com"]'),
        "listeners[0].allowed_origins[1]: expected scheme://host[:port] or 'null', got 'a.com'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "ws"'),
        "listeners[0].routes[0].path_prefix: must start with '/', got 'ws'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\nhost = "chat.example.com:443"'),
        "listeners[0].routes[0].host: expected a host name without port, "
        "got 'chat.example.com:443'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\nhost = "chat..example.com"'),
        "listeners[0].routes[0].host: expected a host name without port, got 'chat..example.com'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\nhost = "[::1::]"'),
        "listeners[0].routes[0].host: '::1::' is not an IPv6 address",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "/%61dmin"'),
        "listeners[0].routes[0].path_prefix: requests are routed on their normalized path:"
        " write '/admin'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "/api//v1/./x"'),
        "listeners[0].routes[0].path_prefix: requests are routed on their normalized path:"
        " write '/api/v1/x'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "/../admin"'),
        "listeners[0].routes[0].path_prefix: path goes above the root ('..'), got '/../admin'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "/api?v=1"'),
        "listeners[0].routes[0].path_prefix: a query or fragment is not part of the path,"
        " got '/api?v=1'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "/api;v=1"'),
        "listeners[0].routes[0].path_prefix: path parameters (';') are left out of routing:"
        " leave them out, got '/api;v=1'",
    ),
    (
        config(route='[[listeners.routes]]\nbackend = "app"\npath_prefix = "/café"'),
        "listeners[0].routes[0].path_prefix: characters outside a URI path must be %XX"
        " escapes: write '/caf%C3%A9'",
    ),
    (
        config(route="[[listeners.routes]]\nwebsocket = true"),
        "listeners[0].routes[0].backend: required key is missing",
    ),
    # health checks
    (
        config(health='[backends.health]\npath = "healthz"'),
        "backends[0].health.path: must start with '/', got 'healthz'",
    ),
    (
        config(health='[backends.health]\nmethod = "GE T"'),
        "backends[0].health.method: 'GE T' is not an HTTP method",
    ),
    (
        config(health='[backends.health]\nexpect_status = ["200-399", "700"]'),
        "backends[0].health.expect_status[1]: status 700 is out of range (100-599)",
    ),
    (
        config(health='[backends.health]\nexpect_status = ["300-200"]'),
        "backends[0].health.expect_status[0]: range '300-200' starts above its end",
    ),
    (
        config(health='[backends.health]\nexpect_status = ["2xx"]'),
        'backends[0].health.expect_status[0]: expected a status like 204, "204" or "200-399", '
        "got string '2xx'",
    ),
    (
        config(health="[backends.health]\nexpect_status = []"),
        "backends[0].health.expect_status: must list at least one status or range",
    ),
    (
        config(health='[backends.health]\nca_file = "/nonexistent/ca.pem"'),
        "backends[0].health.ca_file: no such file: '/nonexistent/ca.pem'",
    ),
    # required structure
    (
        config(backend="servers = []").replace(
            '[[backends.servers]]\n  name = "a1"\n  address = "127.0.0.1:9001"', ""
        ),
        "backends[0].servers: at least one server ([[backends.servers]]) is required",
    ),
    # ends spread out: close_spread, max_tunnel_age, on_server_down
    (
        config(global_="close_spread = 31"),
        "global.close_spread: must not be more than drain_timeout (30 s), got 31",
    ),
    (
        config(global_="drain_timeout = 8\nclose_spread = 8.5"),
        "global.close_spread: must not be more than drain_timeout (8 s), got 8.5",
    ),
    (
        config(global_="close_spread = -1"),
        "global.close_spread: must be a number of seconds >= 0, got -1",
    ),
    (
        config(global_='close_spread = "4s"'),
        "global.close_spread: expected a number of seconds, got string '4s'",
    ),
    (
        config(listener="max_tunnel_age = -3600"),
        "listeners[0].max_tunnel_age: must be a number of seconds >= 0, got -3600",
    ),
    (
        config(listener="max_tunnel_age = nan"),
        "listeners[0].max_tunnel_age: must be a number of seconds >= 0, got nan",
    ),
    (
        config(listener="max_tunel_age = 60"),
        "listeners[0].max_tunel_age: unknown key (did you mean 'max_tunnel_age'?)",
    ),
    # client limits
    (
        config(listener="client_maxconn = -1"),
        "listeners[0].client_maxconn: must be >= 0, got -1",
    ),
    (
        config(listener="client_maxconn = 1.5"),
        "listeners[0].client_maxconn: expected an integer, got float 1.5",
    ),
    (
        config(listener="client_rate = -2"),
        "listeners[0].client_rate: must be a number of connections per second >= 0, got -2",
    ),
    (
        config(listener="client_rate = inf"),
        "listeners[0].client_rate: must be a number of connections per second >= 0, got inf",
    ),
    (
        config(listener='client_rate = "20/s"'),
        "listeners[0].client_rate: expected a number of connections per second, got string '20/s'",
    ),
    (
        config(listener="client_rate = 20\nclient_burst = 0"),
        "listeners[0].client_burst: must be >= 1, got 0",
    ),
    (
        config(listener="client_burst = 50"),
        "listeners[0].client_burst: needs client_rate (the rate at which the burst refills)",
    ),
    (
        config(listener="client_max_conn = 10"),
        "listeners[0].client_max_conn: unknown key (did you mean 'client_maxconn'?)",
    ),
    (
        config(backend='on_server_down = "drop"'),
        "backends[0].on_server_down: expected one of keep, close; got 'drop'",
    ),
    (
        config(backend="on_server_down = true"),
        "backends[0].on_server_down: expected a string, got boolean true",
    ),
    # source addresses
    (
        config(backend='source = ["127.0.0.1:80"]'),
        "backends[0].source[0]: expected an IP address without port, got '127.0.0.1:80'",
    ),
    (
        config(backend='source = ["10.0.0.1", "10.0.0.01"]'),
        "backends[0].source[1]: expected an IP address without port, got '10.0.0.01'",
    ),
    (
        config(backend='source = ["::1", "0:0::1"]'),
        "backends[0].source[1]: ::1 is listed twice",
    ),
    (
        config(backend='source = "127.0.0.2"'),
        'backends[0].source: expected an array of IP addresses, e.g. ["127.0.0.2"],'
        " got string '127.0.0.2'",
    ),
    # client addresses: send_proxy, forwarded_headers, trusted_proxies, accept_proxy
    (
        config(backend='send_proxy = "v3"'),
        'backends[0].send_proxy: expected "v1" or "v2" (leave the key out for none), got \'v3\'',
    ),
    (
        config(backend="send_proxy = true"),
        'backends[0].send_proxy: expected a string ("v1" or "v2"), got boolean true',
    ),
    (
        config(backend="send_proxy = 2"),
        'backends[0].send_proxy: expected a string ("v1" or "v2"), got integer 2',
    ),
    (
        config(listener='forwarded_headers = "yes"'),
        "listeners[0].forwarded_headers: expected a boolean, got string 'yes'",
    ),
    (
        config(listener='trusted_proxies = ["10.0.0.1/8"]'),
        "listeners[0].trusted_proxies[0]: '10.0.0.1/8' has host bits set;"
        " did you mean '10.0.0.0/8'?",
    ),
    (
        config(listener='trusted_proxies = ["10.0.0.0/33"]'),
        "listeners[0].trusted_proxies[0]: '33' is not a prefix length for '10.0.0.0'",
    ),
    (
        config(listener='trusted_proxies = ["127.0.0.1", "lb.example"]'),
        "listeners[0].trusted_proxies[1]: expected an IP address or a network such as"
        " '10.0.0.0/8', got 'lb.example'",
    ),
    (
        config(listener="trusted_proxies = [10]"),
        "listeners[0].trusted_proxies[0]: expected a string, got integer 10",
    ),
    (
        config(listener='trusted_proxies = "10.0.0.0/8"'),
        "listeners[0].trusted_proxies: expected an array of strings, got string '10.0.0.0/8'",
    ),
    (
        config(listener='mode = "tcp"\ntrusted_proxies = ["10.0.0.0/8"]'),
        "listeners[0].trusted_proxies: does nothing on a tcp listener without accept_proxy ="
        " true (a tcp listener reads no forwarded fields)",
    ),
    (
        config(listener="accept_proxy = true"),
        "listeners[0].accept_proxy: needs trusted_proxies: the peers that send a PROXY header"
        ' (e.g. trusted_proxies = ["10.0.0.0/8"])',
    ),
    (
        config(listener='accept_proxy = "v2"'),
        "listeners[0].accept_proxy: expected a boolean, got string 'v2'",
    ),
    # mode = "tls": SNI routes
    (
        config(route='[[listeners.routes]]\nbackend = "app"\nsni = "a.example"'),
        'listeners[0].routes[0].sni: needs mode = "tls" (only a tls listener reads the server'
        " name)",
    ),
    (
        config(
            listener='mode = "tls"', route='[[listeners.routes]]\nbackend = "app"\nhost = "a.b"'
        ),
        'listeners[0].routes[0].host: needs mode = "http" (a tls listener does not read the'
        " request; route on the server name with sni)",
    ),
    (
        config(
            listener='mode = "tls"',
            route='[[listeners.routes]]\nbackend = "app"\nsni = "a.b"\npath_prefix = "/x"',
        ),
        'listeners[0].routes[0].path_prefix: needs mode = "http" (a tls listener does not read'
        " the request; route on the server name with sni)",
    ),
    (
        config(
            listener='mode = "tls"', route='[[listeners.routes]]\nbackend = "app"\nsni = "a.*.b"'
        ),
        "listeners[0].routes[0].sni: expected a host name, or '*.' and a domain (one label more),"
        " got 'a.*.b'",
    ),
    (
        config(listener='mode = "tls"', route='[[listeners.routes]]\nbackend = "app"\nsni = "*"'),
        "listeners[0].routes[0].sni: expected a host name, or '*.' and a domain (one label more),"
        " got '*'",
    ),
    (
        config(
            listener='mode = "tls"', route='[[listeners.routes]]\nbackend = "app"\nsni = "a.b:443"'
        ),
        "listeners[0].routes[0].sni: expected a host name, or '*.' and a domain (one label more),"
        " got 'a.b:443'",
    ),
    (
        config(
            listener='mode = "tls"', route='[[listeners.routes]]\nbackend = "app"\nsni = "10.0.0.1"'
        ),
        "listeners[0].routes[0].sni: clients send no server name for an IP address, got '10.0.0.1'",
    ),
    (
        config(listener='mode = "tls"', route='[[listeners.routes]]\nbackend = "app"\nsni = 1'),
        "listeners[0].routes[0].sni: expected a string, got integer 1",
    ),
    (
        config(listener='mode = "tls"\nhead_timeout = 3'),
        'listeners[0].head_timeout: a mode = "tls" listener reads no HTTP head: its ClientHello'
        " has tls_head_timeout",
    ),
    (
        config(listener="tls_head_timeout = 3"),
        'listeners[0].tls_head_timeout: needs mode = "tls" (the ClientHello\'s deadline)',
    ),
    (
        config(listener='mode = "tls"\ntls_head_timeout = 0'),
        "listeners[0].tls_head_timeout: must be a number of seconds > 0, got 0",
    ),
    (
        config(listener='mode = "tls"\ntrusted_proxies = ["10.0.0.0/8"]'),
        "listeners[0].trusted_proxies: does nothing on a tls listener without accept_proxy ="
        " true (a tls listener reads no forwarded fields)",
    ),
]


def test_tls_listener_with_sni_routes_loads(tmp_path: Path) -> None:
    text = config(
        listener='mode = "tls"\ntls_head_timeout = 2.5\naccept_proxy = true\n'
        'trusted_proxies = ["10.0.0.0/8"]\nclient_maxconn = 5',
        route='[[listeners.routes]]\nsni = "Chat.Example.COM."\nbackend = "app"\n'
        '[[listeners.routes]]\nsni = "*.Example.com"\nbackend = "app"',
    )
    path = tmp_path / "c.toml"
    path.write_text(text)
    listener = load_config(path).listeners[0]
    assert (listener.mode, listener.tls_head_timeout, listener.first_bytes_timeout) == (
        "tls",
        2.5,
        2.5,
    )
    assert [r.sni for r in listener.routes] == ["chat.example.com", "*.example.com"]
    assert [(r.host, r.path_prefix, r.websocket) for r in listener.routes] == [
        (None, None, None)
    ] * 2


@pytest.mark.parametrize(("text", "line"), CASES, ids=[line.split(":")[0] for _, line in CASES])
def test_each_problem_is_one_line_naming_its_key(tmp_path: Path, text: str, line: str) -> None:
    assert problems(tmp_path, text) == [line]


def test_missing_sections_and_keys(tmp_path: Path) -> None:
    assert problems(tmp_path, '[[listeners]]\nname = "l"') == [
        "listeners[0].bind: required key is missing",
        "listeners[0].default_backend: required key is missing",
        "backends: at least one backend ([[backends]]) is required",
    ]
    assert problems(tmp_path, "") == [
        "listeners: at least one listener ([[listeners]]) is required",
        "backends: at least one backend ([[backends]]) is required",
    ]
    assert problems(tmp_path, "listeners = [1]\nbackends = 2") == [
        "listeners[0]: expected a table, got integer 1",
        "backends: expected an array of tables ([[backends]]), got integer 2",
    ]


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    text = config(
        global_="workers = 0\nwrokers = 2",
        bind="8080",
        listener='mode = "udp"',
        route='[[listeners.routes]]\nbackend = "chat"',
        address="127.0.0.1:70000",
        health="[backends.health]\nrise = 0\ntimeout = -1",
    )
    assert problems(tmp_path, text) == [
        "global.workers: must be between 1 and 256, got 0",
        "global.wrokers: unknown key (did you mean 'workers'?)",
        "listeners[0].bind: expected host:port or [v6]:port, got '8080'",
        "listeners[0].mode: expected one of http, tcp, tls; got 'udp'",
        "listeners[0].routes[0].backend: unknown backend 'chat'",
        "backends[0].servers[0].address: port 70000 is out of range (1-65535)",
        "backends[0].health.timeout: must be a number of seconds > 0, got -1",
        "backends[0].health.rise: must be >= 1, got 0",
    ]


def test_config_error_message_has_one_line_per_problem(tmp_path: Path) -> None:
    with pytest.raises(LBError) as caught:
        load_config(write(tmp_path, config(global_="workers = 0\nmaxconn = 0")))
    assert str(caught.value).splitlines() == [
        "global.workers: must be between 1 and 256, got 0",
        "global.maxconn: must be >= 1, got 0",
    ]


# --- the file itself -------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[global]\nworkers = 2\nlog_level = "info\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (line,) = caught.value.problems
    assert line.startswith(f"{path}: TOML syntax error: ")
    assert "line 3" in line


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: cannot read config file: No such file or directory"]


def test_default_config_path() -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/splicelb/splicelb.toml"
