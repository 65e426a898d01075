"""The handover's channel, on real SOCK_SEQPACKET sockets: every tunnel sent is adopted."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from lb.worker.handover import Channel, State
from lb.worker.loop import Loop


@dataclass
class Log:
    lines: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    error = warning = info


@dataclass
class Receiver:
    """What a channel needs of its receiver."""

    loop: Loop
    adopted: list[tuple[State, list[int]]] = field(default_factory=list)
    channels: set[Channel] = field(default_factory=set)
    granted: int = 0
    log: Log = field(default_factory=Log)

    def adopt(self, state: State, fds: list[int]) -> None:
        self.adopted.append((state, fds))

    def room(self) -> int:
        return 1000

    def grant(self, channel: Channel) -> int:
        return 0


def test_tunnels_queued_when_the_old_worker_closes_with_credit_unread_are_all_adopted() -> None:
    """Closing a Unix socket with unread messages makes the kernel report ECONNRESET to
    its peer before the messages still queued there: they must be read all the same."""
    loop = Loop(on_error=lambda exc: pytest.fail(repr(exc)))
    receiver = Receiver(loop)
    new, old = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    new.setblocking(False)
    channel = Channel(receiver, new)  # type: ignore[arg-type]
    channel.greeted, channel.credit = True, 10
    receiver.channels.add(channel)
    pipes = [os.pipe() for _ in range(10)]
    for index, (r, w) in enumerate(pipes):
        socket.send_fds(old, [orjson.dumps({"tunnel": index})], [r, w])
    new.send(b'{"credit": 10}')  # credit the old worker never reads
    old.close()
    channel.on_readable()
    assert [state["tunnel"] for state, _ in receiver.adopted] == list(range(10))
    assert all(len(fds) == 2 for _, fds in receiver.adopted)
    for r, w in pipes:
        os.close(r)
        os.close(w)
    for _, fds in receiver.adopted:
        for fd in fds:
            os.close(fd)
    loop.shutdown()
