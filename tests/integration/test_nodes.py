"""Several balancer nodes, one answer: two splicelb instances in two network namespaces,
with the same config and the same DNS answers (in another order, found in another
order), send every key to the same server, and move only a removed server's keys."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.dnsmasq import Dnsmasq, need_dnsmasq
from tests.integration.harness import Proc, SpliceLB, cli, config, free_port, listener, wait_until

SRV = "_ws._tcp.chat.test"
HOST = "s.chat.test"
KEYS = [f"user-{i}" for i in range(1000)]
ECHO = Path(__file__).resolve().parents[2] / "examples" / "echo_backend.py"


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if result.returncode:
        raise OSError(f"{' '.join(argv)}: {result.stderr.strip()}")


@contextlib.contextmanager
def node_namespace(number: int) -> Iterator[tuple[str, str, str]]:
    """A namespace joined to ours by a veth pair, with its default route through us:
    (name, our address, its address), from 198.18.0.0/15 (set aside for tests)."""
    tag = f"{os.getpid() % 10000}n{number}"
    name, ours, theirs = f"slbn{tag}", f"slbr{tag}", f"slbp{tag}"
    octet = (os.getpid() + 7 * number) % 250
    here, there = f"198.19.{octet}.1", f"198.19.{octet}.2"
    try:
        run("ip", "netns", "add", name)
        run("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs)
        run("ip", "link", "set", theirs, "netns", name)
        run("ip", "addr", "add", f"{here}/30", "dev", ours)
        run("ip", "link", "set", ours, "up")
        inside = ("ip", "netns", "exec", name, "ip")
        run(*inside, "addr", "add", f"{there}/30", "dev", theirs)
        run(*inside, "link", "set", theirs, "up")
        run(*inside, "link", "set", "lo", "up")
        run(*inside, "route", "add", "default", "via", here)
        yield name, here, there
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=10, check=False)


@pytest.fixture
def two_namespaces() -> Iterator[list[tuple[str, str, str]]]:
    need_dnsmasq()
    try:
        with node_namespace(1) as a, node_namespace(2) as b:
            yield [a, b]
    except OSError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")


def echo(name: str, host: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc([sys.executable, str(ECHO), "--name", name, "--port", str(port), "--host", host])
    wait_until(lambda: any("listening" in line for line in proc.lines), 15, f"backend {name}")
    return proc, port


def ask(address: str, port: int, key: str) -> str:
    with socket.create_connection((address, port), timeout=10) as sock:
        sock.sendall(
            f"GET /whoami HTTP/1.1\r\nHost: x\r\nX-Key: {key}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
    return reply.rsplit(b"\n", 1)[-1].decode()


def mapping(address: str, port: int) -> dict[str, str]:
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(KEYS, pool.map(lambda key: ask(address, port, key), KEYS), strict=True))


def servers(lb: SpliceLB) -> list[str]:
    done = cli("status", "-c", str(lb.config_path), "--json")
    assert done.returncode == 0, done.stderr
    [app] = json.loads(done.stdout)["backends"]
    return sorted(s["name"] for s in app["servers"])


def test_two_nodes_send_every_key_to_the_same_server_and_move_only_a_removed_ones(
    tmp_path: Path, procs: list[Proc], two_namespaces: list[tuple[str, str, str]]
) -> None:
    (_, here, node_a), (_, _, node_b) = two_namespaces
    echoes = []
    for i in range(1, 5):
        proc, port = echo(f"echo{i}", "0.0.0.0")
        procs.append(proc)
        echoes.append(port)
    # Both nodes reach the servers at ``here`` (ours, on node A's link) through us.
    hosts = [(here, HOST)]
    records = [(SRV, HOST, port, 0, 1) for port in echoes]
    dns_a = Dnsmasq(tmp_path / "dns-a", hosts, records, listen=(here,))
    # node B's DNS: the records in the other order, and at first only the last two
    dns_b = Dnsmasq(tmp_path / "dns-b", hosts, records[:1:-1], listen=(here,))
    procs += [dns_a, dns_b]  # type: ignore[list-item]  # they have kill()
    lbs: list[SpliceLB] = []
    port = free_port()
    for (ns, _, node), dns in ((two_namespaces[0], dns_a), (two_namespaces[1], dns_b)):
        text = config(
            listener(f"{node}:{port}", "app"),
            f'[[backends]]\nname = "app"\nbalance = "hash"\nhash_key = "header:X-Key"\n'
            f'[backends.discovery]\nname = "{SRV}"\nresolvers = ["{here}:{dns.port}"]\n'
            "interval = 1\n",
        )
        lb_dir = tmp_path / ns
        lb_dir.mkdir()
        lb = SpliceLB(lb_dir, text, prefix=("ip", "netns", "exec", ns))
        procs.append(lb)
        lbs.append(lb)
    names = sorted(f"{here}:{p}" for p in echoes)
    wait_until(lambda: servers(lbs[0]) == names, 10, "node A's servers")
    first_two = sorted(f"{here}:{p}" for p in echoes[2:])
    wait_until(lambda: servers(lbs[1]) == first_two, 10, "node B's first servers")
    dns_b.set_srv(records[::-1])  # now all four: node B holds them in other slots than A
    wait_until(lambda: servers(lbs[1]) == names, 10, "node B's servers")

    before = [mapping(node_a, port), mapping(node_b, port)]
    assert before[0] == before[1]
    assert set(before[0].values()) == {"echo1", "echo2", "echo3", "echo4"}

    # echo2 leaves DNS: on both nodes only its keys move, to the same servers
    for dns, order in ((dns_a, records), (dns_b, records[::-1])):
        dns.set_srv([r for r in order if r[2] != echoes[1]])
    for lb in lbs:
        wait_until(lambda lb=lb: len(servers(lb)) == 3, 10, "echo2 gone")  # type: ignore[misc]
    after = [mapping(node_a, port), mapping(node_b, port)]
    assert after[0] == after[1]
    moved = {key for key in KEYS if after[0][key] != before[0][key]}
    assert moved == {key for key in KEYS if before[0][key] == "echo2"}
    assert len(moved) > 150
