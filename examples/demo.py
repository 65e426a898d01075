"""The demo: two example echo backends behind splicelb, as in examples/splicelb.toml.

Run ``python examples/demo.py`` and open the URL it prints; Ctrl-C stops
everything.  The balancer's JSON log lines go to stdout as they happen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "splicelb.toml"
BACKENDS = (("echo1", 9001), ("echo2", 9002))
URL = "http://127.0.0.1:8080/"


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)


def wait_for_line(proc: subprocess.Popen[bytes], want: str, what: str, timeout: float = 20) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            raise SystemExit(f"demo: {what} exited before it was ready")
        sys.stdout.write(line)
        if want in line:
            return
    raise SystemExit(f"demo: {what} not ready after {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=0, help="stop after this long (0: run until Ctrl-C)"
    )
    args = parser.parse_args(argv)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, port in BACKENDS:
            backend = start(
                [sys.executable, str(HERE / "echo_backend.py"), "--name", name, "--port", str(port)]
            )
            procs.append(backend)
            wait_for_line(backend, "listening", f"backend {name}")
        balancer = start([sys.executable, "-m", "lb", "run", "-c", str(CONFIG)])
        procs.append(balancer)
        wait_for_line(balancer, '"event":"ready"', "splicelb")
        print(f"\nsplicelb demo is up: open {URL} (WebSocket echo at ws://127.0.0.1:8080/ws)")
        print("live dashboard: http://127.0.0.1:9900/  metrics: http://127.0.0.1:9900/metrics")
        print("each page and echo names the backend that served it; Ctrl-C stops the demo\n")
        sys.stdout.flush()
        deadline = time.monotonic() + args.seconds if args.seconds else None
        assert balancer.stdout is not None
        os.set_blocking(balancer.stdout.fileno(), False)
        while deadline is None or time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                print("demo: a process exited; stopping", file=sys.stderr)
                return 1
            for line in iter(balancer.stdout.readline, b""):
                record = json.loads(line)
                sys.stdout.write(line.decode())
                if record.get("event") == "stopped":
                    return 0
            sys.stdout.flush()
            time.sleep(0.2)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
