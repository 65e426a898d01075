"""Child processes, ports, bounded waits and the tool installer of the benchmark.

Every process is started in its own session (so its process group holds all
its children) and registered; ``kill_all`` kills every group still alive, and
``run.py`` calls it on normal exit, on exceptions and on Ctrl-C/SIGTERM.
Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, ClassVar, TypeVar

import psutil  # type: ignore[import-untyped,unused-ignore]

from lb.parent import set_pdeathsig

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
T = TypeVar("T")

# binary -> Debian package that ships it
DEBIAN_TOOLS = {"haproxy": "haproxy", "iperf3": "iperf3", "wrk": "wrk", "nginx": "nginx"}
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class BenchError(RuntimeError):
    """A step of the benchmark failed (a tool missing, a server that did not start)."""


def die_with_parent() -> None:
    """In a child (before exec, or after fork): SIGKILL it when its parent dies, even by
    SIGKILL."""
    set_pdeathsig(signal.SIGKILL)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def which(binary: str) -> str | None:
    """The binary's path, also looking in the sbin directories (nginx, haproxy live there)."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN)
    return shutil.which(binary, path=path)


def ensure_tools() -> dict[str, str]:
    """Install the Debian packages whose binary is missing, and matplotlib; return the paths."""
    missing = [pkg for binary, pkg in DEBIAN_TOOLS.items() if which(binary) is None]
    if missing:
        install_debian(missing)
    if importlib.util.find_spec("matplotlib") is None:
        log("installing matplotlib with pip")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "matplotlib"], timeout=900, check=True
        )
        importlib.invalidate_caches()
    paths = {}
    for binary in DEBIAN_TOOLS:
        found = which(binary)
        if found is None:
            raise BenchError(f"{binary} is still missing after installing it")
        paths[binary] = found
    return paths


def install_debian(packages: list[str]) -> None:
    """apt-get install, with one apt-get update and retry if the package lists are stale."""
    log(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, timeout=900, check=False).returncode != 0:
        log("apt-get install failed; running apt-get update and trying again")
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=900, check=False)
        subprocess.run(install, env=env, timeout=900, check=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A child in its own process group; its output goes to a file (no reader threads)."""

    live: ClassVar[list[Proc]] = []  # every process started and not yet killed
    default_logdir: ClassVar[Path] = Path(tempfile.gettempdir())

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = None,
    ) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=self._log if stdout is None else stdout,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509  (no threads here)
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        )
        Proc.live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.name} exited with {self.popen.returncode}: {tail}")

    def tree(self) -> list[psutil.Process]:
        """This process and all its descendants."""
        try:
            top = psutil.Process(self.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the process group and any descendant that left it; reap; bounded."""
        stray = [p for p in self.tree() if p.pid != self.pid]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for p in stray:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()
        if self in Proc.live:
            Proc.live.remove(self)


def kill_all() -> None:
    for proc in reversed(list(Proc.live)):
        proc.kill()


def scratch_main(prefix: str, body: Callable[[Path], str]) -> int:
    """A measuring tool's ``main``: ``body`` runs with a scratch directory for its
    processes' logs, and what it returns is printed; every process is killed and the
    directory removed after.  Exit status 0, or 2 when a step failed (BenchError)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    Proc.default_logdir = tmp
    try:
        print(body(tmp))
        return 0
    except BenchError as exc:
        log(f"failed: {exc}")
        return 2
    finally:
        kill_all()
        shutil.rmtree(tmp, ignore_errors=True)


def tcp_segments_sent() -> int:
    """TCP segments this network namespace has sent (``Tcp: OutSegs``, /proc/net/snmp).

    On loopback every segment is sent once and received once, so the count
    over a run is the whole conversation: client, balancer and backend.
    """
    with open("/proc/net/snmp") as f:
        tcp = [line.split() for line in f if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("OutSegs")])


def run_tool(argv: Sequence[str], timeout: float, what: str) -> str:
    """Run a client tool to completion (own process group, killed on timeout); its stdout."""
    popen = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,  # noqa: PLW1509
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        out, err = popen.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate(timeout=10)
        raise
    if popen.returncode != 0:
        raise BenchError(
            f"{what} exited with {popen.returncode}: {err.decode(errors='replace')[-2000:]}"
            f" {out.decode(errors='replace')[-1000:]}"
        )
    return out.decode()
