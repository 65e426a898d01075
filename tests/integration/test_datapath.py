"""The data path through a real ``splicelb run``: WebSocket echo, TCP tunnels, half-close."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import psutil

from tests.integration import clients
from tests.integration.harness import (
    EchoBackend,
    Proc,
    SpliceLB,
    ToolServer,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)
from tests.integration.tools import drain, pattern, pattern_sha

GiB = 1 << 30


def echo_config(port: int, pair: tuple[EchoBackend, EchoBackend], **kw: str) -> str:
    servers = [(b.name, b.address) for b in pair]
    return config(
        listener(f"127.0.0.1:{port}", "app", extra=kw.get("listener", "")),
        backend("app", servers, extra=kw.get("backend", "")),
    )


def test_websocket_messages_echo_intact_and_in_order(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    messages: list[bytes | str] = [b"x", os.urandom(64 * 1024), os.urandom(16 << 20), "text ✓"]
    replies = clients.run(clients.ws_echo(f"ws://127.0.0.1:{port}/ws", messages))
    assert replies == messages
    [line] = lb.wait_conns(1)
    assert line["websocket"] is True
    assert line["status"] is None
    assert line["server"] in {"echo1", "echo2"}
    assert line["bytes_in"] > (16 << 20) + 64 * 1024
    assert line["bytes_out"] > (16 << 20) + 64 * 1024


def test_hundred_concurrent_clients_spread_over_workers_and_backends(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    url = f"ws://127.0.0.1:{port}/ws"

    async def client(i: int) -> list[bytes | str]:
        return await clients.ws_echo(url, [f"hello {i}", os.urandom(1000)])

    async def all_clients() -> list[list[bytes | str]]:
        return await asyncio.gather(*(client(i) for i in range(100)))

    results = clients.run(all_clients())
    assert all(r[0] == f"hello {i}" for i, r in enumerate(results))  # type: ignore[index]
    lines = lb.wait_conns(100)
    assert len(lines) == 100
    assert {line["pid"] for line in lines} == set(lb.worker_pids())
    assert {line["server"] for line in lines} == {"echo1", "echo2"}
    assert all(line["websocket"] for line in lines)


def test_leastconn_counts_the_other_workers_tunnels_as_they_open(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """With a tunnel open to one server, the next goes to the other, whichever worker
    accepts it: ``leastconn`` reads every worker's tunnels as they open and close."""
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair, backend='balance = "leastconn"'))
    rounds = 12  # each round's two connections reach different workers half the time
    for done in range(rounds):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
            first.sendall(clients.upgrade_request())
            assert first.recv(200).startswith(b"HTTP/1.1 101"), done
            with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
                second.sendall(clients.upgrade_request())
                assert second.recv(200).startswith(b"HTTP/1.1 101"), done
        lb.wait_conns(2 * (done + 1))  # both ends counted before the next round
    lines = lb.conns()
    pairs = [lines[i : i + 2] for i in range(0, 2 * rounds, 2)]
    assert all({line["server"] for line in pair} == {"echo1", "echo2"} for pair in pairs)
    crossed = sum(a["pid"] != b["pid"] for a, b in pairs)
    assert crossed > 0, "every round stayed in one worker: not tested across"


