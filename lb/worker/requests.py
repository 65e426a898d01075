"""The client's side of a kept-alive HTTP connection: every request read, routed and checked.

Theory of operation
-------------------
In ``mode = "http"`` a connection's first request is sniffed, routed and
checked by its :class:`~lb.worker.conn.Connection`.  Unless that request asks
to upgrade, the client may send more on the same connection, and each must be
judged as the first was before it reaches the server.  So the tunnel's
client-to-server direction is a :class:`RequestFlow`: it reads what the client
sends and feeds it to a :class:`RequestStream`, which finds where each request
begins and ends and has the connection judge each head (the same sniffer, the
same routing and checks as the first request).  The server's answers are
spliced to the client as in any tunnel: never read into Python, never parsed.

A request that routes to the connection's server and passes the listener's
checks is forwarded, its head through the connection's ``forward_head``.  One
that routes elsewhere, fails a check or is malformed is not, and nothing
after it is: the flow half-closes the server socket, so that the server
completes the answers it owes and closes, and the tunnel then closes the
client's connection (what the client still sends is read and dropped, up to
``DISCARD_BYTES``, so that the close sends no reset over those answers).  It
does not answer the refused request itself: the answers are not parsed, so
where they end is not known.  A client retries a request whose kept-alive
connection closed before any answer to it on a new connection, which is
routed afresh.

Framing (:mod:`lb.proto.http1`): a head ends at its first CRLF CRLF; a
Content-Length body is counted, and what of it did not come with its head is
spliced by count, so a large upload stays zero-copy; a chunked body passes
through Python, llhttp finding its end.  Several requests in one read
(pipelining) are judged in turn, and what is forwarded of one read goes out
in one ``write``.  The flow reads the client only while nothing it forwarded
is waiting for the server: backpressure as in a splicing flow.

After a request that asks to upgrade (llhttp's test: ``Connection: upgrade``
and an ``Upgrade`` header, whatever the method), the flow becomes a plain
splicing :class:`~lb.worker.splice.Flow`, as the tunnel of a first request
that upgrades: the server's answer is not parsed, so a 101 cannot be told
from a refusal, and what follows a 101 is another protocol.  So what a client
sends after an upgrade request that its server refused, without closing,
reaches that server unjudged (HAProxy parses the answer and goes on with
HTTP after a refusal).  After a request without keep-alive (``Connection:
close``; HTTP/1.0 without ``keep-alive``) the server closes once it has
answered: what the client sends after it is read and dropped, and its end of
file passed on.

Timeouts: the wait for the next request is the tunnel's idle wait (its
``tunnel_timeout`` with no byte either way); a head that has begun to arrive
must be complete within the listener's ``head_timeout``, or it is refused as
above.  A refused request's connection waits for its server to close, as long
as any tunnel waits for a byte.

Cost: the common request is one ``read``, one ``find`` and one ``write``.  A
head that is byte for byte the previous one judged on the connection gets
that judgement again without being parsed: it is a function of the head and
of the connection (its listener's routes and checks, its server), none of
which changes while it is open.
"""

from __future__ import annotations

import os
from time import monotonic
from typing import Protocol

from lb.proto.events import NeedData
from lb.proto.http1 import CHUNKED, ChunkedBody, Head, HeadSniffer, Reject
from lb.worker.deadlines import Queue
from lb.worker.pipes import PIPE_SIZE
from lb.worker.splice import (
    SPLICE_FLAGS,
    Flow,
    Tunnel,
    failure_reason,
    shutdown_write,
    splice,
)

READ_SIZE = 64 * 1024  # one read of requests (a chunked body's bytes pass here too)
DISCARD_BYTES = 256 * 1024  # read and dropped after the last request, before not reading
TERMINATOR = b"\r\n\r\n"

# What the stream expects next.
HEAD = 0  # a request head (none begun, or ``sniffer`` holds its first bytes)
LENGTH = 1  # ``left`` more bytes of a Content-Length body
CHUNKED_BODY = 2  # more of a chunked body
TUNNEL = 3  # nothing to judge: an upgrade request was forwarded
CLOSE = 4  # nothing to forward: the last request was (no keep-alive)
REFUSED = 5  # nothing to forward: a request was not (``reason`` says why)

Framing = tuple[int, bool, bool]  # a request's body (a length or CHUNKED), keep-alive, upgrade
PLAIN: Framing = (0, True, False)  # no body, keep-alive: what follows is the next head
Buffer = bytes | memoryview


