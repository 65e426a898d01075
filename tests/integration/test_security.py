"""A shared host: the runtime dir, a second instance, a hostile local user.

The hostile user is a real one, made for the test with ``useradd`` and
removed after it; what it does runs in a forked child that has dropped to
its uid (the interpreter and the code are already loaded: nothing needs to
be readable by that user).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lb.supervisor  # noqa: F401 (loaded before a child drops to another user: see above)
from lb.cli import cli as splicelb_cli
from lb.config import load_config
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

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture
def hostile() -> Iterator[tuple[int, int]]:
    """A local user of its own: (uid, gid); removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("making a user for the test needs root (useradd)")
    name = f"slbhostile{os.getpid() % 100000}"
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    entry = pwd.getpwnam(name)
    try:
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def as_user(user: tuple[int, int], job: Callable[[], int]) -> tuple[int, str]:
    """Run ``job`` in a child that has dropped to ``user``: its exit code and its output."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (pytest's capture is not fd 1)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])
            code = job()
            sys.stdout.flush()
            sys.stderr.flush()
        except SystemExit as exc:
            sys.stdout.flush()
            sys.stderr.flush()
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            os.write(2, f"{exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(write)
    out = b""
    while chunk := os.read(read, 65536):
        out += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode()


def run_instance(tmp: Path, text: str, name: str = "splicelb.toml") -> Proc:
    """``splicelb run`` with a config whose runtime dir is already in ``text``."""
    path = tmp / name
    path.write_text(text)
    return Proc([sys.executable, "-m", "lb", "run", "-c", str(path)])


def refused(proc: Proc, timeout: float = 20) -> str:
    """The proc exits 1 at once; what it said."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"it started: {proc.lines[-3:]}") from None
    time.sleep(0.1)  # the reader threads take the last lines
    said = "\n".join(proc.lines + proc.errors)
    assert code == 1, said
    return said


