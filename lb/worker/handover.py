"""Handing open tunnels to the next generation's workers, and adopting them there.

Theory of operation
-------------------
After its head, a tunnel is two sockets and, while bytes are in flight, a
pipe per direction that holds them: file descriptors, which a Unix socket
carries from one process to another (``SCM_RIGHTS``).  On reload, once the
new generation serves, the supervisor writes its number in the old
generation's pool header (``H_HANDOVER_TO``) and sends the old workers
SIGTERM.  An old worker that finds a newer generation there hands its tunnels
over instead of draining them (:class:`Sender`):

1. it connects to each new worker's handover socket
   (``handover-<generation>-<slot>.sock`` in the runtime dir, ``SOCK_SEQPACKET``:
   one message, one tunnel, its descriptors with it) and says hello with its
   protocol version; the new worker answers whether it understands it;
2. it sends its tunnels in batches (``BATCH`` per turn of its loop, so that the
   ones not sent yet are served meanwhile), round-robin over the new workers:
   per tunnel one message, its state (:func:`state_of`, JSON) and its
   descriptors: the client's and the server's sockets, and each direction's
   pipe if it holds bytes;
3. once the kernel has taken a message (the descriptors are in flight, the
   kernel holds them), it forgets the tunnel and closes its own copies: no
   close reaches a peer, and no ``conn`` line is written: the adopter writes
   it when the tunnel ends, with its whole duration and bytes.

The new worker adopts each tunnel as it was (:class:`Receiver`, then the
worker's ``adopt``): a flow that was reading reads, a flow whose pipe holds
bytes waits for its destination to take them, an ended flow stays ended,
and its idle deadline goes on from its last byte.  Bytes that arrive in
between wait in the kernel's socket buffers and the pipes keep theirs in
order: neither peer sees anything but a pause of a few milliseconds.

Not handed over: connections before their tunnel (they finish in the old
worker), tunnels of a backend with ``on_reload = "close"``, and what no new
worker would take (none understands the version, or they are gone): those
drain as on stop.  A worker killed in the middle of a handover loses only
the tunnels it still held: a message the kernel has taken is the new
worker's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import orjson

from lb.sockets import HANDOVER_TYPE as SOCK_TYPE
from lb.worker.conn import Connection
from lb.worker.loop import Loop
from lb.worker.splice import FlowState

VERSION = 1  # of the handover's messages; a receiver takes versions up to its own
BATCH = 256  # tunnels sent per turn of the old worker's loop
HELLO_TIMEOUT = 2.0  # seconds a new worker has to answer the hello
MAX_MESSAGE = 4096
MAX_FDS = 6  # two sockets, two pipes of two ends

State = dict[str, Any]
Adopt = Callable[[State, list[int]], None]


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Sender:
    """An old worker's side: channels to the new workers, and one message per tunnel."""

    def __init__(self, runtime_dir: str, generation: int, log: Any) -> None:
        self.generation = generation
        self.channels: list[socket.socket] = []
        self.next = 0
        pattern = os.path.join(runtime_dir, f"handover-{generation}-*.sock")
        for path in sorted(glob.glob(pattern)):
            try:
                self.channels.append(_hello(path))
            except (OSError, ValueError) as exc:
                log.warning("handover_refused", path=path, reason=str(exc))

    def send(self, message: bytes, fds: list[int]) -> bool | None:
        """Send one tunnel to the next new worker that takes it: True once sent, False if
        every channel is full for now (try again soon), None if no channel is left."""
        busy = 0
        while self.channels:
            channel = self.channels[self.next % len(self.channels)]
            self.next += 1
            try:
                socket.send_fds(channel, [message], fds, socket.MSG_DONTWAIT)
                return True
            except BlockingIOError:
                busy += 1
                if busy >= len(self.channels):
                    return False
            except OSError:  # that worker is gone: the others take the rest
                self.channels.remove(channel)
                channel.close()
        return None

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()


def _hello(path: str) -> socket.socket:
    """Connect to a new worker and agree on the version (blocking, bounded)."""
    channel = socket.socket(socket.AF_UNIX, SOCK_TYPE)
    try:
        channel.settimeout(HELLO_TIMEOUT)
        channel.connect(path)
        channel.sendall(orjson.dumps({"hello": VERSION, "pid": os.getpid()}))
        answer = orjson.loads(channel.recv(MAX_MESSAGE) or b"{}")
        if not answer.get("ok"):
            raise ValueError(f"it takes version {answer.get('version')}, ours is {VERSION}")
        channel.setblocking(False)
    except BaseException:
        channel.close()
        raise
    return channel