class RequestOwner(Protocol):
    """What the requests of a connection are judged by: the connection."""

    def next_request(self, event: Head | Reject, raw: bytes) -> str | None:
        """A head (or a sniffer's rejection): None to forward it, else why it is not."""

    def forward_head(self, head: Head, raw: bytes) -> bytes:
        """The bytes that go to the server for a head the client sent as ``raw``."""

    def request_refused(self, reason: str) -> None:
        """A request was not forwarded: the connection ends once its server has closed."""

    def request_upgraded(self, head: Head) -> None:
        """An upgrade request was forwarded: the tunnel splices both ways from now on."""


class RequestStream:
    """Sans-I/O: the bytes a client sends after its first request, in, and what of them
    goes to the server, out; ``state`` says what comes next (see the module's docstring)."""

    __slots__ = (
        "chunked",
        "forwarded",
        "framing",
        "head",
        "last",
        "left",
        "owner",
        "reason",
        "repeat",
        "requests",
        "sniffer",
        "state",
        "then",
    )

    def __init__(self, owner: RequestOwner) -> None:
        self.owner = owner
        self.state = HEAD
        self.then = HEAD  # after the body in progress: HEAD, or CLOSE
        self.left = 0  # LENGTH: bytes of the body still to come
        self.chunked: ChunkedBody | None = None  # CHUNKED_BODY: where it ends
        self.sniffer: HeadSniffer | None = None  # a head begun in an earlier read
        self.requests = 0  # heads judged and forwarded
        self.reason = ""  # REFUSED: why
        self.head: Head | None = None  # the last head judged to go: ...
        self.last = b""  # ... as the client sent it, ...
        self.forwarded = b""  # ... as it goes to the server ...
        self.framing: Framing = (0, True, False)  # ... and its framing
        self.repeat = b""  # the last head, if nothing follows it but the next head

    def first(self, head: Head, raw: bytes, framing: Framing, forwarded: bytes) -> None:
        """The connection's first request, which it judged and forwarded itself."""
        self.requests = 1
        self.head, self.last, self.framing, self.forwarded = head, raw, framing, forwarded
        if framing == PLAIN:
            self.repeat = raw
        else:
            self._begin(framing)

    def refuse(self, why: str) -> None:
        """The next request is not forwarded, nor anything after it."""
        self.state, self.left, self.repeat = REFUSED, 0, b""
        self.reason = f"request {self.requests + 1} not forwarded: {why}"
        self.sniffer = self.chunked = None

    def feed(self, data: bytes) -> list[Buffer]:
        """Take the next bytes the client sent; what of them goes to the server, in order."""
        out: list[Buffer] = []
        pos, size = 0, len(data)
        while pos < size:
            state = self.state
            if state == HEAD:
                if self.sniffer is None:
                    end = data.find(TERMINATOR, pos)
                    if end >= 0:  # a whole head: the usual case
                        end += 4
                        raw = data if pos == 0 and end == size else data[pos:end]
                        if raw != self.last and not self._judge(HeadSniffer(), raw):
                            break
                        self.requests += 1
                        out.append(self.forwarded)
                        if not self.repeat:  # the head has a body, or is the last
                            self._begin(self.framing)
                        pos = end
                        continue
                    self.sniffer = HeadSniffer()
                sniffer = self.sniffer
                event = sniffer.feed(data[pos:] if pos else data)
                if isinstance(event, NeedData):
                    break
                self.sniffer = None
                buffered = sniffer.buffer
                raw = buffered if isinstance(event, Reject) else buffered[: event.head_len]
                if not self._judge(sniffer, raw, event):
                    break
                self.requests += 1
                out.append(self.forwarded)
                self._begin(self.framing)
                data, pos = sniffer.trailing, 0  # what came after the head, if anything
                size = len(data)
            elif state == LENGTH:
                take = min(self.left, size - pos)
                out.append(data if take == size else memoryview(data)[pos : pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state = self.then
            elif state == CHUNKED_BODY:
                chunked = self.chunked
                assert chunked is not None
                rest = data[pos:] if pos else data
                body_end = chunked.feed(rest)
                if isinstance(body_end, Reject):
                    self.state, self.chunked = REFUSED, None
                    self.reason = f"request {self.requests} cut short: {body_end.reason}"
                    break
                if body_end < 0:
                    out.append(rest)
                    break
                out.append(rest if body_end == len(rest) else memoryview(rest)[:body_end])
                pos += body_end
                self.state, self.chunked = self.then, None
            elif state == TUNNEL:  # the rest is the upgraded protocol's, or unjudged
                out.append(data[pos:] if pos else data)
                break
            else:  # CLOSE, REFUSED: dropped
                break
        return out

    def _judge(self, sniffer: HeadSniffer, raw: bytes, event: Head | Reject | None = None) -> bool:
        """Judge a whole head (sniffing it if ``event`` is None): remember it if it is to
        be forwarded, or refuse it."""
        if event is None:
            judged = sniffer.feed(raw)  # a whole head: never NEED_DATA
            assert not isinstance(judged, NeedData)
            event = judged
        why = self.owner.next_request(event, raw)
        if why is not None:
            self.refuse(why)
            return False
        assert isinstance(event, Head)  # a Reject always has its reason
        framing = (sniffer.body, sniffer.keep_alive, sniffer.upgrade)
        self._remember(event, raw, framing, self.owner.forward_head(event, raw))
        return True

    def _remember(self, head: Head, raw: bytes, framing: Framing, forwarded: bytes) -> None:
        """A head judged to go, and what goes for it: the same bytes again get the same
        judgement and go as the same bytes (see the module's docstring)."""
        self.head, self.last, self.framing, self.forwarded = head, raw, framing, forwarded
        self.repeat = raw if framing == PLAIN else b""

    def _begin(self, framing: Framing) -> None:
        """What follows a forwarded head."""
        body, keep_alive, upgrade = framing
        if upgrade:
            self.state = TUNNEL
            return
        then = HEAD if keep_alive else CLOSE
        if body == CHUNKED:
            self.state, self.then, self.chunked = CHUNKED_BODY, then, ChunkedBody()
        elif body:
            self.state, self.then, self.left = LENGTH, then, body
        else:
            self.state = then


class ReadsHeads(Protocol):
    """A flow that reads later requests (a :class:`RequestFlow`, or over TLS
    :class:`lb.worker.tls.TlsUp`): a head that has begun must be complete within the
    listener's ``head_timeout``.  It keeps the deadline's queue in ``deadline`` while it
    is armed, and is the deadline's owner (its ``expire`` calls :func:`head_expired`)."""

    deadline: Queue | None
    head_timeout: float
    tunnel: Tunnel


def arm_head(flow: ReadsHeads) -> None:
    """A head has begun: its deadline, unless it has one."""
    if flow.deadline is None:
        flow.deadline = flow.tunnel.pump.deadlines.arm(flow, flow.head_timeout, monotonic())


def disarm_head(flow: ReadsHeads) -> None:
    deadline, flow.deadline = flow.deadline, None
    if deadline is not None:
        deadline.pop(flow, None)


def head_expired(flow: ReadsHeads, stream: RequestStream) -> bool:
    """The deadline came: refuse the head still begun, if there is one (True)."""
    flow.deadline = None
    if stream.state != HEAD or stream.sniffer is None:
        return False
    stream.refuse(f"request head not complete within {flow.head_timeout:g} s")
    return True


class RequestFlow(Flow):
    """A tunnel's client-to-server flow that reads requests: each judged before it goes
    (see the module's docstring).  Made by its tunnel, as any flow; attached to its
    stream and connection before the tunnel watches its sockets."""

    __slots__ = ("deadline", "discarded", "head_timeout", "owner", "pending", "stream")

    def attach(self, stream: RequestStream, owner: RequestOwner, head_timeout: float) -> None:
        self.stream = stream
        self.owner = owner
        self.head_timeout = head_timeout
        self.pending = b""  # forwarded, not yet taken by the server
        self.deadline: Queue | None = None  # the head timeout's queue, while armed
        self.discarded = 0  # CLOSE, REFUSED: bytes read and dropped

    def forget(self) -> None:
        """The tunnel closed, went to another process, or splices on without this flow:
        drop the deadline, the stream and the connection (no reference cycle is left).
        Called once: by the connection, or as it splices on."""
        if self.deadline is not None:
            disarm_head(self)
        del self.stream, self.owner

    @property
    def idle(self) -> bool:
        """Between two requests, holding nothing: it can go to another process as it is."""
        stream = self.stream
        return (
            stream.state == HEAD
            and stream.sniffer is None
            and not self.pending
            and self.pipe is None
            and not self.ended
        )

    @property
    def ending(self) -> bool:
        """It forwards nothing more: the connection ends where it is."""
        return self.stream.state >= CLOSE or self.ended

    def on_readable(self) -> None:
        stream = self.stream
        if stream.left:
            self._splice_body(stream)
            return
        tunnel = self.tunnel
        try:
            data = os.read(self.src, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(failure_reason(exc, "client"), reset=True)
            return
        if not data:
            if self.ended:  # refused already: only a reset matters now
                tunnel.loop.watch_failure(self.src, self.on_failure)
            else:
                if self.deadline is not None:
                    disarm_head(self)
                self._end()
            return
        self.nbytes += len(data)
        if not tunnel.moved:  # the first bytes since the last sweep: it counts them
            tunnel.moved = True
            tunnel.pump.moved.add(tunnel)
        if data == stream.repeat and stream.sniffer is None:
            # The previous head again, alone, with nothing after it: the usual request
            # of a kept-alive client, judged and made ready once (RequestStream.feed).
            stream.requests += 1
            forwarded = stream.forwarded
            try:
                sent = os.write(self.dst, forwarded)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                tunnel.close(failure_reason(exc, "server"), reset=True)
                return
            if sent != len(forwarded):
                self._wait(forwarded[sent:])
            return
        if stream.state >= CLOSE:
            self.discarded += len(data)
            if self.discarded > DISCARD_BYTES:
                tunnel.loop.watch_failure(self.src, self.on_failure)
            return
        out = stream.feed(data)
        if out:
            self._send(out)
        else:
            self.settle()

    def _send(self, out: list[Buffer]) -> None:
        try:
            sent = os.write(self.dst, out[0]) if len(out) == 1 else os.writev(self.dst, out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.tunnel.close(failure_reason(exc, "server"), reset=True)
            return
        whole = len(out[0]) if len(out) == 1 else sum(len(piece) for piece in out)
        if sent == whole:
            self.settle()
            return
        self._wait(b"".join(out)[sent:])

    def _wait(self, pending: bytes) -> None:
        """The server did not take all: stop reading the client until it has."""
        self.pending = pending
        loop = self.tunnel.loop
        loop.watch_failure(self.src, self.on_failure)  # not read, still heard if it resets
        loop.add_writer(self.dst, self.on_writable)

    def on_writable(self) -> None:
        if self.pipe is not None:  # a body's bytes, spliced by count
            super().on_writable()
            return
        tunnel = self.tunnel
        try:
            sent = os.write(self.dst, self.pending)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(failure_reason(exc, "server"), reset=True)
            return
        self.pending = self.pending[sent:]
        tunnel.active_at = monotonic()
        if self.pending:
            return
        loop = tunnel.loop
        loop.remove_writer(self.dst)
        loop.add_reader(self.src, self.on_readable)
        self.settle()

    def settle(self) -> None:
        """What the stream's state asks for, once what it forwarded is all out."""
        stream = self.stream
        state = stream.state
        if state == HEAD:
            if stream.sniffer is not None:  # a head has begun: it has head_timeout
                arm_head(self)
                return
        elif state == TUNNEL:
            self._splice_from_now()
            return
        elif state == REFUSED:
            self._refused()
            return
        if self.deadline is not None:
            disarm_head(self)

    def _splice_body(self, stream: RequestStream) -> None:
        """Move the rest of a Content-Length body, at most ``stream.left`` bytes, by
        ``splice``: as :meth:`Flow.on_readable`, but counted."""
        tunnel = self.tunnel
        free = tunnel.free
        if not free and not self.new_pipe():
            return
        pipe = free[-1]
        try:
            n = splice(self.src, pipe[1], min(stream.left, PIPE_SIZE), None, None, SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            tunnel.close(failure_reason(exc, "client"), reset=True)
            return
        if n == 0:
            self._end()
            return
        self.nbytes += n
        if not tunnel.moved:
            tunnel.moved = True
            tunnel.pump.moved.add(tunnel)
        stream.left -= n
        if not stream.left:
            stream.state = stream.then
        try:
            m = splice(pipe[0], self.dst, n, None, None, SPLICE_FLAGS)
        except BlockingIOError:
            m = 0
        except OSError as exc:
            self.pipe, self.queued = free.pop(), n
            tunnel.close(failure_reason(exc, "server"), reset=True)
            return
        if m < n:
            self.pipe, self.queued = free.pop(), n - m
            loop = tunnel.loop
            loop.watch_failure(self.src, self.on_failure)
            loop.add_writer(self.dst, self.on_writable)

    def _splice_from_now(self) -> None:
        """An upgrade request went to the server: a plain flow takes this one's place."""
        tunnel = self.tunnel
        flow = Flow(tunnel, self.src, self.dst, "client")
        flow.nbytes, self.nbytes = self.nbytes, 0
        tunnel.up = flow
        tunnel.loop.add_reader(self.src, flow.on_readable)
        head, owner = self.stream.head, self.owner
        assert head is not None
        self.forget()
        del self.tunnel
        owner.request_upgraded(head)

    def _refused(self) -> None:
        """Nothing more goes to the server: it finishes its answers and closes, then the
        tunnel closes (the client is read on, and what it sends dropped)."""
        disarm_head(self)
        self.ended = True
        self.owner.request_refused(self.stream.reason)
        tunnel = self.tunnel
        if tunnel.down.ended:  # the server has closed already
            tunnel.close("server closed")
            return
        shutdown_write(self.dst)

    def expire(self) -> None:
        """The head timeout: the head begun is not complete (called by the deadlines)."""
        self.deadline = None
        tunnel = getattr(self, "tunnel", None)
        if tunnel is None or tunnel.closed or not hasattr(self, "stream"):
            return
        if head_expired(self, self.stream) and not self.pending and self.pipe is None:
            self.settle()  # else once they are out
