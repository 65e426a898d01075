"""The demo: two example echo backends behind splicelb, as in examples/splicelb.toml.

Run ``python examples/demo.py`` (``--port`` and ``--admin-port`` choose the
balancer's ports) and open the URL it prints; Ctrl-C stops everything.

The demo makes a temporary directory and writes its own copy of
examples/splicelb.toml there: the listener on ``--port``, the admin endpoint
on ``--admin-port``, the backends on ports the system picks, the runtime dir
inside that directory. The addresses it prints are read back from that
config. The balancer's JSON log lines go to stdout as they happen. When it
stops, every process it started has ended and the directory is removed, and
its last line says so.

Theory of operation: one selector watches the children's stdout, their
pidfds (readable once a child has exited) and the wakeup pipe that the
signal module writes a byte to for each SIGINT, SIGTERM or SIGHUP (the
handlers themselves do nothing). The children run in process groups of their
own, so Ctrl-C reaches the demo alone and the demo stops them in order; the
kernel sends them SIGTERM if the demo dies without doing so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from lb.config import Config, load_config
from lb.config_table import Address
from lb.errors import ConfigError
from lb.parent import set_pdeathsig

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "splicelb.toml"
START_TIMEOUT = 30.0  # seconds a backend, then the balancer, gets to be ready
STOP_TIMEOUT = 15.0  # seconds the children get to exit after SIGTERM, before SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LISTENING_RE = re.compile(r"listening on http://\S+:([0-9]+)")
STOPPED = "splicelb demo stopped"


class DemoError(Exception):
    """The demo cannot go on; the text says why."""


class Interrupted(Exception):
    """A stop signal came while the demo was starting."""


class Child:
    """A process the demo started, and what it has written of its current line."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            process_group=0,  # Ctrl-C reaches the demo alone; it stops the children in order
            # The demo has no threads, so running Python between fork and exec is safe here.
            preexec_fn=lambda: set_pdeathsig(signal.SIGTERM),  # noqa: PLW1509
        )
        assert self.popen.stdout is not None
        self.pipe = self.popen.stdout
        self.stdout = self.pipe.fileno()
        os.set_blocking(self.stdout, False)
        self.pidfd = os.pidfd_open(self.popen.pid)
        self.partial = b""
        self.eof = False  # its stdout is at end of file

    def read_lines(self) -> list[str] | None:
        """The complete lines it has written since the last call; None at end of file."""
        try:
            data = os.read(self.stdout, 65536)
        except BlockingIOError:
            return []
        if not data:  # end of file; a last line without its newline still counts
            rest, self.partial = self.partial, b""
            return [rest.decode("utf-8", "replace")] if rest else None
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def close(self) -> None:
        """Close what the demo holds of it (once it has exited)."""
        self.pipe.close()
        os.close(self.pidfd)


def _no_op(signum: int, frame: FrameType | None) -> None:
    """The signal's number reaches the selector through the wakeup pipe."""


class Demo:
    """The demo's children, their output and the stop signals, on one selector."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.children: list[Child] = []
        self.wakeup, wakeup_write = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write)
        for sig in STOP_SIGNALS:
            signal.signal(sig, _no_op)
        self.selector.register(self.wakeup, selectors.EVENT_READ, ("signal", None))
        self.signals = 0  # stop signals received so far

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv)
        self.children.append(child)
        self.selector.register(child.stdout, selectors.EVENT_READ, ("output", child))
        self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
        return child

    def pump(self, timeout: float | None) -> tuple[list[tuple[Child, str]], list[Child]]:
        """Wait up to ``timeout`` for output, exits or signals; echo the output.

        Returns the lines read and the children that have exited.
        """
        lines: list[tuple[Child, str]] = []
        exited: list[Child] = []
        for key, _ in self.selector.select(timeout):
            kind, child = key.data
            if child is None:
                self.signals += len(os.read(self.wakeup, 64))
            elif kind == "output":
                read = child.read_lines()
                if read is None:
                    self.selector.unregister(child.stdout)
                    child.eof = True
                else:
                    lines.extend((child, line) for line in read)
            else:
                self.selector.unregister(child.pidfd)
                child.popen.wait()
                exited.append(child)
        for _, line in lines:
            print(line)
        sys.stdout.flush()
        return lines, exited

    def wait_for(
        self, child: Child, ready: Callable[[str], bool], failed: Callable[[], str]
    ) -> str:
        """The first line of ``child`` that ``ready`` accepts, within START_TIMEOUT.

        ``failed`` says why the child exited, if it does first.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            lines, exited = self.pump(left)
            for source, line in lines:
                if source is child and ready(line):
                    return line
            if self.signals:
                raise Interrupted
            if exited:
                gone, why = exited[0], ""
                if gone is child:
                    self.drain(child, ready)
                    why = failed()
                code = gone.popen.returncode
                raise DemoError(f"{gone.name} exited with code {code} {why}".rstrip())
        raise DemoError(f"{child.name} not ready after {START_TIMEOUT:g} s")

    def drain(self, child: Child, take: Callable[[str], object]) -> None:
        """Hand ``take`` the lines an exited child left in its pipe (for up to 2 s: a
        process it started may still hold the pipe open)."""
        until = time.monotonic() + 2
        while not child.eof and (left := until - time.monotonic()) > 0:
            for source, line in self.pump(left)[0]:
                if source is child:
                    take(line)

    def run_until_stopped(self, seconds: float) -> int:
        """Echo the children's output until a stop signal (0), ``seconds`` pass (0), or
        a child exits (1)."""
        deadline = time.monotonic() + seconds if seconds else None
        while not self.signals:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return 0
            _, exited = self.pump(left)
            for child in exited:
                print(
                    f"demo: {child.name} exited with code {child.popen.returncode}", file=sys.stderr
                )
                return 1
        return 0

    def stop(self) -> None:
        """SIGTERM to every child; SIGKILL to those still running after STOP_TIMEOUT or
        another stop signal. Returns once every child has exited."""
        running = [child for child in self.children if child.popen.returncode is None]
        for child in running:
            child.signal(signal.SIGTERM)
        signals, deadline = self.signals, time.monotonic() + STOP_TIMEOUT
        while any(child.popen.returncode is None for child in running):
            left = deadline - time.monotonic()
            if left <= 0 or self.signals > signals:
                break
            self.pump(left)
        for child in running:
            child.signal(signal.SIGKILL)
            child.popen.wait()
        for child in self.children:
            child.close()