class Receiver:
    """A new worker's side: its handover socket, and a channel per old worker."""

    __slots__ = ("adopt", "channels", "listener", "log", "loop")

    def __init__(self, loop: Loop, listener: socket.socket, adopt: Adopt, log: Any) -> None:
        self.loop = loop
        self.listener = listener
        self.adopt = adopt
        self.log = log
        self.channels: set[Channel] = set()
        loop.protect(listener.fileno())
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            if peer_uid(sock) not in (os.geteuid(), 0):
                sock.close()
                continue
            sock.setblocking(False)
            channel = Channel(self, sock)
            self.channels.add(channel)
            self.loop.add_reader(sock.fileno(), channel.on_readable)

    def fail(self, exc: BaseException) -> None:
        """A bug while accepting (the loop reported it): the old workers drain instead."""
        self.stop()

    def stop(self) -> None:
        """No more adoptions (this worker drains): old workers drain what they hold."""
        self.loop.unprotect(self.listener.fileno())
        self.loop.close(self.listener.detach())
        for channel in list(self.channels):
            channel.end()


class Channel:
    """One old worker's messages: a hello, then one tunnel each."""

    __slots__ = ("adopted", "greeted", "receiver", "sock")

    def __init__(self, receiver: Receiver, sock: socket.socket) -> None:
        self.receiver = receiver
        self.sock = sock
        self.greeted = False
        self.adopted = 0

    def on_readable(self) -> None:
        for _ in range(BATCH):
            try:
                message, fds, flags, _ = socket.recv_fds(
                    self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:
                message, fds, flags = b"", [], 0
            if not message:
                _close_all(fds)
                self.end()
                return
            if not self.greeted:
                self._greet(message)
                continue
            if flags & socket.MSG_CTRUNC:  # descriptors lost on the way: not a whole tunnel
                _close_all(fds)
                continue
            try:
                self.receiver.adopt(orjson.loads(message), fds)
            except Exception as exc:
                self.receiver.log.error("adopt_failed", error=repr(exc))
                _close_all(fds)
                continue
            self.adopted += 1

    def _greet(self, message: bytes) -> None:
        hello = orjson.loads(message)
        ok = isinstance(hello, dict) and 0 < int(hello.get("hello", 0)) <= VERSION
        self.sock.send(orjson.dumps({"ok": ok, "version": VERSION}))
        self.greeted = ok
        if not ok:
            self.end()

    def fail(self, exc: BaseException) -> None:
        self.end()

    def end(self) -> None:
        if self.sock.fileno() >= 0:
            self.receiver.loop.close(self.sock.detach())
        self.receiver.channels.discard(self)
        if self.adopted:
            self.receiver.log.info("adopted", tunnels=self.adopted)
            self.adopted = 0


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def state_of(conn: Connection) -> tuple[bytes, list[int]]:
    """One tunnel as a message: its state and its descriptors (its byte counts flushed)."""
    tunnel = conn.tunnel
    backend = conn.backend
    assert tunnel is not None and backend is not None
    tunnel.flush()
    fds = [tunnel.up.src, tunnel.down.src]
    flows = []
    for flow in (tunnel.up, tunnel.down):
        pipe = flow.pipe
        flows.append([flow.ended, flow.queued if pipe else 0, pipe[2] if pipe else 0])
        if pipe is not None:
            fds += [pipe[0], pipe[1]]
    state = {
        "v": VERSION,
        "listener": conn.listener.name,
        "mode": conn.listener.mode,
        "backend": backend.name,
        "server": backend.names[conn.server],
        "client": list(conn.addr[:2]),
        "started": conn.started,
        "websocket": conn.websocket,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "active_at": tunnel.active_at,
        "keepalive": tunnel.keepalive,
        "idle_timeout": tunnel.idle_timeout,
        "flows": flows,
    }
    return orjson.dumps(state), fds


def flows_of(state: State, fds: list[int]) -> tuple[FlowState, FlowState]:
    """The two flows of an adopted tunnel: (ended, queued, pipe) each, the pipes from ``fds``."""
    rest = iter(fds[2:])
    out: list[FlowState] = []
    for ended, queued, slots in state["flows"]:
        pipe = (next(rest), next(rest), slots) if slots else None
        out.append((bool(ended), int(queued), pipe))
    return out[0], out[1]
