"""Pipe buffers as deployed: splicelb run the way systemd/splicelb.service runs it.

The unit runs splicelb as its own user without CAP_SYS_RESOURCE or
CAP_SYS_ADMIN, so the kernel charges every pipe of the instance to one
per-user budget (fs.pipe-user-pages-soft pages); past it a pipe cannot be
enlarged and new ones get 2 pages (8 KiB a splice) instead of 16.  Here the
instance runs under setpriv as a user of its own (a uid no other process has,
so that nothing else draws on its budget), with no capabilities, and more
tunnels hold bulk data in flight at once than the budget has pipes of 1 MiB.
Then every pipe each worker holds is read through /proc: none may be cut to
2 pages, each worker still has its pipes of 1 MiB, every byte arrives, and
the instance has said once that fs.pipe-user-pages-soft is below what a full
pool needs.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import hashlib
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    REPO,
    Proc,
    SpliceLB,
    ToolServer,
    backend,
    config,
    free_port,
    listener,
    wait_until,
)
from tests.integration.tools import pattern_sha

F_GETPIPE_SZ = 1032
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
DEFAULT_PIPE = 16 * PAGE  # a new pipe while the budget has room
PAST_OLD_POOL = 96  # tunnels in flight past what the budget holds in pipes of 1 MiB
SOFT_PATH = Path("/proc/sys/fs/pipe-user-pages-soft")


def soft_limit() -> int:
    return int(SOFT_PATH.read_text())


def bytes_per_tunnel() -> int:
    """More than the balancer's send buffer to a client can grow to (the largest
    ``net.ipv4.tcp_wmem``), so that a client that does not read leaves its pipe full."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + 2 * MiB


def setpriv(uid: int) -> list[str]:
    """Run as ``uid`` with no capabilities at all, like the unit (which keeps only
    CAP_NET_BIND_SERVICE, no matter for pipes) and with no new privileges."""
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]


def python_env() -> dict[str, str]:
    """This checkout and this environment's packages, for an interpreter started as
    another user (which may not read this environment's own directory)."""
    paths = sysconfig.get_paths()
    return {"PYTHONPATH": os.pathsep.join([str(REPO), paths["purelib"], paths["platlib"]])}


