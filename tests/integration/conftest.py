from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import EchoBackend, Proc, SpliceLB, network_namespace
from tests.integration.tls_setup import Certs, make_certs


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace and veth pair: (name, our address, its address).

    Requested before ``procs`` so its processes are killed before it goes.
    """
    try:
        with network_namespace() as ns:
            yield ns
    except OSError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all killed at the end, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.kill()


@pytest.fixture
def echo_pair(procs: list[Proc]) -> tuple[EchoBackend, EchoBackend]:
    a = EchoBackend("echo1")
    procs.append(a)
    b = EchoBackend("echo2")
    procs.append(b)
    return a, b


@pytest.fixture
def start_lb(tmp_path: Path, procs: list[Proc]) -> Callable[..., SpliceLB]:
    def start(
        config: str, workers: int = 2, env: dict[str, str] | None = None, **options: Any
    ) -> SpliceLB:
        lb = SpliceLB(tmp_path, config, workers, env, **options)
        procs.append(lb)
        return lb

    return start


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    """Client sockets a test holds open; all closed at its end."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """Test certificates (see tls_setup.make_certs)."""
    return make_certs(tmp_path)


@pytest.fixture
def echo(procs: list[Proc]) -> EchoBackend:
    """One echo backend (a WebSocket echo server, see harness.EchoBackend)."""
    server = EchoBackend("echo1")
    procs.append(server)
    return server
