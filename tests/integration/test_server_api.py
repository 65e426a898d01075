"""The runtime server API: ``splicelb server add|remove|weight`` on a running instance."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    LoadGen,
    Proc,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

WHOAMI = b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
ADD_WITHIN = 0.1  # seconds: a change reaches every worker's next connection within this


def whoami(port: int) -> str:
    return clients.exchange(port, WHOAMI).rsplit(b"\n", 1)[-1].decode()


def server(lb: SpliceLB, *args: str) -> str:
    done = cli("server", args[0], "-c", str(lb.config_path), *args[1:])
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def refused(lb: SpliceLB, *args: str) -> str:
    done = cli("server", args[0], "-c", str(lb.config_path), *args[1:])
    assert done.returncode != 0, done.stdout
    return done.stderr.strip()


def status(lb: SpliceLB) -> dict[str, object]:
    done = cli("status", "-c", str(lb.config_path), "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def servers_of(lb: SpliceLB) -> dict[str, dict[str, object]]:
    [app] = status(lb)["backends"]  # type: ignore[misc]
    return {s["name"]: s for s in app["servers"]}


def wall(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def started(conn: dict[str, object]) -> float:
    return wall(conn) - float(conn["duration_ms"]) / 1000  # type: ignore[arg-type]


def first_pick(lb: SpliceLB, name: str, after: float) -> dict[int, float]:
    """When each worker first sent a connection to ``name`` (its start, wall clock)."""
    firsts: dict[int, float] = {}
    for conn in lb.conns():
        if conn["server"] == name and started(conn) >= after - 0.05:
            pid = int(conn["pid"])
            firsts[pid] = min(firsts.get(pid, float("inf")), started(conn))
    return firsts


def conns_since(lb: SpliceLB, since: float) -> int:
    return sum(1 for c in lb.conns() if started(c) > since)


def test_servers_added_and_removed_under_load_lose_no_connection_and_take_their_share(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    echoes = [EchoBackend(f"echo{i}") for i in range(1, 4)]
    procs.extend(echoes)
    port = free_port()
    text = config(
        listener(f"127.0.0.1:{port}", "app"),
        backend("app", [("a1", echoes[0].address)], "spare_servers = 4"),
    )
    lb = start_lb(text)
    tunnel = clients.ws_tunnel(port)  # on a1; later on b1 too
    load = LoadGen(port, rate=200, duration=10)
    procs.append(load)
    wait_until(lambda: len(lb.conns()) >= 200, 10, "the load to run")
    assert server(lb, "add", "app/b1", echoes[1].address) == (
        f"app/b1: added at {echoes[1].address}, weight 1"
    )
    [added] = lb.events("server_add")
    # every worker's next connections go to it: within 100 ms of the answer
    wait_until(lambda: len(first_pick(lb, "b1", wall(added))) == 2, 5, "b1 in both workers")
    assert max(first_pick(lb, "b1", wall(added)).values()) - wall(added) < ADD_WITHIN
    wait_until(lambda: conns_since(lb, wall(added)) >= 100, 10, "load on b1")
    b1_tunnel = clients.ws_tunnel(port)  # round robin: the next goes to the other server
    clients.ws_tunnel(port)
    server(lb, "add", "app/b2", echoes[2].address, "--weight", "2")
    [b2_added] = lb.events("server_add")[1:]
    wait_until(lambda: conns_since(lb, wall(b2_added) + 0.1) >= 300, 10, "load on b2")
    server(lb, "remove", "app/b1")
    [removed] = lb.events("server_remove")
    wait_until(lambda: conns_since(lb, wall(removed) + 0.1) >= 200, 10, "load after")
    summary = load.summary(30)
    assert summary["failures"] == [], summary["failures"][:5]
    assert summary["requests_ok"] >= 1500
    # shares while a1, b1 and b2 (weight 2) were in: 1/4, 1/4, 1/2
    window = [
        c
        for c in lb.conns()
        if wall(b2_added) + 0.1 < started(c) < wall(removed) and c["status"] is None
    ]
    shares = Counter(c["server"] for c in window)
    assert len(window) >= 200, shares
    assert abs(shares["b2"] / len(window) - 0.5) < 0.1, shares
    assert abs(shares["b1"] / len(window) - 0.25) < 0.1, shares
    after = Counter(c["server"] for c in lb.conns() if started(c) > wall(removed) + 0.1)
    assert after["b1"] == 0 and after["a1"] and after["b2"], after
    # the tunnels stay, b1's included
    assert clients.ws_ping(tunnel) and clients.ws_ping(b1_tunnel)
    listed = servers_of(lb)
    assert (listed["a1"]["source"], listed["b2"]["source"], listed["b2"]["weight"]) == (
        "config",
        "api",
        2,
    )
    assert "b1" not in listed
    assert listed["b2"]["total"] == sum(1 for c in lb.conns() if c["server"] == "b2")


def test_added_servers_survive_a_reload_and_a_weight_change_takes_effect(
    start_lb: Callable[..., SpliceLB], echo_pair: tuple[EchoBackend, EchoBackend]
) -> None:
    a, b = echo_pair
    port = free_port()
    admin = f"127.0.0.1:{free_port()}"
    text = config(
        listener(f"127.0.0.1:{port}", "app"),
        backend("app", [("a1", a.address)], "spare_servers = 2"),
        workers=1,
        admin_bind=admin,
    )
    lb = start_lb(text, workers=1)
    server(lb, "add", "app/b1", b.address)
    assert Counter(whoami(port) for _ in range(10)) == {"echo1": 5, "echo2": 5}
    assert server(lb, "weight", "app/b1", "4") == "app/b1: weight 1 -> 4"
    assert Counter(whoami(port) for _ in range(10)) == {"echo1": 2, "echo2": 8}
    counted = 'splicelb_server_connections_total{backend="app",server="b1"} 13.0'

    def metrics() -> str:
        return str(urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode())

    wait_until(lambda: counted in metrics(), 5, "b1's total in the metrics")  # 10 ms late
    done = cli("reload", "-c", str(lb.config_path))
    assert done.returncode == 0, done.stderr
    listed = servers_of(lb)
    assert (listed["b1"]["source"], listed["b1"]["weight"], listed["b1"]["total"]) == ("api", 4, 13)
    assert Counter(whoami(port) for _ in range(10)) == {"echo1": 2, "echo2": 8}


def test_bad_requests_get_clear_answers(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    a = EchoBackend("echo1")
    procs.append(a)
    port = free_port()
    text = config(
        listener(f"127.0.0.1:{port}", "app"),
        backend("app", [("a1", a.address)], "spare_servers = 1")
        + backend("fixed", [("f1", a.address)]),
        workers=1,
    )
    lb = start_lb(text, workers=1)
    assert (
        refused(lb, "add", "nope/x", a.address)
        == "splicelb: no backend 'nope'; the backends: app, fixed"
    )
    assert refused(lb, "add", "fixed/x", a.address) == (
        "splicelb: backend fixed has no spare slots for servers added at runtime:"
        " set spare_servers in its [[backends]] table, then reload"
    )
    assert refused(lb, "add", "app/a1", a.address) == (
        "splicelb: duplicate server name: app/a1 exists (splicelb status lists it)"
    )
    assert refused(lb, "add", "app/x", "10.0.0.1") == (
        "splicelb: ADDRESS: expected host:port or [v6]:port, got '10.0.0.1'"
    )
    assert "cannot resolve host 'no.such.host.invalid'" in refused(
        lb, "add", "app/x", "no.such.host.invalid:80"
    )
    assert "is not a valid server name" in refused(lb, "add", "app/x y", a.address)
    assert refused(lb, "remove", "app/a1") == (
        "splicelb: app/a1 comes from the config file: change it there, then reload"
    )
    assert refused(lb, "remove", "app/zz").startswith("splicelb: no server app/zz;")
    assert "0 is not in the range 1<=x<=256" in refused(
        lb, "add", "app/x", a.address, "--weight", "0"
    )
    server(lb, "add", "app/x", a.address)
    assert refused(lb, "add", "app/y", a.address) == (
        "splicelb: no spare slot left in backend app (all 1 hold servers):"
        " raise its spare_servers, then reload"
    )
    assert "not in the range" in refused(lb, "weight", "app/x", "300")


def test_an_added_server_takes_no_traffic_before_it_passes_its_check(
    start_lb: Callable[..., SpliceLB], echo_pair: tuple[EchoBackend, EchoBackend]
) -> None:
    a, b = echo_pair
    port = free_port()
    health = '[backends.health]\ntype = "http"\npath = "/healthz"\ninterval = 0.5\ntimeout = 0.5\n'
    text = config(
        listener(f"127.0.0.1:{port}", "app"),
        backend("app", [("a1", a.address)], f"spare_servers = 2\nslowstart = 0\n{health}"),
        workers=1,
    )
    lb = start_lb(text, workers=1)
    wait_until(lambda: servers_of(lb)["a1"]["health"] == "up", 10, "a1 up")
    dead = f"127.0.0.1:{free_port()}"
    server(lb, "add", "app/dead", dead)
    server(lb, "add", "app/b1", b.address)
    # the dead one is never picked; b1 once it passed its first check, at once
    wait_until(lambda: servers_of(lb)["b1"]["health"] == "up", 5, "b1 up")
    wait_until(lambda: servers_of(lb)["dead"]["health"] == "down", 5, "dead down")
    assert {whoami(port) for _ in range(10)} == {"echo1", "echo2"}
    assert not [c for c in lb.conns() if c["server"] == "dead"]
    assert not lb.events("connect_failed")
