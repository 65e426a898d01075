"""Backends (iperf3, nginx, the WebSocket echo) and the balancers under test.

Every target exposes five front ports (``FRONTS``): ``bulk`` (to ``iperf3 -s``),
``http`` (to nginx) and ``ws`` (to the echo backend), HAProxy in ``mode tcp``
on all three; and ``http7`` (to nginx) and ``ws7`` (to the echo backend) where
HAProxy runs ``mode http``, as splicelb's http listener parses every head.
The balancers get a config with all five listeners; "direct" is the backends'
own ports (the physical limit).

Variants of splicelb change only its ``http`` listener, to measure what a
feature costs against the same listener without it (see ``VARIANTS``).
``splicelb-tls`` and ``haproxy-tls`` make it a TLS passthrough listener that
routes on the ClientHello's server name (``mode = "tls"``; HAProxy's
``req.ssl_sni`` after ``tcp-request inspect-delay``) to nginx's TLS port
(``https``: a self-signed ECDSA P-256 certificate for ``localhost``, made at
start): clients connect to ``https://localhost:PORT/`` (``TLS_NAME``).  A name
``VARIANT@REV`` runs that variant with the code of commit ``REV`` (``git archive``
into the run's directory), to measure a change against the code before it;
``VARIANT+info`` runs it with ``log_level = "info"`` (a ``conn`` line per
connection, to the log file), to measure what logging costs; ``VARIANT+nopoll``
with ``busy_poll_us = 0`` (``GLOBAL_SUFFIXES``; several may follow each other);
``+null`` and ``+pipe`` send its stdout to /dev/null or to a pipe that ``cat``
drains, in place of its log file (``STDOUT_SUFFIXES``), to tell what a line
costs from what its file costs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]

from bench.procs import (
    HOST,
    REPO,
    BenchError,
    Proc,
    free_port,
    free_ports,
    log,
    unprivileged,
    unprivileged_uid,
    wait_until,
)

START_TIMEOUT = 30.0
HAPROXY_MAXCONN = 9500  # 2 x 9,500 sockets + 2 x MAXPIPES pipe ends fit in 20,000 descriptors
HAPROXY_MAXPIPES = 256

# splicelb's variants: the http listener's mode, its extra keys, its backend's extra keys
# and which nginx port that backend uses ("http_pp": nginx's listen ... proxy_protocol).
# Client limits too high to refuse anyone of the benchmark: what counting clients costs.
CLIENT_LIMITS = "client_maxconn = 1000000\nclient_rate = 1000000000\nclient_burst = 1000000000"
TLS_NAME = "localhost"  # the server name TLS clients send: a name that resolves to HOST
# Two routes that the benchmark's name does not take, then its own: what routing costs.
SNI_ROUTES = f"""
[[listeners.routes]]
sni = "other.example"
backend = "http"
[[listeners.routes]]
sni = "*.example.com"
backend = "http"
[[listeners.routes]]
sni = "{TLS_NAME}"
backend = "http"
"""
VARIANTS = {
    "splicelb-http": ("http", "forwarded_headers = false", "", "http"),
    "splicelb-http-defaults": ("http", "", "", "http"),
    "splicelb-address": ("http", "forwarded_headers = true", 'send_proxy = "v2"', "http_pp"),
    "splicelb-limits": ("tcp", CLIENT_LIMITS, "", "http"),
    "splicelb-tls": ("tls", SNI_ROUTES, "", "https"),
}
TLS_BALANCERS = ("splicelb-tls", "haproxy-tls")  # their http port takes TLS (to nginx's https)


# front port -> (splicelb's listener mode, HAProxy's mode, the backend it leads to)
FRONTS = {
    "bulk": ("tcp", "tcp", "bulk"),
    "http": ("tcp", "tcp", "http"),
    "ws": ("http", "tcp", "ws"),
    "http7": ("http", "http", "http"),
    "ws7": ("http", "http", "ws"),
}


# a suffix "+NAME" of a splicelb's name -> the [global] keys it sets
GLOBAL_SUFFIXES = {"info": {"log_level": '"info"'}, "nopoll": {"busy_poll_us": "0"}}
# a suffix "+NAME" that says where splicelb's stdout goes (else: its log file)
STDOUT_SUFFIXES = ("null", "pipe")


def direct_ports(backends: dict[str, int]) -> dict[str, int]:
    """The front ports of the "direct" target: each front's backend port."""
    return {**backends, **{front: backends[to] for front, (_, _, to) in FRONTS.items()}}


