"""DNS discovery against a real DNS server (dnsmasq on 127.0.0.1): servers that come and go."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import clients
from tests.integration.dnsmasq import Dnsmasq, need_dnsmasq
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)
from tests.integration.test_server_api import first_pick, started, whoami

SRV = "_ws._tcp.chat.test"
HOST = "s.chat.test"
INTERVAL = 1.0
ECHO = Path(__file__).resolve().parents[2] / "examples" / "echo_backend.py"


@pytest.fixture(autouse=True)
def _dnsmasq() -> None:
    need_dnsmasq()


def discovery_backend(name: str, dns: Dnsmasq, keys: str, extra: str = "") -> str:
    return (
        f'[[backends]]\nname = "{name}"\n{extra}\n[backends.discovery]\n'
        f'resolvers = ["{dns.resolver}"]\ninterval = {INTERVAL}\n{keys}\n'
    )


def status(lb: SpliceLB) -> dict[str, Any]:
    done = cli("status", "-c", str(lb.config_path), "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def backend_status(lb: SpliceLB, name: str) -> dict[str, Any]:
    return next(b for b in status(lb)["backends"] if b["name"] == name)


def servers_of(lb: SpliceLB, name: str = "app") -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in backend_status(lb, name)["servers"]}


def name_of(echo: EchoBackend) -> str:
    return f"127.0.0.1:{echo.port}"


def srv(*records: tuple[EchoBackend, int]) -> list[tuple[str, str, int, int, int]]:
    return [(SRV, HOST, echo.port, 0, weight) for echo, weight in records]


def reaches_every_worker(lb: SpliceLB, port: int, server: str, since: float) -> float:
    """Send requests until both workers picked ``server``: the latest first pick."""

    def both() -> bool:
        for _ in range(4):
            whoami(port)
        return len(first_pick(lb, server, since)) == 2

    wait_until(both, 10, f"{server} in both workers")
    return max(first_pick(lb, server, since).values())


def echo_on(name: str, host: str, port: int) -> Proc:
    """The example echo backend on ``host``:``port`` (any 127.0.0.0/8 address is ours)."""
    proc = Proc([sys.executable, str(ECHO), "--name", name, "--port", str(port), "--host", host])
    wait_until(lambda: any("listening" in line for line in proc.lines), 15, f"backend {name}")
    return proc


def test_servers_added_removed_and_reweighted_in_dns_reach_every_worker(
    tmp_path: Path, procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    # two servers on one port: 127.0.0.1 and 127.0.0.2, as A records name them
    echo_port = free_port()
    procs += [echo_on("echo1", "127.0.0.1", echo_port), echo_on("echo2", "127.0.0.2", echo_port)]
    one, two = f"127.0.0.1:{echo_port}", f"127.0.0.2:{echo_port}"
    targets = [("127.0.0.1", "s1.chat.test"), ("127.0.0.2", "s2.chat.test")]
    weighted = [(SRV, f"s{i}.chat.test", echo_port, 0, 10) for i in (1, 2)]
    dns = Dnsmasq(tmp_path / "dns", hosts=[("127.0.0.1", HOST), *targets], srv=weighted)
    procs.append(dns)  # type: ignore[arg-type]  # it has kill()
    port, srv_port = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app")
            + listener(f"127.0.0.1:{srv_port}", "srv", name="srv"),
            discovery_backend("app", dns, f'name = "{HOST}"\ntype = "A"\nport = {echo_port}')
            + discovery_backend("srv", dns, f'name = "{SRV}"'),
        )
    )
    wait_until(lambda: servers_of(lb).keys() == {one}, 5, "the first answer")
    assert {whoami(port) for _ in range(6)} == {"echo1"}
    tunnel = clients.ws_tunnel(port)

    # added: every worker sends it connections within interval + 1 s of DNS saying so
    changed = time.time()
    dns.set_hosts([("127.0.0.1", HOST), ("127.0.0.2", HOST), *targets])  # re-read on SIGHUP
    reached = reaches_every_worker(lb, port, two, changed)
    assert reached - changed < INTERVAL + 1, reached - changed
    assert [e["added"] for e in lb.events("discovery")][-1] == [two]

    # removed: no worker sends it a new connection after interval + 1 s; its tunnel stays
    changed = time.time()
    dns.set_hosts([("127.0.0.2", HOST), *targets])
    wait_until(lambda: one not in servers_of(lb), INTERVAL + 1, "e1 gone from status")
    for _ in range(20):
        whoami(port)
    late = [c for c in lb.conns() if c["server"] == one and started(c) > changed]
    assert all(started(c) - changed < INTERVAL + 1 for c in late), late
    assert {whoami(port) for _ in range(6)} == {"echo2"}
    assert clients.ws_ping(tunnel)

    # re-weighted: 10 and 30 in SRV are 85 and 256 as server weights.  dnsmasq reads SRV
    # records only when it starts: it is down for a moment, and a lookup then may time
    # out (LOOKUP_TIMEOUT: the interval, 1 s) before the next one sees the change.
    assert {s["weight"] for s in servers_of(lb, "srv").values()} == {256}
    dns.set_srv([weighted[0], (SRV, "s2.chat.test", echo_port, 0, 30)])
    wait_until(lambda: servers_of(lb, "srv")[one]["weight"] == 85, 5, "weights")
    assert time.time() - dns.started_at < INTERVAL + 1 + INTERVAL
    assert servers_of(lb, "srv")[two]["weight"] == 256
    shares = Counter(whoami(srv_port) for _ in range(80))
    assert 0.65 < shares["echo2"] / 80 < 0.85, shares

    # a stopped DNS server changes nothing: same servers, one warning, the answer ages
    dns.stop()
    wait_until(lambda: backend_status(lb, "app")["discovery"]["failures"] >= 3, 15, "failures")
    found = backend_status(lb, "app")
    assert [s["name"] for s in found["servers"]] == [two]
    assert found["discovery"]["answer_age_s"] > 2
    assert "timeout" in found["discovery"]["problem"]
    assert {whoami(port) for _ in range(6)} == {"echo2"}
    assert len(servers_of(lb, "srv")) == 2
    assert sorted(e["backend"] for e in lb.events("discovery_failed")) == ["app", "srv"]
    text = cli("status", "-c", str(lb.config_path)).stdout
    assert "app: DNS answer " in text and " s old, 1 servers; " in text
    dns.start()
    wait_until(lambda: len(lb.events("discovery_recovered")) == 2, 10, "recovery")
    assert backend_status(lb, "app")["discovery"]["failures"] == 0


def test_a_server_dns_names_that_fails_its_health_check_gets_no_traffic(
    tmp_path: Path, procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    echo = EchoBackend("echo1")
    procs.append(echo)
    # A records: 127.0.0.1 (the echo backend) and 127.0.0.2, where nothing listens
    dns = Dnsmasq(tmp_path / "dns", hosts=[("127.0.0.1", HOST), ("127.0.0.2", HOST)])
    procs.append(dns)  # type: ignore[arg-type]
    port = free_port()
    health = '[backends.health]\ntype = "http"\ninterval = 0.5\ntimeout = 0.5\n'
    keys = f'name = "{HOST}"\ntype = "A"\nport = {echo.port}'
    lb = start_lb(
        config(listener(f"127.0.0.1:{port}", "app"), discovery_backend("app", dns, keys, health))
    )
    bad, good = f"127.0.0.2:{echo.port}", f"127.0.0.1:{echo.port}"
    wait_until(lambda: servers_of(lb).keys() == {bad, good}, 5, "both servers")
    seen: set[str] = set()
    while servers_of(lb)[bad]["health"] != "down":  # traffic from the moment DNS names it
        seen |= (
            {whoami(port) for _ in range(2)} if servers_of(lb)[good]["health"] == "up" else set()
        )
    assert {whoami(port) for _ in range(10)} | seen == {"echo1"}
    assert not [c for c in lb.conns() if c["server"] == bad]
    assert not lb.events("connect_failed")
    assert servers_of(lb)[bad]["check"]["result"] == "connection refused"


def test_bad_answers_are_told_and_change_only_what_they_must(
    tmp_path: Path, procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    e1, e2, e3 = (EchoBackend(f"echo{i}") for i in range(1, 4))
    procs += [e1, e2, e3]
    few = "_few._tcp.chat.test"
    records = [
        (SRV, HOST, e1.port, 0, 0),  # weight 0: the least share, not none
        (SRV, HOST, e2.port, 0, 100),
        (SRV, "gone.chat.test", 9, 0, 10),  # a target that does not resolve
        (SRV, HOST, e3.port, 1, 100),  # a lower priority: not used while priority 0 is there
        *((few, HOST, e.port, 0, 1) for e in (e1, e2, e3)),
    ]
    both = [("127.0.0.1", "v6.chat.test"), ("::1", "v6.chat.test")]
    dns = Dnsmasq(tmp_path / "dns", hosts=[("127.0.0.1", HOST), *both], srv=records)
    procs.append(dns)  # type: ignore[arg-type]
    ports = [free_port() for _ in range(3)]
    text = config(
        listener(f"127.0.0.1:{ports[0]}", "app")
        + listener(f"127.0.0.1:{ports[1]}", "nx", name="nx")
        + listener(f"127.0.0.1:{ports[2]}", "few", name="few"),
        discovery_backend("app", dns, f'name = "{SRV}"')
        + discovery_backend("nx", dns, 'name = "_none._tcp.chat.test"')
        + discovery_backend("few", dns, f'name = "{few}"\nmax_servers = 2')
        + discovery_backend("both", dns, 'name = "v6.chat.test"\ntype = "A+AAAA"\nport = 8'),
        workers=1,
    )
    lb = start_lb(text, workers=1)
    wait_until(lambda: len(servers_of(lb)) == 2 and len(servers_of(lb, "few")) == 2, 5, "answers")
    weights = {name: s["weight"] for name, s in servers_of(lb).items()}
    assert weights == {name_of(e1): 1, name_of(e2): 256}
    refused = cli("server", "remove", "-c", str(lb.config_path), f"app/{name_of(e1)}")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"splicelb: app/{name_of(e1)} comes from DNS (the backend's discovery): change its records"
    )
    warnings = [e["reason"] for e in lb.events("discovery_skipped")]
    assert "SRV target gone.chat.test does not resolve: left out" in warnings
    assert "no SRV record for _none._tcp.chat.test" in warnings
    assert "3 servers in DNS, 1 ignored: raise backends[2].discovery.max_servers" in warnings
    assert len(warnings) == 3  # once each, however many lookups since
    # a name that does not resolve: no server, 503
    assert servers_of(lb, "nx") == {}
    assert (
        clients.status_of(clients.exchange(ports[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == 503
    )
    assert backend_status(lb, "few")["discovery"]["servers"] == 2
    wait_until(lambda: sorted(servers_of(lb, "both")) == ["127.0.0.1:8", "[::1]:8"], 5, "A+AAAA")

    # an empty answer empties the backend only once two more lookups confirm it
    dns.set_srv([])
    answered = dns.started_at
    wait_until(lambda: not servers_of(lb), 10, "the backend to empty")
    emptied = time.time()
    assert emptied - answered > 1.5  # two confirmations, a second apart
    assert lb.events("discovery_empty")
    assert (
        clients.status_of(clients.exchange(ports[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == 503
    )
