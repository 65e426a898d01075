"""Child processes, ports, bounded waits and the tool installer of the benchmark.

Every process is started in its own session (so its process group holds all
its children) and registered; ``kill_all`` kills every group still alive, and
``run.py`` calls it on normal exit, on exceptions and on Ctrl-C/SIGTERM.
Everything binds 127.0.0.1 only.

splicelb runs as systemd/splicelb.service runs it (:func:`unprivileged`): as
a user without capabilities, so that the kernel's per-user limits (the pipe
budget, ``fs.pipe-user-pages-soft``) apply to it as they do in production.
Root is exempt from them, and a benchmark run as root would measure pipes
the deployed service cannot have.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import stat
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
OWN_UIDS = 4_000_000  # + this process's pid: the uid splicelb runs as, which no other process has
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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that nothing listens on right now:
    bound all at once, since ports asked for one after another may repeat (a
    balancer's config then names one port twice and is refused)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


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


def unprivileged_uid() -> int | None:
    """The uid splicelb runs as, or None when the benchmark itself is not root (then
    splicelb is already a user without capabilities).  A uid of its own, not ``nobody``:
    the pipe budget is per user, and the unit's ``splicelb`` user runs nothing else."""
    return OWN_UIDS + os.getpid() % 1_000_000 if os.geteuid() == 0 else None


def unprivileged(argv: Sequence[str], scratch: Path) -> list[str]:
    """``argv`` (a Python command) run as :func:`unprivileged_uid` with no capabilities and
    no new privileges, like the unit (which keeps only CAP_NET_BIND_SERVICE, nothing to
    do with pipes).  ``scratch``: an empty directory of the caller's, for mounts.

    When this interpreter lives where other users cannot go (pyenv under a 0700
    ``/root``), the command runs in a mount namespace of its own in which that directory
    is a tmpfs open to all, holding only the interpreter's tree: the same interpreter and
    environment as before, nothing changed outside the namespace.
    """
    uid = unprivileged_uid()
    if uid is None:
        return list(argv)
    if which("setpriv") is None:
        raise BenchError("setpriv (util-linux) is missing: splicelb runs as an unprivileged user")
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    setpriv += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig=keep"]
    hidden = _hidden(sys.executable, sys.prefix, sys.base_prefix, str(REPO))
    if not hidden:
        return [*setpriv, *argv]
    if which("unshare") is None:
        raise BenchError(f"unshare (util-linux) is missing, to make {sorted(hidden)} reachable")
    script = ["set -e"]
    children = sorted({child for found in hidden.values() for child in found})
    for i, child in enumerate(children):
        script.append(f"mkdir -p {scratch}/{i} && mount --bind {shlex.quote(child)} {scratch}/{i}")
    script += [f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(d)}" for d in hidden]
    for i, child in enumerate(children):
        script.append(
            f"mkdir {shlex.quote(child)} && mount --bind {scratch}/{i} {shlex.quote(child)}"
        )
    script.append('exec "$@"')
    namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)]
    return [*namespace, "sh", *setpriv, *argv]


def _hidden(*paths: str) -> dict[str, set[str]]:
    """The directories that keep other users from ``paths`` (no search permission for
    them), each with its entries on the way to those paths."""
    found: dict[str, set[str]] = {}
    for path in paths:
        parts = Path(os.path.realpath(path)).parts
        for depth in range(1, len(parts)):
            directory = Path(*parts[:depth])
            if not directory.stat().st_mode & stat.S_IXOTH:
                found.setdefault(str(directory), set()).add(str(directory / parts[depth]))
                break
    return found


@functools.cache
def check_unprivileged() -> str:
    """Run this interpreter once as splicelb will run: what it is, or BenchError why not."""
    scratch = Path(tempfile.mkdtemp(prefix="splicelb-bench-ns-"))
    try:
        argv = [sys.executable, "-c", "import os, sys, lb.cli; print(os.getuid(), sys.executable)"]
        done = subprocess.run(
            unprivileged(argv, scratch),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if done.returncode != 0:
        raise BenchError(f"splicelb cannot run as an unprivileged user: {done.stderr[-1000:]}")
    return done.stdout.strip()


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
        code: Path = REPO,
    ) -> None:
        """``code``: the tree whose ``lb`` (and ``bench``) the child imports."""
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
            cwd=code,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(code)},
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


def listen_overflows() -> int:
    """Connections this network namespace's listening sockets have dropped because their
    accept queue was full (``TcpExt: ListenOverflows``, /proc/net/netstat): a client then
    waits for its SYN (or its handshake's last ACK) to be sent again, a second or more."""
    with open("/proc/net/netstat") as f:
        ext = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(ext[1][ext[0].index("ListenOverflows")])


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