def test_sigterm_stops_cleanly_with_no_process_left(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    children = psutil.Process(lb.pid).children(recursive=True)
    assert len(children) == 3  # two workers and the prober
    assert lb.stop(timeout=20) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    assert not (lb.runtime_dir / "splicelb.pid").exists()
    assert lb.events("stopped")[-1]["exit_code"] == 0


def test_tcp_tunnel_carries_a_gibibyte_each_way(
    procs: list[Proc], start_lb: Callable[..., SpliceLB]
) -> None:
    far = ToolServer("sha", "--send", str(GiB))
    procs.append(far)
    port = free_port()
    start_lb(
        config(
            listener(f"127.0.0.1:{port}", "bulk", mode="tcp"),
            backend("bulk", [("far", far.address)]),
            workers=1,
        ),
        workers=1,
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent: dict[str, str] = {}

    def sender() -> None:
        digest = hashlib.sha256()
        for chunk in pattern(GiB):
            sock.sendall(chunk)
            digest.update(chunk)
        sock.shutdown(socket.SHUT_WR)
        sent["sha"] = digest.hexdigest()

    thread = threading.Thread(target=sender)
    thread.start()
    received, received_sha = drain(sock)
    thread.join(120)
    sock.close()
    assert received == GiB
    assert received_sha == pattern_sha(GiB)
    wait_until(far.results, 30, "the far end's result")
    [result] = far.results()
    assert result["received"] == GiB
    assert result["received_sha"] == sent["sha"]


def test_half_close_in_each_mode(procs: list[Proc], start_lb: Callable[..., SpliceLB]) -> None:
    far = ToolServer("halfclose")
    procs.append(far)
    http_port, tcp_port = free_port(), free_port()
    start_lb(
        config(
            listener(f"127.0.0.1:{http_port}", "far")
            + listener(f"127.0.0.1:{tcp_port}", "far", mode="tcp", name="raw"),
            backend("far", [("far", far.address)]),
        )
    )
    body = os.urandom(300_000)
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    forwarded = (
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: x\r\n"
        b'Forwarded: for=127.0.0.1;proto=http;host="x"\r\n'
    )
    # The server gets the head with its forwarded fields, then every byte after it as sent.
    reply = clients.exchange(http_port, head + b"\r\n" + body, half_close=True)
    assert reply == head + forwarded + b"\r\n" + body
    assert clients.exchange(tcp_port, body, half_close=True) == body


def listening_socket(backlog: int) -> socket.socket:
    """A listening socket on 127.0.0.1 that the test accepts on itself."""
    server = socket.create_server(("127.0.0.1", 0), backlog=backlog)
    server.settimeout(10)
    return server


def in_each_mode(
    start_lb: Callable[..., SpliceLB],
    name: str,
    server_port: int,
    extra: str = "",
    workers: int = 2,
) -> tuple[SpliceLB, int, int]:
    """A balancer in front of one server, through an http and a tcp listener: the
    balancer and the two listeners' ports.  The server gets the bytes as the client sent
    them in either mode (no forwarded fields)."""
    http_port, tcp_port = free_port(), free_port()
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{http_port}", name, extra="forwarded_headers = false")
            + listener(f"127.0.0.1:{tcp_port}", name, mode="tcp", name="raw"),
            backend(name, [(name, f"127.0.0.1:{server_port}")], extra=extra),
            workers=workers,
        ),
        workers=workers,
    )
    return lb, http_port, tcp_port


def test_a_servers_last_bytes_and_fin_reach_the_client_in_one_segment(
    start_lb: Callable[..., SpliceLB],
) -> None:
    """A server that answers and closes: the client gets as many segments through the
    balancer as from the server directly (handshake, the request's ACK, answer and FIN
    in one), in each mode.  Passed on apart, the FIN would cost a segment more, and the
    client's ACK of the answer another (the shorter conversation the benchmark counts)."""
    server = listening_socket(backlog=8)
    server_port = server.getsockname()[1]
    lb, http_port, tcp_port = in_each_mode(start_lb, "far", server_port)
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
    rounds = 3
    thread = threading.Thread(
        target=clients.answer_and_close, args=(server, answer, 3 * rounds), daemon=True
    )
    thread.start()
    try:
        got = {
            (name, i): clients.segments_received(port, request)
            for i in range(rounds)
            for name, port in (("direct", server_port), ("http", http_port), ("tcp", tcp_port))
        }
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes an accept still waiting (a failed test)
        thread.join(15)
        server.close()
    assert {reply for reply, _ in got.values()} == {answer}
    direct = {segments for (name, _), (_, segments) in got.items() if name == "direct"}
    assert len(direct) == 1, f"the server's own segments vary: {got}"
    assert {segments for _, segments in got.values()} == direct, got
    lb.wait_conns(2 * rounds)


