"""Totals outlive reloads: what `splicelb status` and `/metrics` count never falls while
the instance runs, and equals the connections the clients made."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
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
KEEP_ALIVE = b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n"
GARBAGE = bytes.fromhex("160301020001000200") + b"\x00" * 40  # answered 400 by the balancer
SERVER_COUNTERS = ("total", "bytes_in", "bytes_out", "failed_connects")
GONE_WITHIN = 20  # seconds for a retiring generation's children to exit (drain_timeout is 5)


class Traffic:
    """The connections the test made and the bytes it sent, by the server that answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.to_server: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.garbage = 0

    def requests(self, count: int) -> None:
        for _ in range(count):
            self.connections += 1
            name = clients.exchange(self.port, WHOAMI).rsplit(b"\n", 1)[-1].decode()
            self.to_server[name] += 1
            self.bytes_in[name] += len(WHOAMI)

    def answered(self, count: int) -> None:
        for _ in range(count):
            self.connections += 1
            assert clients.status_of(clients.exchange(self.port, GARBAGE)) == 400
            self.garbage += 1

    def tunnel(self) -> tuple[socket.socket, str]:
        """A connection kept open (a tunnel to one server), and that server."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.connections += 1
        name = self.ask(sock, None)
        self.to_server[name] += 1
        return sock, name

    def ask(self, sock: socket.socket, name: str | None) -> str:
        """One more request over a tunnel; the name of the server that answered."""
        sock.sendall(KEEP_ALIVE)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < length(reply):
            chunk = sock.recv(1000)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply
        answered = reply.partition(b"\r\n\r\n")[2].decode()
        assert name in (None, answered)
        self.bytes_in[answered] += len(KEEP_ALIVE)
        return answered


def length(reply: bytes) -> int:
    """The Content-Length of a reply whose head has arrived."""
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length: {reply!r}")


def observe(lb: SpliceLB, admin: int) -> dict[tuple[str, ...], float]:
    """The totals as `splicelb status --json` and `/metrics` report them, side by side."""
    result = cli("status", "--runtime-dir", str(lb.runtime_dir), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    seen: dict[tuple[str, ...], float] = {}
    for server in status["backends"][0]["servers"]:
        seen[("status", server["name"], "total")] = server["total"]
        seen[("status", server["name"], "bytes_in")] = server["bytes_in"]
    seen[("status", "answers", "400")] = status["answers"]["400"]
    seen[("status", "accepted by the workers")] = sum(w["accepted"] for w in status["workers"])
    samples = scrape(admin)
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "splicelb_server_connections_total":
            seen[("metrics", label["server"], "total")] = value
        elif name == "splicelb_server_bytes_in_total":
            seen[("metrics", label["server"], "bytes_in")] = value
        elif name == "splicelb_listener_connections_total":
            seen[("metrics", "listener", label["listener"])] = value
        elif name == "splicelb_answers_total" and label["status"] == "400":
            seen[("metrics", "answers", "400")] = value
    return seen


def expected(traffic: Traffic, servers: list[str]) -> dict[tuple[str, ...], float]:
    want: dict[tuple[str, ...], float] = {}
    for source in ("status", "metrics"):
        for name in servers:
            want[(source, name, "total")] = traffic.to_server[name]
            want[(source, name, "bytes_in")] = traffic.bytes_in[name]
        want[(source, "answers", "400")] = traffic.garbage
    want[("status", "accepted by the workers")] = traffic.connections
    want[("metrics", "listener", "public")] = traffic.connections
    return want


def scrape(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counters of `/metrics` (samples named ``*_total``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.endswith("_total")
    }


class Watch(threading.Thread):
    """Reads `/status` and `/metrics` over and over; keeps every counter that fell."""

    def __init__(self, admin: int) -> None:
        super().__init__(daemon=True)
        self.admin = admin
        self.stop = threading.Event()
        self.reads = 0
        self.fell: list[tuple[Any, float, float]] = []

    def run(self) -> None:
        last: dict[Any, float] = {}
        while not self.stop.is_set():
            try:
                now = self.read()
            except (OSError, urllib.error.URLError):  # an admin process handing over
                continue
            self.fell += [(k, last[k], v) for k, v in now.items() if k in last and v < last[k]]
            last.update(now)
            self.reads += 1
            self.stop.wait(0.02)

    def read(self) -> dict[Any, float]:
        counters: dict[Any, float] = dict(scrape(self.admin))
        url = f"http://127.0.0.1:{self.admin}/status"
        with urllib.request.urlopen(url, timeout=10) as reply:
            status = json.loads(reply.read())
        for b in status["backends"]:
            for s in b["servers"]:
                for name in SERVER_COUNTERS:
                    counters[("status", b["name"], s["name"], name)] = s[name]
        for code, count in status["answers"].items():
            counters[("status", "answers", code)] = count
        for worker in status["workers"]:
            counters[("status", "accepted", worker["pid"])] = worker["accepted"]
        return counters


def test_totals_never_fall_across_reloads_and_count_every_connection(
    echo_pair: tuple[EchoBackend, EchoBackend],
    start_lb: Callable[..., SpliceLB],
    procs: list[Proc],
) -> None:
    """Traffic, then three reloads (the second removes echo2 and adds echo3), each
    followed by more traffic and the end of the generation before; a tunnel stays open
    across the first reload.  After each step both readers report exactly what the
    clients made, echo2 is no longer listed once removed, and no counter ever fell."""
    echo3 = EchoBackend("echo3")
    procs.append(echo3)
    one, two = echo_pair
    port, admin = free_port(), free_port()

    def text(servers: list[EchoBackend]) -> str:
        return config(
            listener(f"127.0.0.1:{port}", "app"),
            backend("app", [(s.name, s.address) for s in servers]),
            admin_bind=f"127.0.0.1:{admin}",
        )

    lb = start_lb(text([one, two]))
    wait_until(lambda: lb.events("admin_start"), 10, "the admin endpoint")
    traffic = Traffic(port)
    watch = Watch(admin)
    watch.start()
    try:
        traffic.requests(10)
        traffic.answered(2)
        tunnel, tunnel_server = traffic.tunnel()
        check(lb, admin, traffic, ["echo1", "echo2"], step="before any reload")

        steps = [([one, two], "same config"), ([one, echo3], "echo2 out, echo3 in")]
        steps.append(([one, echo3], "same config"))
        for number, (servers, what) in enumerate(steps, start=2):
            lb.config_path.write_text(text(servers).replace("@RUNTIME@", str(lb.runtime_dir)))
            result = cli("reload", "--runtime-dir", str(lb.runtime_dir))
            assert result.returncode == 0, result.stderr
            assert f"generation {number} is serving" in result.stdout
            traffic.requests(7 + number)
            traffic.answered(1)
            if number == 2:  # the tunnel, held by generation 1, still works; then it ends
                traffic.ask(tunnel, tunnel_server)
                tunnel.close()
            wait_gone(lb, number - 1)
            step = f"reload {number - 1} ({what})"
            check(lb, admin, traffic, [s.name for s in servers], step=step)
    finally:
        watch.stop.set()
        watch.join(10)
    assert watch.reads > 20, watch.reads
    assert watch.fell == []


def wait_gone(lb: SpliceLB, generation: int) -> None:
    """Until every child of ``generation`` has exited and its pool file is gone."""
    children = 2 + 2  # two workers, the prober and the admin process

    def exits() -> int:
        return sum(
            1
            for kind in ("worker", "prober", "admin")
            for r in lb.events(f"{kind}_exit")
            if r["child_generation"] == generation
        )

    wait_until(lambda: exits() == children, GONE_WITHIN, f"generation {generation}'s exits")
    pool = lb.runtime_dir / f"pool-{generation}.shm"
    wait_until(lambda: not pool.exists(), 5, f"generation {generation} removed")


def check(lb: SpliceLB, admin: int, traffic: Traffic, servers: list[str], *, step: str) -> None:
    """Both readers report exactly what the clients made (within a bounded wait: a
    worker publishes its counts up to 10 ms after they change)."""
    want = expected(traffic, servers)
    last: dict[str, dict[tuple[str, ...], float]] = {}

    def matches() -> bool:
        last["seen"] = observe(lb, admin)
        return last["seen"] == want

    with contextlib.suppress(AssertionError):
        wait_until(matches, 10, step)
    assert last["seen"] == want, step