@functools.cache
def runner() -> tuple[list[str], int] | str:
    """(setpriv argv, a Python that user can run with this environment's packages), or why
    there is none."""
    if os.geteuid() != 0:
        return "needs root, to run splicelb as another user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        getattr(sys, "_base_executable", ""),
    ]
    candidates += [f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    env = {**os.environ, **python_env()}
    for uid in (4_000_000 + os.getpid() % 1_000_000, 65534):  # a uid of its own, else nobody
        prefix = setpriv(uid)
        for python in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
            done = subprocess.run(
                [*prefix, python, "-c", "import lb.cli, uvloop, orjson"],
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return [*prefix, python], uid
    return f"no {version} with this environment's packages runs under setpriv as another user"


class UnprivilegedLB(SpliceLB):
    """``splicelb run`` under setpriv, its runtime dir owned by that user."""

    def __init__(self, tmp: Path, text: str, argv: list[str], uid: int) -> None:
        self.tmp = tmp
        self.workers = 2
        self.runtime_dir = tmp / "run"
        self.runtime_dir.mkdir()
        os.chown(self.runtime_dir, uid, uid)
        self.config_path = tmp / "splicelb.toml"
        self.config_path.write_text(text.replace("@RUNTIME@", str(self.runtime_dir)))
        Proc.__init__(self, [*argv, "-m", "lb", "run", "-c", str(self.config_path)], python_env())
        wait_until(self._started, 30, "splicelb to start")


@pytest.fixture
def readable_tmp() -> Iterator[Path]:
    """A directory another user can read (pytest's own is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="splicelb-pipes-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


Pipes = dict[int, tuple[int, int]]  # pipe inode -> (size, bytes held)


def pipes_of(pid: int) -> Pipes:
    """Every pipe the process holds (but its stdio, the test's), read through /proc."""
    found: Pipes = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        if int(name) <= 2:
            continue
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if not link.startswith("pipe:") or int(link[6:-1]) in found:
                continue
            fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:  # closed meanwhile
            continue
        try:
            size = fcntl.fcntl(fd, F_GETPIPE_SZ)
            [held] = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))
        finally:
            os.close(fd)
        found[int(link[6:-1])] = (size, held)
    return found


def in_flight(pids: list[int]) -> int:
    return sum(held > 0 for pid in pids for _, held in pipes_of(pid).values())


def settled(count: Callable[[], int], want: int, timeout: float) -> int:
    """Poll ``count`` until it reaches ``want`` or stops growing for a second."""
    best, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = count()
        if now >= want:
            return now
        if now > best:
            best, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0:
            break
        time.sleep(0.1)
    return best


def read_all(clients: list[socket.socket], timeout: float) -> list[tuple[int, str]]:
    """Every client's bytes to end of file: (count, sha256) in the clients' order."""
    selector = selectors.DefaultSelector()
    digests = {sock.fileno(): hashlib.sha256() for sock in clients}
    counts = dict.fromkeys(digests, 0)
    for sock in clients:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)  # open the window
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)  # the backend ends its side after its bytes
        selector.register(sock, selectors.EVENT_READ)
    buf = bytearray(MiB)
    view = memoryview(buf)
    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            n = sock.recv_into(buf)
            if n == 0:
                selector.unregister(sock)
                continue
            digests[sock.fileno()].update(view[:n])
            counts[sock.fileno()] += n
    selector.close()
    return [(counts[s.fileno()], digests[s.fileno()].hexdigest()) for s in clients]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_as_deployed_no_tunnel_gets_a_pipe_cut_to_2_pages(
    readable_tmp: Path, procs: list[Proc]
) -> None:
    how = runner()
    if isinstance(how, str):
        pytest.skip(how)
    argv, uid = how
    soft = soft_limit()
    if soft == 0:
        pytest.skip("fs.pipe-user-pages-soft is 0: no per-user pipe budget on this machine")
    if not 16384 <= soft <= 32768:  # the kernel's default, or up to twice that
        pytest.skip(f"fs.pipe-user-pages-soft = {soft}: this test's load is sized for 16384")
    old_pool = soft * PAGE // MiB  # pipes of 1 MiB the budget holds: all the old code made
    tunnels = old_pool + PAST_OLD_POOL
    send = bytes_per_tunnel()

    far = ToolServer("sha", "--send", str(send))
    procs.append(far)
    port = free_port()
    lb = UnprivilegedLB(
        readable_tmp,
        config(
            listener(f"127.0.0.1:{port}", "bulk", mode="tcp", name="bulk"),
            backend("bulk", [("far", far.address)]),
        ),
        argv,
        uid,
    )
    procs.append(lb)
    workers = lb.worker_pids()

    clients = []
    try:
        for _ in range(tunnels):  # clients that do not read yet: every flow holds its pipe
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            clients.append(sock)
        held = settled(lambda: in_flight(workers), tunnels, 60)
        assert held > old_pool, f"only {held} pipes hold bytes; the test needs more than {old_pool}"

        pipes = [size for pid in workers for size, _ in pipes_of(pid).values()]
        sizes = collections.Counter(pipes)
        cut = sum(n for size, n in sizes.items() if size < DEFAULT_PIPE)
        assert cut == 0, f"{cut} of {len(pipes)} pipes below {DEFAULT_PIPE} bytes: {sizes}"
        for pid in workers:  # and each worker still moves bulk data through pipes of 1 MiB
            large = sum(size == MiB for size, _ in pipes_of(pid).values())
            assert large >= 8, f"worker {pid} holds {large} pipes of 1 MiB: {sizes}"

        results = read_all(clients, 120)
    finally:
        for sock in clients:
            sock.close()
    expected = (send, pattern_sha(send))
    assert sum(r != expected for r in results) == 0, collections.Counter(r[0] for r in results)

    [warning] = lb.events("pipe_budget")  # once for the instance
    assert warning["sysctl"] == "fs.pipe-user-pages-soft" and warning["value"] == soft
    assert warning["needed"] > soft and warning["fix"].endswith(f"={warning['needed']}")
    assert lb.events("pipe_refused") == []  # the plan kept within the budget