def test_a_connect_still_in_progress_is_waited_for_in_each_mode(
    start_lb: Callable[..., SpliceLB],
) -> None:
    """A server whose handshake is not done when ``connect`` returns, as a remote one.

    Here a full accept queue (backlog 0, one connection waiting) drops the
    balancer's SYN and the kernel sends it again a second later: the worker
    must wait for the connect instead of taking it as done or failed.
    """
    server = listening_socket(backlog=0)
    server_port = server.getsockname()[1]
    # the SYN is sent again after 1 s, 3 s, 7 s...: room for a slow test machine
    lb, http_port, tcp_port = in_each_mode(
        start_lb, "slow", server_port, extra="connect_timeout = 10", workers=1
    )

    def syn_sent() -> bool:
        return any(
            c.status == psutil.CONN_SYN_SENT and c.raddr and c.raddr.port == server_port
            for c in psutil.net_connections("tcp4")
        )

    try:
        for port, first in ((http_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), (tcp_port, b"hi")):
            filler = socket.create_connection(("127.0.0.1", server_port), timeout=10)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(first)
                wait_until(syn_sent, 10, "the balancer's connect to be in progress")
                server.accept()[0].close()  # the filler: the SYN sent again gets in
                filler.close()
                conn, _ = server.accept()
                with conn:
                    assert conn.recv(100) == first
                    conn.sendall(b"answer")
                assert clients.read_all(client) == b"answer"
    finally:
        server.close()
    lines = lb.wait_conns(2)
    assert [(line["listener"], line["server"]) for line in lines] == [
        ("public", "slow"),
        ("raw", "slow"),
    ]
    assert lb.events("connect_failed") == []


def test_idle_tunnel_is_closed_after_tunnel_timeout(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair, listener="tunnel_timeout = 1"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(clients.upgrade_request())
        start = time.monotonic()
        reply = clients.read_all(sock)
        waited = clients.elapsed(start)
    assert reply.startswith(b"HTTP/1.1 101")
    assert 0.9 < waited < 5
    [line] = lb.wait_conns(1)
    assert line["reason"] == "tunnel idle timeout"


def test_tcp_keepalive_is_on_for_both_sockets_of_a_tunnel(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    a, _ = echo_pair
    port = free_port()
    start_lb(config(listener(f"127.0.0.1:{port}", "app"), backend("app", [("echo1", a.address)])))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(clients.upgrade_request())
        assert sock.recv(200).startswith(b"HTTP/1.1 101")
        # The balancer's two sockets: local port = the listener's, remote port = the backend's.
        # The server side gets it from the worker's sweep, within about a second.
        deadline = time.monotonic() + 5
        while True:
            client_side = ss_timers(f"sport = :{port}")
            server_side = ss_timers(f"dport = :{a.port}")
            if server_side and all("keepalive" in t for t in server_side):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert client_side and all("keepalive" in t for t in client_side), client_side
    assert server_side and all("keepalive" in t for t in server_side), server_side


def ss_timers(selector: str) -> list[str]:
    """The timer column of ``ss -tno`` for established sockets matching ``selector``."""
    out = subprocess.run(
        ["ss", "-tnoH", "state", "established", selector],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return [line[line.index("timer:") :] if "timer:" in line else line for line in out.splitlines()]


def test_an_idle_worker_sleeps(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    """After its last connection a worker wakes only for its heartbeat and its sweep
    (about twice a second), not for timers of connections long gone."""
    port = free_port()
    lb = start_lb(echo_config(port, echo_pair))
    for _ in range(4):  # connections that set head and connect deadlines, then end
        assert clients.run(clients.ws_echo(f"ws://127.0.0.1:{port}/ws", [b"hi"])) == [b"hi"]
    time.sleep(1.0)
    workers = [psutil.Process(pid) for pid in lb.worker_pids()]
    before = [w.num_ctx_switches().voluntary for w in workers]
    time.sleep(3.0)
    woken = [w.num_ctx_switches().voluntary - b for w, b in zip(workers, before, strict=True)]
    assert all(n <= 12 for n in woken), f"wake-ups in 3 s per worker: {woken}"
