"""Load and validate the splicelb config file (TOML).

Theory of operation: the raw TOML dict is walked once, table by table, through
``Table``, which reads typed values, records which keys it used (the rest are
reported as unknown) and appends one line per problem, prefixed by the key
path, to a list shared by the whole walk.  A value that is missing or invalid
is replaced by a placeholder so the walk can go on and report every problem;
``parse_config`` raises ``ConfigError`` whenever the list is not empty, so no
placeholder ever leaves this module.  Host names are resolved once, here.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from lb.config_table import Address, Table, describe
from lb.discovery_config import MAX_SPARE, Discovery, parse_discovery
from lb.errors import ConfigError, ProtocolError
from lb.proto.tls import normalize_server_name
from lb.proto.uri import normalize_host, normalize_path
from lb.tls import ListenerTLS, parse_tls

DEFAULT_CONFIG_PATH = "/etc/splicelb/splicelb.toml"
DEFAULT_RUNTIME_DIR = "/run/splicelb"

MAX_WORKERS = 256
# After a turn that found work, a worker polls on (yielding the CPU between polls)
# this long before it sleeps: the next event is then met without a wake-up.
DEFAULT_BUSY_POLL_US = 50
MAX_BUSY_POLL_US = 10_000
MAX_WEIGHT = 256
LISTENER_MODES = ("http", "tcp", "tls")
DEFAULT_TLS_HEAD_TIMEOUT = 5.0
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "random2", "hash", "source")
HASH_SOURCES = ("source", "header", "cookie", "query")  # hash_key: "source" or "KIND:NAME"
HEALTH_TYPES = ("http", "https", "tcp")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
ON_SERVER_DOWN = ("keep", "close")
SEND_PROXY = {"v1": 1, "v2": 2}  # PROXY protocol versions a backend may send

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HOST_RE = re.compile(r"[a-z0-9_.-]+|\[[0-9a-f:.]+\]")
_ORIGIN_RE = re.compile(r"[a-z][a-z0-9+.-]*://(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
# What a path prefix may hold: RFC 3986 path characters, but ";" (path parameters are
# left out of routing, see lb.route).
_PREFIX_RE = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,=:@/]*")
_STATUS_RE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")
# A query parameter's name as written in the target: no separator, space or control.
_QUERY_NAME_RE = re.compile(r"[!-~]+")


@dataclass(frozen=True, slots=True)
class GlobalConfig:
    """The ``[global]`` table; every key is optional."""

    workers: int
    runtime_dir: str
    drain_timeout: float
    admin_bind: Address | None  # None: admin endpoint off
    admin_hosts: tuple[str, ...]  # lowercased Host names it answers besides its own (lb.admin)
    maxconn: int
    log_level: str
    log_format: str
    worker_timeout: float  # heartbeat staleness before a worker is replaced
    busy_poll_us: int  # a worker's poll without sleeping after work, µs; 0 = off
    close_spread: float  # tunnels that must end close at random times over this (lb.worker.closing)


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[[listeners.routes]]`` entry; first match wins, None = not checked."""

    backend: str
    websocket: bool | None = None
    host: str | None = None  # in normal form (lb.proto.uri): lowercased, without port
    path_prefix: str | None = None  # in normal form (lb.proto.uri)
    sni: str | None = None  # mode = "tls": a server name or "*.domain", lowercased, no final dot


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    bind: Address
    mode: str  # "http" | "tcp" | "tls"
    default_backend: str
    allowed_origins: tuple[str, ...]  # lowercased, no trailing "/"; empty = any
    head_timeout: float
    tunnel_timeout: float
    routes: tuple[Route, ...]
    max_tunnel_age: float = 0.0  # tunnels older than this (+/-10%) are closed; 0 = never
    forwarded_headers: bool = True  # http: X-Forwarded-* and Forwarded in the forwarded head
    trusted_proxies: tuple[str, ...] = ()  # CIDRs (normalized) whose forwarding is trusted
    accept_proxy: bool = False  # a PROXY header is required from trusted_proxies (lb.proto.proxy)
    # Per client address (an IPv6 one by its /64), shared by all workers (lb.pool.clients):
    client_maxconn: int = 0  # open connections; 0 = no limit
    client_rate: float = 0.0  # new connections per second; 0 = no limit
    client_burst: int = 0  # new connections at once, the bucket's size (0 only without a rate)
    tls_head_timeout: float = DEFAULT_TLS_HEAD_TIMEOUT  # mode = "tls": the whole ClientHello's
    tls: ListenerTLS | None = None  # [listeners.tls]: TLS is terminated here (lb.tls)

    @property
    def first_bytes_timeout(self) -> float:
        """What bounds the read before routing (a PROXY header, then the head or the hello)."""
        return self.tls_head_timeout if self.mode == "tls" else self.head_timeout

    @property
    def limits_clients(self) -> bool:
        return bool(self.client_maxconn or self.client_rate)


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    address: Address
    weight: int = 1
    maxconn: int = 0  # 0 = unlimited


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: str  # http | https | tcp
    path: str = "/healthz"
    method: str = "GET"
    host: str = ""  # Host header; empty = the server address
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)  # inclusive ranges
    expect_body: str = ""  # substring; empty = not checked
    interval: float = 2
    timeout: float = 1
    rise: int = 2
    fall: int = 3
    ca_file: str = ""  # absolute path (a relative one is taken from the config's dir)
    sni: str = ""
    verify: bool = True