def listening_ports() -> set[int]:
    """Ports with a TCP socket listening on 127.0.0.1 or any address (from /proc/net/tcp)."""
    ports = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, _, port = local.partition(":")
            if state == "0A" and address in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


def wait_listening(proc: Proc, ports: list[int], what: str) -> None:
    def ready() -> bool:
        proc.check_alive()
        return set(ports) <= listening_ports()

    wait_until(ready, START_TIMEOUT, what)


@dataclass
class Target:
    """What a client talks to: a balancer's front ports, or the backends directly."""

    name: str  # "direct", "splicelb", "haproxy", "floor"
    ports: dict[str, int]
    proc: Proc | None = None
    workdir: Path | None = None
    backends: Backends | None = None

    def rss(self) -> int:
        """Resident memory of the balancer's whole process tree, in bytes."""
        if self.proc is None:
            return 0
        total = 0
        for p in self.proc.tree():
            try:
                total += p.memory_info().rss
            except Exception:  # a child that just ended
                continue
        return total

    def pids(self) -> int:
        return 0 if self.proc is None else len(self.proc.tree())

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU seconds of the balancer's process tree so far."""
        user = system = 0.0
        for p in [] if self.proc is None else self.proc.tree():
            try:
                t = p.cpu_times()
            except psutil.Error:  # a child that just ended
                continue
            user += t.user
            system += t.system
        return user, system

    @contextlib.contextmanager
    def pinned(self, cpu: int, backend: str) -> Iterator[None]:
        """The balancer's processes and the ``backend`` server's on one CPU, for a while."""
        procs = [] if self.proc is None else self.proc.tree()
        if self.backends is not None:
            procs += [p for b in self.backends.procs if b.name == backend for p in b.tree()]
        saved: dict[int, set[int]] = {}
        try:
            for p in procs:
                with contextlib.suppress(psutil.Error, OSError):
                    for thread in p.threads():  # every thread: HAProxy's nbthread, say
                        saved.setdefault(thread.id, os.sched_getaffinity(thread.id))
                        os.sched_setaffinity(thread.id, {cpu})
            yield
        finally:
            for tid, cpus in saved.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


@dataclass
class Backends:
    ports: dict[str, int]
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


def start_backends(tools: dict[str, str], tmp: Path, echo_procs: int) -> Backends:
    backends = Backends(ports={})
    try:
        port = free_port()
        iperf = Proc(
            "iperf3-server",
            [tools["iperf3"], "-s", "-B", HOST, "-p", str(port), "--forceflush"],
            tmp,
        )
        backends.procs.append(iperf)
        wait_listening(iperf, [port], "iperf3 -s")
        backends.ports["bulk"] = port

        (
            backends.ports["http"],
            backends.ports["http_pp"],
            backends.ports["https"],
        ) = start_nginx(tools["nginx"], tmp, backends)

        echo = Proc(
            "echo-backend",
            [
                sys.executable,
                str(Path(__file__).with_name("echo_server.py")),
                "--procs",
                str(echo_procs),
            ],
            tmp,
            stdout=subprocess.PIPE,
        )
        backends.procs.append(echo)
        assert echo.popen.stdout is not None
        line = echo.popen.stdout.readline().decode()  # "listening PORT", or EOF if it failed
        echo.check_alive()
        if not line.startswith("listening "):
            raise BenchError(f"echo backend said {line!r}")
        backends.ports["ws"] = int(line.split()[1])
        wait_listening(echo, [backends.ports["ws"]], "the echo backend")
    except BaseException:
        backends.stop()
        raise
    return backends


