"""The control socket: a Unix stream socket in the runtime dir, mode 0600.

One request per connection: a JSON object on one line, answered by a JSON
object on one line.  Commands: ``{"cmd": "reload"}`` (answered when the new
generation is serving, or with the config's problems), ``{"cmd": "admin",
"backend": B, "server": S, "state": "ready"|"drain"|"maint"}``, and
``{"cmd": "ping"}``.  Only the instance's own user (and root) may connect:
the socket file's mode says so, and the peer's credentials are checked too.

Theory of operation
-------------------
The supervisor serves the socket from its own loop and never waits for a
client: a client that stalls must not stall reaping, respawning or the
watchdog.  `Clients` accepts without blocking and keeps each connection (a
`Client`, which is the connection's socket) in one of four states: reading
its request, waiting for the supervisor (a reload is answered when the new
generation serves), sending its answer, closed.  It reads and sends only
when the selector says the socket is ready.  A client has
``CLIENT_TIMEOUT`` to send its request, and again to take its answer once
the answer is ready; then it is answered with an error (if it can take it)
and closed.  At most ``MAX_CLIENTS`` are open at once; one more is answered
"busy" and closed at once, so a flood costs a bounded number of descriptors.

A client always gets to read its answer.  Its request is read before it is
answered (a refusal too), so its write does not race our close; and a
connection ends with shutdown, then a drain of what the client sent, then
close, because a Unix socket closed with unread bytes resets its peer, which
then loses the answer still queued for it.  The shutdown also ends the
connection for the client while a child forked meanwhile holds a copy.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from lb.errors import LBError, NotRunningError

CONTROL_SOCKET = "control.sock"
SELECTOR_TAG = "control"  # the data of the control socket's keys in the supervisor's selector
CLIENT_TIMEOUT = 5.0  # seconds a client has to send its request, and again to take its answer
MAX_CLIENTS = 32  # control connections at once; one more is answered "busy" and closed
ACCEPTS_PER_TURN = 64  # connections taken off the listen queue per turn of the loop, at most
MAX_REQUEST = 65536  # bytes in a request line
MAX_MESSAGE = 1 << 20  # bytes in an answer, as the command line reads it
DRAIN_READS = 16  # reads of 64 KiB that empty a closing client's unread bytes

PERMISSION_DENIED = {"ok": False, "errors": ["permission denied (run as the instance's user)"]}
BUSY = {
    "ok": False,
    "errors": [f"busy: {MAX_CLIENTS} control connections are open; try again shortly"],
}
STOPPING = {"ok": False, "errors": ["the instance is stopping"]}
TIMED_OUT = {"ok": False, "errors": [f"no complete request within {CLIENT_TIMEOUT:g} s"]}


def control_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, CONTROL_SOCKET)


def listen(runtime_dir: str) -> socket.socket:
    """Bind the control socket with mode 0600 (no window where it is wider)."""
    path = control_path(runtime_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def peer_allowed(conn: socket.socket) -> bool:
    """The peer runs as our user or as root."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def parse_request(received: bytes, *, closed: bool) -> dict[str, Any] | None:
    """The request in what a client sent so far; None while its line is not whole.

    ``closed``: the client sent all it will (what came before its close is
    the request).  Raises LBError for a line that is too long or not a JSON
    object.
    """
    line, newline, _ = received.partition(b"\n")
    if len(line) > MAX_REQUEST:
        raise LBError(f"control request longer than {MAX_REQUEST} bytes")
    if not newline and not closed:
        return None
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise LBError(f"control request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise LBError("control request must be a JSON object")
    return request


def finish(sock: socket.socket) -> None:
    """End a connection so that the client still reads what was sent to it."""
    with contextlib.suppress(OSError):  # the client may be gone already
        sock.shutdown(socket.SHUT_RDWR)  # it can send no more, and sees the end after our bytes
        sock.setblocking(False)
        for _ in range(DRAIN_READS):
            if not sock.recv(65536):
                break
    sock.close()


def answer_at_once(sock: socket.socket, answer: dict[str, Any]) -> None:
    """Send ``answer`` if it goes out without waiting, and end the connection."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(encode(answer))
    finish(sock)


class State(enum.Enum):
    READING = "reading"  # its request; deadline set
    WAITING = "waiting"  # for the supervisor; no deadline (a reload takes its own time)
    SENDING = "sending"  # its answer; deadline set
    CLOSED = "closed"


class Client(socket.socket):
    """One control connection, from accept to close; it is its own socket.

    Being the socket lets the supervisor hold a waiting client where it holds
    sockets (a generation's ``waiters``) and answer it with `reply`.  Every
    change of state is reported to ``on_change`` (the owner's bookkeeping:
    the selector and the deadlines).
    """

    def __init__(
        self,
        fileno: int,
        *,
        allowed: bool,
        deadline: float,
        on_change: Callable[[Client], None],
    ) -> None:
        super().__init__(fileno=fileno)
        self.setblocking(False)
        self.allowed = allowed  # the peer's credentials passed; a refused peer is read, then told
        self.state = State.READING
        self.deadline = deadline
        self._received = bytearray()
        self._unsent = b""
        self._on_change = on_change

    def on_readable(self) -> dict[str, Any] | None:
        """Take what has arrived; the request once its line is whole (the client then waits)."""
        if self.state is not State.READING:
            return None
        try:
            chunk = self.recv(MAX_REQUEST + 1 - len(self._received))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.end()
            return None
        if not chunk and not self._received:
            self.end()  # gone before a word: nobody to answer
            return None
        self._received += chunk
        try:
            request = parse_request(bytes(self._received), closed=not chunk)
        except LBError as exc:
            self.answer({"ok": False, "errors": [str(exc)]} if self.allowed else PERMISSION_DENIED)
            return None
        if request is None:
            return None
        if not self.allowed:
            self.answer(PERMISSION_DENIED)
            return None
        self.state = State.WAITING
        self._on_change(self)
        return request

    def answer(self, answer: dict[str, Any]) -> None:
        """Send ``answer``, then end; what does not go out at once waits for the selector."""
        if self.state in (State.SENDING, State.CLOSED):
            return
        if self.state is State.WAITING:  # the wait was the supervisor's time, not the client's
            self.deadline = time.monotonic() + CLIENT_TIMEOUT
        self.state = State.SENDING
        self._unsent = encode(answer)
        self.on_writable()
        if self.state is State.SENDING:
            self._on_change(self)

    def on_writable(self) -> None:
        if self.state is not State.SENDING:
            return
        try:
            sent = self.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the client gave up
            self.end()
            return
        self._unsent = self._unsent[sent:]
        if not self._unsent:
            self.end()

    def expire(self) -> None:
        """The deadline passed: one still reading is told so, one not taking its answer dropped."""
        if self.state is State.READING:
            self.answer(TIMED_OUT if self.allowed else PERMISSION_DENIED)
        if self.state is State.SENDING:
            self.end()

    def end(self) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._on_change(self)  # before the close: the selector still knows its descriptor
        finish(self)


def reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    """Answer a client handed out by `Clients` (and end its connection), never blocking."""
    if isinstance(conn, Client):
        conn.answer(answer)
    else:
        answer_at_once(conn, answer)


class Clients:
    """The control socket's connections, served from the supervisor's selector.

    `on_ready` handles one selector event and hands back a request once it is
    whole; the supervisor answers it with `reply`, now or later.  `sweep`
    runs on every turn of the loop and ends the clients whose deadline passed.
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._listener: socket.socket | None = None
        self._clients: set[Client] = set()
        # Deadlines in insertion order, which is deadline order: each is set to
        # CLIENT_TIMEOUT after the moment it is inserted.
        self._deadlines: dict[Client, float] = {}

    def serve(self, listener: socket.socket) -> None:
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, SELECTOR_TAG)

    def on_ready(self, fileobj: object, events: int) -> tuple[Client, dict[str, Any]] | None:
        """One selector event; a client and its whole request, if this completed one."""
        if fileobj is self._listener:
            self._accept()
        elif isinstance(fileobj, Client):
            if events & selectors.EVENT_WRITE:
                fileobj.on_writable()
            elif events & selectors.EVENT_READ:
                request = fileobj.on_readable()
                if request is not None:
                    return fileobj, request
        return None

    def sweep(self, now: float) -> None:
        """End the clients whose deadline passed (the oldest first; stops at the first not due)."""
        while self._deadlines:
            client, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                return
            del self._deadlines[client]
            client.expire()

    def sockets(self) -> list[socket.socket]:
        """The connected clients' sockets (a forked child closes its copies)."""
        return list(self._clients)

    def close(self) -> None:
        """The instance stops: every client still owed an answer is told so, then ended."""
        for client in list(self._clients):
            client.answer(STOPPING)
            client.end()

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the listener stays readable, try next turn
                return
            if len(self._clients) >= MAX_CLIENTS:
                answer_at_once(sock, BUSY)
                continue
            try:
                allowed = peer_allowed(sock)
            except OSError:
                allowed = False
            deadline = time.monotonic() + CLIENT_TIMEOUT
            client = Client(
                sock.detach(), allowed=allowed, deadline=deadline, on_change=self._on_change
            )
            self._clients.add(client)
            self._deadlines[client] = deadline
            self._selector.register(client, selectors.EVENT_READ, SELECTOR_TAG)

    def _on_change(self, client: Client) -> None:
        if client.state is State.CLOSED:
            self._clients.discard(client)
            self._deadlines.pop(client, None)
            with contextlib.suppress(KeyError):
                self._selector.unregister(client)
        elif client.state is State.WAITING:
            self._selector.unregister(client)
            self._deadlines.pop(client, None)
        elif client.state is State.SENDING:
            try:
                self._selector.modify(client, selectors.EVENT_WRITE, SELECTOR_TAG)
            except KeyError:  # it was waiting, unregistered
                self._selector.register(client, selectors.EVENT_WRITE, SELECTOR_TAG)
            # From reading it keeps its place; from waiting it gets a new deadline, the latest.
            self._deadlines.setdefault(client, client.deadline)


def read_line(sock: socket.socket) -> bytes:
    """One newline-terminated message (or what came before the peer closed)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise LBError(f"the instance's answer is longer than {MAX_MESSAGE} bytes")
    return data


def request(runtime_dir: str, command: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Send one command to the running instance and return its answer.

    Every way the connection can fail is an LBError with one line a person
    can read (NotRunningError when there is no instance).
    """
    path = control_path(runtime_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError(f"no instance is running in {runtime_dir}") from None
        except PermissionError:
            raise LBError(f"{path}: permission denied (run as the instance's user)") from None
        except TimeoutError:
            raise LBError(f"{path}: the instance took no connection within {timeout:g} s") from None
        except OSError as exc:
            raise LBError(f"{path}: {exc.strerror or exc}") from None
        try:
            # The instance may answer before it reads (busy, stopping): its answer is
            # still there to read after our write failed.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(command))
            data = read_line(sock)
        except TimeoutError:
            raise LBError(f"the instance did not answer within {timeout:g} s") from None
        except ConnectionResetError:
            data = b""
        except OSError as exc:
            raise LBError(f"the control connection failed: {exc.strerror or exc}") from None
    if not data.endswith(b"\n"):
        raise LBError("the instance closed the control connection without an answer")
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise LBError("the instance's answer is not a JSON object")
    return answer