@dataclass(frozen=True, slots=True)
class HashKey:
    """What ``balance = "hash"`` hashes: the client's address (``source``), or the value
    of a header, cookie or query parameter of the request, if it has one."""

    source: str = "source"  # source | header | cookie | query
    name: str = ""  # the header (lowercased), cookie or query parameter; "" for source


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    balance: str  # roundrobin | leastconn | random2 | hash ("source" is loaded as hash)
    connect_timeout: float
    retries: int
    servers: tuple[Server, ...]
    health: HealthCheck | None  # None: servers count as up
    on_reload: str = "handover"  # open tunnels on reload: "handover" to the new workers, or "close"
    on_server_down: str = "keep"  # "close": a server down or in maint has its tunnels closed
    hash_key: HashKey = HashKey()  # balance = "hash": what is hashed
    hash_balance_factor: int = 0  # balance = "hash": a server's bound in % of the average; 0 = off
    slowstart: float = 0.0  # a server back in rotation ramps up to its weight over this; 0 = off
    # local addresses to connect from, used in turn (each family its own); () = the kernel's
    source: tuple[tuple[int, str], ...] = ()
    send_proxy: int = 0  # PROXY protocol version sent to its servers (and checks); 0 = none
    spare_servers: int = 0  # slots for servers added at runtime (splicelb server add)
    discovery: Discovery | None = None  # servers named by DNS, in slots of their own
    tls: BackendTLS | None = None  # tls = true: its servers are reached over TLS

    @property
    def dns_slots(self) -> int:
        """The spare slots reserved for the servers DNS names."""
        return self.discovery.max_servers if self.discovery is not None else 0


@dataclass(frozen=True, slots=True)
class BackendTLS:
    """``tls = true`` on a backend: how its servers' certificates are checked."""

    ca_file: str = ""  # absolute; trusted besides the system CAs
    sni: str = ""  # the name sent and verified; "" = each server's address host
    verify: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    global_: GlobalConfig
    listeners: tuple[Listener, ...]
    backends: tuple[Backend, ...]
    path: str  # the file it was loaded from

    def backend(self, name: str) -> Backend:
        """The backend called ``name``; KeyError if there is none."""
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


_Named = TypeVar("_Named", Listener, Backend, Server)