def start_nginx(nginx: str, tmp: Path, backends: Backends) -> tuple[int, int, int]:
    """nginx, one worker, as root, everything under ``tmp/nginx``: ``return 200 "ok\\n"``,
    on a plain port, on one that reads a PROXY header first (``proxy_protocol``) and on
    a TLS one (a self-signed P-256 certificate for ``TLS_NAME``)."""
    prefix = tmp / "nginx"
    prefix.mkdir(exist_ok=True)
    port, pp_port, tls_port = free_ports(3)
    cert, key = prefix / "cert.pem", prefix / "key.pem"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"),
            *("-subj", f"/CN={TLS_NAME}", "-addext", f"subjectAltName=DNS:{TLS_NAME}"),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        worker_processes 1;
        daemon off;
        master_process on;
        user root;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{ worker_connections 16384; }}
        http {{
            access_log off;
            keepalive_requests 100000000;
            keepalive_timeout 3600s;
        {temp_paths}
            server {{
                listen {HOST}:{port} backlog=4096;
                listen {HOST}:{pp_port} backlog=4096 proxy_protocol;
                listen {HOST}:{tls_port} backlog=4096 ssl;
                ssl_certificate {cert};
                ssl_certificate_key {key};
                location / {{ return 200 "ok\\n"; }}
            }}
        }}
        """)
    )
    proc = Proc(
        "nginx", [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log"], tmp
    )
    backends.procs.append(proc)
    wait_listening(proc, [port, pp_port, tls_port], "nginx")
    return port, pp_port, tls_port


def splicelb_toml(
    runtime: Path,
    workers: int,
    listeners: list[tuple[str, int, str, int]],
    extra: dict[str, tuple[str, str]] | None = None,
    **global_: int | str,
) -> str:
    """A splicelb config for measuring: ``[global]`` (no admin endpoint, no per-connection
    log lines unless ``global_`` sets ``log_level``, and the keys of ``global_``, their
    values TOML as they are), then for each
    (name, port, mode, server port) a listener on 127.0.0.1 and a backend of that one
    server, both called name; ``extra``: lines for the listener and for the backend, by
    name."""
    extra = extra or {}
    parts = [
        textwrap.dedent(f"""\
        [global]
        workers = {workers}
        runtime_dir = "{runtime}"
        admin_bind = ""
        """)
    ]
    global_ = {"log_level": '"warning"', **global_}
    parts += [f"{key} = {value}\n" for key, value in global_.items()]
    for name, port, mode, server_port in listeners:
        listener_extra, backend_extra = extra.get(name, ("", ""))
        parts.append(
            textwrap.dedent(f"""
            [[listeners]]
            name = "{name}"
            bind = "{HOST}:{port}"
            mode = "{mode}"
            default_backend = "{name}"
            {listener_extra}

            [[backends]]
            name = "{name}"
            {backend_extra}

              [[backends.servers]]
              name = "{name}1"
              address = "{HOST}:{server_port}"
            """)
        )
    return "".join(parts)


def target_toml(
    variant: str, runtime: Path, workers: int, ports: dict[str, int], servers: dict[str, int]
) -> str:
    """The config of splicelb (or a variant, with ``GLOBAL_SUFFIXES``) with the front
    ``ports`` before the backends' ``servers`` ports."""
    variant, *suffixes = variant.split("+")
    keys: dict[str, int | str] = {"maxconn": 20000, "drain_timeout": 1}
    for suffix in suffixes:
        if suffix not in STDOUT_SUFFIXES:
            keys.update(GLOBAL_SUFFIXES[suffix])
    modes = {name: FRONTS[name][0] for name in ports}
    upstream = {name: servers[FRONTS[name][2]] for name in ports}
    extra = {}
    if variant in VARIANTS:
        modes["http"], listener_extra, backend_extra, server = VARIANTS[variant]
        upstream["http"] = servers[server]
        extra["http"] = (listener_extra, backend_extra)
    listeners = [(name, ports[name], modes[name], upstream[name]) for name in ports]
    return splicelb_toml(runtime, workers, listeners, extra, **keys)


def splicelb_workdir(tmp: Path, name: str) -> tuple[Path, Path]:
    """A directory for one splicelb's config and logs, and its runtime dir: readable,
    and writable, by the user splicelb runs as (see :func:`bench.procs.unprivileged`)."""
    workdir = tmp / name
    workdir.mkdir()
    runtime = workdir / "run"
    runtime.mkdir()
    uid = unprivileged_uid()
    if uid is not None:
        tmp.chmod(0o711)  # mkdtemp's 0700 would stop it on the way
        workdir.chmod(0o755)
        os.chown(runtime, uid, uid)
    return workdir, runtime


