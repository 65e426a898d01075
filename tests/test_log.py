"""Log lines: one JSON object per line, written whole."""

from __future__ import annotations

import json
import os

from lb.log import MAX_LINE, configure, conn_logger

CONN = {
    "client": "127.0.0.1:5",
    "listener": "public",
    "backend": "app",
    "server": "a1",
    "websocket": True,
    "status": None,
    "bytes_in": 100,
    "bytes_out": 200,
    "duration_ms": 1.5,
    "reason": "client closed",
}


def read_lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def test_every_line_has_the_contract_fields_in_order() -> None:
    r, w = os.pipe()
    log = configure("worker", 4, fd=w)
    log.info("conn", client="127.0.0.1:5", status=None, bytes_in=10)
    log.debug("hidden")
    [line] = read_lines(r)
    record = json.loads(line)
    assert list(record)[:6] == ["timestamp", "level", "event", "pid", "role", "generation"]
    assert record["event"] == "conn" and record["role"] == "worker" and record["generation"] == 4
    assert record["status"] is None and record["timestamp"].endswith("Z")
    os.close(r)
    os.close(w)


def test_a_huge_line_is_shortened_to_stay_atomic_on_a_pipe() -> None:
    r, w = os.pipe()
    log = configure("supervisor", 1, fd=w)
    problems = [f"backends[{i}].servers[0].address: port 70000 is out of range" for i in range(500)]
    log.error("reload", outcome="rejected", problems=problems)
    [line] = read_lines(r)
    assert len(line) + 1 <= MAX_LINE + 1 <= 4096
    record = json.loads(line)
    assert record["truncated"] is True and record["outcome"] == "rejected"
    assert record["problems"].startswith('["backends[0]')
    os.close(r)
    os.close(w)


def test_the_fast_conn_line_matches_the_structlog_line() -> None:
    r, w = os.pipe()
    log = configure("worker", 2, fd=w)
    log.info("conn", **CONN)
    conn_logger(log, "worker", 2, level="info", fmt="json")(**CONN)
    slow, fast = (json.loads(line) for line in read_lines(r))
    assert list(slow) == list(fast)
    assert {k: v for k, v in slow.items() if k != "timestamp"} == {
        k: v for k, v in fast.items() if k != "timestamp"
    }
    os.close(r)
    os.close(w)