def simple_config(port: int, runtime: Path, echo: EchoBackend) -> str:
    return config(
        listener(f"127.0.0.1:{port}", "app"), backend("app", [("echo1", echo.address)])
    ).replace("@RUNTIME@", str(runtime))


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "world-writable"])
def test_a_runtime_dir_someone_else_could_write_into_is_refused(
    tmp_path: Path, echo: EchoBackend, procs: list[Proc], kind: str
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    runtime = tmp_path / "run"
    if kind == "symlink":
        runtime.symlink_to(real)
    else:
        runtime.mkdir()
        runtime.chmod(0o770 if kind == "group-writable" else 0o777)
    proc = run_instance(tmp_path, simple_config(free_port(), runtime, echo))
    procs.append(proc)
    said = refused(proc)
    assert "global.runtime_dir" in said
    assert ("symlink" if kind == "symlink" else "writable by") in said
    assert not any((real if kind == "symlink" else runtime).iterdir())  # nothing written there


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A world-writable directory with the sticky bit, as /tmp is, that every user reaches."""
    top = Path(tempfile.mkdtemp(prefix="slb-shared-", dir="/tmp"))
    top.chmod(0o755)
    shared = top / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    yield shared
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory of root's, mode 0755, that every user reaches and may not write into."""
    top = Path(tempfile.mkdtemp(prefix="slb-open-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def readable_config(directory: Path, runtime: Path) -> Path:
    """A config every user may read, its runtime dir at ``runtime``."""
    path = directory / "splicelb.toml"
    text = config(listener("127.0.0.1:1", "app"), backend("app", [("a1", "127.0.0.1:2")]))
    path.write_text(text.replace("@RUNTIME@", str(runtime)))
    path.chmod(0o644)
    load_config(path)  # loads what reading it needs (the interpreter's files are root's alone)
    return path


NOT_YOURS = (
    "run splicelb as root or as the user the service runs as,"
    " or set global.runtime_dir to a directory this user owns"
)


@pytest.mark.parametrize("kind", ["missing", "root's, 0755", "root's, 0700"])
def test_run_by_a_user_who_may_not_write_the_runtime_dir_names_the_key_and_the_fix(
    open_tmp: Path, hostile: tuple[int, int], kind: str
) -> None:
    runtime = open_tmp / "run"
    if kind != "missing":
        runtime.mkdir()
        runtime.chmod(0o755 if kind == "root's, 0755" else 0o700)
    path = readable_config(open_tmp, runtime)
    code, said = as_user(
        hostile,
        lambda: splicelb_cli(["run", "-c", str(path), "--log-format", "json"], "splicelb"),
    )
    assert code == 1, said
    [failed] = [json.loads(line) for line in said.splitlines() if "start_failed" in line]
    what = {
        "missing": f"cannot create {runtime}",
        "root's, 0755": f"cannot open {runtime}/splicelb.pid",
        "root's, 0700": f"cannot open {runtime}",
    }[kind]
    assert failed["reason"] == f"global.runtime_dir: {what}: permission denied; {NOT_YOURS}"
    assert "Errno" not in said


@pytest.mark.parametrize("kind", ["missing", "root's, 0755"])
def test_check_warns_a_user_who_may_not_write_the_runtime_dir(
    open_tmp: Path, hostile: tuple[int, int], kind: str
) -> None:
    runtime = open_tmp / "run" / "splicelb"
    if kind != "missing":
        runtime.mkdir(parents=True)
        runtime.chmod(0o755)
    path = readable_config(open_tmp, runtime)
    code, said = as_user(hostile, lambda: splicelb_cli(["check", "-c", str(path)], "splicelb"))
    assert code == 0, said
    warning, ok = sorted(said.splitlines(), key=lambda line: not line.startswith("warning:"))
    assert ok.startswith(f"{path}: OK")
    if kind == "missing":
        assert warning == (
            f"warning: global.runtime_dir: {runtime} does not exist and this user"
            f" (uid {hostile[0]}) may not create it in {open_tmp}; {NOT_YOURS}"
        )
    else:
        assert warning == (
            f"warning: global.runtime_dir: {runtime} is not writable by this user"
            f" (uid {hostile[0]}); {NOT_YOURS}"
        )

    as_root = cli("check", "-c", str(path))  # root may write anywhere: no warning
    assert (as_root.returncode, as_root.stderr) == (0, "")


def test_links_planted_by_a_local_user_are_never_followed(
    tmp_path: Path,
    echo: EchoBackend,
    procs: list[Proc],
    hostile: tuple[int, int],
    shared_tmp: Path,
) -> None:
    """The runtime dir in a shared, world-writable directory (as /tmp is): another user
    made it first and planted links to a file of root's there."""
    shared = shared_tmp
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    before = victim.stat().st_mtime_ns
    runtime = shared / "run"

    def plant() -> int:
        runtime.mkdir(mode=0o777)
        for name in ("splicelb.pid", "splicelb.pid.tmp", "pool-1.shm", "pool", "pool.tmp"):
            (runtime / name).symlink_to(victim)
        return 0

    assert as_user(hostile, plant) == (0, "")
    proc = run_instance(tmp_path, simple_config(free_port(), runtime, echo))
    procs.append(proc)
    said = refused(proc)
    assert f"global.runtime_dir: {runtime} is owned by uid {hostile[0]}" in said
    assert victim.read_text() == "root's file\n"
    assert victim.stat().st_mtime_ns == before


def test_links_left_in_the_runtime_dir_are_replaced_never_followed(
    tmp_path: Path, echo: EchoBackend, procs: list[Proc]
) -> None:
    """Links in a runtime dir of root's own (left by whatever): no file is written
    through one; the pid file, which is the lock, must not be a link at all."""
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    before = victim.stat().st_mtime_ns
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    for name in ("pool-1.shm", "pool.tmp", "control.sock", f"pool-1.shm.tmp{os.getpid()}"):
        (runtime / name).symlink_to(victim)
    port = free_port()
    lb = SpliceLB(tmp_path, simple_config(port, runtime, echo), workers=2)
    procs.append(lb)
    assert clients.status_of(clients.exchange(port, REQUEST)) == 200
    assert victim.read_text() == "root's file\n" and victim.stat().st_mtime_ns == before
    for name in ("pool-1.shm", "control.sock"):
        assert not (runtime / name).is_symlink()
    assert oct((runtime / "pool-1.shm").stat().st_mode & 0o777) == "0o600"
    lb.stop()

    (runtime / "splicelb.pid").symlink_to(victim)
    proc = run_instance(tmp_path, simple_config(free_port(), runtime, echo), "second.toml")
    procs.append(proc)
    assert "splicelb.pid" in refused(proc)
    assert victim.read_text() == "root's file\n" and victim.stat().st_mtime_ns == before


def test_status_tells_a_user_who_cannot_read_the_pool(
    tmp_path: Path, echo: EchoBackend, procs: list[Proc], hostile: tuple[int, int]
) -> None:
    port = free_port()
    tmp_path.chmod(0o755)
    runtime = tmp_path / "run"
    lb = SpliceLB(tmp_path, simple_config(port, runtime, echo), workers=1)
    procs.append(lb)
    assert oct(runtime.stat().st_mode & 0o777) == "0o700"
    code, said = as_user(
        hostile, lambda: splicelb_cli(["status", "--runtime-dir", str(runtime)], "splicelb")
    )
    assert code != 0
    assert said.strip().count("\n") == 0, said  # one line, no traceback
    assert "permission denied (run as the instance's user or root)" in said


def test_a_second_instance_on_a_running_ones_address_is_refused(
    tmp_path: Path, echo: EchoBackend, procs: list[Proc]
) -> None:
    port = free_port()
    first = SpliceLB(tmp_path, simple_config(port, tmp_path / "run", echo), workers=2)
    procs.append(first)
    second = run_instance(tmp_path, simple_config(port, tmp_path / "run2", echo), "second.toml")
    procs.append(second)
    said = refused(second)
    assert f"listeners[0].bind: cannot listen on 127.0.0.1:{port}: Address already in use" in said
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: clients.exchange(port, REQUEST), range(200)))
    statuses = [clients.status_of(reply) for reply in replies]
    assert statuses == [200] * 200
    lines = first.wait_conns(200)
    assert len(lines) == 200  # every one of them through the first instance


def test_concurrent_starts_on_one_runtime_dir_leave_one_instance_whole(
    tmp_path: Path, echo: EchoBackend, procs: list[Proc]
) -> None:
    runtime = tmp_path / "run"
    text = simple_config(free_port(), runtime, echo)
    path = tmp_path / "splicelb.toml"
    path.write_text(text)
    starts = [Proc([sys.executable, "-m", "lb", "run", "-c", str(path)]) for _ in range(20)]
    procs.extend(starts)
    wait_until(lambda: sum(p.popen.poll() is not None for p in starts) == 19, 120, "19 refusals")
    [survivor] = [p for p in starts if p.popen.poll() is None]
    assert all(p.popen.returncode == 1 for p in starts if p is not survivor)
    wait_until(lambda: any('"serving"' in line for line in survivor.lines), 30, "it serves")
    assert (runtime / "splicelb.pid").read_text() == f"{survivor.pid}\n"
    assert (runtime / "pool").is_symlink()
    status = cli("status", "--runtime-dir", str(runtime), "--json")
    assert status.returncode == 0, status.stderr
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0


def test_a_pid_file_whose_lock_is_free_is_stale_whatever_its_number(
    tmp_path: Path, echo: EchoBackend, procs: list[Proc]
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    (runtime / "splicelb.pid").write_text("1\n")  # a live process, but not an instance
    port = free_port()
    lb = SpliceLB(tmp_path, simple_config(port, runtime, echo), workers=1)
    procs.append(lb)
    assert (runtime / "splicelb.pid").read_text() == f"{lb.pid}\n"