def _parse_global(t: Table) -> GlobalConfig:
    admin_text = t.string("admin_bind", "127.0.0.1:9900")
    drain_timeout = t.seconds("drain_timeout", 30, allow_zero=True)
    config = GlobalConfig(
        workers=t.integer("workers", min(os.cpu_count() or 1, MAX_WORKERS), 1, MAX_WORKERS),
        runtime_dir=t.string("runtime_dir", DEFAULT_RUNTIME_DIR),
        drain_timeout=drain_timeout,
        admin_bind=t.address("admin_bind", admin_text) if admin_text else None,
        admin_hosts=_parse_admin_hosts(t),
        maxconn=t.integer("maxconn", 10000, 1),
        log_level=t.choice("log_level", "info", LOG_LEVELS),
        log_format=t.choice("log_format", "json", LOG_FORMATS),
        worker_timeout=t.seconds("worker_timeout", 30),
        busy_poll_us=t.integer("busy_poll_us", DEFAULT_BUSY_POLL_US, 0, MAX_BUSY_POLL_US),
        close_spread=_parse_close_spread(t, drain_timeout),
    )
    if not config.runtime_dir:
        t.problem("runtime_dir", "must not be empty")
    t.finish()
    return config


def _parse_close_spread(t: Table, drain_timeout: float) -> float:
    """The last stretch of ``drain_timeout`` over which a stop closes what is left (default:
    its second half): at most ``drain_timeout``, which ends every close."""
    spread = t.seconds("close_spread", drain_timeout / 2, allow_zero=True)
    if 0 <= drain_timeout < math.inf and spread > drain_timeout:
        t.problem(
            "close_spread",
            f"must not be more than drain_timeout ({drain_timeout:g} s), got {spread:g}",
        )
    return spread


def _host_name_problem(text: str) -> str | None:
    """What is wrong with a host name written without port, if anything."""
    host = text.lower()
    if not host:
        return "must not be empty"
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"'{text[1:-1]}' is not an IPv6 address"
        return None
    if host.count(":") > 1 and not host.startswith("["):
        return f"an IPv6 address needs brackets, e.g. '[::1]'; got '{text}'"
    if not _HOST_RE.fullmatch(host):
        return f"expected a host name without port, got '{text}'"
    return None


def _parse_admin_hosts(t: Table) -> tuple[str, ...]:
    hosts = []
    for path, value in t.items("admin_hosts", "an array of strings"):
        if not isinstance(value, str):
            t.problems.append(f"{path}: expected a string, got {describe(value)}")
            continue
        if problem := _host_name_problem(value):
            t.problems.append(f"{path}: {problem}")
        hosts.append(value.lower())
    return tuple(hosts)


def _backend_ref(t: Table, key: str, backends: set[Any]) -> str:
    name = t.string(key)
    if isinstance(t.data.get(key), str) and name not in backends:
        t.problem(key, f"unknown backend '{name}'")
    return name


def _parse_route(t: Table, backends: set[Any], mode: str) -> Route:
    websocket = t.get("websocket", (bool,), "a boolean", False)
    host = t.get("host", (str,), "a string", False)
    prefix = t.get("path_prefix", (str,), "a string", False)
    sni = t.get("sni", (str,), "a string", False)
    if sni is not None:
        normal_sni = _normal_sni(sni)
        if isinstance(normal_sni, str) and mode != "tls":
            t.problem("sni", 'needs mode = "tls" (only a tls listener reads the server name)')
        elif not isinstance(normal_sni, str):
            t.problem("sni", normal_sni.reason)
        sni = normal_sni if isinstance(normal_sni, str) else None
    if mode == "tls":
        for key in ("websocket", "host", "path_prefix"):
            if key in t.data:
                t.problem(
                    key,
                    'needs mode = "http" (a tls listener does not read the request;'
                    " route on the server name with sni)",
                )
    if host is not None:
        problem = _host_name_problem(host)
        normal = None if problem else normalize_host(host)
        if normal is None:
            t.problem("host", problem or f"expected a host name without port, got '{host}'")
        host = normal
    if prefix is not None and (problem := _prefix_problem(prefix)):
        t.problem("path_prefix", problem)
    route = Route(_backend_ref(t, "backend", backends), websocket, host, prefix, sni)
    t.finish()
    return route


