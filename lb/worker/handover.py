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

A tunnel whose client side reads HTTP requests (:mod:`lb.worker.requests`)
goes between two requests, when it holds no byte of one: its state says so
(``requests``: how many so far), and the adopter reads and judges the next
requests by its own config.  One in the middle of a request is looked at again on the following
turns, for up to a second (``HANDOVER_PATIENCE``); one whose last request
closes it or was refused stays.  A receiver of this version's first form
ignores ``requests``, and splices that client's later requests unjudged, as
it did its own.

Not handed over: connections before their tunnel (they finish in the old
worker), tunnels of a backend with ``on_reload = "close"``, the request
readers above that are not between two requests, and what no new worker
would take (none understands the version, or they are gone): those drain as
on stop.  A worker killed in the middle of a handover loses only
the tunnels it still held: a message the kernel has taken is the new
worker's.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import glob
import os
import socket
import struct
from collections.abc import Callable
from time import monotonic
from typing import Any

import orjson

from lb.sockets import HANDOVER_TYPE as SOCK_TYPE
from lb.worker.conn import Connection
from lb.worker.loop import Loop
from lb.worker.splice import FlowState

VERSION = 1  # of the handover's messages; a receiver takes versions up to its own
BATCH = 64  # tunnels sent per turn of the old worker's loop
CREDIT = 64  # tunnels a new worker lets an old one send at a time (see Receiver)
HELLO_TIMEOUT = 2.0  # seconds a new worker has to answer the hello
MAX_MESSAGE = 4096
MAX_FDS = 6  # two sockets, two pipes of two ends

State = dict[str, Any]
Adopt = Callable[[State, list[int]], None]


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class Outlet:
    """One channel to a new worker, and how many tunnels that worker will still take."""

    __slots__ = ("credit", "sock")

    def __init__(self, sock: socket.socket, credit: int) -> None:
        self.sock = sock
        self.credit = credit

    def hear(self) -> None:
        """Take the credit the new worker has granted since (never waits)."""
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionResetError("the new worker closed the channel")
            self.credit += int(orjson.loads(data).get("credit", 0))