def with_port(address: Address, port: int) -> str:
    """``address`` as written in a config, on another port."""
    return f"{str(address).rpartition(':')[0]}:{port}"


def write_config(path: Path, port: int, admin_port: int, backend_ports: dict[str, int]) -> Config:
    """The template with the demo's ports and runtime dir, written to ``path`` and loaded.

    The template's text is kept (its comments too); each value changed must be
    written exactly once there, as a quoted string.
    """
    template = load_config(TEMPLATE)
    if template.global_.admin_bind is None:
        raise DemoError(f'{TEMPLATE}: the demo needs global.admin_bind (it is "")')
    changes = {
        template.global_.runtime_dir: str(path.parent / "run"),
        str(template.listeners[0].bind): with_port(template.listeners[0].bind, port),
        str(template.global_.admin_bind): with_port(template.global_.admin_bind, admin_port),
    }
    for server in template.backends[0].servers:
        changes[str(server.address)] = with_port(server.address, backend_ports[server.name])
    text = TEMPLATE.read_text()
    for old, new in changes.items():
        if text.count(f'"{old}"') != 1:
            raise DemoError(f'{TEMPLATE}: expected "{old}" exactly once')
        text = text.replace(f'"{old}"', f'"{new}"')
    path.write_text(text)
    return load_config(path)


# The config keys the demo's options set, as splicelb names them in its errors.
OPTION_OF_KEY = {"listeners[0].bind": "--port", "global.admin_bind": "--admin-port"}


def start_error(records: list[dict[str, object]]) -> Callable[[], str]:
    """Why the balancer did not start: the reason of its last error line, and the
    demo's option that changes what it names."""

    def why() -> str:
        reasons = [str(r["reason"]) for r in records if r.get("level") == "error" and "reason" in r]
        if not reasons:
            return "(its log above says why)"
        reason = reasons[-1]
        options = [option for key, option in OPTION_OF_KEY.items() if reason.startswith(key + ":")]
        hint = f"; choose another with {options[0]}" if options else ""
        return f"({reason}{hint})"

    return why


def run(demo: Demo, workdir: Path, args: argparse.Namespace) -> int:
    python = sys.executable
    backend_ports: dict[str, int] = {}
    for server in load_config(TEMPLATE).backends[0].servers:
        argv = [python, str(HERE / "echo_backend.py"), "--name", server.name, "--port", "0"]
        backend = demo.start(f"backend {server.name}", argv)
        line = demo.wait_for(backend, lambda text: LISTENING_RE.search(text) is not None, str)
        listening = LISTENING_RE.search(line)
        assert listening is not None
        backend_ports[server.name] = int(listening[1])
    config = write_config(workdir / "splicelb.toml", args.port, args.admin_port, backend_ports)
    balancer = demo.start("splicelb", [python, "-m", "lb", "run", "-c", config.path])
    records: list[dict[str, object]] = []
    # Ready when its workers accept and its admin endpoint answers: the URLs printed work.
    waiting = {"serving", "admin_start"} if config.global_.admin_bind else {"serving"}

    def ready(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        if isinstance(record, dict):
            records.append(record)
            waiting.discard(record.get("event", ""))
        return not waiting

    demo.wait_for(balancer, ready, start_error(records))
    listener, admin = config.listeners[0], config.global_.admin_bind
    ws = [r.path_prefix for r in listener.routes if r.websocket and r.path_prefix]
    print(f"\nsplicelb demo is up: open http://{listener.bind}/", end="")
    print(f" (WebSocket echo at ws://{listener.bind}{ws[0]})" if ws else "")
    if admin is not None:
        print(f"live dashboard: http://{admin}/  metrics: http://{admin}/metrics")
    print(f"config: {config.path} (try: splicelb status -c {config.path})")
    print(f"runtime dir: {config.global_.runtime_dir}")
    print("each page names the backend server that served it; Ctrl-C stops the demo\n")
    sys.stdout.flush()
    return demo.run_until_stopped(args.seconds)


def port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got '{text}'")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--port", type=port_number, default=8080, help="the balancer's listener port (8080)"
    )
    parser.add_argument(
        "--admin-port",
        type=port_number,
        default=9900,
        help="the admin endpoint's port: dashboard, /status, /metrics (9900)",
    )
    parser.add_argument(
        "--seconds", type=float, default=0, help="stop after this long (0: run until Ctrl-C)"
    )
    args = parser.parse_args(argv)
    if args.seconds < 0:
        parser.error(f"--seconds must be 0 or more, got {args.seconds:g}")
    if args.port == args.admin_port:
        parser.error(f"--port and --admin-port must differ (both are {args.port})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Demo()
    workdir = Path(tempfile.mkdtemp(prefix="splicelb-demo-"))
    try:
        return run(demo, workdir, args)
    except Interrupted:
        return 0
    except (DemoError, ConfigError) as exc:
        reason = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
        print(f"demo: {reason}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"{STOPPED}: every process it started has exited; {workdir} is removed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
