"""A writer of the live pool dies mid-write: readers report the record, nothing waits on it.

The fault: a process that writes a server's health record is killed with
SIGKILL right after its first store, the odd sequence that tells readers a
write is under way, so the record stays mid-write.  The server is in maint
and its last check is long over, so the live prober never writes that record
while the test looks (it would repair it).  Then ``splicelb status`` (table
and JSON), the admin endpoint (``/metrics``, ``/status``) and ``splicelb
reload`` must all answer, and a prober that restarts must repair the record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.faults.checks import HEAD_TIMEOUT, still_serves
from tests.integration.harness import (
    REPO,
    EchoBackend,
    SpliceLB,
    backend,
    cli,
    config,
    free_port,
    listener,
    wait_until,
)

INTERVAL, TIMEOUT = 0.2, 0.2  # the backend's health checks
# A last check older than this is over, and none follows in maint: with checks every
# INTERVAL (+10%) that end within TIMEOUT, a check under way would have been published.
QUIET = 2.0
QUIET_SERVER = 1  # echo2's index in the pool
ANSWER_WITHIN = 30  # seconds for any CLI command; a reader waiting for ever fails here

# A writer of echo2's record that SIGKILLs itself at its second store: the first one
# made the sequence odd, the fields are never written.
DIE_MID_WRITE = """
import os, signal, sys
from lb.pool.shm import HealthRecord, Pool

class DieOnSecondStore:
    def __init__(self, view):
        self.view, self.stores = view, 0
    def __getitem__(self, index):
        return self.view[index]
    def __setitem__(self, index, value):
        if self.stores:
            os.kill(os.getpid(), signal.SIGKILL)
        self.view[index] = value
        self.stores += 1

pool = Pool.open(sys.argv[1])
pool.q = DieOnSecondStore(pool.q)
pool.write_record(int(sys.argv[2]), HealthRecord(2, 0, 9, 0.0, 0.0, 0.0, 9, "never finished"))
"""


def start(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> tuple[SpliceLB, int, int]:
    """An instance over echo1 and echo2, both up, echo2 in maint and no check of it under way;
    (the instance, its port, its admin port)."""
    port, admin = free_port(), free_port()
    health = f'[backends.health]\ntype = "http"\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\n'
    lb = start_lb(
        config(
            listener(f"127.0.0.1:{port}", "app", extra=f"head_timeout = {HEAD_TIMEOUT:g}"),
            backend("app", [(b.name, b.address) for b in echo_pair], extra=health),
            admin_bind=f"127.0.0.1:{admin}",
        )
    )
    wait_until(lambda: all(s["health"] == "up" for s in servers(lb)), 15, "both servers up")
    assert cli("maint", "--runtime-dir", str(lb.runtime_dir), "app/echo2").returncode == 0
    wait_until(lambda: servers(lb)[QUIET_SERVER]["check"]["age_s"] > QUIET, 15, "echo2 quiet")
    wait_until(lambda: lb.events("admin_start"), 15, "the admin endpoint")
    return lb, port, admin


def status(lb: SpliceLB) -> dict[str, Any]:
    result = cli("status", "--runtime-dir", str(lb.runtime_dir), "--json", timeout=ANSWER_WITHIN)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def servers(lb: SpliceLB) -> list[dict[str, Any]]:
    return list(status(lb)["backends"][0]["servers"])


def kill_a_writer_mid_write(lb: SpliceLB, server: int) -> None:
    writer = subprocess.run(
        [sys.executable, "-c", DIE_MID_WRITE, str(lb.runtime_dir / "pool"), str(server)],
        cwd=REPO,
        capture_output=True,
        timeout=ANSWER_WITHIN,
        check=False,
    )
    assert writer.returncode == -signal.SIGKILL, writer.stderr


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=ANSWER_WITHIN) as reply:
        assert reply.status == 200
        return bytes(reply.read())


def test_a_record_left_mid_write_is_reported_and_the_reload_completes(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port, admin = start(echo_pair, start_lb)
    kill_a_writer_mid_write(lb, QUIET_SERVER)

    echo1, echo2 = servers(lb)
    assert echo1["health"] == "up"
    assert (echo2["health"], echo2["admin"]) == ("unknown", "maint")
    assert echo2["health_reason"] == "health record unreadable: its last write never finished"
    table = cli("status", "--runtime-dir", str(lb.runtime_dir), timeout=ANSWER_WITHIN)
    assert table.returncode == 0, table.stderr
    [row] = [
        line for line in table.stdout.splitlines() if line.startswith("app ") and "echo2" in line
    ]
    assert row.split()[3:5] == ["unknown", "maint"]
    assert row.endswith("health record unreadable: its last write never finished")

    states = {
        (sample.labels["server"], sample.labels["state"]): sample.value
        for family in text_string_to_metric_families(
            get(f"http://127.0.0.1:{admin}/metrics").decode()
        )
        if family.name == "splicelb_server_health"
        for sample in family.samples
    }
    assert states[("echo2", "unknown")] == 1 and states[("echo2", "up")] == 0
    assert states[("echo1", "up")] == 1 and states[("echo1", "unknown")] == 0
    answer = json.loads(get(f"http://127.0.0.1:{admin}/status"))
    assert answer["backends"][0]["servers"][QUIET_SERVER]["health"] == "unknown"

    reload = cli("reload", "--runtime-dir", str(lb.runtime_dir), timeout=ANSWER_WITHIN)
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.strip() == "reloaded: generation 2 is serving"
    after = status(lb)
    echo1, echo2 = after["backends"][0]["servers"]
    assert after["generation"] == 2
    assert echo1["health"] == "up"  # carried over
    assert (echo2["health"], echo2["admin"]) == ("unchecked", "maint")  # not carried: afresh
    still_serves(lb, port)


def test_a_prober_that_starts_repairs_the_record_left_mid_write(
    echo_pair: tuple[EchoBackend, EchoBackend], start_lb: Callable[..., SpliceLB]
) -> None:
    lb, port, _ = start(echo_pair, start_lb)
    kill_a_writer_mid_write(lb, QUIET_SERVER)
    assert servers(lb)[QUIET_SERVER]["health"] == "unknown"

    [prober] = lb.events("prober_start")
    os.kill(prober["pid"], signal.SIGKILL)
    wait_until(lambda: len(lb.events("prober_start")) == 2, 15, "a new prober")
    repaired = lb.events("record_repaired")  # logged before prober_start
    assert [(r["backend"], r["server"], r["pid"]) for r in repaired] == [
        ("app", "echo2", lb.events("prober_start")[1]["pid"])
    ]

    echo2 = servers(lb)[QUIET_SERVER]
    assert (echo2["health"], echo2["admin"]) == ("up", "maint")  # as it stood: the last check's
    assert echo2["check"]["result"] == "HTTP 200"
    still_serves(lb, port)