class Sender:
    """An old worker's side: channels to the new workers, and one message per tunnel.

    Credit that arrives wakes the old worker (``on_credit``): it sends again at once,
    it does not poll."""

    def __init__(
        self,
        loop: Loop,
        runtime_dir: str,
        generation: int,
        on_credit: Callable[[], None],
        log: Any,
    ) -> None:
        self.loop = loop
        self.generation = generation
        self.on_credit = on_credit
        self.outlets: list[Outlet] = []
        self.next = 0
        pattern = os.path.join(runtime_dir, f"handover-{generation}-*.sock")
        for path in sorted(glob.glob(pattern)):
            try:
                outlet = _hello(path)
            except (OSError, ValueError) as exc:
                log.warning("handover_refused", path=path, reason=str(exc))
                continue
            self.outlets.append(outlet)
            loop.add_reader(outlet.sock.fileno(), functools.partial(self._heard, outlet))

    def _heard(self, outlet: Outlet) -> None:
        try:
            outlet.hear()
        except (OSError, ValueError):
            self._drop(outlet)
        self.on_credit()

    def _drop(self, outlet: Outlet) -> None:
        """That new worker is gone: the others take the rest."""
        if outlet in self.outlets:
            self.outlets.remove(outlet)
            self.loop.close(outlet.sock.detach())

    def send(self, message: bytes, fds: list[int]) -> bool | None:
        """Send one tunnel to the next new worker that takes it: True once sent, False if
        none will take one now (full, or no credit: try again soon), None if none is left."""
        tried = 0
        while self.outlets and tried < len(self.outlets):
            outlet = self.outlets[self.next % len(self.outlets)]
            self.next += 1
            tried += 1
            try:
                if not outlet.credit:
                    outlet.hear()
                    if not outlet.credit:
                        continue
                socket.send_fds(outlet.sock, [message], fds, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                self._drop(outlet)
                tried = 0
                continue
            outlet.credit -= 1
            return True
        return False if self.outlets else None

    def close(self) -> None:
        for outlet in list(self.outlets):
            with contextlib.suppress(OSError, ValueError):
                outlet.hear()  # credit left unread would reset the new worker's end
            self._drop(outlet)


def _hello(path: str) -> Outlet:
    """Connect to a new worker, agree on the version, take its first credit (blocking,
    bounded)."""
    sock = socket.socket(socket.AF_UNIX, SOCK_TYPE)
    try:
        sock.settimeout(HELLO_TIMEOUT)
        sock.connect(path)
        sock.sendall(orjson.dumps({"hello": VERSION, "pid": os.getpid()}))
        answer = orjson.loads(sock.recv(MAX_MESSAGE) or b"{}")
        if not answer.get("ok"):
            raise ValueError(f"it takes version {answer.get('version')}, ours is {VERSION}")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return Outlet(sock, int(answer.get("credit", 0)))


class Receiver:
    """A new worker's side: its handover socket, and a channel per old worker.

    Credit: a new worker tells each old worker how many tunnels it may send
    (``CREDIT`` at a time, as many as the worker has room for, see
    lb.worker.limits), and grants more as it adopts them and as room frees up;
    an old worker sends no tunnel without credit.  So no tunnel ever waits in
    a channel for room: one that a new worker cannot take stays with its old
    worker, served, until it ends or drains.
    """

    __slots__ = ("adopt", "channels", "granted", "listener", "log", "loop", "room")

    def __init__(
        self,
        loop: Loop,
        listener: socket.socket,
        adopt: Adopt,
        room: Callable[[], int],
        log: Any,
    ) -> None:
        """``room()``: how many more connections this worker may hold (its cap)."""
        self.loop = loop
        self.listener: socket.socket | None = listener
        self.adopt = adopt
        self.room = room
        self.log = log
        self.channels: set[Channel] = set()
        self.granted = 0  # credit given and not used yet, over every channel
        loop.protect(listener.fileno())
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        while self.listener is not None:
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

    def grant(self, channel: Channel) -> int:
        """More credit for ``channel``, within the room not promised to another."""
        more = min(CREDIT - channel.credit, self.room() - self.granted)
        if more <= 0:
            return 0
        channel.credit += more
        self.granted += more
        return more

    def release(self) -> None:
        """Room freed up: channels low on credit get more."""
        for channel in list(self.channels):
            if channel.greeted and channel.credit < CREDIT // 2:
                more = self.grant(channel)
                if more:
                    channel.tell({"credit": more})

    def fail(self, exc: BaseException) -> None:
        """A bug while accepting (the loop reported it): the old workers drain instead."""
        self.stop_listening()

    def stop_listening(self) -> None:
        """No new channels (this worker drains); the open ones are read to their end, so
        that no tunnel already on its way is lost (this worker hands them on in turn)."""
        listener, self.listener = self.listener, None
        if listener is not None:
            self.loop.unprotect(listener.fileno())
            self.loop.close(listener.detach())


class Channel:
    """One old worker's messages: a hello, then one tunnel each."""

    __slots__ = ("adopted", "credit", "greeted", "longest", "receiver", "sock")

    def __init__(self, receiver: Receiver, sock: socket.socket) -> None:
        self.receiver = receiver
        self.sock = sock
        self.greeted = False
        self.adopted = 0
        self.longest = 0.0  # the longest a tunnel was on its way (sent to served), seconds
        self.credit = 0  # tunnels the old worker may still send on it

    def on_readable(self) -> None:
        receiver = self.receiver
        for _ in range(BATCH):
            try:
                message, fds, flags, _ = socket.recv_fds(
                    self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The old worker closed with credit unread: the kernel reports that before
                # the tunnels still queued here, and reading on returns them.
                continue
            except OSError:
                message, fds, flags = b"", [], 0
            if not message:
                _close_all(fds)
                self.end()
                return
            if not self.greeted:
                self._greet(message)
                continue
            self.credit -= 1
            receiver.granted -= 1
            if flags & socket.MSG_CTRUNC:  # descriptors lost on the way: not a whole tunnel
                _close_all(fds)
                continue
            try:
                state = orjson.loads(message)
                receiver.adopt(state, fds)
                self.longest = max(self.longest, monotonic() - float(state.get("sent_at", 0)))
            except Exception as exc:
                receiver.log.error("adopt_failed", error=repr(exc))
                _close_all(fds)
                continue
            self.adopted += 1
        gc.freeze()  # adopted tunnels are long-lived: see "Garbage" in lb.worker.process
        if self.greeted and self.credit < CREDIT // 2:
            more = receiver.grant(self)
            if more:
                self.tell({"credit": more})

    def _greet(self, message: bytes) -> None:
        hello = orjson.loads(message)
        ok = isinstance(hello, dict) and 0 < int(hello.get("hello", 0)) <= VERSION
        credit = self.receiver.grant(self) if ok else 0
        self.greeted = ok
        self.tell({"ok": ok, "version": VERSION, "credit": credit})
        if not ok:
            self.end()

    def tell(self, message: dict[str, Any]) -> None:
        """A small message to the old worker (its credit); never waits.  A failure is not
        the channel's end: the old worker may have sent its last tunnel and closed, and
        the tunnels still queued here are read to the end of file all the same."""
        with contextlib.suppress(OSError):
            self.sock.send(orjson.dumps(message), socket.MSG_DONTWAIT)

    def fail(self, exc: BaseException) -> None:
        self.end()

    def end(self) -> None:
        receiver = self.receiver
        if self.sock.fileno() >= 0:
            receiver.loop.close(self.sock.detach())
        if self in receiver.channels:
            receiver.channels.discard(self)
            receiver.granted -= self.credit  # promised, never to be used
            self.credit = 0
        if self.adopted:
            longest = round(self.longest * 1000, 3)
            receiver.log.info("adopted", tunnels=self.adopted, longest_pause_ms=longest)
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
        "sni": conn.server_name,  # mode = "tls": the server name, for its conn line
        "requests": conn.requests.stream.requests if conn.requests else 0,  # ... so far
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "active_at": tunnel.active_at,
        "keepalive": tunnel.keepalive,
        "idle_timeout": tunnel.idle_timeout,
        "flows": flows,
        "sent_at": monotonic(),
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
