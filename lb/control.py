"""The control socket: a Unix stream socket in the runtime dir, mode 0600.

One request per connection: a JSON object on one line, answered by a JSON
object on one line.  Commands: ``{"cmd": "reload"}`` (answered when the new
generation is serving, or with the config's problems), ``{"cmd": "admin",
"backend": B, "server": S, "state": "ready"|"drain"|"maint"}``, and
``{"cmd": "ping"}``.  Only the instance's own user (and root) may connect:
the socket file's mode says so, and the peer's credentials are checked too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from typing import Any

from lb.errors import LBError, NotRunningError

CONTROL_SOCKET = "control.sock"
MAX_MESSAGE = 1 << 20


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


def read_request(conn: socket.socket, timeout: float = 2.0) -> dict[str, Any]:
    conn.settimeout(timeout)
    data = read_line(conn)
    try:
        request = json.loads(data)
    except ValueError as exc:
        raise LBError(f"control request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise LBError("control request must be a JSON object")
    return request


def accept_request(listener: socket.socket) -> tuple[socket.socket, dict[str, Any]] | None:
    """The next client and its request; None if there is none or it was answered already.

    A client that is not allowed, or whose request is not a JSON object, gets
    its error answer here.
    """
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return None
    try:
        if not peer_allowed(conn):
            reply(conn, {"ok": False, "errors": ["permission denied"]})
            return None
        return conn, read_request(conn)
    except (LBError, OSError) as exc:
        reply(conn, {"ok": False, "errors": [str(exc)]})
        return None


def reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError), conn:  # the client may have given up
        conn.settimeout(2.0)
        conn.sendall(json.dumps(answer).encode() + b"\n")


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
