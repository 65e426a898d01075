"""Small TCP servers for integration tests, run as ``python tools.py KIND --port N``.

Each prints one line when it listens, then one JSON line per finished
connection.  They bind 127.0.0.1 only.

* ``sha``: reads until end of file, hashing; at the same time sends
  ``--send`` bytes of a deterministic pattern, then shuts down its write side.
* ``halfclose``: reads until end of file, then sends back everything it read
  and closes: the reply is only sent after the client's half-close.
* ``stall``: never reads; reports how its connection ended (``reset`` or
  ``closed``) once the balancer ends it.
* ``flood``: sends without pause and never reads; once nothing more has gone
  out for half a second (the client stopped reading), resets the connection.
* ``head``: reads one request head, answers 200 with that head as its body,
  closes, and reports the head: what a server was sent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

CHUNK = 1 << 20
_BASE = hashlib.shake_256(b"splicelb test pattern").digest(CHUNK)


def pattern(total: int) -> Iterator[bytes]:
    """``total`` bytes in chunks of 1 MiB, each chunk numbered (so reordering shows)."""
    index = 0
    while total > 0:
        chunk = struct.pack("<Q", index) + _BASE[8:]
        yield chunk[: min(CHUNK, total)]
        total -= CHUNK
        index += 1


def pattern_sha(total: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(total):
        digest.update(chunk)
    return digest.hexdigest()


def drain(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if not n:
            return count, digest.hexdigest()
        digest.update(view[:n])
        count += n


def send_pattern(sock: socket.socket, total: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(total):
        sock.sendall(chunk)
        digest.update(chunk)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def serve_sha(conn: socket.socket, send: int) -> dict[str, object]:
    result: dict[str, object] = {}

    def sender() -> None:
        result["sent_sha"] = send_pattern(conn, send)
        result["sent"] = send

    thread = threading.Thread(target=sender)
    thread.start()
    result["received"], result["received_sha"] = drain(conn)
    thread.join()
    return result


def serve_halfclose(conn: socket.socket, _send: int) -> dict[str, object]:
    data = bytearray()
    while chunk := conn.recv(CHUNK):
        data += chunk
    conn.sendall(data)
    return {"received": len(data)}


def serve_stall(conn: socket.socket, _send: int) -> dict[str, object]:
    poller = select.poll()
    poller.register(conn, 0)  # never reads: only hang-ups and errors are reported
    while not poller.poll(1000):
        pass
    err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return {"ended": "reset" if err else "closed"}


def serve_flood(conn: socket.socket, _send: int) -> dict[str, object]:
    conn.setblocking(False)
    chunk, sent, stalled_since = b"x" * 65536, 0, time.monotonic()
    while time.monotonic() - stalled_since < 0.5:
        try:
            sent += conn.send(chunk)
            stalled_since = time.monotonic()
        except BlockingIOError:
            select.select([], [conn], [], 0.05)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {"sent": sent, "ended": "reset"}  # the close that follows sends the reset


def serve_head(conn: socket.socket, _send: int) -> dict[str, object]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    head = head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(head), head)
    )
    return {"head": head.decode("latin-1")}


SERVE = {
    "sha": serve_sha,
    "halfclose": serve_halfclose,
    "stall": serve_stall,
    "flood": serve_flood,
    "head": serve_head,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(SERVE))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--send", type=int, default=0)
    args = parser.parse_args()
    serve = SERVE[args.kind]
    listener = socket.create_server(("127.0.0.1", args.port))
    print(f"{args.kind} listening on 127.0.0.1:{args.port}", flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                result = serve(conn, args.send)
            except OSError as exc:
                result = {"error": str(exc)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