@dataclass(frozen=True, slots=True)
class _SniProblem:
    reason: str


def _normal_sni(text: str) -> str | _SniProblem:
    """An ``sni`` route's name as routes compare it: lower case, without a trailing dot;
    ``*.`` before a name matches one more label."""
    wildcard = text.startswith("*.")
    name = normalize_server_name(text[2 if wildcard else 0 :].encode("utf-8", "replace"))
    if name is None:
        return _SniProblem(
            f"expected a host name, or '*.' and a domain (one label more), got '{text}'"
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return "*." + name if wildcard else name
    return _SniProblem(f"clients send no server name for an IP address, got '{text}'")


def _prefix_problem(prefix: str) -> str | None:
    """What is wrong with a ``path_prefix``, if anything: requests are routed on their path
    in normal form, so a prefix in any other form could never match."""
    if not prefix.startswith("/"):
        return f"must start with '/', got '{prefix}'"
    if "?" in prefix or "#" in prefix:
        return f"a query or fragment is not part of the path, got '{prefix}'"
    if ";" in prefix:
        return f"path parameters (';') are left out of routing: leave them out, got '{prefix}'"
    if not _PREFIX_RE.fullmatch(prefix):
        escaped = urllib.parse.quote(prefix, safe="-._~%!$&'()*+,=:@/")
        return f"characters outside a URI path must be %XX escapes: write '{escaped}'"
    try:
        normal = normalize_path(prefix)
    except ProtocolError as exc:
        return f"{exc.reason}, got '{prefix}'"
    if normal != prefix:
        return f"requests are routed on their normalized path: write '{normal}'"
    return None


def _parse_origins(t: Table) -> tuple[str, ...]:
    origins = []
    for path, value in t.items("allowed_origins", "an array of strings"):
        if not isinstance(value, str):
            t.problems.append(f"{path}: expected a string, got {describe(value)}")
            continue
        origin = value.lower().rstrip("/")
        if origin != "null" and not _ORIGIN_RE.fullmatch(origin):
            t.problems.append(f"{path}: expected scheme://host[:port] or 'null', got '{value}'")
        origins.append(origin)
    return tuple(origins)


def _parse_trusted_proxies(t: Table) -> tuple[str, ...]:
    networks = []
    for path, value in t.items("trusted_proxies", "an array of strings"):
        if not isinstance(value, str):
            t.problems.append(f"{path}: expected a string, got {describe(value)}")
            continue
        try:
            networks.append(str(ipaddress.ip_network(value)))
        except ValueError:
            t.problems.append(f"{path}: {_network_problem(value)}")
    return tuple(networks)


def _network_problem(text: str) -> str:
    """Why ``text`` is not an address or a CIDR network (ipaddress says it less plainly)."""
    address, _, bits = text.partition("/")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return f"expected an IP address or a network such as '10.0.0.0/8', got '{text}'"
        return f"'{bits}' is not a prefix length for '{address}'"
    return f"'{text}' has host bits set; did you mean '{network}'?"


def _parse_listener(t: Table, backends: set[Any], base_dir: str) -> Listener:
    tls_table = t.table("tls")
    listener = Listener(
        name=t.name(),
        bind=t.address("bind"),
        mode=(mode := t.choice("mode", "http", LISTENER_MODES)),
        default_backend=_backend_ref(t, "default_backend", backends),
        allowed_origins=_parse_origins(t),
        head_timeout=t.seconds("head_timeout", 5),
        tunnel_timeout=t.seconds("tunnel_timeout", 3600),
        routes=tuple(_parse_route(r, backends, mode) for r in t.tables("routes")),
        max_tunnel_age=t.seconds("max_tunnel_age", 0, allow_zero=True),
        forwarded_headers=t.get("forwarded_headers", (bool,), "a boolean", False) is not False,
        trusted_proxies=_parse_trusted_proxies(t),
        accept_proxy=t.get("accept_proxy", (bool,), "a boolean", False) is True,
        client_maxconn=t.integer("client_maxconn", 0, 0),
        client_rate=(rate := _parse_client_rate(t)),
        client_burst=_parse_client_burst(t, rate),
        tls_head_timeout=t.seconds("tls_head_timeout", DEFAULT_TLS_HEAD_TIMEOUT),
        tls=None if tls_table is None else parse_tls(tls_table, base_dir),
    )
    if listener.tls is not None and listener.mode != "http":
        t.problem("tls", f'terminates TLS on mode = "http" listeners only, not "{listener.mode}"')
    if listener.mode != "tls" and "tls_head_timeout" in t.data:
        t.problem("tls_head_timeout", 'needs mode = "tls" (the ClientHello\'s deadline)')
    if listener.mode == "tls" and "head_timeout" in t.data:
        t.problem(
            "head_timeout",
            'a mode = "tls" listener reads no HTTP head: its ClientHello has tls_head_timeout',
        )
    if listener.mode != "http":
        why = f'needs mode = "http" (a {listener.mode} listener does not read the request)'
        if listener.routes and listener.mode == "tcp":
            t.problem("routes", why)
        if listener.allowed_origins:
            t.problem("allowed_origins", why)
        if t.data.get("forwarded_headers") is True:
            t.problem("forwarded_headers", why)
        if listener.trusted_proxies and not listener.accept_proxy:
            t.problem(
                "trusted_proxies",
                f"does nothing on a {listener.mode} listener without accept_proxy = true"
                f" (a {listener.mode} listener reads no forwarded fields)",
            )
    if listener.accept_proxy and not listener.trusted_proxies:
        t.problem(
            "accept_proxy",
            "needs trusted_proxies: the peers that send a PROXY header"
            ' (e.g. trusted_proxies = ["10.0.0.0/8"])',
        )
    t.finish()
    return listener


def _parse_client_rate(t: Table) -> float:
    """New connections per second per client; 0: no limit."""
    rate = t.get("client_rate", (int, float), "a number of connections per second", False)
    if rate is None:
        return 0.0
    if not math.isfinite(rate) or rate < 0:
        t.problem("client_rate", f"must be a number of connections per second >= 0, got {rate}")
        return 0.0
    return float(rate)


def _parse_client_burst(t: Table, rate: float) -> int:
    """How many new connections a client may open at once (the bucket's size); default
    one second's worth of ``client_rate``, at least 1; it needs a rate to refill it."""
    burst = t.integer("client_burst", max(1, math.ceil(rate)) if rate else 0, 1)
    if "client_burst" in t.data and not rate:
        t.problem("client_burst", "needs client_rate (the rate at which the burst refills)")
    return burst


def _parse_status(value: Any) -> tuple[int, int] | str:
    """One expect_status entry (204, "204" or "200-399"), or what is wrong with it."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (match := _STATUS_RE.fullmatch(value)):
        low = int(match[1])
        high = int(match[2]) if match[2] else low
    else:
        return f'expected a status like 204, "204" or "200-399", got {describe(value)}'
    for status in (low, high):
        if not 100 <= status <= 599:
            return f"status {status} is out of range (100-599)"
    if low > high:
        return f"range '{value}' starts above its end"
    return low, high


def _parse_expect_status(t: Table) -> tuple[tuple[int, int], ...]:
    if "expect_status" not in t.data:
        return ((200, 399),)
    if t.data["expect_status"] == []:
        t.problem("expect_status", "must list at least one status or range")
    ranges = []
    for entry_path, entry in t.items("expect_status", "an array of statuses"):
        found = _parse_status(entry)
        if isinstance(found, str):
            t.problems.append(f"{entry_path}: {found}")
        else:
            ranges.append(found)
    return tuple(ranges)


def _parse_health(t: Table, base_dir: str) -> HealthCheck:
    method = t.string("method", "GET").upper()
    if not _TOKEN_RE.fullmatch(method):
        t.problem("method", f"'{method}' is not an HTTP method")
    ca_file = t.string("ca_file", "")
    if ca_file:
        ca_file = os.path.join(base_dir, ca_file)
        if not os.path.isfile(ca_file):
            t.problem("ca_file", f"no such file: '{ca_file}'")
    health = HealthCheck(
        type=t.choice("type", "http", HEALTH_TYPES),
        path=t.string("path", "/healthz"),
        method=method,
        host=t.string("host", ""),
        expect_status=_parse_expect_status(t),
        expect_body=t.string("expect_body", ""),
        interval=t.seconds("interval", 2),
        timeout=t.seconds("timeout", 1),
        rise=t.integer("rise", 2, 1),
        fall=t.integer("fall", 3, 1),
        ca_file=ca_file,
        sni=t.string("sni", ""),
        verify=t.get("verify", (bool,), "a boolean", False) is not False,
    )
    if not health.path.startswith("/"):
        t.problem("path", f"must start with '/', got '{health.path}'")
    t.finish()
    return health


def _parse_server(t: Table) -> Server:
    server = Server(
        name=t.name(),
        address=t.address("address"),
        weight=t.integer("weight", 1, 1, MAX_WEIGHT),
        maxconn=t.integer("maxconn", 0, 0),
    )
    t.finish()
    return server


def _check_unique(items: Iterable[tuple[str, Any, str]], what: str, problems: list[str]) -> None:
    """One problem per (path, key, shown) whose key an earlier item has; empty keys skipped."""
    first: dict[Any, str] = {}
    for path, key, shown in items:
        if key and key in first:
            problems.append(f"{path}: duplicate {what} '{shown}' (first at {first[key]})")
        first.setdefault(key, path)


def _parse_all(
    t: Table, key: str, what: str, parse: Callable[[Table], _Named], required: bool = True
) -> list[tuple[Table, _Named]]:
    """Parse each table of the array ``[[key]]`` (``required``: at least one); their names
    must be unique."""
    tables = t.tables(key)
    if required and t.data.get(key, []) == []:
        header = re.sub(r"\[[0-9]+\]", "", t.key_path(key))
        t.problem(key, f"at least one {what} ([[{header}]]) is required")
    parsed = [(table, parse(table)) for table in tables]
    names = [(f"{table.path}.name", x.name, x.name) for table, x in parsed]
    _check_unique(names, f"{what} name", t.problems)
    return parsed


ON_RELOAD = ("handover", "close")


def _parse_hash_key(t: Table, balance: str) -> HashKey:
    """``hash_key``: "source", "header:NAME", "cookie:NAME" or "query:NAME"."""
    text = t.string("hash_key", "source")
    source, _, name = text.partition(":")
    if problem := _hash_key_problem(text, source, name):
        t.problem("hash_key", problem)
    elif source != "source" and balance == "source":
        t.problem("hash_key", 'needs balance = "hash" (balance = "source" hashes the address only)')
    elif source != "source" and balance != "hash":
        t.problem("hash_key", f'needs balance = "hash", not "{balance}"')
    return HashKey(source, name.lower() if source == "header" else name)


_EXAMPLE_KEYS = {"header": "X-Session-Id", "cookie": "sid", "query": "sid"}


def _hash_key_problem(text: str, source: str, name: str) -> str | None:
    if source not in HASH_SOURCES:
        return f"expected source, header:NAME, cookie:NAME or query:NAME; got '{text}'"
    if source == "source":
        return None if text == "source" else f"'source' takes no name; got '{text}'"
    if not name:
        return f"'{source}:' needs a name, e.g. '{source}:{_EXAMPLE_KEYS[source]}'"
    if source == "query":
        if "&" in name or "=" in name or not _QUERY_NAME_RE.fullmatch(name):
            return f"'{name}' is not a query parameter name (no '&', '=', space or control)"
    elif not _TOKEN_RE.fullmatch(name):
        return f"'{name}' is not a valid {source} name (letters, digits and !#$%&'*+-.^_`|~)"
    return None


def _parse_hash_balance_factor(t: Table, balance: str) -> int:
    factor = t.integer("hash_balance_factor", 0, 0)
    if factor and factor <= 100:
        t.problem(
            "hash_balance_factor",
            f"must be 0 (off) or more than 100 (a percentage of the average load), got {factor}",
        )
    elif factor and balance not in ("hash", "source"):
        t.problem("hash_balance_factor", f'needs balance = "hash", not "{balance}"')
    return factor


def _parse_backend(t: Table, base_dir: str) -> Backend:
    name = t.name()
    discovery_table = t.table("discovery")
    discovery = parse_discovery(discovery_table) if discovery_table is not None else None
    spare_servers = t.integer("spare_servers", 0, 0, MAX_SPARE)
    # Servers that come and go (DNS, splicelb server add) may be all a backend has.
    dynamic = discovery is not None or spare_servers > 0
    servers = [
        server for _, server in _parse_all(t, "servers", "server", _parse_server, not dynamic)
    ]
    health = t.table("health")
    balance = t.choice("balance", "roundrobin", BALANCE_ALGORITHMS)
    backend = Backend(
        name=name,
        balance="hash" if balance == "source" else balance,  # source: hash_key = "source"
        connect_timeout=t.seconds("connect_timeout", 3),
        retries=t.integer("retries", 2, 0),
        servers=tuple(servers),
        health=None if health is None else _parse_health(health, base_dir),
        on_reload=t.choice("on_reload", "handover", ON_RELOAD),
        on_server_down=t.choice("on_server_down", "keep", ON_SERVER_DOWN),
        hash_key=_parse_hash_key(t, balance),
        hash_balance_factor=_parse_hash_balance_factor(t, balance),
        slowstart=t.seconds("slowstart", 0, allow_zero=True),
        source=_parse_source(t),
        send_proxy=_parse_send_proxy(t),
        spare_servers=spare_servers,
        discovery=discovery,
        tls=_parse_backend_tls(t, base_dir),
    )
    t.finish()
    return backend


def _parse_backend_tls(t: Table, base_dir: str) -> BackendTLS | None:
    """``tls = true`` and its ``ca_file``, ``sni``, ``verify`` (as for health checks)."""
    on = t.get("tls", (bool,), "a boolean", False) is True
    ca_file = t.string("ca_file", "")
    sni = t.string("sni", "")
    verify = t.get("verify", (bool,), "a boolean", False) is not False
    if not on:
        for key in ("ca_file", "sni", "verify"):
            if key in t.data:
                t.problem(key, "needs tls = true (its servers reached over TLS)")
        return None
    if ca_file:
        ca_file = os.path.join(base_dir, ca_file)
        if not os.path.isfile(ca_file):
            t.problem("ca_file", f"no such file: '{ca_file}'")
    if sni and (problem := _host_name_problem(sni)):
        t.problem("sni", problem)
    return BackendTLS(ca_file, sni, verify)


def _parse_source(t: Table) -> tuple[tuple[int, str], ...]:
    """``source``: IP addresses without port, each once; (family, address) pairs."""
    found: list[tuple[int, str]] = []
    for path, value in t.items("source", 'an array of IP addresses, e.g. ["127.0.0.2"]'):
        try:
            ip = ipaddress.ip_address(value if isinstance(value, str) else "")
        except ValueError:
            t.problems.append(f"{path}: expected an IP address without port, got {value!r}")
            continue
        pair = (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))
        if pair in found:
            t.problems.append(f"{path}: {ip} is listed twice")
        else:
            found.append(pair)
    return tuple(found)


def _parse_send_proxy(t: Table) -> int:
    value = t.get("send_proxy", (str,), 'a string ("v1" or "v2")', False)
    if value is None:
        return 0
    if value not in SEND_PROXY:
        versions = " or ".join(f'"{version}"' for version in SEND_PROXY)
        t.problem("send_proxy", f"expected {versions} (leave the key out for none), got '{value}'")
        return 0
    return SEND_PROXY[value]


def parse_config(data: dict[str, Any], path: str = "<memory>") -> Config:
    """Validate an already-parsed TOML document; ConfigError lists every problem."""
    problems: list[str] = []
    root = Table(data, "", problems)
    global_table = root.table("global") or Table({}, "global", problems, root.elsewhere)
    global_ = _parse_global(global_table)
    root.elsewhere["[global]"] = global_table.keys_read()  # where a misplaced key may belong
    raw_backends = data["backends"] if isinstance(data.get("backends"), list) else []
    backend_names = {b.get("name") for b in raw_backends if isinstance(b, dict)}
    base_dir = os.getcwd() if path.startswith("<") else os.path.dirname(os.path.abspath(path))
    listeners = _parse_all(
        root, "listeners", "listener", lambda t: _parse_listener(t, backend_names, base_dir)
    )
    binds = [(f"{t.path}.bind", x.bind.sockaddr, str(x.bind)) for t, x in listeners]
    _check_unique(binds, "bind address", problems)
    backends = _parse_all(root, "backends", "backend", lambda t: _parse_backend(t, base_dir))
    root.finish()
    if problems:
        raise ConfigError(problems)
    return Config(global_, tuple(x for _, x in listeners), tuple(x for _, x in backends), path)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML file as a dict, not yet validated; ConfigError if it cannot be read."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8 (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``; ConfigError lists every problem."""
    return parse_config(read_toml(path), os.fspath(path))


def runtime_dir_of(path: str | os.PathLike[str]) -> str:
    """Where the instance started from this file keeps its runtime files.

    Read without validating the rest, so that ``splicelb reload`` can reach the
    running instance (and have it report the problems) when the file has just
    been broken.
    """
    table = read_toml(path).get("global", {})
    value = table.get("runtime_dir", DEFAULT_RUNTIME_DIR) if isinstance(table, dict) else None
    if not isinstance(value, str) or not value:
        return DEFAULT_RUNTIME_DIR
    return value


PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def local_ports(path: str = PORT_RANGE) -> tuple[int, int] | None:
    """This host's ephemeral port range (``net.ipv4.ip_local_port_range``), if readable."""
    try:
        with open(path) as file:
            low, high = (int(x) for x in file.read().split())
    except (OSError, ValueError):
        return None
    return low, high


def capacity_warnings(config: Config, ports: tuple[int, int]) -> list[str]:
    """Backends that cannot hold ``global.maxconn`` tunnels: each tunnel takes a local
    port toward its server, from each source address (one when the kernel chooses)."""
    per_address = ports[1] - ports[0] + 1
    warnings = []
    for i, backend in enumerate(config.backends):
        families = [family for family, _ in backend.source]
        capacity = sum(
            per_address * max(1, families.count(s.address.family)) for s in backend.servers
        )
        if backend.spare_servers or backend.discovery is not None:
            continue  # its servers come and go: no count to hold maxconn against
        if config.global_.maxconn > capacity:
            addresses = len(backend.source) or 1
            warnings.append(
                f"backends[{i}] ({backend.name}): global.maxconn {config.global_.maxconn} is above"
                f" the {capacity} tunnels its {len(backend.servers)} servers can take from"
                f" {addresses} source address{'es' if addresses > 1 else ''} with"
                f" net.ipv4.ip_local_port_range {ports[0]}-{ports[1]} ({per_address} ports);"
                " add addresses to its source, widen the port range, or add servers"
            )
    return warnings
