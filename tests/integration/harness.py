"""Real processes for integration tests: splicelb, example backends, small TCP servers.

Everything binds 127.0.0.1, every wait is bounded, and every process started
here is killed by the fixture that started it (whole process group).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ECHO_BACKEND = REPO / "examples" / "echo_backend.py"
TOOLS = Path(__file__).with_name("tools.py")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in one test run."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``splicelb ARGS`` (as ``python -m lb``) and capture what it says."""
    return subprocess.run(
        [sys.executable, "-m", "lb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# splicelb does not wait for its stdout to be read (it drops lines when the pipe
# is full): room for the thread that reads it to fall behind by thousands of lines.
STDOUT_PIPE_SIZE = 1 << 20


class Proc:
    """A child process in its own process group, its stdout lines collected."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert self.popen.stdout is not None
        with contextlib.suppress(OSError):  # over the user's pipe quota: the default size
            fcntl.fcntl(self.popen.stdout.fileno(), fcntl.F_SETPIPE_SZ, STDOUT_PIPE_SIZE)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._reading = threading.Event()  # cleared: stdout is not read (see hold_stdout)
        self._reading.set()
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.popen.stdout, self.lines, self._reading), daemon=True
            ),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.errors), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str], reading: threading.Event | None = None) -> None:
        for raw in stream:
            into.append(raw.decode("utf-8", "replace").rstrip("\n"))
            if reading is not None:
                reading.wait()

    def hold_stdout(self) -> None:
        """Stop reading stdout (after at most one more read): the process's pipe fills."""
        self._reading.clear()

    def release_stdout(self) -> None:
        """Read stdout again, from where it stopped."""
        self._reading.set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """Kill the whole process group (children included) and reap."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._reading.set()
        for reader in self._readers:
            reader.join(2)


class EchoBackend(Proc):
    """examples/echo_backend.py on a free port."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        super().__init__(
            [sys.executable, str(ECHO_BACKEND), "--name", name, "--port", str(self.port)]
        )
        wait_until(lambda: any("listening" in line for line in self.lines), 15, f"backend {name}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class ToolServer(Proc):
    """A server from tools.py (sha, halfclose, ...); its stdout lines are JSON results."""

    def __init__(self, kind: str, *args: str) -> None:
        self.port = free_port()
        super().__init__([sys.executable, str(TOOLS), kind, "--port", str(self.port), *args])
        wait_until(lambda: self.lines, 15, f"tool server {kind}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines[1:]]


class SpliceLB(Proc):
    """``splicelb run`` with a config written to a temp dir."""

    def __init__(
        self,
        tmp: Path,
        config: str,
        workers: int = 2,
        env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = ("-m", "lb"),
        prefix: tuple[str, ...] = (),
        cwd: Path = REPO,
    ) -> None:
        """``launcher``: what runs ``splicelb`` (tests/faults/inject.py injects faults);
        ``prefix``: a command it runs under (``ip netns exec NS``); ``cwd``: where it
        runs (``python -m lb`` takes the ``lb`` found there)."""
        self.tmp = tmp
        self.workers = workers
        self.runtime_dir = tmp / "run"
        self.config_path = tmp / "splicelb.toml"
        self.config_path.write_text(config.replace("@RUNTIME@", str(self.runtime_dir)))
        argv = [*prefix, sys.executable, *launcher, "run", "-c", str(self.config_path)]
        super().__init__(argv, env, cwd)
        wait_until(self._started, 20, "splicelb to start")

    def _started(self) -> bool:
        if self.popen.poll() is not None:
            time.sleep(0.2)  # let the readers catch the last lines
            raise AssertionError(
                f"splicelb exited with {self.popen.returncode}: {self.errors} {self.lines[-5:]}"
            )
        return len(self.events("worker_start")) >= self.workers and bool(
            self.events("prober_start")
        )

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def conns(self) -> list[dict[str, Any]]:
        return self.events("conn")

    def wait_conns(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.conns()) >= count, timeout, f"{count} conn log lines")
        return self.conns()

    def worker_pids(self) -> list[int]:
        return [r["pid"] for r in self.events("worker_start")]

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)


def config(
    listeners: str,
    backends: str,
    workers: int = 2,
    extra_global: str = "",
    drain_timeout: float = 5,
    admin_bind: str = "",
) -> str:
    """A config with the runtime dir under the test's tmp dir (no admin endpoint by default)."""
    return (
        f'[global]\nworkers = {workers}\nruntime_dir = "@RUNTIME@"\nadmin_bind = "{admin_bind}"\n'
        f"drain_timeout = {drain_timeout}\n{extra_global}\n{listeners}\n{backends}\n"
    )


def listener(
    bind: str, backend: str, mode: str = "http", name: str = "public", extra: str = ""
) -> str:
    return (
        f'[[listeners]]\nname = "{name}"\nbind = "{bind}"\nmode = "{mode}"\n'
        f'default_backend = "{backend}"\n{extra}\n'
    )


def backend(name: str, servers: list[tuple[str, str]], extra: str = "") -> str:
    text = f'[[backends]]\nname = "{name}"\n{extra}\n'
    for server_name, address in servers:
        text += f'[[backends.servers]]\nname = "{server_name}"\naddress = "{address}"\n'
    return text


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()


FLAKY = Path(__file__).with_name("flaky.py")


class FlakyBackend(Proc):
    """tests/integration/flaky.py: a backend whose health check can be made to fail."""

    def __init__(
        self,
        name: str,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        extra: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port()
        super().__init__(
            [
                *prefix,
                sys.executable,
                str(FLAKY),
                "--name",
                name,
                "--host",
                host,
                "--port",
                str(self.port),
                *extra,
            ]
        )
        wait_until(lambda: any("listening" in ln for ln in self.lines), 15, f"flaky {name}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_mode(self, mode: str) -> None:
        """Switch the health check's behaviour (talks to the backend directly)."""
        tls = "--tls" in self.argv
        context = ssl._create_unverified_context() if tls else None
        url = f"{'https' if tls else 'http'}://{self.address}/control/{mode}"
        with urllib.request.urlopen(
            urllib.request.Request(url, method="POST"), timeout=10, context=context
        ) as reply:
            assert reply.read().decode() == mode


RECORDER = Path(__file__).with_name("recorder.py")


class Recorder(Proc):
    """tests/integration/recorder.py: a backend that reports every request it receives."""

    def __init__(self, name: str, *options: str) -> None:
        self.name = name
        self.port = free_port()
        argv = [sys.executable, str(RECORDER), "--name", name, "--port", str(self.port)]
        super().__init__([*argv, *options])
        wait_until(lambda: any("listening" in ln for ln in self.lines), 15, f"recorder {name}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        """What it received so far, one record per request."""
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def wait_requests(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """What it received, once it has said so for ``count`` requests (it says so before
        it answers, but its lines are read by a thread of ours)."""
        wait_until(lambda: len(self.requests()) >= count, timeout, f"{count} requests")
        return self.requests()


@contextlib.contextmanager
def network_namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to ours by a veth pair: (name, our address, its address).

    The addresses come from 198.18.0.0/15, the range set aside for network
    tests; they exist only on this veth pair, inside this machine.  Raises
    OSError when namespaces cannot be made here (the caller skips).
    """
    tag = os.getpid() % 100000
    name, ours, theirs = f"slb{tag}", f"slbr{tag}", f"slbn{tag}"
    octet = tag % 250
    here, there = f"198.18.{octet}.1", f"198.18.{octet}.2"
    setup = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", ours, "type", "veth", "peer", "name", theirs],
        ["ip", "link", "set", theirs, "netns", name],
        ["ip", "addr", "add", f"{here}/30", "dev", ours],
        ["ip", "link", "set", ours, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", theirs],
        ["ip", "netns", "exec", name, "ip", "link", "set", theirs, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for argv in setup:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            if result.returncode:
                raise OSError(f"{' '.join(argv)}: {result.stderr.strip()}")
        yield name, here, there
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=10, check=False)


def blackhole(namespace: str, address: str, on: bool) -> None:
    """Silently drop every packet the namespace sends to ``address`` (connects hang)."""
    verb = "add" if on else "del"
    subprocess.run(
        ["ip", "netns", "exec", namespace, "ip", "route", verb, "blackhole", f"{address}/32"],
        check=True,
        capture_output=True,
        timeout=10,
    )


LOAD = Path(__file__).with_name("load.py")


class LoadGen(Proc):
    """tests/integration/load.py against a balancer port."""

    def __init__(
        self, port: int, *, tunnels: int = 0, rate: float = 0, duration: float = 5
    ) -> None:
        super().__init__(
            [
                sys.executable,
                str(LOAD),
                "--port",
                str(port),
                "--tunnels",
                str(tunnels),
                "--rate",
                str(rate),
                "--duration",
                str(duration),
            ]
        )

    def event(self, name: str) -> dict[str, Any] | None:
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == name:
                    return dict(record)
        return None

    def summary(self, timeout: float) -> dict[str, Any]:
        return dict(
            wait_until(lambda: self.event("summary"), timeout, f"load summary {self.errors}")
        )