def splicelb_argv(config: Path, workdir: Path) -> list[str]:
    """``splicelb run`` as the unit runs it: as an unprivileged user."""
    scratch = workdir / "mounts"
    scratch.mkdir()
    return unprivileged([sys.executable, "-m", "lb", "run", "-c", str(config)], scratch)


def checkout(rev: str, tmp: Path) -> Path:
    """The tree of commit ``rev`` under ``tmp`` (once per run), readable by all."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=False,
        capture_output=True,
        text=True,
    )
    if commit.returncode != 0:
        raise BenchError(f"{rev!r} is not a commit of {REPO}: {commit.stderr.strip()}")
    tree = tmp / f"code-{commit.stdout.strip()[:12]}"
    if not tree.exists():
        tree.mkdir(mode=0o755)
        archive = subprocess.Popen(
            ["git", "-C", str(REPO), "archive", commit.stdout.strip()], stdout=subprocess.PIPE
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise BenchError(f"git archive {rev} failed")
    return tree


def start_splicelb(
    workers: int, backends: Backends, tmp: Path, run_id: str, variant: str = "splicelb"
) -> Target:
    """splicelb, or one of its ``VARIANTS``, optionally ``@REV``."""
    name, _, rev = variant.partition("@")
    code = checkout(rev, tmp) if rev else REPO
    workdir, runtime = splicelb_workdir(tmp, f"splicelb-{run_id}")
    ports = dict(zip(FRONTS, free_ports(len(FRONTS)), strict=True))
    config = workdir / "splicelb.toml"
    config.write_text(target_toml(name, runtime, workers, ports, backends.ports))
    stdout = splicelb_stdout(name, workdir)
    try:
        proc = Proc("splicelb", splicelb_argv(config, workdir), workdir, code=code, stdout=stdout)
    finally:
        if stdout is not None and stdout >= 0:
            os.close(stdout)  # the child has it (a pipe's reader sees its end when it exits)
    target = Target(variant, ports, proc, workdir, backends)
    try:
        wait_listening(proc, list(ports.values()), "splicelb's listeners")
        wait_until(
            lambda: _workers_running(proc, runtime) == workers,
            START_TIMEOUT,
            f"splicelb status to show {workers} running workers",
        )
    except BaseException:
        target.stop()
        raise
    return target


def splicelb_stdout(variant: str, workdir: Path) -> int | None:
    """Where a splicelb's stdout goes: ``+null``, /dev/null; ``+pipe``, a pipe that ``cat``
    drains (as journald reads a service's stream); else None, its log file."""
    suffixes = variant.split("+")[1:]  # (its @REV is gone: see start_splicelb)
    if "null" in suffixes:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if "pipe" in suffixes:
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            Proc("splicelb-stdout", ["cat"], workdir, stdin=read, stdout=subprocess.DEVNULL)
        finally:
            os.close(read)
        return write
    return None


def _workers_running(proc: Proc, runtime: Path) -> int:
    proc.check_alive()
    result = subprocess.run(
        [sys.executable, "-m", "lb", "status", "--runtime-dir", str(runtime), "--json"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if result.returncode != 0:
        return 0
    status = json.loads(result.stdout)
    return sum(1 for w in status["workers"] if w.get("state") == "running")


def start_haproxy(
    haproxy: str,
    workers: int,
    backends: Backends,
    tmp: Path,
    run_id: str,
    busy_polling: bool = False,
    processes: bool = False,
    tls: bool = False,
) -> Target:
    """HAProxy as the issue sets it up; ``busy_polling`` adds its global ``busy-polling``
    (its threads never sleep), to compare with splicelb's ``busy_poll_us``; ``processes``
    runs ``workers`` HAProxy processes of one thread each on the same ports (HAProxy binds
    with ``SO_REUSEPORT``), laid out as splicelb's workers are; ``tls``: the ``http`` port
    routes TLS on its server name to nginx's TLS port, as ``splicelb-tls`` does."""
    workdir = tmp / f"haproxy-{run_id}"
    workdir.mkdir()
    ports = dict(zip(FRONTS, free_ports(len(FRONTS)), strict=True))
    cfg = textwrap.dedent(f"""\
        global
            nbthread {1 if processes else workers}
            maxconn {HAPROXY_MAXCONN}
            maxpipes {HAPROXY_MAXPIPES}
        """)
    if busy_polling:
        cfg += "    busy-polling\n"
    cfg += textwrap.dedent(f"""
        defaults
            mode tcp
            option splice-auto
            maxconn {HAPROXY_MAXCONN}
            timeout connect 5s
            timeout client 1h
            timeout server 1h
        """)
    for name, port in ports.items():
        if tls and name == "http":
            cfg += haproxy_sni_frontend(port, backends.ports["https"])
            continue
        _, mode, to = FRONTS[name]
        cfg += textwrap.dedent(f"""
            listen {name}
                bind {HOST}:{port}
                server {name}1 {HOST}:{backends.ports[to]}
            """)
        if mode == "http":  # as splicelb's http listener: the client's address to nginx
            cfg += "    mode http\n    option forwardfor\n    timeout tunnel 1h\n"
    path = workdir / "haproxy.cfg"
    path.write_text(cfg)
    argv = [haproxy, "-db", "-f", str(path)]
    if processes:  # a shell parent, so that the processes make one tree to count and kill
        one = " ".join(shlex.quote(a) for a in argv)
        argv = ["sh", "-c", f"for i in $(seq {workers}); do {one} & done; wait"]
    proc = Proc("haproxy", argv, workdir)
    target = Target("haproxy-tls" if tls else "haproxy", ports, proc, workdir, backends)
    try:
        wait_listening(proc, list(ports.values()), "haproxy's listeners")
        if processes:
            wait_until(
                lambda: sum(p.name() == "haproxy" for p in proc.tree()) == workers,
                START_TIMEOUT,
                f"{workers} haproxy processes",
            )
    except BaseException:
        target.stop()
        raise
    return target


def haproxy_sni_frontend(port: int, server_port: int) -> str:
    """HAProxy's SNI passthrough with the routes of ``SNI_ROUTES``: wait for the whole
    ClientHello (``req.ssl_hello_type``), then route on ``req.ssl_sni``."""
    return textwrap.dedent(f"""
        frontend http
            bind {HOST}:{port}
            tcp-request inspect-delay 5s
            tcp-request content accept if {{ req.ssl_hello_type 1 }}
            use_backend https if {{ req.ssl_sni -i other.example }}
            use_backend https if {{ req.ssl_sni -m end .example.com }}
            use_backend https if {{ req.ssl_sni -i {TLS_NAME} }}
            default_backend https

        backend https
            server https1 {HOST}:{server_port}
        """)


def start_floor(
    workers: int, backends: Backends, tmp: Path, run_id: str, copy: bool = False
) -> Target:
    """``bench/floor.py`` in front of nginx: the ``http`` port only (what ``bench/cpu.py`` uses);
    ``copy``: its read-and-write mode."""
    workdir = tmp / f"floor-{run_id}"
    workdir.mkdir()
    port = free_port()
    argv = ["-m", "bench.floor", str(port), str(backends.ports["http"]), str(workers)]
    argv += ["copy"] if copy else []
    proc = Proc("floor", [sys.executable, *argv], workdir)
    target = Target("floor", {"http": port}, proc, workdir, backends)
    try:
        wait_listening(proc, [port], "bench/floor.py")
    except BaseException:
        target.stop()
        raise
    return target


def start_target(
    name: str,
    tools: dict[str, str],
    workers: int,
    backends: Backends,
    tmp: Path,
    run_id: str,
    haproxy_busy_polling: bool = False,
) -> Target:
    if name == "direct":
        return Target("direct", direct_ports(backends.ports), backends=backends)
    log(f"  starting {name} ({workers} worker{'s' if workers > 1 else ''})")
    if name.partition("@")[0].partition("+")[0] in ("splicelb", *VARIANTS):
        return start_splicelb(workers, backends, tmp, run_id, name)
    if name in ("floor", "floor-copy"):
        return start_floor(workers, backends, tmp, run_id, copy=name == "floor-copy")
    processes = name == "haproxy-procs"
    tls = name == "haproxy-tls"
    return start_haproxy(
        tools["haproxy"], workers, backends, tmp, run_id, haproxy_busy_polling, processes, tls
    )
