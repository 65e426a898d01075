"""The floor of Python work per connection: a bare splice forwarder, for measuring only.

``python -m bench.floor PORT BACKEND_PORT WORKERS [copy]`` forks ``WORKERS``
processes, each accepting on its own ``SO_REUSEPORT`` socket on
``127.0.0.1:PORT`` and forwarding every connection to ``BACKEND_PORT`` the
way any Python balancer that splices must: accept, connect, splice each way
through a pipe, pass each end of file on as a half-close, close.  Nothing
else: no routing, health, counters, timeouts, logs or answers.  The same
system calls as splicelb's worker, and the least Python around them.

``python -m bench.cpu --balancers floor,splicelb,haproxy`` measures it next to
the balancers: the user CPU it spends per connection is what Python costs
before any feature, and what is left of a gap to HAProxy after it is the
kernel's.  It is not a balancer: a write the destination does not take whole,
or any error but a reset, stops it (exit status 1), so a figure never comes
from a run that lost bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import traceback

from bench.procs import die_with_parent

# splicelb's own pipes, flags and calls: the same system calls, by construction.
from lb.worker.loop import BATCH, IN, RDHUP
from lb.worker.pipes import PIPE_SIZE, PipePool
from lb.worker.splice import SPLICE_FLAGS, SPLICE_LAST, shutdown_write

HOST = "127.0.0.1"


COPY_SIZE = 65536  # bytes per read in copy mode


def serve(listener: socket.socket, backend: tuple[str, int], copy: bool = False) -> None:
    """One worker's loop; returns never (an error ends the process).  ``copy``: move the
    bytes with ``read`` and ``send`` through this process instead of ``splice``."""
    epoll = select.epoll()
    lfd = listener.fileno()
    epoll.register(lfd, select.EPOLLIN)
    accept = listener._accept  # type: ignore[attr-defined]
    peer: dict[int, int] = {}  # fd -> the other socket of its connection
    sockets: dict[int, socket.socket] = {}  # copy mode: fd -> a socket object, for send()
    ended: set[int] = set()  # sockets whose end of file was passed on
    # copy mode moves no byte through a pipe: a read of fewer than COPY_SIZE drained the queue
    r, w, slots = (-1, -1, COPY_SIZE) if copy else PipePool().new()
    splice, read, closing = os.splice, os.read, []
    while True:
        for fd, mask in epoll.poll(-1, BATCH):
            if fd == lfd:
                while True:
                    try:
                        client, _ = accept()
                    except BlockingIOError:
                        break
                    os.set_blocking(client, False)
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    err = sock.connect_ex(backend)
                    if err not in (0, errno.EINPROGRESS):
                        raise OSError(err, os.strerror(err))
                    server = sock.detach()
                    peer[client], peer[server] = server, client
                    if copy:  # family and type given: wrapping makes no system call
                        for s in (client, server):
                            sockets[s] = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, s)
                    epoll.register(client, IN)
                    epoll.register(server, IN)  # a connect still in progress reads nothing
                continue
            dst = peer.get(fd, -1)
            if dst < 0 or fd in ended:
                continue  # closed earlier in this batch
            data = b""
            try:
                if copy:
                    data = read(fd, COPY_SIZE)
                    n = len(data)
                else:
                    n = splice(fd, w, PIPE_SIZE, None, None, SPLICE_FLAGS)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                n = 0
                ended.add(dst)  # close both now
            # the last bytes before the end of file carry the FIN: see "Last bytes and FIN"
            last = mask & RDHUP and n < slots
            try:
                if copy:
                    m = sockets[dst].send(data, socket.MSG_MORE if last else 0) if n else 0
                else:
                    flags = SPLICE_LAST if last else SPLICE_FLAGS
                    m = splice(r, dst, n, None, None, flags) if n else 0
            except BlockingIOError:
                m = 0
            except (ConnectionResetError, BrokenPipeError):
                n = m = 0
                ended.add(dst)
            if m != n:
                sys.exit(f"floor: short write to {dst} ({m} of {n} bytes)")
            if n and not last:
                continue  # more may follow: see "End of file without a read", lb/worker/splice.py
            if dst in ended:  # both ways done
                for s in (fd, dst):
                    del peer[s]
                    ended.discard(s)
                    if copy:
                        sockets.pop(s).detach()
                    closing.append(s)
            else:
                ended.add(fd)
                epoll.unregister(fd)
                shutdown_write(dst)
        while closing:
            os.close(closing.pop())


def main(argv: list[str]) -> None:
    copy = argv[3:] == ["copy"]
    port, backend_port, workers = (int(a) for a in argv[:3])
    listeners = []
    for _ in range(workers):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, port))
        sock.listen(4096)
        sock.setblocking(False)
        listeners.append(sock)
    children, parent = [], os.getpid()
    for sock in listeners:
        pid = os.fork()
        if pid == 0:
            try:
                die_with_parent()  # a parent killed outright takes its workers along
                if os.getppid() != parent:
                    return  # it died before that: the finally below exits
                serve(sock, (HOST, backend_port), copy)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        os.wait()  # a worker failed: stop them all, say so
        sys.exit(1)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
